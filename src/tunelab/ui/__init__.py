"""`tunelab ui`: the local dashboard. app.py serves the page and the JSON API, jobs.py runs
the trainings it starts, forms.py turns recipes into the training form and back."""
