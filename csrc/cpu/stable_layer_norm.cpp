// CPU kernels of imer_fast::stable_layer_norm and imer_fast::stable_layer_norm_backward: LayerNorm
// over the last dimension, optionally "stable" (FedDISC / Imagen): each row is first divided by its
// row maximum a = max_j x[j] (not the absolute maximum; a = 1 when not stable), and a is a constant
// for the backward (the release detaches it).
//
//   xh = x / a,  mean = sum(xh) / N,  var = sum((xh - mean)^2) / N,  rstd = 1 / sqrt(var + eps)
//   y  = (xh - mean) * rstd * weight + bias
//   dx = (rstd / a) * (g - mean(g) - xn * mean(g * xn)),  g = grad_y * weight,  xn = (xh - mean) * rstd
//   dweight = sum_rows grad_y * xn,  dbias = sum_rows grad_y
//
// The release's quirks are kept: a negative row maximum flips the sign of the row, a row maximum of
// 0 divides by zero (inf / nan in that row, as the release gives).
//
// Layout: x and grad_y are read through .contiguous() (a copy only for non-contiguous inputs); y
// and dx are fresh contiguous tensors of x's shape and dtype; mean / rstd / row_max are contiguous
// [x.shape[:-1]] in float32 (float64 for float64 x). half / bfloat16 are computed in float32.
//
// Variance is two-pass (mean first, then the centred squares), like torch.var. Row sums use eight
// interleaved partial sums combined in a fixed tree, which lets the compiler vectorise them without
// -ffast-math and keeps the result independent of the thread count. dweight / dbias are summed per
// chunk of rows whose size depends on the row count only, then the chunk partials are added in chunk
// order: bitwise-repeatable for any number of threads, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec_rows.h"

// No fused multiply-add contraction in this file (GCC contracts by default, and the AVX-512 clones
// have FMA): the backward must rebuild the forward's normalised rows bit for bit, and a fused
// x * (1 / a) - mean or grad * weight - mean(grad * weight) keeps bits the rounded operand lost, which
// rstd (up to 1 / sqrt(eps)) magnifies on near-constant rows (a one-feature row then got dx ~ 1e-5, not 0).
#pragma GCC optimize("fp-contract=off")

namespace imer_fast {
namespace {

constexpr const char* kOp = "imer_fast::stable_layer_norm: ";
constexpr const char* kOpBackward = "imer_fast::stable_layer_norm_backward: ";
constexpr int64_t kLanes = 8;
constexpr int64_t kMaxChunks = 256;  // partial rows of dweight / dbias
constexpr int64_t kMinChunkRows = 32;

// sum_{j < n} f(j) with kLanes interleaved accumulators combined in a fixed order.
template <typename acc_t, typename F>
inline acc_t lane_sum(int64_t n, const F& f) {
  acc_t lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += f(j + l);
  }
  acc_t tail = 0;
  for (; j < n; ++j) tail += f(j);
  return (((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]))) + tail;
}

// Row maximum, ignoring NaN (kLanes interleaved maxima, so it vectorises); the caller re-checks
// rows whose mean came out NaN.
template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  acc_t lanes[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lanes[l] = x[0];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] = x[j + l] > lanes[l] ? x[j + l] : lanes[l];
  }
  for (; j < n; ++j) lanes[0] = x[j] > lanes[0] ? x[j] : lanes[0];
  acc_t m = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) m = lanes[l] > m ? lanes[l] : m;
  return m;
}

at::ScalarType stat_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_x(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 1 && at::isFloatingType(x.scalar_type()), op,
              "x must be a floating tensor with at least 1 dimension; got ", x.scalar_type(), " of shape ", x.sizes());
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              "x must be float16, bfloat16, float32 or float64; got ", t);
  TORCH_CHECK(x.size(-1) >= 1, op, "the normalised (last) dimension of x must be >= 1; got x of shape ", x.sizes());
}

void check_affine(const char* op, const char* name, const c10::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(-1), op, name, " must have shape [N = ", x.size(-1),
              "] (the last dimension of x); got ", t->sizes());
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), op, name, " dtype must match x (", x.scalar_type(), "); got ",
              t->scalar_type());
  TORCH_CHECK(t->device() == x.device(), op, name, " is on ", t->device(), " but x is on ", x.device());
}

std::vector<int64_t> leading_shape(const at::Tensor& x) {
  return std::vector<int64_t>(x.sizes().begin(), x.sizes().end() - 1);
}

// Rows [begin, end) of the forward (module doc of imer_fast/ops/layer_norm.py); xh is a scratch row.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void forward_rows(const scalar_t* __restrict__ xp, const scalar_t* wp,
                                                        const scalar_t* bp, scalar_t* __restrict__ yp, acc_t* mean_p,
                                                        acc_t* rstd_p, acc_t* amax_p, acc_t* __restrict__ xh,
                                                        int64_t begin, int64_t end, int64_t N, acc_t eps_c, acc_t inv_n,
                                                        bool stable) {
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* __restrict__ xr = xp + i * N;
    scalar_t* __restrict__ yr = yp + i * N;
    for (int64_t j = 0; j < N; ++j) xh[j] = static_cast<acc_t>(xr[j]);
    acc_t a = acc_t(1);
    if (stable) {
      a = row_max(xh, N);
      for (int64_t j = 0; j < N; ++j) xh[j] = xh[j] / a;
    }
    const acc_t mu = lane_sum<acc_t>(N, [&](int64_t j) { return xh[j]; }) * inv_n;
    // A NaN in the row makes the whole row NaN either way; only the stored row_max needs it
    // (torch.amax propagates NaN).
    if (stable && std::isnan(mu) && !std::isnan(a)) {
      for (int64_t j = 0; j < N; ++j) {
        if (std::isnan(static_cast<acc_t>(xr[j]))) {
          a = static_cast<acc_t>(xr[j]);
          break;
        }
      }
    }
    const acc_t var = lane_sum<acc_t>(N, [&](int64_t j) {
                        const acc_t d = xh[j] - mu;
                        return d * d;
                      }) * inv_n;
    const acc_t rs = acc_t(1) / std::sqrt(var + eps_c);
    if (wp != nullptr && bp != nullptr) {
      for (int64_t j = 0; j < N; ++j) {
        yr[j] = static_cast<scalar_t>((xh[j] - mu) * rs * static_cast<acc_t>(wp[j]) + static_cast<acc_t>(bp[j]));
      }
    } else if (wp != nullptr) {
      for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((xh[j] - mu) * rs * static_cast<acc_t>(wp[j]));
    } else if (bp != nullptr) {
      for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((xh[j] - mu) * rs + static_cast<acc_t>(bp[j]));
    } else {
      for (int64_t j = 0; j < N; ++j) yr[j] = static_cast<scalar_t>((xh[j] - mu) * rs);
    }
    mean_p[i] = mu;
    rstd_p[i] = rs;
    amax_p[i] = a;
  }
}

// One float32 row on eight-lane vectors (vec_rows.h), compiled per instruction set (the build has
// no -march flag): row maximum, xh = x / a into the scratch row with its sum, centred squares
// (vec_rows::row_power_sum), output. Lanes are combined in a fixed order.
IMER_FAST_ROW_CLONES void forward_rows_f32(const float* xp, const float* wp, const float* bp, float* yp, float* mean_p,
                                          float* rstd_p, float* amax_p, float* xh, int64_t begin, int64_t end,
                                          int64_t N, float eps_c, float inv_n, bool stable) {
  using namespace vec_rows;
  const int64_t vec_end = N - N % 8;
  for (int64_t i = begin; i < end; ++i) {
    const float* xr = xp + i * N;
    float* yr = yp + i * N;
    float a = 1.0f;
    if (stable) {  // four independent maxima: one running maximum would wait on each comparison
      F8 m0 = F8{} + xr[0], m1 = m0, m2 = m0, m3 = m0;
      int64_t j = 0;
      for (; j + 32 <= vec_end; j += 32) {
        const F8 v0 = load8(xr + j), v1 = load8(xr + j + 8), v2 = load8(xr + j + 16), v3 = load8(xr + j + 24);
        m0 = v0 > m0 ? v0 : m0;
        m1 = v1 > m1 ? v1 : m1;
        m2 = v2 > m2 ? v2 : m2;
        m3 = v3 > m3 ? v3 : m3;
      }
      for (; j < vec_end; j += 8) {
        const F8 v = load8(xr + j);
        m0 = v > m0 ? v : m0;
      }
      m0 = m1 > m0 ? m1 : m0;
      m2 = m3 > m2 ? m3 : m2;
      const F8 m = m2 > m0 ? m2 : m0;
      a = m[0];
      for (int l = 1; l < 8; ++l) a = m[l] > a ? m[l] : a;
      for (int64_t j = vec_end; j < N; ++j) a = xr[j] > a ? xr[j] : a;
    }
    // x / a as x * (1 / a): at most one rounding apart, and division is the slowest vector unit. An a
    // whose reciprocal is not a normal float (zero, subnormal, non-finite, or |a| >= 2^126) keeps the
    // division. backward_rows_f32 rebuilds xh with the same rule, element for element.
    F8 s0 = F8{}, s1 = F8{};
    int64_t j = 0;
    const float inv_a = 1.0f / a;
    const bool multiply = std::isnormal(a) && std::isnormal(inv_a);
    if (multiply) {
      for (; j + 16 <= vec_end; j += 16) {
        const F8 v0 = load8(xr + j) * inv_a, v1 = load8(xr + j + 8) * inv_a;
        store8(xh + j, v0);
        store8(xh + j + 8, v1);
        s0 += v0;
        s1 += v1;
      }
    }
    for (; j < vec_end; j += 8) {
      const F8 v = multiply ? load8(xr + j) * inv_a : load8(xr + j) / a;
      store8(xh + j, v);
      s0 += v;
    }
    const F8 s = s0 + s1;
    float tail = 0.0f;
    for (int64_t j = vec_end; j < N; ++j) {
      xh[j] = multiply ? xr[j] * inv_a : xr[j] / a;
      tail += xh[j];
    }
    const float mu = (hsum(s) + tail) * inv_n;
    if (stable && std::isnan(mu) && !std::isnan(a)) {  // torch.amax propagates NaN (module doc)
      for (int64_t j = 0; j < N; ++j) {
        if (std::isnan(xr[j])) {
          a = xr[j];
          break;
        }
      }
    }
    const float rs = 1.0f / std::sqrt(row_power_sum(xh, N, -mu, true) * inv_n + eps_c);
    for (int64_t j = 0; j < vec_end; j += 8) {
      F8 v = (load8(xh + j) - mu) * rs;
      if (wp != nullptr) v *= load8(wp + j);
      if (bp != nullptr) v += load8(bp + j);
      store8(yr + j, v);
    }
    for (int64_t j = vec_end; j < N; ++j) {
      float v = (xh[j] - mu) * rs;
      if (wp != nullptr) v *= wp[j];
      if (bp != nullptr) v += bp[j];
      yr[j] = v;
    }
    mean_p[i] = mu;
    rstd_p[i] = rs;
    amax_p[i] = a;
  }
}

// Backward of rows [begin, end) in acc_t (module doc of imer_fast/ops/layer_norm.py): dx when dxp is
// given, grad_y * xn and grad_y added to dw_row / db_row when given; buf holds 2 * N scratch values.
template <typename scalar_t, typename acc_t>
void backward_rows(const scalar_t* __restrict__ gp, const scalar_t* __restrict__ xp, const scalar_t* wp,
                   const acc_t* mean_p, const acc_t* rstd_p, const acc_t* amax_p, scalar_t* dxp,
                   acc_t* __restrict__ dw_row, acc_t* __restrict__ db_row, acc_t* buf, int64_t begin, int64_t end,
                   int64_t N) {
  acc_t* __restrict__ xn = buf;
  acc_t* __restrict__ g = buf + N;
  const acc_t n = static_cast<acc_t>(N);
  for (int64_t i = begin; i < end; ++i) {
    const scalar_t* __restrict__ xr = xp + i * N;
    const scalar_t* __restrict__ gr = gp + i * N;
    const acc_t a = amax_p[i], mu = mean_p[i], rs = rstd_p[i];
    for (int64_t j = 0; j < N; ++j) xn[j] = (static_cast<acc_t>(xr[j]) / a - mu) * rs;
    if (dxp != nullptr) {
      if (wp != nullptr) {
        for (int64_t j = 0; j < N; ++j) g[j] = static_cast<acc_t>(gr[j]) * static_cast<acc_t>(wp[j]);
      } else {
        for (int64_t j = 0; j < N; ++j) g[j] = static_cast<acc_t>(gr[j]);
      }
      // Means by division, not by a rounded 1 / N: a row of equal g then gets g - mean(g) == 0.
      const acc_t mean_g = lane_sum<acc_t>(N, [&](int64_t j) { return g[j]; }) / n;
      const acc_t mean_gxn = lane_sum<acc_t>(N, [&](int64_t j) { return g[j] * xn[j]; }) / n;
      const acc_t scale = rs / a;
      scalar_t* __restrict__ dxr = dxp + i * N;
      for (int64_t j = 0; j < N; ++j) dxr[j] = static_cast<scalar_t>(scale * (g[j] - mean_g - xn[j] * mean_gxn));
    }
    if (dw_row != nullptr && db_row != nullptr) {
      for (int64_t j = 0; j < N; ++j) {
        const acc_t gy = static_cast<acc_t>(gr[j]);
        dw_row[j] += gy * xn[j];
        db_row[j] += gy;
      }
    } else if (dw_row != nullptr) {
      for (int64_t j = 0; j < N; ++j) dw_row[j] += static_cast<acc_t>(gr[j]) * xn[j];
    } else if (db_row != nullptr) {
      for (int64_t j = 0; j < N; ++j) db_row[j] += static_cast<acc_t>(gr[j]);
    }
  }
}

// Backward of float32 rows [begin, end) on eight-lane vectors, compiled per instruction set: xn is
// rebuilt from x the way forward_rows_f32 built xh (x * (1 / a) where a and that reciprocal are normal
// floats, else x / a; no fused multiply-add, see the pragma above),
// dx is written when dxp is given, and grad_y * xn and grad_y are added to dw_row / db_row when given.
// xn is a scratch row of N floats.
IMER_FAST_ROW_CLONES void backward_rows_f32(const float* gp, const float* xp, const float* wp, const float* mean_p,
                                           const float* rstd_p, const float* amax_p, float* dxp, float* dw_row,
                                           float* db_row, float* xn, int64_t begin, int64_t end, int64_t N) {
  using namespace vec_rows;
  const int64_t vec_end = N - N % 8;
  const float n = static_cast<float>(N);
  for (int64_t i = begin; i < end; ++i) {
    const float* xr = xp + i * N;
    const float* gr = gp + i * N;
    const float a = amax_p[i], mu = mean_p[i], rs = rstd_p[i];
    const float inv_a = 1.0f / a;
    const bool multiply = std::isnormal(a) && std::isnormal(inv_a);
    F8 sum_g{}, sum_gxn{};
    float tail_g = 0.0f, tail_gxn = 0.0f;
    for (int64_t j = 0; j < N; j += 8) {
      if (j == vec_end) {  // scalar tail, same formulas
        for (int64_t t = j; t < N; ++t) {
          const float v = ((multiply ? xr[t] * inv_a : xr[t] / a) - mu) * rs;
          const float gy = gr[t], g = wp != nullptr ? gy * wp[t] : gy;
          xn[t] = v;
          tail_g += g;
          tail_gxn += g * v;
          if (dw_row != nullptr) dw_row[t] += gy * v;
          if (db_row != nullptr) db_row[t] += gy;
        }
        break;
      }
      const F8 xv = load8(xr + j);
      const F8 v = ((multiply ? xv * inv_a : xv / a) - mu) * rs;
      const F8 gy = load8(gr + j), g = wp != nullptr ? gy * load8(wp + j) : gy;
      store8(xn + j, v);
      sum_g += g;
      sum_gxn += g * v;
      if (dw_row != nullptr) store8(dw_row + j, load8(dw_row + j) + gy * v);
      if (db_row != nullptr) store8(db_row + j, load8(db_row + j) + gy);
    }
    if (dxp == nullptr) continue;
    // Means by division, not by a rounded 1 / N: a row of equal g then gets g - mean(g) == 0.
    const float mean_g = (hsum(sum_g) + tail_g) / n, mean_gxn = (hsum(sum_gxn) + tail_gxn) / n;
    const float scale = rs / a;
    float* dxr = dxp + i * N;
    int64_t j = 0;
    for (; j < vec_end; j += 8) {
      const F8 gy = load8(gr + j), g = wp != nullptr ? gy * load8(wp + j) : gy;
      store8(dxr + j, scale * (g - mean_g - load8(xn + j) * mean_gxn));
    }
    for (; j < N; ++j) {
      const float g = wp != nullptr ? gr[j] * wp[j] : gr[j];
      dxr[j] = scale * (g - mean_g - xn[j] * mean_gxn);
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_rows_any(const scalar_t* gp, const scalar_t* xp, const scalar_t* wp, const acc_t* mean_p,
                       const acc_t* rstd_p, const acc_t* amax_p, scalar_t* dxp, acc_t* dw_row, acc_t* db_row,
                       acc_t* buf, int64_t begin, int64_t end, int64_t N) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    backward_rows_f32(gp, xp, wp, mean_p, rstd_p, amax_p, dxp, dw_row, db_row, buf, begin, end, N);
  } else {
    backward_rows<scalar_t, acc_t>(gp, xp, wp, mean_p, rstd_p, amax_p, dxp, dw_row, db_row, buf, begin, end, N);
  }
}

template <typename scalar_t, typename acc_t>
void forward_rows_any(const scalar_t* xp, const scalar_t* wp, const scalar_t* bp, scalar_t* yp, acc_t* mean_p,
                      acc_t* rstd_p, acc_t* amax_p, acc_t* xh, int64_t begin, int64_t end, int64_t N, acc_t eps_c,
                      acc_t inv_n, bool stable) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    forward_rows_f32(xp, wp, bp, yp, mean_p, rstd_p, amax_p, xh, begin, end, N, eps_c, inv_n, stable);
  } else {
    forward_rows<scalar_t, acc_t>(xp, wp, bp, yp, mean_p, rstd_p, amax_p, xh, begin, end, N, eps_c, inv_n, stable);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> stable_layer_norm_cpu(
    const at::Tensor& x_in, const c10::optional<at::Tensor>& weight_in, const c10::optional<at::Tensor>& bias_in,
    double eps, bool stable) {
  check_x(kOp, x_in);
  check_affine(kOp, "weight", weight_in, x_in);
  check_affine(kOp, "bias", bias_in, x_in);
  const int64_t N = x_in.size(-1);
  const int64_t M = x_in.numel() / N;
  const auto x = x_in.contiguous();
  const auto weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  auto y = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  const auto stat_options = x_in.options().dtype(stat_type(x_in.scalar_type()));
  const auto lead = leading_shape(x_in);
  auto mean = at::empty(lead, stat_options), rstd = at::empty(lead, stat_options), amax = at::empty(lead, stat_options);
  if (M == 0) return {y, mean, rstd, amax};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stable_layer_norm_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // float, or double for double
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* wp = weight.defined() ? weight.data_ptr<scalar_t>() : nullptr;
    const scalar_t* bp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.data_ptr<scalar_t>();
    acc_t* mean_p = mean.data_ptr<acc_t>();
    acc_t* rstd_p = rstd.data_ptr<acc_t>();
    acc_t* amax_p = amax.data_ptr<acc_t>();
    const acc_t eps_c = static_cast<acc_t>(eps);
    const acc_t inv_n = acc_t(1) / static_cast<acc_t>(N);
    const int64_t grain = std::max<int64_t>(1, 32768 / N);
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> buf(N);  // xh of the current row
      forward_rows_any<scalar_t, acc_t>(xp, wp, bp, yp, mean_p, rstd_p, amax_p, buf.data(), begin, end, N, eps_c,
                                        inv_n, stable);
    });
  });
  return {y, mean, rstd, amax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stable_layer_norm_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const c10::optional<at::Tensor>& weight_in,
    const at::Tensor& mean_in, const at::Tensor& rstd_in, const at::Tensor& row_max_in,
    std::array<bool, 3> output_mask) {
  check_x(kOpBackward, x_in);
  check_affine(kOpBackward, "weight", weight_in, x_in);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes() && at::isFloatingType(grad_y_in.scalar_type()), kOpBackward,
              "grad_y must be a floating tensor of x's shape ", x_in.sizes(), "; got ", grad_y_in.scalar_type(),
              " of shape ", grad_y_in.sizes());
  const int64_t N = x_in.size(-1);
  const int64_t M = x_in.numel() / N;
  const auto st = stat_type(x_in.scalar_type());
  const std::pair<const char*, const at::Tensor*> stats[] = {{"mean", &mean_in}, {"rstd", &rstd_in},
                                                             {"row_max", &row_max_in}};
  for (const auto& [name, t] : stats) {
    TORCH_CHECK(t->numel() == M && t->scalar_type() == st, kOpBackward, name, " must be a ", st, " tensor of ", M,
                " elements (x.shape[:-1]); got ", t->scalar_type(), " of shape ", t->sizes());
  }
  const bool need_x = output_mask[0], need_w = output_mask[1] && weight_in.has_value(), need_b = output_mask[2];
  // Outputs not asked for are distinct empty tensors (one shared tensor would alias the outputs).
  const auto none = [&] { return at::empty({0}, x_in.options()); };
  at::Tensor dx = none(), dweight = none(), dbias = none();
  if (!(need_x || need_w || need_b)) return {dx, dweight, dbias};

  const auto x = x_in.contiguous();
  const auto grad_y = grad_y_in.to(x_in.scalar_type()).contiguous();
  const auto weight = weight_in.has_value() ? weight_in->contiguous() : at::Tensor();
  const auto mean = mean_in.contiguous(), rstd = rstd_in.contiguous(), amax = row_max_in.contiguous();
  if (need_x) dx = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  // Fixed chunks of rows (a function of M only) own one partial row of dweight and dbias each.
  const int64_t chunk_rows = std::max<int64_t>(kMinChunkRows, (M + kMaxChunks - 1) / kMaxChunks);
  const int64_t chunks = (M + chunk_rows - 1) / chunk_rows;
  const auto acc_options = x_in.options().dtype(st);
  at::Tensor dw_part = need_w ? at::zeros({std::max<int64_t>(chunks, 1), N}, acc_options) : at::Tensor();
  at::Tensor db_part = need_b ? at::zeros({std::max<int64_t>(chunks, 1), N}, acc_options) : at::Tensor();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "stable_layer_norm_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = grad_y.data_ptr<scalar_t>();
    const scalar_t* wp = weight.defined() ? weight.data_ptr<scalar_t>() : nullptr;
    const acc_t* mean_p = mean.data_ptr<acc_t>();
    const acc_t* rstd_p = rstd.data_ptr<acc_t>();
    const acc_t* amax_p = amax.data_ptr<acc_t>();
    scalar_t* dxp = need_x ? dx.data_ptr<scalar_t>() : nullptr;
    acc_t* dwp = need_w ? dw_part.data_ptr<acc_t>() : nullptr;
    acc_t* dbp = need_b ? db_part.data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      std::vector<acc_t> buf(2 * N);  // scratch: xn, and g for the generic rows
      for (int64_t c = c_begin; c < c_end; ++c) {
        backward_rows_any<scalar_t, acc_t>(gp, xp, wp, mean_p, rstd_p, amax_p, dxp, need_w ? dwp + c * N : nullptr,
                                           need_b ? dbp + c * N : nullptr, buf.data(), c * chunk_rows,
                                           std::min(M, (c + 1) * chunk_rows), N);
      }
    });
  });
  // Chunk partials added in chunk order, columns in parallel.
  const auto reduce = [&](const at::Tensor& part, at::ScalarType out_type) {
    auto out = at::empty({N}, part.options());
    AT_DISPATCH_FLOATING_TYPES(part.scalar_type(), "stable_layer_norm_reduce", [&] {
      const scalar_t* p = part.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t rows = part.size(0);
      at::parallel_for(0, N, 1024, [&](int64_t begin, int64_t end) {
        for (int64_t j = begin; j < end; ++j) o[j] = p[j];
        for (int64_t c = 1; c < rows; ++c) {
          for (int64_t j = begin; j < end; ++j) o[j] += p[c * N + j];
        }
      });
    });
    return out.to(out_type);
  };
  if (need_w) dweight = reduce(dw_part, weight_in->scalar_type());
  if (need_b) dbias = reduce(db_part, x_in.scalar_type());
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) {
  m.impl("stable_layer_norm", &stable_layer_norm_cpu);
  m.impl("stable_layer_norm_backward", &stable_layer_norm_backward_cpu);
}

}  // namespace imer_fast
