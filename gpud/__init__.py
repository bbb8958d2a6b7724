"""gpud: run LLM model replicas on the GPUs of one machine, served as one OpenAI-compatible endpoint."""

__version__ = "0.1.0"
