"""The networks: the conditional diffusion generator, its LoRA adapters, the downstream heads, the model bundle."""
