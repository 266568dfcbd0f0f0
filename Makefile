# The two commands of the README:
#   make demo   install everything, then train the embedded default (MiniLM on the demo set)
#   make test   install everything, then run the test suite
.PHONY: setup demo test test-fast bench

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/tunelab train

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"

bench: setup
	.venv/bin/python bench/run_all.py
