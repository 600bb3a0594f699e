"""`jax-gpt2 serve`: an OpenAI-compatible server, split as vLLM splits one.

    engine.py     slots, continuous batching, chunked prefill, prefix reuse (JAX; no web stack)
    protocol.py   the API's request and response shapes (pydantic)
    routes.py     the HTTP routes, the request gate (API key, body size), uvicorn with a bounded drain
    metrics.py    Prometheus metrics

Only engine.py is importable without the `serve` extra (FastAPI, uvicorn, prometheus_client).
"""
