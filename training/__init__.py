"""Offline pipeline: routing tables -> embeddings -> heads -> evaluation -> bundle."""
