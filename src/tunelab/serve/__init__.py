"""`tunelab serve`: an HTTP API over finished runs of every task (docs/serving.md).

    app.py         FastAPI app: classify, explain, tag, models, health, metrics; limits, API
                   key, Prometheus metrics; the `serve` command
    generation.py  /v1/generate and the OpenAI-compatible /v1/chat/completions (streamed or
                   not), run one at a time beside the batcher
    api.py         what the route modules share: errors, limits, finding the requested model
    pool.py        the served runs (and onnx/int8 exports) by name; classification adapter
                   runs on one base share it
    batcher.py     greedy micro-batching in a worker thread (a lone request never waits)
    threads.py     the rest of the torch work on threads that end with it (OpenMP's pools)
"""
