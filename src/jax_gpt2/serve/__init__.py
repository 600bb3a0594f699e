"""`jax-gpt2 serve`: the engine (continuous batching) and the HTTP routes over it."""
