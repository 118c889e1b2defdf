"""Cost-aware LLM query router: serves routing decisions from a trained bundle."""

__version__ = "0.1.0"
