"""Diffusion maths: noise schedules, samplers and guidance, batched sampling, inpainting, the
training objective, the denoiser weights file."""
