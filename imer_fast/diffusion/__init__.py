"""Diffusion models and samplers for missing-modality recovery (DDPM/DDIM, VE-SDE, DPM-Solver++)."""
