"""`jax-gpt2 serve`: an OpenAI-compatible server, split as vLLM splits one.

    engine.py     the scheduler: continuous batching at the active width, chunked prefill, prefix reuse
    slots.py      its device state (the slots' KV cache and per-row state) and the jitted programs on it
    programs.py   those programs compiled ahead of use (a first request's first, the rest in the background)
    protocol.py   the API's request and response shapes (pydantic)
    routes.py     the HTTP routes, the request gate (API key, body size), uvicorn with a bounded drain
    metrics.py    Prometheus metrics

engine.py and slots.py need no web stack; the rest needs the `serve` extra (FastAPI, uvicorn,
prometheus_client).
"""
