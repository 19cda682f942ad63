"""rporec_jax: RPORec (Rechead on LLM reasoning + GRPO reasoning refinement) in JAX/Flax."""

__version__ = "0.1.0"
