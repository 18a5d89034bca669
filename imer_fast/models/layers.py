"""Which layer classes a model is built from: imer_fast's fused modules, or the eager twins of the
release semantics (``imer_fast.testing``) with every fused op forced to its ``_ref`` — the same
model, parameter for parameter, used as the baseline of the end-to-end benchmarks."""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable, ContextManager, Type

from torch import nn

IMPLEMENTATIONS = ("fused", "reference")


@dataclass(frozen=True)
class LayerSet:
    transformer: Type[nn.Module]          # MulT TransformerEncoder semantics
    unet: Type[nn.Module]                 # FedDISC UNetModel semantics
    dialogue_graph: Callable[..., nn.Module]  # GCNet GraphModel(adim, tdim, vdim, D_e, graph_hidden, ...)
    context: Callable[[], ContextManager]     # wraps every call (backend forcing for the reference)


def layer_set(implementation: str) -> LayerSet:
    if implementation == "fused":
        from ..nn import ConditionalUNet1d, CrossModalTransformer, DialogueGraphNetwork

        # partials of module-level callables, not lambdas: a model holding its LayerSet pickles whole
        return LayerSet(CrossModalTransformer, ConditionalUNet1d, functools.partial(DialogueGraphNetwork, "LSTM"),
                        contextlib.nullcontext)
    if implementation == "reference":
        from .. import backends
        from ..testing.reference_feddisc import ReferenceUNetModel
        from ..testing.reference_gcnet import ReferenceGraphModel
        from ..testing.reference_mult import ReferenceTransformerEncoder

        return LayerSet(ReferenceTransformerEncoder, ReferenceUNetModel, _reference_graph_model,
                        functools.partial(backends.force, "reference"))
    raise ValueError(f"layers: expected one of {IMPLEMENTATIONS}; got {implementation!r}")


def _reference_graph_model(adim, tdim, vdim, D_e, graph_hidden, n_speakers, *args, **kwargs) -> nn.Module:
    """GCNet's GraphModel twin with imer_fast's canonical relation ids (the release's come from a set)."""
    from ..ops import relation_names
    from ..testing.reference_gcnet import ReferenceGraphModel

    model = ReferenceGraphModel(adim, tdim, vdim, D_e, graph_hidden, n_speakers, *args, **kwargs)
    model.relation_ids = {kind: {name: i for i, name in enumerate(relation_names(kind, n_speakers))}
                          for kind in ("temporal", "speaker")}
    return model
