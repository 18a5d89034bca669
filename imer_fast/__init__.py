"""imer_fast: kernel-fused PyTorch library for incomplete multimodal emotion recognition in conversation.

Subpackages load on first use so that ``imer_fast.data`` works without the compiled extension:
``imer_fast.ops`` (operators), ``imer_fast.nn`` (modules), ``imer_fast.diffusion`` (diffusion models and samplers), ``imer_fast.data`` (datasets, missing-modality
protocols, metrics), ``imer_fast.train`` (training loops), ``imer_fast.backends`` (backend selection).
"""
import importlib

__version__ = "0.1.0"

_SUBMODULES = ("backends", "data", "diffusion", "nn", "ops", "train")
_EXPORTS = {"DialogueGraphNetwork": "nn", "RGCNConv": "nn", "GraphConv": "nn", "CrossModalTransformer": "nn",
            "CondCrossAttention": "nn", "StableLayerNorm": "nn", "ConditionalUNet1d": "nn",
            "DISCDiffusion": "diffusion", "GaussianDiffusion": "diffusion",
            "ScoreNet": "nn", "VESDE": "diffusion"}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"imer_fast.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"imer_fast.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'imer_fast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES) + list(_EXPORTS))
