// CPU kernels of imer_fast::rgcn_conv (relational graph convolution, PyG RGCNConv/GraphConv
// semantics). Forward = one deterministic segment gather of the typed neighbourhood sums into
// H [N, R * Fin] followed by a single GEMM with the stacked relation weights; no per-relation loop
// and no per-edge weight copies. Backward reuses the same gather on the transposed CSR, so every
// output row is written by one thread: no atomics, bitwise-repeatable results.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace imer_fast {
namespace {

constexpr const char* kOp = "imer_fast::rgcn_conv: ";

// dst[i, r-block] (+)= sum_{k in seg(i, r)} scale[scale_idx[k]] * src[idx[k], r-block], for all
// nodes i and relations r. `*_rel` is the offset between relation blocks (0 folds all relations
// into one row). Rows of dst are owned by one thread each.
template <typename T>
void segment_gather(int64_t num_nodes, int64_t num_relations, int64_t width, const int64_t* seg_ptr,
                    const int64_t* idx, const T* scale, const int64_t* scale_idx, const T* src, int64_t src_row,
                    int64_t src_rel, T* dst, int64_t dst_row, int64_t dst_rel) {
  at::parallel_for(0, num_nodes, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t r = 0; r < num_relations; ++r) {
        T* __restrict__ out = dst + i * dst_row + r * dst_rel;
        const int64_t seg = i * num_relations + r;
        for (int64_t k = seg_ptr[seg]; k < seg_ptr[seg + 1]; ++k) {
          const T s = scale == nullptr ? T(1) : scale[scale_idx == nullptr ? k : scale_idx[k]];
          const T* __restrict__ in = src + idx[k] * src_row + r * src_rel;
          for (int64_t f = 0; f < width; ++f) out[f] += s * in[f];
        }
      }
    }
  });
}

struct Problem {
  int64_t num_nodes, num_relations, fin, fout, num_edges;
  at::ScalarType compute;
};

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
  if (scale.has_value()) {
    TORCH_CHECK(scale->dim() == 1 && scale->numel() == p.num_edges && scale->scalar_type() == x.scalar_type(), kOp,
                "scale must be a ", x.scalar_type(), " tensor of shape [E = ", p.num_edges, "]; got ",
                scale->scalar_type(), " of shape ", scale->sizes());
  }
  return p;
}

// H[i, r * fin : (r + 1) * fin] = sum_{k in seg(i, r)} scale[k] * x[col[k]]
at::Tensor aggregate(const Problem& p, const at::Tensor& x, const at::Tensor& seg_ptr, const at::Tensor& col,
                     const at::Tensor& scale) {
  auto h = at::zeros({p.num_nodes, p.num_relations * p.fin}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rgcn_conv_aggregate", [&] {
    segment_gather<scalar_t>(p.num_nodes, p.num_relations, p.fin, seg_ptr.data_ptr<int64_t>(),
                             col.data_ptr<int64_t>(), scale.defined() ? scale.data_ptr<scalar_t>() : nullptr,
                             nullptr, x.data_ptr<scalar_t>(), p.fin, 0, h.data_ptr<scalar_t>(),
                             p.num_relations * p.fin, p.fin);
  });
  return h;
}

at::Tensor in_compute(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype).contiguous(); }
at::Tensor in_compute(const c10::optional<at::Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? in_compute(*t, dtype) : at::Tensor();
}

at::Tensor rgcn_conv_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& root_in,
                         const c10::optional<at::Tensor>& bias_in, const at::Tensor& seg_ptr_in,
                         const at::Tensor& col_in, const c10::optional<at::Tensor>& scale_in,
                         const at::Tensor& t_seg_ptr, const at::Tensor& t_col, const at::Tensor& t_eid,
                         int64_t max_degree) {
  const Problem p = check_inputs(x_in, weight_in, root_in, bias_in, seg_ptr_in, col_in, scale_in, t_seg_ptr, t_col,
                                 t_eid);
  auto x = in_compute(x_in, p.compute);
  auto weight = in_compute(weight_in, p.compute).view({p.num_relations * p.fin, p.fout});
  auto root = in_compute(root_in, p.compute);
  auto bias = in_compute(bias_in, p.compute);
  auto h = aggregate(p, x, seg_ptr_in.contiguous(), col_in.contiguous(), in_compute(scale_in, p.compute));
  at::Tensor out;
  if (root.defined()) {
    out = bias.defined() ? at::addmm(bias, x, root) : at::mm(x, root);
  } else {
    out = bias.defined() ? bias.unsqueeze(0).expand({p.num_nodes, p.fout}).contiguous()
                         : at::zeros({p.num_nodes, p.fout}, x.options());
  }
  out.addmm_(h, weight);
  return out.to(x_in.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rgcn_conv_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& x_in, const at::Tensor& weight_in,
    const c10::optional<at::Tensor>& root_in, const at::Tensor& seg_ptr_in, const at::Tensor& col_in,
    const c10::optional<at::Tensor>& scale_in, const at::Tensor& t_seg_ptr_in, const at::Tensor& t_col_in,
    const at::Tensor& t_eid_in, int64_t max_degree, std::array<bool, 4> output_mask) {
  const Problem p = check_inputs(x_in, weight_in, root_in, c10::nullopt, seg_ptr_in, col_in, scale_in,
                                 t_seg_ptr_in, t_col_in, t_eid_in);
  TORCH_CHECK(grad_out_in.dim() == 2 && grad_out_in.size(0) == p.num_nodes && grad_out_in.size(1) == p.fout, kOp,
              "grad_out must have shape [", p.num_nodes, ", ", p.fout, "]; got ", grad_out_in.sizes());
  auto g = in_compute(grad_out_in, p.compute);
  auto x = in_compute(x_in, p.compute);
  auto weight = in_compute(weight_in, p.compute).view({p.num_relations * p.fin, p.fout});
  auto root = in_compute(root_in, p.compute);
  auto scale = in_compute(scale_in, p.compute);
  auto seg_ptr = seg_ptr_in.contiguous(), col = col_in.contiguous();
  auto t_seg_ptr = t_seg_ptr_in.contiguous(), t_col = t_col_in.contiguous(), t_eid = t_eid_in.contiguous();
  const auto empty = at::empty({0}, x_in.options());

  at::Tensor grad_weight = empty, grad_root = empty, grad_x = empty, grad_scale = empty;
  if (output_mask[1]) {
    grad_weight = at::mm(aggregate(p, x, seg_ptr, col, scale).t(), g)
                      .view({p.num_relations, p.fin, p.fout})
                      .to(x_in.scalar_type());
  }
  if (output_mask[2] && root.defined()) grad_root = at::mm(x.t(), g).to(x_in.scalar_type());
  const bool need_scale_grad = output_mask[3] && scale.defined();
  if (output_mask[0] || need_scale_grad) {
    // P[i, r-block] = g[i] @ weight[r]^T: the gradient each edge of relation r sends to its source.
    auto proj = at::mm(g, weight.t()).contiguous();
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rgcn_conv_backward", [&] {
      const scalar_t* proj_p = proj.data_ptr<scalar_t>();
      const scalar_t* scale_p = scale.defined() ? scale.data_ptr<scalar_t>() : nullptr;
      if (output_mask[0]) {
        auto gx = root.defined() ? at::mm(g, root.t()) : at::zeros({p.num_nodes, p.fin}, x.options());
        segment_gather<scalar_t>(p.num_nodes, p.num_relations, p.fin, t_seg_ptr.data_ptr<int64_t>(),
                                 t_col.data_ptr<int64_t>(), scale_p, t_eid.data_ptr<int64_t>(), proj_p,
                                 p.num_relations * p.fin, p.fin, gx.data_ptr<scalar_t>(), p.fin, 0);
        grad_x = gx.to(x_in.scalar_type());
      }
      if (need_scale_grad) {
        auto gs = at::empty({p.num_edges}, x.options());
        scalar_t* gs_p = gs.data_ptr<scalar_t>();
        const scalar_t* x_p = x.data_ptr<scalar_t>();
        const int64_t* seg_p = seg_ptr.data_ptr<int64_t>();
        const int64_t* col_p = col.data_ptr<int64_t>();
        at::parallel_for(0, p.num_nodes, 16, [&](int64_t begin, int64_t end) {
          for (int64_t i = begin; i < end; ++i) {
            for (int64_t r = 0; r < p.num_relations; ++r) {
              const scalar_t* pr = proj_p + (i * p.num_relations + r) * p.fin;
              const int64_t seg = i * p.num_relations + r;
              for (int64_t k = seg_p[seg]; k < seg_p[seg + 1]; ++k) {
                const scalar_t* xr = x_p + col_p[k] * p.fin;
                scalar_t acc = 0;
                for (int64_t f = 0; f < p.fin; ++f) acc += xr[f] * pr[f];
                gs_p[k] = acc;
              }
            }
          }
        });
        grad_scale = gs.to(x_in.scalar_type());
      }
    });
  }
  return {grad_x, grad_weight, grad_root, grad_scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) {
  m.impl("rgcn_conv", &rgcn_conv_cpu);
  m.impl("rgcn_conv_backward", &rgcn_conv_backward_cpu);
}

}  // namespace imer_fast
