"""megatron-moh: Mixture-of-Head attention on megatron-core."""

__version__ = "0.1.0"
