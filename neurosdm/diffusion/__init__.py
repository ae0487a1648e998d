"""Gaussian diffusion (Ho et al. 2020) and its samplers: DDPM ancestral, DDIM (Song et al. 2021),
Analytic-DPM (Bao et al. 2022) and DPM-Solver-1/2/3 (Lu et al. 2022).

The denoiser is separate from the process: any callable ``model(x_t, t) -> eps``.
"""

from neurosdm.diffusion.analytic import analytic_variance, estimate_gamma, gamma_table, load_gamma, save_gamma
from neurosdm.diffusion.noise import ImageNoise, image_stream
from neurosdm.diffusion.samplers import SAMPLERS, dpm_solver_plan, host_ops_schedule, sample
from neurosdm.diffusion.schedules import GaussianDiffusion, make_betas

__all__ = [
    "GaussianDiffusion",
    "ImageNoise",
    "SAMPLERS",
    "analytic_variance",
    "dpm_solver_plan",
    "estimate_gamma",
    "gamma_table",
    "host_ops_schedule",
    "image_stream",
    "load_gamma",
    "make_betas",
    "sample",
    "save_gamma",
]
