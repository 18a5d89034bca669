"""Triton GPU kernels of imer_fast (installed as ``imer_fast._kernels``)."""
