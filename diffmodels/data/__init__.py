"""Data on disk: datasets and splits, mask sets, pixel conversions and PNGs, the latent cache."""
