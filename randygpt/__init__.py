"""randygpt: small character-level GPT models in JAX."""
