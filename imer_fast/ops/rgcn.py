"""Relational graph convolution: ``imer_fast::rgcn_conv`` and the public ``rgcn_conv`` / ``graph_conv``.

Semantics (PyG): for node i,

    out[i] = x[i] @ root + bias + sum_r AGG_{j in N_r(i)} (w_ji * x[j]) @ weight[r]

with AGG the mean (PyG ``RGCNConv`` default) or the sum (``GraphConv`` default, DialogueGCN's
``edge_norm`` graphs). ``graph_conv`` is the single-relation case of the same operator with
``weight = lin_rel.weight^T``, ``root = lin_root.weight^T`` and ``bias = lin_rel.bias``. Optional
per-edge weights w (DialogueGCN's edge attention) are differentiable; PyG's RGCNConv has none, and
with ``aggr="mean"`` we average the weighted messages.

Backends (:func:`select_rgcn_conv_backend`): Triton on CUDA (``kernels/rgcn.py``: fused gather-GEMM,
no [N, R*Fin] intermediate), C++ on CPU (``csrc/cpu/rgcn_conv.cpp``: one deterministic gather then
one GEMM), and the pure-torch :func:`rgcn_conv_ref`. Double backward is not supported.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from . import _runtime
from .relational_csr import RelationalGraph

_runtime.require_cpp()

AGGREGATIONS = ("mean", "add")


def rgcn_conv_ref(
    x: Tensor, edge_index: Tensor, edge_type: Tensor, weight: Tensor, root: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, edge_weight: Optional[Tensor] = None, aggr: str = "mean",
) -> Tensor:
    """Pure-torch twin written from the math over the unsorted edge list, one relation at a time."""
    num_nodes, num_relations = x.shape[0], weight.shape[0]
    src, tgt = edge_index[0], edge_index[1]
    out = x @ root if root is not None else x.new_zeros(num_nodes, weight.shape[2])
    for r in range(num_relations):
        in_r = edge_type == r
        messages = x[src[in_r]]
        if edge_weight is not None:
            messages = messages * edge_weight[in_r].unsqueeze(-1)
        summed = x.new_zeros(num_nodes, x.shape[1]).index_add(0, tgt[in_r], messages)
        if aggr == "mean":
            count = torch.bincount(tgt[in_r], minlength=num_nodes).clamp(min=1)
            summed = summed / count.unsqueeze(-1).to(x.dtype)
        out = out + summed @ weight[r]
    return out + bias if bias is not None else out


def graph_conv_ref(
    x: Tensor, edge_index: Tensor, lin_rel_weight: Tensor, lin_rel_bias: Optional[Tensor], lin_root_weight: Tensor,
    edge_weight: Optional[Tensor] = None, aggr: str = "add",
) -> Tensor:
    """PyG ``GraphConv``: ``lin_rel(AGG_j w_ji x_j) + lin_root(x_i)``, from the math."""
    src, tgt = edge_index[0], edge_index[1]
    messages = x[src] if edge_weight is None else x[src] * edge_weight.unsqueeze(-1)
    summed = x.new_zeros(x.shape).index_add(0, tgt, messages)
    if aggr == "mean":
        summed = summed / torch.bincount(tgt, minlength=x.shape[0]).clamp(min=1).unsqueeze(-1).to(x.dtype)
    return torch.nn.functional.linear(summed, lin_rel_weight, lin_rel_bias) + x @ lin_root_weight.t()


# ---- operator registration: fake, autograd, CUDA (Triton) ------------------------------------


@torch.library.register_fake("imer_fast::rgcn_conv")
def _rgcn_conv_fake(x, weight, root, bias, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid, max_degree):
    return x.new_empty(x.shape[0], weight.shape[2])


@torch.library.register_fake("imer_fast::rgcn_conv_backward")
def _rgcn_conv_backward_fake(grad_out, x, weight, root, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid, max_degree,
                             output_mask):
    return (
        x.new_empty(x.shape) if output_mask[0] else x.new_empty(0),
        weight.new_empty(weight.shape) if output_mask[1] else x.new_empty(0),
        root.new_empty(root.shape) if output_mask[2] and root is not None else x.new_empty(0),
        scale.new_empty(scale.shape) if output_mask[3] and scale is not None else x.new_empty(0),
    )


def _setup_context(ctx, inputs, output):
    x, weight, root, bias, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid, max_degree = inputs
    ctx.save_for_backward(x, weight, root, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid)
    ctx.max_degree = max_degree
    ctx.has_root, ctx.has_bias, ctx.has_scale = root is not None, bias is not None, scale is not None


def _backward(ctx, grad_out):
    x, weight, root, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [needs[0], needs[1], ctx.has_root and needs[2], ctx.has_scale and needs[6]]
    grads = [None] * 11
    if any(mask):
        gx, gw, groot, gscale = torch.ops.imer_fast.rgcn_conv_backward(
            grad_out.contiguous(), x, weight, root, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid, ctx.max_degree,
            mask,
        )
        for slot, flag, grad in ((0, mask[0], gx), (1, mask[1], gw), (2, mask[2], groot), (6, mask[3], gscale)):
            grads[slot] = grad if flag else None
    if ctx.has_bias and needs[3]:
        grads[3] = grad_out.sum(0)
    return tuple(grads)


torch.library.register_autograd("imer_fast::rgcn_conv", _backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("imer_fast.rgcn_conv: double backward (gradients of gradients) is not supported")


torch.library.register_autograd("imer_fast::rgcn_conv_backward", _no_double_backward,
                                setup_context=lambda ctx, inputs, output: None)


def _rgcn_conv_triton(x, weight, root, bias, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid, max_degree):
    from imer_fast._kernels import rgcn as kernels

    return kernels.rgcn_conv_forward(x, weight, root, bias, seg_ptr, col, scale, max_degree)


def _rgcn_conv_backward_triton(grad_out, x, weight, root, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid, max_degree,
                               output_mask):
    from imer_fast._kernels import rgcn as kernels

    return kernels.rgcn_conv_backward(grad_out, x, weight, root, seg_ptr, col, scale, t_seg_ptr, t_col, t_eid,
                                      max_degree, list(output_mask))


for _name, _kernel in (("rgcn_conv", _rgcn_conv_triton), ("rgcn_conv_backward", _rgcn_conv_backward_triton)):
    torch.library.register_kernel(f"imer_fast::{_name}", "cuda", _kernel)
    _runtime.register_triton_cpu_route(_name, _kernel)


# ---- backend selection and the public functions -----------------------------------------------

# Both kernels take every floating dtype (the C++ one computes half types in float32).
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@backends.register_selector("rgcn_conv")
def select_rgcn_conv_backend(x: Tensor) -> backends.Choice:
    """Priority: Triton (CUDA), C++ (CPU), reference. Other devices run the reference."""
    on, dtype = x.device, x.dtype
    return backends.choose(
        "rgcn_conv",
        [
            ("triton", lambda: _runtime.triton_cannot_run(on)
             or (None if dtype in _KERNEL_DTYPES else f"dtype {dtype} is not one of {_KERNEL_DTYPES}")),
            ("cpp", lambda: (_runtime.cpp_error() or (None if on.type == "cpu" else f"tensors are on {on.type}, not cpu"))
             or (None if dtype in _KERNEL_DTYPES else f"dtype {dtype} is not one of {_KERNEL_DTYPES}")),
            ("reference", lambda: None),
        ],
    )


def _check_conv_inputs(op: str, x: Tensor, graph: RelationalGraph, tensors: dict, aggr: str) -> None:
    if not isinstance(graph, RelationalGraph):
        raise TypeError(f"{op}: graph must be an imer_fast RelationalGraph (RelationalGraph.from_edges or "
                        f"build_dialogue_graph); got {type(graph).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{x.dtype} of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be a floating tensor of shape [num_nodes, in_channels]; got {got}")
    if x.shape[0] != graph.num_nodes:
        raise ValueError(f"{op}: x has {x.shape[0]} rows but the graph has num_nodes = {graph.num_nodes}")
    if aggr not in AGGREGATIONS:
        raise ValueError(f"{op}: aggr must be one of {AGGREGATIONS}; got {aggr!r}")
    for name, t in tensors.items():
        if t is None and name in ("weight", "lin_rel_weight", "lin_root_weight"):
            raise ValueError(f"{op}: {name} is required; got None")
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor; got {type(t).__name__}")
        if t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {x.dtype}")
    if graph.seg_ptr.device != x.device:
        raise ValueError(f"{op}: the graph is on {graph.seg_ptr.device} but x is on {x.device}; use graph.to(device)")
    edge_weight = tensors.get("edge_weight")
    if edge_weight is not None and edge_weight.shape != (graph.edge_index.shape[1],):
        raise ValueError(f"{op}: edge_weight must have shape [E = {graph.edge_index.shape[1]}]; got "
                         f"{tuple(edge_weight.shape)}")


def rgcn_conv(
    x: Tensor, graph: RelationalGraph, weight: Tensor, root: Optional[Tensor] = None, bias: Optional[Tensor] = None,
    edge_weight: Optional[Tensor] = None, aggr: str = "mean",
) -> Tensor:
    """Relational graph convolution (see module doc). ``weight`` [R, Fin, Fout], ``root`` [Fin, Fout],
    ``bias`` [Fout], ``edge_weight`` [E] in the order of ``graph.edge_index``."""
    op = "imer_fast.rgcn_conv"
    x, weight, root, bias, edge_weight = _runtime.under_autocast(x, weight, root, bias, edge_weight)
    _check_conv_inputs(op, x, graph, {"weight": weight, "root": root, "bias": bias, "edge_weight": edge_weight}, aggr)
    if weight.dim() != 3 or weight.shape[0] != graph.num_relations or weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight must have shape [num_relations = {graph.num_relations}, in_channels = "
                         f"{x.shape[1]}, out_channels]; got {tuple(weight.shape)}")
    fin, fout = weight.shape[1], weight.shape[2]
    if root is not None and tuple(root.shape) != (fin, fout):
        raise ValueError(f"{op}: root must have shape [in_channels, out_channels] = [{fin}, {fout}]; got "
                         f"{tuple(root.shape)}")
    if bias is not None and tuple(bias.shape) != (fout,):
        raise ValueError(f"{op}: bias must have shape [out_channels = {fout}]; got {tuple(bias.shape)}")
    if select_rgcn_conv_backend(x).backend == "reference":
        return rgcn_conv_ref(x, graph.edge_index, graph.edge_type, weight, root, bias, edge_weight, aggr)
    scale = graph.edge_scale(edge_weight, aggr, x.dtype)
    return torch.ops.imer_fast.rgcn_conv(x, weight, root, bias, graph.seg_ptr, graph.col, scale, graph.t_seg_ptr,
                                         graph.t_col, graph.t_eid, graph.max_degree)


def graph_conv(
    x: Tensor, graph: RelationalGraph, lin_rel_weight: Tensor, lin_rel_bias: Optional[Tensor], lin_root_weight: Tensor,
    edge_weight: Optional[Tensor] = None, aggr: str = "add",
) -> Tensor:
    """PyG ``GraphConv`` (weights in ``nn.Linear`` layout [out, in]); edge types are ignored."""
    op = "imer_fast.graph_conv"
    x, lin_rel_weight, lin_rel_bias, lin_root_weight, edge_weight = _runtime.under_autocast(
        x, lin_rel_weight, lin_rel_bias, lin_root_weight, edge_weight)
    tensors = {"lin_rel_weight": lin_rel_weight, "lin_rel_bias": lin_rel_bias, "lin_root_weight": lin_root_weight,
               "edge_weight": edge_weight}
    _check_conv_inputs(op, x, graph, tensors, aggr)
    if (lin_rel_weight.dim() != 2 or lin_rel_weight.shape[1] != x.shape[1]
            or lin_root_weight.shape != lin_rel_weight.shape):
        raise ValueError(f"{op}: lin_rel_weight and lin_root_weight must both have shape [out_channels, in_channels = "
                         f"{x.shape[1]}]; got {tuple(lin_rel_weight.shape)} and {tuple(lin_root_weight.shape)}")
    if lin_rel_bias is not None and tuple(lin_rel_bias.shape) != (lin_rel_weight.shape[0],):
        raise ValueError(f"{op}: lin_rel_bias must have shape [out_channels = {lin_rel_weight.shape[0]}]; got "
                         f"{tuple(lin_rel_bias.shape)}")
    if select_rgcn_conv_backend(x).backend == "reference":
        return graph_conv_ref(x, graph.edge_index, lin_rel_weight, lin_rel_bias, lin_root_weight, edge_weight, aggr)
    single = graph.single_relation()
    scale = single.edge_scale(edge_weight, aggr, x.dtype)
    return torch.ops.imer_fast.rgcn_conv(x, lin_rel_weight.t().unsqueeze(0), lin_root_weight.t(), lin_rel_bias,
                                         single.seg_ptr, single.col, scale, single.t_seg_ptr, single.t_col,
                                         single.t_eid, single.max_degree)
