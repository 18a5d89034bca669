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
}
