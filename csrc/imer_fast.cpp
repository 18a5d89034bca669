// Operator schemas of the imer_fast library. Kernels register per dispatch key in csrc/cpu
// (C++), csrc/cuda (CUDA C++) and, from Python, kernels/ (Triton); fake (meta) kernels and autograd
// are registered from Python (imer_fast/ops).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import imer_fast._C` only has to load this shared object so that the static TORCH_LIBRARY
// registrations below run; the module itself exposes nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
}

TORCH_LIBRARY(imer_fast, m) {
  // Dialogue graph of a batch of conversations (GCNet / DialogueGCN conventions), edges sorted by
  // target then source. Returns (edge_index [2, E] (row 0 source, row 1 target), edge_type [E],
  // rowptr [N + 1] over targets).
  m.def(
      "build_dialogue_graph(Tensor lengths, Tensor speakers, int window_past, int window_future, "
      "str relations, int num_speakers) -> (Tensor, Tensor, Tensor)");
  // Stable counting sort of a typed edge list into CSR keyed by (target, relation) and its
  // transpose keyed by (source, relation). Returns (seg_ptr, col, perm, t_seg_ptr, t_col, t_eid).
  m.def("relational_csr(Tensor edge_index, Tensor edge_type, int num_nodes, int num_relations) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // out[i] = x[i] @ root + bias + sum_r sum_{e in seg(i, r)} scale[e] * x[col[e]] @ weight[r]
  m.def(
      "rgcn_conv(Tensor x, Tensor weight, Tensor? root, Tensor? bias, Tensor seg_ptr, Tensor col, "
      "Tensor? scale, Tensor t_seg_ptr, Tensor t_col, Tensor t_eid, int max_degree) -> Tensor");
  // Gradients of rgcn_conv for x, weight, root and scale (bias: grad_out.sum(0)). Outputs that
  // output_mask does not ask for come back as empty tensors.
  m.def(
      "rgcn_conv_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor? root, Tensor seg_ptr, "
      "Tensor col, Tensor? scale, Tensor t_seg_ptr, Tensor t_col, Tensor t_eid, int max_degree, "
      "bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Flash-style attention, never materialising the Lq x Lk scores (spec: imer_fast/ops/attention.py).
  // Padded layout: q [B, H, Lq, D], k/v [B, H, Lk, D], key_mask [B, Lk]; varlen layout (cu_seqlens
  // given): q [Tq, H, D], k/v [Tk, H, D], key_mask [Tk]. Any strides. null_k/null_v [H, Nn, D] are
  // always-visible keys prepended to every sequence. mask_kind 0 none, 1 causal, 2 MulT future mask.
  // Returns (out like q, lse: [B, H, Lq] or [H, Tq], float32 (float64 for float64 q), +inf for rows
  // without a valid key).
  m.def(
      "attention(Tensor q, Tensor k, Tensor v, Tensor? key_mask, Tensor? null_k, Tensor? null_v, "
      "Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float scale, "
      "int mask_kind, float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor)");
  // Gradients of attention for (q, k, v, null_k, null_v); outputs not asked for by output_mask (or
  // without a null token) come back as empty tensors.
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_mask, Tensor? null_k, Tensor? null_v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, float scale, int mask_kind, float dropout_p, "
      "Tensor? dropout_seed, bool[5] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One pre-norm MulT encoder layer on [N = L * B, E] rows in (L, B) order (spec:
  // imer_fast/ops/mult_layer.py): self-attention when xk is absent, keys and values from xk when xv is
  // absent, else from xk and xv; every input normalised by layer_norms[0]. The *_keep tensors are
  // dropout factors (0 or 1 / (1 - p)) for the attention residual, the relu and the feed-forward
  // residual. Returns (out [N, E], the tensors mult_layer_backward needs).
  m.def(
      "mult_layer(Tensor x, Tensor? xk, Tensor? xv, Tensor ln0_weight, Tensor ln0_bias, Tensor in_proj_weight, "
      "Tensor in_proj_bias, Tensor out_proj_weight, Tensor out_proj_bias, Tensor ln1_weight, Tensor ln1_bias, "
      "Tensor fc1_weight, Tensor fc1_bias, Tensor fc2_weight, Tensor fc2_bias, Tensor? key_mask, "
      "Tensor? attn_res_keep, Tensor? relu_keep, Tensor? ffn_res_keep, int batch, int num_heads, float ln0_eps, "
      "float ln1_eps, float scale, int mask_kind, float dropout_p, Tensor? dropout_seed) -> (Tensor, Tensor[])");
  // Gradients of mult_layer for (x, xk, xv, ln0 weight/bias, in_proj weight/bias, out_proj
  // weight/bias, ln1 weight/bias, fc1 weight/bias, fc2 weight/bias); empty tensors for absent xk / xv.
  m.def(
      "mult_layer_backward(Tensor grad_out, Tensor[] saved, Tensor x, Tensor? xk, Tensor? xv, Tensor ln0_weight, "
      "Tensor ln0_bias, Tensor in_proj_weight, Tensor out_proj_weight, Tensor ln1_weight, Tensor ln1_bias, "
      "Tensor fc1_weight, Tensor fc2_weight, Tensor? key_mask, Tensor? attn_res_keep, Tensor? relu_keep, "
      "Tensor? ffn_res_keep, int batch, int num_heads, float scale, int mask_kind, float dropout_p, "
      "Tensor? dropout_seed) -> Tensor[]");
  // LayerNorm over the last dimension of x, optionally "stable" (FedDISC/Imagen): x is first divided
  // by its detached row maximum. Returns (y, mean, rstd, row_max) with the statistics of x / row_max
  // (row_max = 1 when not stable), shaped x.shape[:-1], float32 (float64 for float64 x).
  m.def("stable_layer_norm(Tensor x, Tensor? weight, Tensor? bias, float eps, bool stable) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
  // Gradients of stable_layer_norm for (x, weight, bias); row_max is treated as a constant.
  m.def(
      "stable_layer_norm_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
      "Tensor row_max, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Standard normals from the counter generator (spec: imer_fast/ops/counter_rng.py): element i of
  // draw `offset` under the int64 `seed` (a one-element tensor, read on the device) depends on
  // (seed, offset, i) only. The output lives on seed's device.
  m.def("counter_normal(Tensor seed, int offset, int[] size, ScalarType dtype) -> Tensor");
  // One DDPM / DDIM update (imer_fast/ops/sampler_steps.py): x0 = p*x - q*eps, clamped to [-1, 1]
  // when clip; out = r*x0 + s*x + u*eps + sigma*z, z from noise or from the counter generator at
  // (seed, offset) (not drawn when sigma == 0).
  m.def(
      "diffusion_step(Tensor x, Tensor eps, float p, float q, bool clip, float r, float s, float u, "
      "float sigma, Tensor? noise, Tensor? seed, int offset) -> Tensor");
  // One VE-SDE Euler-Maruyama update: mean = x + drift*score; x_next = mean + diffusion*z.
  // Returns (x_next, mean).
  m.def(
      "ve_em_step(Tensor x, Tensor score, float drift, float diffusion, Tensor? noise, Tensor? seed, "
      "int offset) -> (Tensor, Tensor)");
  // x + std*z with std one value per leading index ([B], B = x.shape[0]) or the scalar std_scalar.
  m.def(
      "add_scaled_noise(Tensor x, Tensor? std, float std_scalar, Tensor? noise, Tensor? seed, int offset) "
      "-> Tensor");
  // Timestep features [N, dim]: angle = (t * freqs) * scale per (row, frequency), the first half
  // sin (sin_first) or cos of the angles, the second half the other, a zero last column when dim is odd
  // (spec: imer_fast/ops/timestep_embedding.py). Sinusoidal and Gaussian Fourier embeddings.
  m.def("timestep_embedding(Tensor t, Tensor freqs, float scale, bool sin_first, int dim) -> Tensor");
  // Convolution of x [B, C, L] with a kernel of 3 taps, stride 1, padding 1, as Winograd F(n, 3):
  // weight_tf [n + 2, C, Co] is the transformed kernel (imer_fast.ops.winograd_weight, n = 2, 4 or 6), bias
  // [Co] optional, residual [B, Co, L] optional (added to the output). Returns [B, Co, L] stored
  // channels-last ([B, L, Co] in memory) (spec: imer_fast/ops/winograd_conv.py).
  m.def("winograd_conv1d(Tensor x, Tensor weight_tf, Tensor? bias, Tensor? residual) -> Tensor");
  // GroupNorm over x [B, C, *spatial] (num_groups groups of channels), with an optional per-sample
  // channel bias added before it, the optional affine, an optional FiLM x * (1 + scale) + shift
  // (scale / shift [B, C] or [B, C, 1]) and an optional SiLU: the diffusion U-Nets' block prologue
  // (spec: imer_fast/ops/group_norm.py). Returns (y like x, mean [B, G], rstd [B, G]) with float32
  // statistics (float64 for float64 x).
  m.def(
      "group_norm_film_silu(Tensor x, Tensor? weight, Tensor? bias, Tensor? input_bias, Tensor? scale, "
      "Tensor? shift, int num_groups, float eps, bool apply_silu) -> (Tensor, Tensor, Tensor)");
  // Gradients for (x, weight, bias, input_bias, scale, shift); unrequested or absent ones are empty.
  m.def(
      "group_norm_film_silu_backward(Tensor grad_y, Tensor x, Tensor? weight, Tensor? bias, "
      "Tensor? input_bias, Tensor? scale, Tensor? shift, Tensor mean, Tensor rstd, int num_groups, "
      "bool apply_silu, bool[6] output_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
