"""imer_fast operators (``torch.ops.imer_fast.*``) and their public Python entry points.

Each operator has a pure-torch ``<op>_ref`` twin, a C++ CPU kernel, a Triton GPU kernel, a fake
implementation, autograd where it is differentiable, and one ``select_<op>_backend`` function.
"""
import torch

from ._runtime import triton_on_cpu
from .attention import MASK_KINDS, attention, attention_ref, select_attention_backend
from .counter_rng import counter_normal, counter_normal_ref, select_counter_normal_backend
from .dialogue_graph import (
    RELATION_KINDS,
    DialogueGraph,
    build_dialogue_graph,
    build_dialogue_graph_ref,
    num_relations_of,
    relation_map_from_names,
    relation_names,
    select_build_dialogue_graph_backend,
)
from .group_norm import group_norm_film_silu, group_norm_film_silu_ref, select_group_norm_film_silu_backend
from .layer_norm import select_stable_layer_norm_backend, stable_layer_norm, stable_layer_norm_ref
from .mult_layer import MultLayerWeights, mult_layer, mult_layer_ref, select_mult_layer_backend
from .relational_csr import RelationalGraph, relational_csr, relational_csr_ref, select_relational_csr_backend
from .rgcn import graph_conv, graph_conv_ref, rgcn_conv, rgcn_conv_ref, select_rgcn_conv_backend
from .sampler_steps import (add_scaled_noise, add_scaled_noise_ref, ddim_step, ddpm_step, diffusion_step_ref,
                            select_sampler_step_backend, ve_em_step, ve_em_step_ref)
from .timestep_embedding import (gaussian_fourier_embedding, select_timestep_embedding_backend,
                                 sinusoidal_timestep_embedding, timestep_embedding_ref)
from .winograd_conv import (fewest_rows_tile, select_winograd_conv1d_backend, winograd_conv1d, winograd_conv1d_ref,
                            winograd_weight)

# Under torch.autocast every imer_fast operator computes in float32, as torch's normalisations do: its
# float16 / bfloat16 / float32 inputs are cast (float64 stays) and autocast is off inside it, so its
# kernels' own ATen calls (the GEMMs of the C++ MulT layer and graph convolution) keep float32 too. The
# public functions cast first as well (_runtime.under_autocast), so their dtype checks see one dtype.
_OPERATORS = ("add_scaled_noise", "attention", "attention_backward", "build_dialogue_graph", "counter_normal",
              "diffusion_step", "group_norm_film_silu", "group_norm_film_silu_backward", "mult_layer",
              "mult_layer_backward", "relational_csr", "rgcn_conv", "rgcn_conv_backward", "stable_layer_norm",
              "stable_layer_norm_backward", "timestep_embedding", "ve_em_step", "winograd_conv1d")


def _register_autocast() -> None:
    # torch.library.register_autocast is torch >= 2.7. On torch 2.6 the operators have no autocast kernel:
    # the public functions cast under autocast themselves (_runtime.under_autocast), only a direct
    # torch.ops call inside an autocast region gets its inputs as they are.
    if not hasattr(torch.library, "register_autocast"):
        return
    for name in _OPERATORS:
        for device_type in ("cpu", "cuda"):
            torch.library.register_autocast(f"imer_fast::{name}", device_type, torch.float32)


_register_autocast()

__all__ = [
    "MASK_KINDS", "attention", "attention_ref", "select_attention_backend",
    "MultLayerWeights", "mult_layer", "mult_layer_ref", "select_mult_layer_backend",
    "RELATION_KINDS", "DialogueGraph", "RelationalGraph", "build_dialogue_graph", "build_dialogue_graph_ref",
    "graph_conv", "graph_conv_ref", "num_relations_of", "relation_map_from_names", "relation_names",
    "relational_csr", "relational_csr_ref", "rgcn_conv", "rgcn_conv_ref", "select_build_dialogue_graph_backend",
    "select_relational_csr_backend", "select_rgcn_conv_backend", "select_stable_layer_norm_backend",
    "stable_layer_norm", "stable_layer_norm_ref", "triton_on_cpu",
    "counter_normal", "counter_normal_ref", "select_counter_normal_backend",
    "group_norm_film_silu", "group_norm_film_silu_ref", "select_group_norm_film_silu_backend",
    "add_scaled_noise", "add_scaled_noise_ref", "ddim_step", "ddpm_step", "diffusion_step_ref",
    "select_sampler_step_backend", "ve_em_step", "ve_em_step_ref",
    "gaussian_fourier_embedding", "select_timestep_embedding_backend", "sinusoidal_timestep_embedding",
    "timestep_embedding_ref",
    "select_winograd_conv1d_backend", "winograd_conv1d", "winograd_conv1d_ref", "winograd_weight", "fewest_rows_tile",
]
