"""Retrieval and out-of-distribution metrics."""
