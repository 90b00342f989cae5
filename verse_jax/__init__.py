"""verse-jax: the Payer et al. VerSe 2019 pipeline in JAX/Flax, built for throughput."""

__version__ = "0.1.0"
