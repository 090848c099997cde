"""Foundations every layer uses: errors, atomic I/O, typed params, checkpoints, MLflow tracking, progress, signals, devices."""
