"""Diffusion models and samplers for missing-modality recovery.

- :class:`GaussianDiffusion`: DDPM schedules, ε-loss, DDPM / DDIM / DPM-Solver++(2M) samplers on fused steps
  (drop-in for FedDISC's ``GaussianDiffusion``);
- :class:`DISCDiffusion`: FedDISC's DISC-Diffusion recovery module;
- :class:`VESDE`, :func:`ve_sde_loss`, :func:`euler_maruyama_sampler`: IMDer's VE-SDE score matching and
  Euler–Maruyama sampler on fused steps;
- :class:`GraphedSampler`: a whole sampling loop replayed as one CUDA graph.
"""
from .disc import DISCDiffusion, pooled_scaling
from .gaussian import GaussianDiffusion
from .graphed import GraphedSampler
from .ve_sde import VESDE, euler_maruyama_sampler, ve_sde_loss

__all__ = ["DISCDiffusion", "pooled_scaling", "GaussianDiffusion", "GraphedSampler", "VESDE", "euler_maruyama_sampler", "ve_sde_loss"]
