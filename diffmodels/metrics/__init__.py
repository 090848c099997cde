"""Evaluation metrics: FID/KID (``fid``); leakage, seam and fidelity metrics join here."""
