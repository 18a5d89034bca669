"""Whole-sampler CUDA graphs: one replay runs every step of a sampling loop with no host work.

A sampling loop is 50–1,000 denoiser calls of a few hundred small kernels each; launched from
Python each kernel costs 5–30 µs of host time, inside a CUDA graph about 1 µs. :class:`GraphedSampler`
captures a whole loop once (model calls, fused steps, timestep tensors) and replays it:

    graphed = GraphedSampler(lambda y, seed: diffusion.ddim_sample(model, y, 48, y.shape[0], 32, seed=seed),
                             y_example)
    x = graphed(y, seed=1234)          # copies y and the seed into the static buffers and replays

The loop must draw its noise from the in-kernel counter generator with the seed given as the
static 0-d int64 tensor (``seed=`` of the imer_fast samplers accepts it), so a new seed changes the
noise of a replay; it must not synchronise with the host (no ``.item()``, no data-dependent
shapes), and every per-step constant becomes part of the graph. Shapes, dtype and device are fixed at
capture: build one GraphedSampler per batch size.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

SampleFn = Callable[[Tensor, Tensor], Tensor]


class GraphedSampler:
    """A sampling loop ``sample_fn(y, seed) -> x`` captured into one CUDA graph (module doc).

    Args:
        sample_fn: runs the whole loop from the condition ``y`` and the seed tensor.
        y_example: a condition of the shape, dtype and device every call will use.
        warmup: eager runs on a side stream before capture (Triton compiles kernels on first use,
            which cannot happen inside a capture).
    """

    def __init__(self, sample_fn: SampleFn, y_example: Tensor, *, warmup: int = 2):
        if not isinstance(y_example, Tensor) or y_example.device.type != "cuda":
            where = y_example.device if isinstance(y_example, Tensor) else type(y_example).__name__
            raise ValueError(f"GraphedSampler: y_example must be a CUDA tensor; got {where} "
                             "(CUDA graphs need a GPU; on CPU call the sampler directly)")
        if warmup < 1:
            raise ValueError(f"GraphedSampler: warmup must be >= 1; got {warmup}")
        self.static_y = y_example.detach().clone()
        self.static_seed = torch.zeros((), dtype=torch.int64, device=y_example.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(warmup):
                sample_fn(self.static_y, self.static_seed)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_out = sample_fn(self.static_y, self.static_seed)

    def __call__(self, y: Tensor, seed: int) -> Tensor:
        """Run the captured loop for condition ``y`` and noise ``seed``; returns a fresh tensor."""
        if y.shape != self.static_y.shape or y.dtype != self.static_y.dtype:
            raise ValueError(f"GraphedSampler: y must be {tuple(self.static_y.shape)} {self.static_y.dtype} "
                             f"(the captured shape); got {tuple(y.shape)} {y.dtype}")
        self.static_y.copy_(y)
        self.static_seed.fill_(int(seed))
        self.graph.replay()
        return self.static_out.clone()
