"""Masked Autoencoders (He et al., 2021): model, data, pretraining, probing.

Plain PyTorch; this package never imports Ray (ray_jobs/ wraps it).
"""

__version__ = "0.1.0"
