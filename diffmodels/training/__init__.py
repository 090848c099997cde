"""One training loop for every training stage, and its parts: resumable state, optimiser, precision, EMA, DDP."""
