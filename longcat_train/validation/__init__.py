"""Validation renders and the official sampler."""

from .denoise import cfg_zero_star, denoise, make_scheduler, sampling_sigmas

__all__ = ["cfg_zero_star", "denoise", "make_scheduler", "sampling_sigmas"]
