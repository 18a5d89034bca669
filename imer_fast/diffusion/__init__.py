"""Diffusion models and samplers for missing-modality recovery.

- :class:`GaussianDiffusion`: DDPM schedules, ε-loss, DDPM / DDIM / DPM-Solver++(2M) samplers on fused steps
  (drop-in for FedDISC's ``GaussianDiffusion``);
- :class:`DISCDiffusion`: FedDISC's DISC-Diffusion recovery module;
- :class:`GraphedSampler`: a whole sampling loop replayed as one CUDA graph.
"""
from .disc import DISCDiffusion
from .gaussian import GaussianDiffusion
from .graphed import GraphedSampler

__all__ = ["DISCDiffusion", "GaussianDiffusion", "GraphedSampler"]
