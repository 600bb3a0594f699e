"""jax-gpt2."""
