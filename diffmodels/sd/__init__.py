"""Stable Diffusion v1-5 from scratch (SPEC 7): CLIP text encoder and tokenizer, UNet, VAE,
and a converter from the original single-file checkpoint."""
