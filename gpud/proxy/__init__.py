"""The OpenAI-compatible endpoint: routing, balancing, the hop to the replicas, metrics."""
