"""Datasets: sources, aspect-ratio buckets, the preprocessing cache and the cached loader."""
