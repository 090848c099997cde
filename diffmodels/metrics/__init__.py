"""Evaluation metrics: FID/KID (``fid``), leakage across a mask boundary (``leakage``),
preserved-region fidelity (``fidelity``) and the seam score (``seam``); docs/metrics.md"""
