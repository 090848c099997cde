"""The networks: localized VAE, denoiser UNet, serpentine blocks, selective state-space layer. No I/O, no noise schedule."""
