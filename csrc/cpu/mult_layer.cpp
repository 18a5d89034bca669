// One pre-norm MulT encoder layer, forward and backward, as two CPU operators (spec:
// imer_fast/ops/mult_layer.py). On 2 cores a MulT layer at the release's sizes (1,600 rows of 32
// features) costs ~1.3 ms of GEMM, LayerNorm and attention arithmetic, but its autograd graph of ~15
// Python-built nodes and ~40 small ATen calls doubled that. Here the whole layer is one autograd
// node: the GEMMs are ATen's (MKL / oneDNN), the attention is imer_fast::attention through the
// dispatcher, and the backward is written out by hand so that no reshape copies, no autograd
// bookkeeping and no Python run between them.
//
// Rows are [N = L * B, E] in (L, B) order (MulT's (seq_len, batch, embed) layout flattened), so the
// heads of a projection are the free view [L, B, H, D] -> [B, H, L, D].
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <vector>

namespace imer_fast {
namespace {

constexpr const char* kOp = "imer_fast::mult_layer: ";

using OptTensor = c10::optional<at::Tensor>;

// Slots of the saved-tensor list (empty tensors where the mode has none).
enum Saved : int64_t {
  kHq, kMeanX, kRstdX,      // layer_norms[0](x) and its statistics
  kHk, kMeanK, kRstdK,      // layer_norms[0](xk): cross modes
  kHv, kMeanV, kRstdV,      // layer_norms[0](xv): separate keys and values
  kQ, kKv, kV,              // projections: q [N, E]; packed k|v [Nk, 2E] (or k [Nk, E] and v when separate)
  kAttn, kLse,              // attention output [B, H, Lq, D] (laid out [Lq, B, H, D]) and its log-sum-exp
  kX1, kMean1, kRstd1, kH1, // residual after attention, layer_norms[1](x1) and its statistics
  kHidden,                  // relu(fc1(h1)) (times the relu-dropout keep factors)
  kNumSaved
};

enum class Mode { kSelf, kSharedKv, kSeparateKv };

struct Shape {
  Mode mode;
  int64_t rows, key_rows, embed, batch, lq, lk, heads, head_dim;
};

void check_matrix(const char* name, const at::Tensor& t, int64_t rows, int64_t cols, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, kOp, name, " must have shape [", rows, ", ",
              cols, "]; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), kOp, name, " must be ",
              x.scalar_type(), " on ", x.device(), " like x; got ", t.scalar_type(), " on ", t.device());
}

void check_vector(const char* name, const at::Tensor& t, int64_t size, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == size, kOp, name, " must have shape [", size, "]; got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), kOp, name, " must be ",
              x.scalar_type(), " on ", x.device(), " like x; got ", t.scalar_type(), " on ", t.device());
}

Shape shape_of(const at::Tensor& x, const OptTensor& xk, const OptTensor& xv, int64_t batch, int64_t heads) {
  TORCH_CHECK(x.device().is_cpu(), kOp, "x must be a CPU tensor; got one on ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              "x must be float32 or float64; got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, kOp, "x must be [L * B, E] rows; got shape ", x.sizes());
  TORCH_CHECK(batch >= 1 && x.size(0) % batch == 0, kOp, "batch (", batch, ") must be >= 1 and divide x's ",
              x.size(0), " rows");
  TORCH_CHECK(heads >= 1 && x.size(1) % heads == 0, kOp, "num_heads (", heads, ") must divide embed dim ",
              x.size(1));
  TORCH_CHECK(!(xv.has_value() && !xk.has_value()), kOp, "xv without xk; give xk alone for shared keys/values");
  Shape s{Mode::kSelf, x.size(0), x.size(0), x.size(1), batch, x.size(0) / batch, x.size(0) / batch, heads,
          x.size(1) / heads};
  if (xk.has_value()) {
    s.mode = xv.has_value() ? Mode::kSeparateKv : Mode::kSharedKv;
    TORCH_CHECK(xk->dim() == 2 && xk->size(1) == s.embed && xk->size(0) % batch == 0, kOp,
                "xk must be [Lk * B, E = ", s.embed, "] rows with B = ", batch, "; got shape ", xk->sizes());
    check_matrix("xk", *xk, xk->size(0), s.embed, x);
    if (xv.has_value()) check_matrix("xv", *xv, xk->size(0), s.embed, x);
    s.key_rows = xk->size(0);
    s.lk = s.key_rows / batch;
  }
  return s;
}

void check_keep(const char* name, const OptTensor& keep, int64_t rows, int64_t cols, const at::Tensor& x) {
  if (keep.has_value()) check_matrix(name, *keep, rows, cols, x);
}

// [L * B, E] rows -> [B, H, L, D] view.
at::Tensor heads_of(const at::Tensor& rows, const Shape& s, int64_t length) {
  return rows.view({length, s.batch, s.heads, s.head_dim}).permute({1, 2, 0, 3});
}

// Packed [Lk * B, 2E] k|v rows -> the k (part 0) or v (part 1) [B, H, Lk, D] view.
at::Tensor packed_heads(const at::Tensor& kv, const Shape& s, int64_t part) {
  return kv.view({s.lk, s.batch, 2, s.heads, s.head_dim}).select(2, part).permute({1, 2, 0, 3});
}

// [B, H, L, D] (any layout) -> [L * B, E] rows (a view when laid out [L, B, H, D]).
at::Tensor rows_of(const at::Tensor& heads, const Shape& s, int64_t length) {
  return heads.permute({2, 0, 1, 3}).reshape({length * s.batch, s.embed});
}

std::tuple<at::Tensor, at::Tensor> call_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const OptTensor& key_mask, double scale, int64_t mask_kind,
                                                  double dropout_p, const OptTensor& dropout_seed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("imer_fast::attention", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                           const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, int64_t,
                           int64_t, double, int64_t, double, const OptTensor&)>();
  return op.call(q, k, v, key_mask, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, 0, 0, scale, mask_kind,
                 dropout_p, dropout_seed);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_attention_backward(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const OptTensor& key_mask, double scale, int64_t mask_kind, double dropout_p,
    const OptTensor& dropout_seed) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("imer_fast::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
              const OptTensor&, int64_t, int64_t, double, int64_t, double, const OptTensor&, std::array<bool, 5>)>();
  return op.call(grad, q, k, v, out, lse, key_mask, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, 0, 0,
                 scale, mask_kind, dropout_p, dropout_seed, {true, true, true, false, false});
}

at::Tensor none_like(const at::Tensor& x) { return at::empty({0}, x.options()); }

// LayerNorm through imer_fast::stable_layer_norm (not stable): on these rows (tens of features) its
// CPU kernels take ~60 % of ATen's native_layer_norm time forward and backward. Returns (y, mean, rstd),
// the statistics shaped [rows].
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm(const at::Tensor& x, const at::Tensor& weight,
                                                          const at::Tensor& bias, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("imer_fast::stable_layer_norm", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const OptTensor&, const OptTensor&, double, bool)>();
  auto [y, mean, rstd, unit_row_max] = op.call(x, weight, bias, eps, false);
  (void)unit_row_max;
  return {y, mean, rstd};
}

// (dx, dweight, dbias) of layer_norm.
std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                   const at::Tensor& weight, const at::Tensor& mean,
                                                                   const at::Tensor& rstd) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("imer_fast::stable_layer_norm_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const OptTensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, std::array<bool, 3>)>();
  return op.call(grad, x, weight, mean, rstd, at::ones_like(mean), {true, true, true});
}


// The [B, H, Lk, D] key and value views of the saved projections.
std::pair<at::Tensor, at::Tensor> key_value_heads(const std::vector<at::Tensor>& saved, const Shape& s) {
  if (s.mode == Mode::kSeparateKv) return {heads_of(saved[kKv], s, s.lk), heads_of(saved[kV], s, s.lk)};
  return {packed_heads(saved[kKv], s, 0), packed_heads(saved[kKv], s, 1)};
}

std::tuple<at::Tensor, std::vector<at::Tensor>> mult_layer_cpu(
    const at::Tensor& x_in, const OptTensor& xk, const OptTensor& xv, const at::Tensor& ln0_weight,
    const at::Tensor& ln0_bias, const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
    const at::Tensor& out_proj_weight, const at::Tensor& out_proj_bias, const at::Tensor& ln1_weight,
    const at::Tensor& ln1_bias, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
    const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, const OptTensor& key_mask,
    const OptTensor& attn_res_keep, const OptTensor& relu_keep, const OptTensor& ffn_res_keep, int64_t batch,
    int64_t num_heads, double ln0_eps, double ln1_eps, double scale, int64_t mask_kind, double dropout_p,
    const OptTensor& dropout_seed) {
  const Shape s = shape_of(x_in, xk, xv, batch, num_heads);
  const int64_t e = s.embed, hidden_dim = fc1_weight.size(0);
  check_vector("ln0_weight", ln0_weight, e, x_in);
  check_vector("ln0_bias", ln0_bias, e, x_in);
  check_matrix("in_proj_weight", in_proj_weight, 3 * e, e, x_in);
  check_vector("in_proj_bias", in_proj_bias, 3 * e, x_in);
  check_matrix("out_proj_weight", out_proj_weight, e, e, x_in);
  check_vector("out_proj_bias", out_proj_bias, e, x_in);
  check_vector("ln1_weight", ln1_weight, e, x_in);
  check_vector("ln1_bias", ln1_bias, e, x_in);
  check_matrix("fc1_weight", fc1_weight, hidden_dim, e, x_in);
  check_vector("fc1_bias", fc1_bias, hidden_dim, x_in);
  check_matrix("fc2_weight", fc2_weight, e, hidden_dim, x_in);
  check_vector("fc2_bias", fc2_bias, e, x_in);
  check_keep("attn_res_keep", attn_res_keep, s.rows, e, x_in);
  check_keep("relu_keep", relu_keep, s.rows, hidden_dim, x_in);
  check_keep("ffn_res_keep", ffn_res_keep, s.rows, e, x_in);

  const at::Tensor x = x_in.contiguous();
  std::vector<at::Tensor> saved(kNumSaved);
  for (auto& t : saved) t = none_like(x);
  const auto norm0 = [&](const at::Tensor& t, int64_t slot) {
    auto [y, mean, rstd] = layer_norm(t, ln0_weight, ln0_bias, ln0_eps);
    saved[slot] = y, saved[slot + 1] = mean, saved[slot + 2] = rstd;
    return y;
  };
  const at::Tensor hq = norm0(x, kHq);
  saved[kQ] = at::addmm(in_proj_bias.narrow(0, 0, e), hq, in_proj_weight.narrow(0, 0, e).t());
  if (s.mode == Mode::kSeparateKv) {
    const at::Tensor hk = norm0(xk->contiguous(), kHk), hv = norm0(xv->contiguous(), kHv);
    saved[kKv] = at::addmm(in_proj_bias.narrow(0, e, e), hk, in_proj_weight.narrow(0, e, e).t());
    saved[kV] = at::addmm(in_proj_bias.narrow(0, 2 * e, e), hv, in_proj_weight.narrow(0, 2 * e, e).t());
  } else {
    const at::Tensor hkv = s.mode == Mode::kSelf ? hq : norm0(xk->contiguous(), kHk);
    saved[kKv] = at::addmm(in_proj_bias.narrow(0, e, 2 * e), hkv, in_proj_weight.narrow(0, e, 2 * e).t());
  }
  const auto [k4, v4] = key_value_heads(saved, s);
  std::tie(saved[kAttn], saved[kLse]) = call_attention(heads_of(saved[kQ], s, s.lq), k4, v4, key_mask, scale,
                                                       mask_kind, dropout_p, dropout_seed);
  const at::Tensor attn_rows = rows_of(saved[kAttn], s, s.lq);

  // x1 = x + keep * (attn @ Wo^T + bo); out = x1 + keep * (hidden @ W2^T + b2)
  const auto residual = [](const at::Tensor& base, const at::Tensor& a, const at::Tensor& w, const at::Tensor& b,
                           const OptTensor& keep) {
    if (keep.has_value()) return at::addmm(b, a, w.t()).mul_(*keep).add_(base);
    return at::addmm(base, a, w.t()).add_(b);
  };
  saved[kX1] = residual(x, attn_rows, out_proj_weight, out_proj_bias, attn_res_keep);
  std::tie(saved[kH1], saved[kMean1], saved[kRstd1]) =
      layer_norm(saved[kX1], ln1_weight, ln1_bias, ln1_eps);
  saved[kHidden] = at::addmm(fc1_bias, saved[kH1], fc1_weight.t()).relu_();
  if (relu_keep.has_value()) saved[kHidden].mul_(*relu_keep);
  at::Tensor out = residual(saved[kX1], saved[kHidden], fc2_weight, fc2_bias, ffn_res_keep);
  return {out, saved};
}

// Gradients, in this order: x, xk, xv (empty when absent), ln0 weight and bias, in_proj weight and
// bias, out_proj weight and bias, ln1 weight and bias, fc1 weight and bias, fc2 weight and bias.
std::vector<at::Tensor> mult_layer_backward_cpu(
    const at::Tensor& grad_out, at::TensorList saved_list, const at::Tensor& x_in, const OptTensor& xk,
    const OptTensor& xv, const at::Tensor& ln0_weight, const at::Tensor& ln0_bias, const at::Tensor& in_proj_weight,
    const at::Tensor& out_proj_weight, const at::Tensor& ln1_weight, const at::Tensor& ln1_bias,
    const at::Tensor& fc1_weight, const at::Tensor& fc2_weight, const OptTensor& key_mask,
    const OptTensor& attn_res_keep, const OptTensor& relu_keep, const OptTensor& ffn_res_keep, int64_t batch,
    int64_t num_heads, double scale, int64_t mask_kind, double dropout_p, const OptTensor& dropout_seed) {
  const Shape s = shape_of(x_in, xk, xv, batch, num_heads);
  const int64_t e = s.embed;
  TORCH_CHECK(static_cast<int64_t>(saved_list.size()) == kNumSaved, kOp, "backward needs the forward's ", kNumSaved,
              " saved tensors; got ", saved_list.size());
  TORCH_CHECK(grad_out.sizes() == x_in.sizes() && grad_out.scalar_type() == x_in.scalar_type(), kOp,
              "grad_out must match x (", x_in.sizes(), ", ", x_in.scalar_type(), "); got ", grad_out.sizes(), ", ",
              grad_out.scalar_type());
  const std::vector<at::Tensor> saved(saved_list.begin(), saved_list.end());
  const at::Tensor x = x_in.contiguous(), g = grad_out.contiguous();

  // out = x1 + keep2 * (hidden @ W2^T + b2)
  const at::Tensor g2 = ffn_res_keep.has_value() ? g * *ffn_res_keep : g;
  at::Tensor d_hidden = at::mm(g2, fc2_weight);
  const at::Tensor d_fc2_w = at::mm(g2.t(), saved[kHidden]), d_fc2_b = g2.sum(0);
  if (relu_keep.has_value()) d_hidden.mul_(*relu_keep);
  // hidden > 0 exactly where the relu passed (a dropped entry has zero gradient either way)
  const at::Tensor d_pre = at::threshold_backward(d_hidden, saved[kHidden], 0);
  const at::Tensor d_fc1_w = at::mm(d_pre.t(), saved[kH1]), d_fc1_b = d_pre.sum(0);
  const at::Tensor d_h1 = at::mm(d_pre, fc1_weight);
  auto [d_x1, d_ln1_w, d_ln1_b] = layer_norm_backward(d_h1, saved[kX1], ln1_weight, saved[kMean1], saved[kRstd1]);
  d_x1.add_(g);

  // x1 = x + keep1 * (attn @ Wo^T + bo)
  const at::Tensor g1 = attn_res_keep.has_value() ? d_x1 * *attn_res_keep : d_x1;
  const at::Tensor attn_rows = rows_of(saved[kAttn], s, s.lq);
  const at::Tensor d_attn = at::mm(g1, out_proj_weight);
  const at::Tensor d_out_w = at::mm(g1.t(), attn_rows), d_out_b = g1.sum(0);

  const auto [k4, v4] = key_value_heads(saved, s);
  const auto [dq, dk, dv, unused_nk, unused_nv] =
      call_attention_backward(heads_of(d_attn, s, s.lq), heads_of(saved[kQ], s, s.lq), k4, v4, saved[kAttn],
                              saved[kLse], key_mask, scale, mask_kind, dropout_p, dropout_seed);
  (void)unused_nk, (void)unused_nv;
  // The in_proj gradients are written straight into their rows of the packed [3E, E] / [3E] results.
  at::Tensor d_in_w = at::empty_like(in_proj_weight), d_in_b = at::empty({3 * e}, in_proj_weight.options());
  const auto project_back = [&](const at::Tensor& d_rows, const at::Tensor& h, int64_t row0, int64_t width) {
    at::Tensor w_rows = d_in_w.narrow(0, row0, width), b_rows = d_in_b.narrow(0, row0, width);
    at::mm_out(w_rows, d_rows.t(), h);
    at::sum_out(b_rows, d_rows, 0);
    return at::mm(d_rows, in_proj_weight.narrow(0, row0, width));
  };
  const at::Tensor dq_rows = rows_of(dq, s, s.lq);
  at::Tensor d_hq = project_back(dq_rows, saved[kHq], 0, e);
  at::Tensor d_hk, d_hv;
  if (s.mode == Mode::kSeparateKv) {
    d_hk = project_back(rows_of(dk, s, s.lk), saved[kHk], e, e);
    d_hv = project_back(rows_of(dv, s, s.lk), saved[kHv], 2 * e, e);
  } else {
    // The attention gives dk and dv as the halves of one [Lk, B, 2, H, D] buffer, like the packed k|v
    // projection they belong to; other layouts are copied into one.
    const std::vector<int64_t> packed_strides{2 * e, s.head_dim, s.batch * 2 * e, 1};
    const bool packed = dk.strides() == at::IntArrayRef(packed_strides) && dv.strides() == dk.strides() &&
                        static_cast<const char*>(dv.data_ptr()) - static_cast<const char*>(dk.data_ptr()) ==
                            static_cast<std::ptrdiff_t>(e * dk.element_size());
    const at::Tensor d_kv =
        packed ? at::as_strided(dk, {s.key_rows, 2 * e}, {2 * e, 1})
               : at::stack({dk.permute({2, 0, 1, 3}), dv.permute({2, 0, 1, 3})}, 2).view({s.key_rows, 2 * e});
    d_hk = project_back(d_kv, s.mode == Mode::kSelf ? saved[kHq] : saved[kHk], e, 2 * e);
    if (s.mode == Mode::kSelf) d_hq.add_(d_hk);
  }

  auto [d_x, d_ln0_w, d_ln0_b] = layer_norm_backward(d_hq, x, ln0_weight, saved[kMeanX], saved[kRstdX]);
  d_x.add_(d_x1);
  at::Tensor d_xk = none_like(x), d_xv = none_like(x);
  const auto key_norm_backward = [&](const at::Tensor& d_h, const at::Tensor& input, int64_t slot) {
    auto [d_input, d_w, d_b] = layer_norm_backward(d_h, input.contiguous(), ln0_weight, saved[slot + 1],
                                                   saved[slot + 2]);
    d_ln0_w.add_(d_w), d_ln0_b.add_(d_b);
    return d_input;
  };
  if (s.mode != Mode::kSelf) d_xk = key_norm_backward(d_hk, *xk, kHk);
  if (s.mode == Mode::kSeparateKv) d_xv = key_norm_backward(d_hv, *xv, kHv);
  return {d_x,     d_xk,    d_xv,    d_ln0_w, d_ln0_b, d_in_w,  d_in_b, d_out_w,
          d_out_b, d_ln1_w, d_ln1_b, d_fc1_w, d_fc1_b, d_fc2_w, d_fc2_b};
}

// ---- autograd ----------------------------------------------------------------------------------
// In C++ rather than torch.library.register_autograd: the Python autograd wrapper of an op with 27
// inputs and a 19-tensor list output cost ~0.3 ms per call in the forward and again in the backward,
// as much as the layer's GEMMs.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kNumInputs = 27;     // the op's inputs; the first 15 (x, xk, xv, 12 weights) differentiable
constexpr int64_t kNumWeights = 12;

OptTensor optional_of(const at::Tensor& t) { return t.defined() ? OptTensor(t) : c10::nullopt; }
at::Tensor tensor_of(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

class MultLayerFunction : public torch::autograd::Function<MultLayerFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const OptTensor& xk, const OptTensor& xv,
                               const at::Tensor& ln0_weight, const at::Tensor& ln0_bias,
                               const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
                               const at::Tensor& out_proj_weight, const at::Tensor& out_proj_bias,
                               const at::Tensor& ln1_weight, const at::Tensor& ln1_bias, const at::Tensor& fc1_weight,
                               const at::Tensor& fc1_bias, const at::Tensor& fc2_weight, const at::Tensor& fc2_bias,
                               const OptTensor& key_mask, const OptTensor& attn_res_keep, const OptTensor& relu_keep,
                               const OptTensor& ffn_res_keep, int64_t batch, int64_t num_heads, double ln0_eps,
                               double ln1_eps, double scale, int64_t mask_kind, double dropout_p,
                               const OptTensor& dropout_seed) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("imer_fast::mult_layer", "")
                         .typed<decltype(mult_layer_cpu)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, saved] = op.call(x, xk, xv, ln0_weight, ln0_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                                out_proj_bias, ln1_weight, ln1_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                key_mask, attn_res_keep, relu_keep, ffn_res_keep, batch, num_heads, ln0_eps, ln1_eps,
                                scale, mask_kind, dropout_p, dropout_seed);
    ctx->mark_non_differentiable(saved);
    ctx->set_materialize_grads(false);  // no zero-filled gradients for the 19 saved outputs
    variable_list to_save{x,          tensor_of(xk), tensor_of(xv), ln0_weight,          ln0_bias,
                          in_proj_weight, out_proj_weight, ln1_weight, ln1_bias,         fc1_weight,
                          fc2_weight, tensor_of(key_mask), tensor_of(attn_res_keep), tensor_of(relu_keep),
                          tensor_of(ffn_res_keep), tensor_of(dropout_seed)};
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["batch"] = batch, ctx->saved_data["num_heads"] = num_heads, ctx->saved_data["scale"] = scale;
    ctx->saved_data["mask_kind"] = mask_kind, ctx->saved_data["dropout_p"] = dropout_p;
    variable_list outputs{out};
    outputs.insert(outputs.end(), saved.begin(), saved.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), kOp,
                "double backward (gradients of gradients, create_graph=True) is not supported");
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("imer_fast::mult_layer_backward", "")
                         .typed<decltype(mult_layer_backward_cpu)>();
    const variable_list s = ctx->get_saved_variables();
    const std::vector<at::Tensor> saved(s.begin() + 16, s.end());
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(s[0]);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::vector<at::Tensor> computed =
        op.call(grad_out, saved, s[0], optional_of(s[1]), optional_of(s[2]), s[3], s[4], s[5], s[6], s[7], s[8],
                s[9], s[10], optional_of(s[11]), optional_of(s[12]), optional_of(s[13]), optional_of(s[14]),
                ctx->saved_data["batch"].toInt(), ctx->saved_data["num_heads"].toInt(),
                ctx->saved_data["scale"].toDouble(), ctx->saved_data["mask_kind"].toInt(),
                ctx->saved_data["dropout_p"].toDouble(), optional_of(s[15]));
    if (!s[1].defined()) computed[1] = at::Tensor();
    if (!s[2].defined()) computed[2] = at::Tensor();
    computed.resize(kNumInputs);  // the non-differentiable inputs get undefined gradients
    return computed;
  }
};
static_assert(3 + kNumWeights == 15, "the differentiable inputs are x, xk, xv and the weights");

std::tuple<at::Tensor, std::vector<at::Tensor>> mult_layer_autograd(
    const at::Tensor& x, const OptTensor& xk, const OptTensor& xv, const at::Tensor& ln0_weight,
    const at::Tensor& ln0_bias, const at::Tensor& in_proj_weight, const at::Tensor& in_proj_bias,
    const at::Tensor& out_proj_weight, const at::Tensor& out_proj_bias, const at::Tensor& ln1_weight,
    const at::Tensor& ln1_bias, const at::Tensor& fc1_weight, const at::Tensor& fc1_bias,
    const at::Tensor& fc2_weight, const at::Tensor& fc2_bias, const OptTensor& key_mask,
    const OptTensor& attn_res_keep, const OptTensor& relu_keep, const OptTensor& ffn_res_keep, int64_t batch,
    int64_t num_heads, double ln0_eps, double ln1_eps, double scale, int64_t mask_kind, double dropout_p,
    const OptTensor& dropout_seed) {
  variable_list outputs = MultLayerFunction::apply(
      x, xk, xv, ln0_weight, ln0_bias, in_proj_weight, in_proj_bias, out_proj_weight, out_proj_bias, ln1_weight,
      ln1_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, key_mask, attn_res_keep, relu_keep, ffn_res_keep, batch,
      num_heads, ln0_eps, ln1_eps, scale, mask_kind, dropout_p, dropout_seed);
  return {outputs[0], std::vector<at::Tensor>(outputs.begin() + 1, outputs.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) {
  m.impl("mult_layer", &mult_layer_cpu);
  m.impl("mult_layer_backward", &mult_layer_backward_cpu);
}

TORCH_LIBRARY_IMPL(imer_fast, Autograd, m) { m.impl("mult_layer", &mult_layer_autograd); }

}  // namespace imer_fast
