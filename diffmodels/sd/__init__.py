"""Stable Diffusion v1-5 from scratch (docs/maths.md#stable-diffusion-v1-5): CLIP text encoder and
tokenizer, UNet, VAE, pipelines and baselines, and a converter from the original checkpoints."""
