// CPU kernels of imer_fast::rgcn_conv (relational graph convolution, PyG RGCNConv/GraphConv
// semantics): out[i] = x[i] @ root + bias + sum_r sum_{k in seg(i, r)} scale[k] * x[col[k]] @ weight[r].
//
// Only the (node, relation) pairs that have edges are multiplied: dialogue graphs leave many empty
// (a target meets only its own speaker pairings), and PyG, like a dense [N, R * Fin] product, spends
// FLOPs on those zero rows. The work is one GEMM per relation on the compact rows plus gathers, with
// the order chosen by width so the gathers move the narrower side:
// - aggregate-first (Fin < Fout): H[(i, r)] = sum_k scale * x[src], then out += H_r @ W_r;
// - transform-first (Fout <= Fin): Y[(j, r)] = x[j] @ W_r for sources j, then out[i] += sum_k scale * Y.
// No per-edge weight copies. Every output row is written by one thread (the transposed CSR serves
// the backward gathers): no atomics, bitwise-repeatable results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "scratch.h"

namespace imer_fast {
namespace {

constexpr const char* kOp = "imer_fast::rgcn_conv: ";

struct Problem {
  int64_t num_nodes, num_relations, fin, fout, num_edges;
  at::ScalarType compute;
};

// Pointers start at 0, never decrease and end at E; every index names a node. O(N * R + E), cheap
// next to the gathers, and it keeps a malformed graph from reading out of bounds.
void check_csr(const at::Tensor& ptr_t, const at::Tensor& idx_t, int64_t num_nodes, int64_t num_edges,
               const char* ptr_name, const char* idx_name) {
  const auto ptr_c = ptr_t.contiguous(), idx_c = idx_t.contiguous();
  const int64_t* ptr = ptr_c.data_ptr<int64_t>();
  const int64_t* idx = idx_c.data_ptr<int64_t>();
  const int64_t n = ptr_c.numel();
  TORCH_CHECK(ptr[0] == 0 && ptr[n - 1] == num_edges, kOp, ptr_name, " must start at 0 and end at E = ", num_edges,
              "; got ", ptr[0], " and ", ptr[n - 1]);
  for (int64_t s = 0; s + 1 < n; ++s) {
    TORCH_CHECK(ptr[s + 1] >= ptr[s], kOp, ptr_name, " must not decrease; it does at entry ", s);
  }
  for (int64_t k = 0; k < num_edges; ++k) {
    TORCH_CHECK(idx[k] >= 0 && idx[k] < num_nodes, kOp, idx_name, " must lie in [0, num_nodes = ", num_nodes,
                "); entry ", k, " is ", idx[k]);
  }
}

Problem check_inputs(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& root,
                     const c10::optional<at::Tensor>& bias, const at::Tensor& seg_ptr, const at::Tensor& col,
                     const c10::optional<at::Tensor>& scale, const at::Tensor& t_seg_ptr, const at::Tensor& t_col,
                     const at::Tensor& t_eid) {
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()), kOp,
              "x must be a 2-D floating tensor [num_nodes, in_channels]; got ", x.scalar_type(), " of shape ",
              x.sizes());
  TORCH_CHECK(weight.dim() == 3 && weight.size(1) == x.size(1), kOp,
              "weight must have shape [num_relations, in_channels = ", x.size(1), ", out_channels]; got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), kOp, "weight dtype must match x (", x.scalar_type(),
              "); got ", weight.scalar_type());
  Problem p{x.size(0), weight.size(0), weight.size(1), weight.size(2), col.numel(), x.scalar_type()};
  if (p.compute == at::kHalf || p.compute == at::kBFloat16) p.compute = at::kFloat;
  if (root.has_value()) {
    TORCH_CHECK(root->dim() == 2 && root->size(0) == p.fin && root->size(1) == p.fout &&
                    root->scalar_type() == x.scalar_type(),
                kOp, "root must be a ", x.scalar_type(), " tensor of shape [", p.fin, ", ", p.fout, "]; got ",
                root->scalar_type(), " of shape ", root->sizes());
  }
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.fout && bias->scalar_type() == x.scalar_type(), kOp,
                "bias must be a ", x.scalar_type(), " tensor of shape [", p.fout, "]; got ", bias->scalar_type(),
                " of shape ", bias->sizes());
  }
  const int64_t num_segments = p.num_nodes * p.num_relations + 1;
  for (const auto* t : {&seg_ptr, &t_seg_ptr}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->numel() == num_segments, kOp,
                "seg_ptr and t_seg_ptr must be int64 of shape [num_nodes * num_relations + 1 = ", num_segments,
                "]; got ", t->scalar_type(), " of shape ", t->sizes());
  }
  for (const auto* t : {&col, &t_col, &t_eid}) {
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->numel() == p.num_edges, kOp,
                "col, t_col and t_eid must be int64 of shape [E = ", p.num_edges, "]; got ", t->scalar_type(),
                " of shape ", t->sizes());
  }
  check_csr(seg_ptr, col, p.num_nodes, p.num_edges, "seg_ptr", "col");
  check_csr(t_seg_ptr, t_col, p.num_nodes, p.num_edges, "t_seg_ptr", "t_col");
  const int64_t* eid = t_eid.contiguous().data_ptr<int64_t>();
  for (int64_t k = 0; k < p.num_edges; ++k) {
    TORCH_CHECK(eid[k] >= 0 && eid[k] < p.num_edges, kOp, "t_eid must lie in [0, E = ", p.num_edges, "); entry ", k,
                " is ", eid[k]);
  }
  if (scale.has_value()) {
    TORCH_CHECK(scale->dim() == 1 && scale->numel() == p.num_edges && scale->scalar_type() == x.scalar_type(), kOp,
                "scale must be a ", x.scalar_type(), " tensor of shape [E = ", p.num_edges, "]; got ",
                scale->scalar_type(), " of shape ", scale->sizes());
  }
  return p;
}

// The non-empty (node, relation) segments of a CSR in a relation-major row layout: relation r owns
// rows rel_offset[r] .. rel_offset[r] + rel_count[r]; row_of_segment maps a segment id to its row
// (-1: empty segment). When the relations hold similar numbers of rows, each gets the same
// `stride` of rows (the spare ones zero) so that all relations go through one batched GEMM, which
// runs markedly faster than R separate ones at these sizes; padding is allowed up to 2x the rows.
struct CompactSegments {
  std::vector<int64_t> rel_offset, rel_count, segment_of_row, row_of_segment;
  at::Tensor node_of_row;  // node of each row; 0 on padding rows
  int64_t num_rows = 0, stride = 0;
  bool identity = false;  // one relation and every node has edges: row == node
  int64_t rows() const { return num_rows; }
  int64_t rows_in(int64_t r) const { return rel_count[r]; }
  bool padded() const { return stride > 0; }
  at::Tensor of(const at::Tensor& t, int64_t r) const { return t.narrow(0, rel_offset[r], rel_count[r]); }
};

CompactSegments compact_segments(const Problem& p, const int64_t* ptr, const at::TensorOptions& index_options) {
  const int64_t R = p.num_relations;
  CompactSegments c;
  c.rel_count.assign(R, 0);
  for (int64_t seg = 0; seg < p.num_nodes * R; ++seg) c.rel_count[seg % R] += ptr[seg + 1] > ptr[seg];
  int64_t used = 0, widest = 0;
  for (int64_t r = 0; r < R; ++r) used += c.rel_count[r], widest = std::max(widest, c.rel_count[r]);
  c.stride = (R > 1 && used > 0 && R * widest <= 2 * used) ? widest : 0;
  c.rel_offset.assign(R, 0);
  for (int64_t r = 1; r < R; ++r) c.rel_offset[r] = c.padded() ? r * c.stride : c.rel_offset[r - 1] + c.rel_count[r - 1];
  c.num_rows = c.padded() ? R * c.stride : used;
  c.segment_of_row.assign(c.num_rows, -1);
  c.row_of_segment.assign(p.num_nodes * R, -1);
  c.node_of_row = at::zeros({c.num_rows}, index_options);
  int64_t* node = c.node_of_row.data_ptr<int64_t>();
  std::vector<int64_t> next(c.rel_offset);
  for (int64_t i = 0; i < p.num_nodes; ++i) {
    for (int64_t r = 0; r < R; ++r) {
      const int64_t seg = i * R + r;
      if (ptr[seg + 1] == ptr[seg]) continue;
      const int64_t row = next[r]++;
      c.row_of_segment[seg] = row;
      c.segment_of_row[row] = seg;
      node[row] = i;
    }
  }
  c.identity = R == 1 && c.num_rows == p.num_nodes;
  return c;
}

// Per-thread scratch for the compact intermediates (scratch.h): a forward+backward measured about 1.5x
// slower inside a long-running process with fresh allocations.
at::Tensor scratch(int slot, int64_t rows, int64_t cols, const at::TensorOptions& options) {
  return thread_scratch(ScratchOwner::kRgcn, slot, rows * cols, options).view({rows, cols});
}

// Edge k's factor; scale_idx re-indexes it when walking the transposed CSR.
template <typename T>
inline T edge_scale(const T* scale, const int64_t* scale_idx, int64_t k) {
  return scale == nullptr ? T(1) : scale[scale_idx == nullptr ? k : scale_idx[k]];
}

// dst[row] = sum_{k in segment_of_row[row]} scale_k * src[idx[k]] for every compact row: a row's first
// edge initialises it (no separate zero fill); padding rows are zeroed.
template <typename T>
void gather_to_rows(const CompactSegments& c, const int64_t* ptr, const int64_t* idx, const T* scale,
                    const int64_t* scale_idx, const T* src, int64_t width, T* dst) {
  at::parallel_for(0, c.rows(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T* __restrict__ out = dst + row * width;
      const int64_t seg = c.segment_of_row[row];
      if (seg < 0) {
        std::fill(out, out + width, T(0));
        continue;
      }
      const int64_t first = ptr[seg];
      const T s0 = edge_scale(scale, scale_idx, first);
      const T* __restrict__ in0 = src + idx[first] * width;
      for (int64_t f = 0; f < width; ++f) out[f] = s0 * in0[f];
      for (int64_t k = first + 1; k < ptr[seg + 1]; ++k) {
        const T s = edge_scale(scale, scale_idx, k);
        const T* __restrict__ in = src + idx[k] * width;
        for (int64_t f = 0; f < width; ++f) out[f] += s * in[f];
      }
    }
  });
}

// dst[n] += sum_r sum_{k in seg(n, r)} scale_k * src[src_rows.row_of_segment[idx[k] * R + r]] for every node.
template <typename T>
void gather_to_nodes(const Problem& p, const int64_t* ptr, const int64_t* idx, const T* scale,
                     const int64_t* scale_idx, const CompactSegments& src_rows, const T* src, int64_t width, T* dst) {
  at::parallel_for(0, p.num_nodes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      T* __restrict__ out = dst + n * width;
      for (int64_t r = 0; r < p.num_relations; ++r) {
        const int64_t seg = n * p.num_relations + r;
        for (int64_t k = ptr[seg]; k < ptr[seg + 1]; ++k) {
          const T s = edge_scale(scale, scale_idx, k);
          const int64_t src_row = src_rows.row_of_segment[idx[k] * p.num_relations + r];
          TORCH_CHECK(src_row >= 0, kOp, "the forward and transposed CSRs disagree (edge ", k, " of node ", n,
                      "); build them with imer_fast::relational_csr");
          const T* __restrict__ in = src + src_row * width;
          for (int64_t f = 0; f < width; ++f) out[f] += s * in[f];
        }
      }
    }
  });
}

// out[k] = <a[a_row(k)], b[b_row(k)]> for every edge k of the forward CSR.
template <typename T, typename RowA, typename RowB>
void edge_dots(const Problem& p, const CompactSegments& targets, const int64_t* seg_ptr, const T* a, RowA a_row,
               const T* b, RowB b_row, int64_t width, T* out) {
  at::parallel_for(0, targets.rows(), 64, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t seg = targets.segment_of_row[row];
      if (seg < 0) continue;
      const int64_t i = seg / p.num_relations, r = seg % p.num_relations;
      for (int64_t k = seg_ptr[seg]; k < seg_ptr[seg + 1]; ++k) {
        const T* __restrict__ ar = a + a_row(k, i, r, row) * width;
        const T* __restrict__ br = b + b_row(k, i, r, row) * width;
        T acc = 0;
        for (int64_t f = 0; f < width; ++f) acc += ar[f] * br[f];
        out[k] = acc;
      }
    }
  });
}

// out_r = in_r @ (transpose ? W_r^T : W_r) for every relation r (the rows of r in a compact layout).
void relation_matmul(const Problem& p, const CompactSegments& c, const at::Tensor& in, const at::Tensor& weight,
                     bool transpose, at::Tensor& out) {
  const auto w = transpose ? weight.transpose(1, 2) : weight;
  if (c.padded()) {
    auto out3 = out.view({p.num_relations, c.stride, out.size(1)});
    at::bmm_out(out3, in.view({p.num_relations, c.stride, in.size(1)}), w);
    return;
  }
  for (int64_t r = 0; r < p.num_relations; ++r) {
    if (c.rows_in(r) == 0) continue;
    auto out_r = c.of(out, r);
    at::mm_out(out_r, c.of(in, r), w[r]);
  }
}

// grad_weight[r] = a_r^T @ b_r for every relation (padding rows of a and b are zero).
at::Tensor relation_weight_grad(const Problem& p, const CompactSegments& c, const at::Tensor& a, const at::Tensor& b) {
  if (c.padded()) {
    return at::bmm(a.view({p.num_relations, c.stride, a.size(1)}).transpose(1, 2),
                   b.view({p.num_relations, c.stride, b.size(1)}));
  }
  auto gw = at::empty({p.num_relations, a.size(1), b.size(1)}, a.options());
  for (int64_t r = 0; r < p.num_relations; ++r) {
    auto gw_r = gw[r];
    if (c.rows_in(r) == 0) {
      gw_r.zero_();
    } else {
      at::mm_out(gw_r, c.of(a, r).t(), c.of(b, r));
    }
  }
  return gw;
}

// dst[c.node_of_row[row]] += rows[row]. Nodes are unique within a relation, so the rows of one
// relation are added in parallel without conflicts, relation after relation: deterministic.
void add_rows_to_nodes(const Problem& p, const CompactSegments& c, const at::Tensor& rows, at::Tensor& dst) {
  if (c.identity) {
    dst.add_(rows);
    return;
  }
  const int64_t width = rows.size(1);
  const int64_t* node = c.node_of_row.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "rgcn_conv_add_rows", [&] {
    const scalar_t* src = rows.data_ptr<scalar_t>();
    scalar_t* out = dst.data_ptr<scalar_t>();
    for (int64_t r = 0; r < p.num_relations; ++r) {
      at::parallel_for(c.rel_offset[r], c.rel_offset[r] + c.rel_count[r], 64, [&](int64_t begin, int64_t end) {
        for (int64_t row = begin; row < end; ++row) {
          scalar_t* __restrict__ o = out + node[row] * width;
          const scalar_t* __restrict__ in = src + row * width;
          for (int64_t f = 0; f < width; ++f) o[f] += in[f];
        }
      });
    }
  });
}

// src[node_of_row[row]] for every compact row (padding rows zero), copied in parallel.
at::Tensor rows_of_nodes(const CompactSegments& c, const at::Tensor& src, int slot) {
  if (c.identity) return src;
  const int64_t width = src.size(1);
  auto out = scratch(slot, c.rows(), width, src.options());
  const int64_t* node = c.node_of_row.data_ptr<int64_t>();
  const size_t bytes = width * src.element_size();
  const char* in = static_cast<const char*>(src.data_ptr());
  char* o = static_cast<char*>(out.data_ptr());
  at::parallel_for(0, c.rows(), 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      if (c.segment_of_row[row] < 0) {
        std::memset(o + row * bytes, 0, bytes);
      } else {
        std::memcpy(o + row * bytes, in + node[row] * bytes, bytes);
      }
    }
  });
  return out;
}

at::Tensor in_compute(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }
at::Tensor in_compute(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? in_compute(*t, dtype) : at::Tensor();
}

bool transform_first(const Problem& p) { return p.fout <= p.fin; }

struct Graph {
  at::Tensor seg_ptr, col, t_seg_ptr, t_col, t_eid;
  const int64_t* ptr() const { return seg_ptr.data_ptr<int64_t>(); }
  const int64_t* cols() const { return col.data_ptr<int64_t>(); }
  const int64_t* t_ptr() const { return t_seg_ptr.data_ptr<int64_t>(); }
  const int64_t* t_cols() const { return t_col.data_ptr<int64_t>(); }
  const int64_t* t_eids() const { return t_eid.data_ptr<int64_t>(); }
};

// Y[(j, r)] = x[j] @ W_r for the compact source rows (transform-first).
at::Tensor transform_sources(const Problem& p, const CompactSegments& sources, const at::Tensor& x,
                             const at::Tensor& weight, int xs_slot, int y_slot) {
  auto xs = rows_of_nodes(sources, x, xs_slot);
  auto y = scratch(y_slot, sources.rows(), p.fout, x.options());
  relation_matmul(p, sources, xs, weight, false, y);
  return y;
}

at::Tensor rgcn_conv_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& root_in,
                         const c10::optional<at::Tensor>& bias_in, const at::Tensor& seg_ptr, const at::Tensor& col,
                         const c10::optional<at::Tensor>& scale_in, const at::Tensor& t_seg_ptr,
                         const at::Tensor& t_col, const at::Tensor& t_eid, int64_t max_degree) {
  const Problem p = check_inputs(x_in, weight_in, root_in, bias_in, seg_ptr, col, scale_in, t_seg_ptr, t_col, t_eid);
  auto x = in_compute(x_in, p.compute);
  auto weight = in_compute(weight_in, p.compute);
  auto root = in_compute(root_in, p.compute);
  auto bias = in_compute(bias_in, p.compute);
  auto scale = in_compute(scale_in, p.compute);
  const Graph g{seg_ptr.contiguous(), col.contiguous(), t_seg_ptr.contiguous(), t_col.contiguous(), t_eid.contiguous()};
  at::Tensor out;
  if (root.defined()) {
    out = bias.defined() ? at::addmm(bias, x, root) : at::mm(x, root);
  } else {
    // A fresh tensor: expand(...).contiguous() of a single row would alias (and then modify) bias.
    out = at::zeros({p.num_nodes, p.fout}, x.options());
    if (bias.defined()) out.add_(bias);
  }
  if (transform_first(p)) {
    const auto sources = compact_segments(p, g.t_ptr(), g.t_seg_ptr.options());
    auto y = transform_sources(p, sources, x, weight, 0, 1);
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rgcn_conv_forward", [&] {
      gather_to_nodes<scalar_t>(p, g.ptr(), g.cols(), scale.defined() ? scale.data_ptr<scalar_t>() : nullptr,
                                nullptr, sources, y.data_ptr<scalar_t>(), p.fout, out.data_ptr<scalar_t>());
    });
  } else {
    const auto targets = compact_segments(p, g.ptr(), g.seg_ptr.options());
    auto h = scratch(0, targets.rows(), p.fin, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rgcn_conv_forward", [&] {
      gather_to_rows<scalar_t>(targets, g.ptr(), g.cols(), scale.defined() ? scale.data_ptr<scalar_t>() : nullptr,
                               nullptr, x.data_ptr<scalar_t>(), p.fin, h.data_ptr<scalar_t>());
    });
    auto hw = scratch(1, targets.rows(), p.fout, x.options());
    relation_matmul(p, targets, h, weight, false, hw);
    add_rows_to_nodes(p, targets, hw, out);
  }
  return out.to(x_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rgcn_conv_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& root_in, const at::Tensor& seg_ptr, const at::Tensor& col,
    const c10::optional<at::Tensor>& scale_in, const at::Tensor& t_seg_ptr, const at::Tensor& t_col,
    const at::Tensor& t_eid, int64_t max_degree, std::array<bool, 4> output_mask) {
  const Problem p = check_inputs(x_in, weight_in, root_in, c10::nullopt, seg_ptr, col, scale_in, t_seg_ptr, t_col,
                                 t_eid);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == p.num_nodes && grad_out_in.size(1) == p.fout, kOp,
              "grad_out must have shape [", p.num_nodes, ", ", p.fout, "]; got ", grad_out_in.sizes());
  auto go = in_compute(grad_out_in, p.compute);
  auto x = in_compute(x_in, p.compute);
  auto weight = in_compute(weight_in, p.compute);
  auto root = in_compute(root_in, p.compute);
  auto scale = in_compute(scale_in, p.compute);
  const Graph g{seg_ptr.contiguous(), col.contiguous(), t_seg_ptr.contiguous(), t_col.contiguous(), t_eid.contiguous()};
  // Outputs not asked for are distinct empty tensors (one shared tensor would alias the outputs).
  const auto none = [&] { return at::empty({0}, x_in.options()); };
  at::Tensor grad_x = none(), grad_weight = none(), grad_root = none(), grad_scale = none();
  const bool need_x = output_mask[0], need_w = output_mask[1], need_s = output_mask[3] && scale.defined();
  if (output_mask[2] && root.defined()) grad_root = at::mm(x.t(), go).to(x_in.scalar_type());
  const auto targets = compact_segments(p, g.ptr(), g.seg_ptr.options());
  at::Tensor gx = need_x ? (root.defined() ? at::mm(go, root.t()) : at::zeros({p.num_nodes, p.fin}, x.options()))
                         : at::Tensor();
  at::Tensor gw;

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rgcn_conv_backward", [&] {
    const scalar_t* scale_p = scale.defined() ? scale.data_ptr<scalar_t>() : nullptr;
    at::Tensor gs = need_s ? at::empty({p.num_edges}, x.options()) : at::Tensor();
    if (transform_first(p)) {
      const auto sources = compact_segments(p, g.t_ptr(), g.t_seg_ptr.options());
      // dY[(j, r)] = sum_{k in tseg(j, r)} scale * grad_out[target]: the gradient of Y's rows.
      auto dy = scratch(0, sources.rows(), p.fout, x.options());
      gather_to_rows<scalar_t>(sources, g.t_ptr(), g.t_cols(), scale_p, g.t_eids(), go.data_ptr<scalar_t>(), p.fout,
                               dy.data_ptr<scalar_t>());
      if (need_w) gw = relation_weight_grad(p, sources, rows_of_nodes(sources, x, 1), dy);
      if (need_x) {
        auto dx_rows = scratch(2, sources.rows(), p.fin, x.options());
        relation_matmul(p, sources, dy, weight, true, dx_rows);
        add_rows_to_nodes(p, sources, dx_rows, gx);
      }
      if (need_s) {
        auto y = transform_sources(p, sources, x, weight, 1, 3);
        const int64_t* cols = g.cols();
        edge_dots<scalar_t>(
            p, targets, g.ptr(), y.data_ptr<scalar_t>(),
            [&](int64_t k, int64_t, int64_t r, int64_t) { return sources.row_of_segment[cols[k] * p.num_relations + r]; },
            go.data_ptr<scalar_t>(), [](int64_t, int64_t i, int64_t, int64_t) { return i; }, p.fout,
            gs.data_ptr<scalar_t>());
      }
    } else {
      auto go_rows = rows_of_nodes(targets, go, 0);  // grad of each compact row's target
      if (need_w) {
        auto h = scratch(1, targets.rows(), p.fin, x.options());
        gather_to_rows<scalar_t>(targets, g.ptr(), g.cols(), scale_p, nullptr, x.data_ptr<scalar_t>(), p.fin,
                                 h.data_ptr<scalar_t>());
        gw = relation_weight_grad(p, targets, h, go_rows);
      }
      if (need_x || need_s) {
        // proj[(i, r)] = grad_out[i] @ W_r^T: what each edge of that segment sends back to its source.
        auto proj = scratch(2, targets.rows(), p.fin, x.options());
        relation_matmul(p, targets, go_rows, weight, true, proj);
        if (need_x) {
          gather_to_nodes<scalar_t>(p, g.t_ptr(), g.t_cols(), scale_p, g.t_eids(), targets, proj.data_ptr<scalar_t>(),
                                    p.fin, gx.data_ptr<scalar_t>());
        }
        if (need_s) {
          const int64_t* cols = g.cols();
          edge_dots<scalar_t>(
              p, targets, g.ptr(), x.data_ptr<scalar_t>(), [&](int64_t k, int64_t, int64_t, int64_t) { return cols[k]; },
              proj.data_ptr<scalar_t>(), [](int64_t, int64_t, int64_t, int64_t row) { return row; }, p.fin,
              gs.data_ptr<scalar_t>());
        }
      }
    }
    if (need_s) grad_scale = gs.to(x_in.scalar_type());
  });
  if (need_x) grad_x = gx.to(x_in.scalar_type());
  if (need_w) grad_weight = gw.to(x_in.scalar_type());
  return {grad_x, grad_weight, grad_root, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) {
  m.impl("rgcn_conv", &rgcn_conv_cpu);
  m.impl("rgcn_conv_backward", &rgcn_conv_backward_cpu);
}

}  // namespace imer_fast
