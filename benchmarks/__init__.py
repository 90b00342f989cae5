"""Speed and memory measurements of verse-jax (``python benchmarks/<name>.py``; README)."""
