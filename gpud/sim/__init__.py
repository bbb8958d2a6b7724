"""The simulated engine: an OpenAI-compatible server that uses no GPU (its own process)."""
