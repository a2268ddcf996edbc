"""Reproducible CycleGAN experiments: DVC stages from data to FID/KID, tracked in MLflow."""
__version__ = "0.1.0"
