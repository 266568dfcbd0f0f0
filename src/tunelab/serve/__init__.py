"""`tunelab serve`: an HTTP API over finished runs.

    app.py      FastAPI endpoints, limits, API key, Prometheus metrics, the `serve` command
    pool.py     the served runs by name; adapter runs on one base share its weights
    batcher.py  dynamic micro-batching in a worker thread
"""
