"""Gaussian diffusion (Ho et al. 2020) and its samplers (DDPM ancestral, DDIM of Song et al. 2021).

The denoiser is separate from the process: any callable ``model(x_t, t) -> eps``.
"""

from neurosdm.diffusion.samplers import SAMPLERS, sample
from neurosdm.diffusion.schedules import GaussianDiffusion, make_betas

__all__ = ["GaussianDiffusion", "SAMPLERS", "make_betas", "sample"]
