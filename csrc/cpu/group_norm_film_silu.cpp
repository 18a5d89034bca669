// CPU kernels of imer_fast::group_norm_film_silu and its backward (semantics:
// imer_fast/ops/group_norm.py). For x [B, C, S] (S = product of the spatial dims) and G groups of
// cpg = C / G channels:
//
//   xi   = x + input_bias[b, c]                         (optional per-sample channel bias)
//   xn   = (xi - mean_bg) * rstd_bg                       (biased variance over the cpg * S group)
//   a    = xn * weight[c] + bias[c]                       (optional affine)
//   f    = a * (1 + scale[b, c]) + shift[b, c]            (optional FiLM)
//   y    = silu(f) if apply_silu else f
//
// Backward, with gf = grad_y * silu'(f) (or grad_y), ga = gf * (1 + scale), g = ga * weight:
//   dshift = sum_s gf,  dscale = sum_s gf * a,  dweight = sum_{b,s} ga * xn,  dbias = sum_{b,s} ga
//   dx = rstd * (g - mean_group(g) - xn * mean_group(g * xn)),  dinput_bias = sum_s dx
//
// Layouts: x contiguous [B, C, S], or 3-D channels-last ([B, S, C] in memory, as the U-Nets run on
// the CPU), whose y / dx come out channels-last too; other layouts are made contiguous first.
//
// Channels-first: one task per (b, g): the group is read once for the mean, once for the centred variance and once
// for the output (it fits in L1/L2 for the U-Net shapes); the float32 backward runs on channels-last copies.
// Channels-last: one task per b, streaming
// rows of C channels with per-channel accumulators. dweight / dbias are reduced per (b, c)
// first and then over b in index order: bitwise-repeatable for any thread count, no atomics.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "vec_rows.h"

namespace imer_fast {
namespace {

constexpr const char* kOp = "imer_fast::group_norm_film_silu: ";

template <typename T>
inline T sigmoid(T v) {
  return T(1) / (T(1) + std::exp(-v));
}

// Row kernels: float32 runs the vectorised rows of vec_rows.h; other types the scalar loops. A
// group's cpg channel rows are contiguous, so the statistics run over the whole group at once.
template <typename scalar_t, typename opmath_t>
inline opmath_t row_sum(const scalar_t* row, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return vec_rows::row_power_sum(row, n, 0.0f, false);
  } else {
    opmath_t s = 0;
    for (int64_t i = 0; i < n; ++i) s += static_cast<opmath_t>(row[i]);
    return s;
  }
}

template <typename scalar_t, typename opmath_t>
inline opmath_t row_centred_squares(const scalar_t* row, int64_t n, opmath_t shift) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return vec_rows::row_power_sum(row, n, shift, true);
  } else {
    opmath_t s = 0;
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t d = static_cast<opmath_t>(row[i]) + shift;
      s += d * d;
    }
    return s;
  }
}

// SiLU in place over a float32 group (vectorised); other types apply it in their row loop.
inline void silu_group(float* y, int64_t n) { vec_rows::silu_inplace(y, n); }
template <typename T>
inline void silu_group(T*, int64_t) {}

// Channels-last rows (x [B, C, S] stored as [B, S, C]): per-channel accumulation and the per-channel
// affine + SiLU over one spatial row of C channels; float32 through vec_rows.h.
template <typename scalar_t, typename opmath_t>
inline void column_accumulate(const scalar_t* x, const opmath_t* shift, opmath_t* acc, int64_t n, bool squares) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    vec_rows::column_power_accumulate(x, shift, acc, n, squares);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t d = static_cast<opmath_t>(x[i]) + (shift ? shift[i] : opmath_t(0));
      acc[i] += squares ? d * d : d;
    }
  }
}

template <typename scalar_t, typename opmath_t>
inline void affine_row(const scalar_t* x, const opmath_t* k, const opmath_t* m, scalar_t* out, int64_t n, bool silu) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    vec_rows::affine_silu_row(x, k, m, out, n, silu);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const opmath_t f = static_cast<opmath_t>(x[i]) * k[i] + m[i];
      out[i] = static_cast<scalar_t>(silu ? f * sigmoid(f) : f);
    }
  }
}

struct Shape {
  int64_t B, C, S, G, cpg;
};

Shape shape_of(const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK(x.dim() >= 2, kOp, "x must be [B, C, *spatial]; got ", x.sizes());
  TORCH_CHECK(num_groups >= 1 && x.size(1) % num_groups == 0, kOp, "C = ", x.size(1),
              " must be divisible by num_groups = ", num_groups);
  const int64_t B = x.size(0), C = x.size(1);
  const int64_t S = (B * C) ? x.numel() / (B * C) : 0;
  return {B, C, S, num_groups, C / num_groups};
}

// The parameters' contract (weight / bias [C], input_bias / scale / shift [B, C], x's dtype): the Python
// entry point checks it; a direct torch.ops call must not read past a smaller tensor.
void check_parameters(const char* op, const at::Tensor& x, const Shape& sh, const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& input_bias,
                      const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  const std::vector<int64_t> per_channel{sh.C}, per_sample{sh.B, sh.C};
  const std::tuple<const char*, const std::optional<at::Tensor>*, const std::vector<int64_t>*> params[] = {
      {"weight", &weight, &per_channel}, {"bias", &bias, &per_channel}, {"input_bias", &input_bias, &per_sample},
      {"scale", &scale, &per_sample}, {"shift", &shift, &per_sample}};
  for (const auto& [name, t, expected] : params) {
    if (!t->has_value() || !(*t)->defined()) continue;
    TORCH_CHECK((*t)->sizes() == at::IntArrayRef(*expected) && (*t)->scalar_type() == x.scalar_type(), op, name,
                " must be a ", at::IntArrayRef(*expected), " ", x.scalar_type(), " tensor; got ", (*t)->scalar_type(),
                " of shape ", (*t)->sizes());
  }
}

// Optional [C] or [B, C] parameters as contiguous float-opmath pointers (nullptr when absent).
template <typename scalar_t>
const scalar_t* ptr_or_null(const std::optional<at::Tensor>& t, at::Tensor& keep) {
  if (!t.has_value() || !t->defined()) return nullptr;
  keep = t->contiguous();
  return keep.data_ptr<scalar_t>();
}

// x [B, C, S] stored channels-last ([B, S, C] in memory, strides (C*S, 1, C)); C = 1 or S = 1 is
// left to the channels-first path, where both layouts coincide.
bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 3 && x.size(1) > 1 && x.size(2) > 1 && x.stride(1) == 1 && x.stride(2) == x.size(1) &&
         x.stride(0) == x.size(1) * x.size(2);
}

// The output layout of both ops: channels-last for a channels-last x, contiguous otherwise.
at::Tensor empty_in_layout(const at::Tensor& x, bool channels_last) {
  if (!channels_last) return at::empty(x.sizes(), x.options());
  return at::empty({x.size(0), x.size(2), x.size(1)}, x.options()).transpose(1, 2);
}

// Per-channel views of the optional parameters for sample b.
template <typename scalar_t, typename opmath_t>
struct ChannelParams {
  const scalar_t *w, *bb, *ib, *sc, *sf;
  int64_t C;
  opmath_t weight(int64_t c) const { return w ? static_cast<opmath_t>(w[c]) : opmath_t(1); }
  opmath_t bias(int64_t c) const { return bb ? static_cast<opmath_t>(bb[c]) : opmath_t(0); }
  opmath_t in_bias(int64_t b, int64_t c) const { return ib ? static_cast<opmath_t>(ib[b * C + c]) : opmath_t(0); }
  opmath_t film(int64_t b, int64_t c) const { return sc ? opmath_t(1) + static_cast<opmath_t>(sc[b * C + c]) : opmath_t(1); }
  opmath_t shift(int64_t b, int64_t c) const { return sf ? static_cast<opmath_t>(sf[b * C + c]) : opmath_t(0); }
};

// Forward over channels-last x: one task per sample; three passes over its [S, C] block (channel
// sums, centred squares, output), each streaming whole rows of C channels.
template <typename scalar_t, typename opmath_t>
void forward_channels_last(const Shape& sh, const ChannelParams<scalar_t, opmath_t>& p, const scalar_t* xp,
                           scalar_t* yp, opmath_t* mp, opmath_t* rp, double eps, bool apply_silu) {
  const int64_t C = sh.C, S = sh.S, n = sh.cpg * S;
  at::parallel_for(0, sh.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> acc(C), shift(C), k(C), m(C);
    for (int64_t b = begin; b < end; ++b) {
      const scalar_t* xb = xp + b * S * C;
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      for (int64_t s = 0; s < S; ++s) column_accumulate<scalar_t, opmath_t>(xb + s * C, nullptr, acc.data(), C, false);
      for (int64_t g = 0; g < sh.G; ++g) {
        opmath_t sum = 0;
        for (int64_t c = g * sh.cpg; c < (g + 1) * sh.cpg; ++c) sum += acc[c] + p.in_bias(b, c) * S;
        const opmath_t mu = sum / n;
        mp[b * sh.G + g] = mu;
        for (int64_t c = g * sh.cpg; c < (g + 1) * sh.cpg; ++c) shift[c] = p.in_bias(b, c) - mu;
      }
      std::fill(acc.begin(), acc.end(), opmath_t(0));
      for (int64_t s = 0; s < S; ++s) column_accumulate<scalar_t, opmath_t>(xb + s * C, shift.data(), acc.data(), C, true);
      for (int64_t g = 0; g < sh.G; ++g) {
        opmath_t sq = 0;
        for (int64_t c = g * sh.cpg; c < (g + 1) * sh.cpg; ++c) sq += acc[c];
        const opmath_t r = opmath_t(1) / std::sqrt(sq / n + static_cast<opmath_t>(eps));
        rp[b * sh.G + g] = r;
        for (int64_t c = g * sh.cpg; c < (g + 1) * sh.cpg; ++c) {
          // f = ((x + ib - mu) * r * w + bias) * (1 + scale) + shift = x * k + m, per channel
          const opmath_t wc = p.weight(c), film = p.film(b, c);
          k[c] = r * wc * film;
          m[c] = (shift[c] * r * wc + p.bias(c)) * film + p.shift(b, c);
        }
      }
      for (int64_t s = 0; s < S; ++s) {
        affine_row<scalar_t, opmath_t>(xb + s * C, k.data(), m.data(), yp + b * S * C + s * C, C, apply_silu);
      }
    }
  });
}

// One float32 sample of the channels-last backward on the vectorised rows of vec_rows.h: the first
// pass stores gf (silu' needs an exp) for the second, which computes dx from the group means.
inline void backward_sample_float(const Shape& sh, const float* x, const float* g, float* dx,
                                  const std::vector<float>& centre, const std::vector<float>& rr,
                                  const std::vector<float>& wc, const std::vector<float>& bc,
                                  const std::vector<float>& film, const std::vector<float>& sft,
                                  std::vector<float>& s_gf, std::vector<float>& s_gfa, std::vector<float>& s_ga_xn,
                                  std::vector<float>& s_ga, std::vector<float>& s_dx, std::vector<float>& gf_rows,
                                  bool apply_silu) {
  const int64_t C = sh.C, S = sh.S, n = sh.cpg * S;
  for (int64_t s = 0; s < S; ++s) {
    vec_rows::group_norm_backward_sums_row(x + s * C, g + s * C, centre.data(), rr.data(), wc.data(), bc.data(),
                                           film.data(), sft.data(), gf_rows.data() + s * C, s_gf.data(),
                                           s_gfa.data(), s_ga_xn.data(), s_ga.data(), C, apply_silu);
  }
  if (dx == nullptr) return;
  std::vector<float> k(C), mg(C), mgx(C);
  for (int64_t grp = 0; grp < sh.G; ++grp) {
    float sum_g = 0, sum_gxn = 0;
    for (int64_t c = grp * sh.cpg; c < (grp + 1) * sh.cpg; ++c) {
      sum_g += wc[c] * s_ga[c];
      sum_gxn += wc[c] * s_ga_xn[c];
    }
    for (int64_t c = grp * sh.cpg; c < (grp + 1) * sh.cpg; ++c) {
      mg[c] = sum_g / n;
      mgx[c] = sum_gxn / n;
    }
  }
  for (int64_t c = 0; c < C; ++c) k[c] = film[c] * wc[c];
  std::fill(s_dx.begin(), s_dx.end(), 0.0f);
  for (int64_t s = 0; s < S; ++s) {
    vec_rows::group_norm_backward_dx_row(x + s * C, gf_rows.data() + s * C, centre.data(), rr.data(), k.data(),
                                         mg.data(), mgx.data(), dx + s * C, s_dx.data(), C);
  }
}

// Backward over channels-last x and grad_y: one task per sample; per-channel partial sums in the
// first pass, dx in the second (the group means of g and g * xn come from the partials). float32
// runs backward_sample_float; other types the scalar loops below.
template <typename scalar_t, typename opmath_t>
void backward_channels_last(const Shape& sh, const ChannelParams<scalar_t, opmath_t>& p, const scalar_t* xp,
                            const scalar_t* gp, scalar_t* dxp, const opmath_t* mp, const opmath_t* rp, opmath_t* pp,
                            bool apply_silu) {
  const int64_t C = sh.C, S = sh.S, n = sh.cpg * S, plane = sh.B * C;
  at::parallel_for(0, sh.B, 1, [&](int64_t begin, int64_t end) {
    std::vector<opmath_t> centre(C), rr(C), wc(C), bc(C), film(C), sft(C);
    std::vector<opmath_t> s_gf(C), s_gfa(C), s_ga_xn(C), s_ga(C), s_dx(C), mean_g(sh.G), mean_gxn(sh.G);
    std::vector<float> gf_rows(std::is_same_v<scalar_t, float> ? S * C : 0);  // float32: gf kept for pass 2
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t g = c / sh.cpg;
        centre[c] = p.in_bias(b, c) - mp[b * sh.G + g];
        rr[c] = rp[b * sh.G + g];
        wc[c] = p.weight(c);
        bc[c] = p.bias(c);
        film[c] = p.film(b, c);
        sft[c] = p.shift(b, c);
      }
      auto grad_f = [&](const scalar_t* xrow, const scalar_t* grow, int64_t c, opmath_t& xn, opmath_t& a) {
        xn = (static_cast<opmath_t>(xrow[c]) + centre[c]) * rr[c];
        a = xn * wc[c] + bc[c];
        opmath_t gf = static_cast<opmath_t>(grow[c]);
        if (apply_silu) {
          const opmath_t f = a * film[c] + sft[c], sg = sigmoid(f);
          gf *= sg * (opmath_t(1) + f * (opmath_t(1) - sg));
        }
        return gf;
      };
      std::fill(s_gf.begin(), s_gf.end(), opmath_t(0));
      std::fill(s_gfa.begin(), s_gfa.end(), opmath_t(0));
      std::fill(s_ga_xn.begin(), s_ga_xn.end(), opmath_t(0));
      std::fill(s_ga.begin(), s_ga.end(), opmath_t(0));
      if constexpr (std::is_same_v<scalar_t, float>) {
        backward_sample_float(sh, xp + b * S * C, gp + b * S * C, dxp ? dxp + b * S * C : nullptr, centre, rr, wc, bc,
                              film, sft, s_gf, s_gfa, s_ga_xn, s_ga, s_dx, gf_rows, apply_silu);
        for (int64_t c = 0; c < C; ++c) {
          pp[0 * plane + b * C + c] = s_ga_xn[c];
          pp[1 * plane + b * C + c] = s_ga[c];
          pp[3 * plane + b * C + c] = s_gfa[c];
          pp[4 * plane + b * C + c] = s_gf[c];
          if (dxp) pp[2 * plane + b * C + c] = s_dx[c];
        }
        continue;
      }
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* xrow = xp + (b * S + s) * C;
        const scalar_t* grow = gp + (b * S + s) * C;
        for (int64_t c = 0; c < C; ++c) {
          opmath_t xn, a;
          const opmath_t gf = grad_f(xrow, grow, c, xn, a);
          const opmath_t ga = gf * film[c];
          s_gf[c] += gf;
          s_gfa[c] += gf * a;
          s_ga_xn[c] += ga * xn;
          s_ga[c] += ga;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        pp[0 * plane + b * C + c] = s_ga_xn[c];
        pp[1 * plane + b * C + c] = s_ga[c];
        pp[3 * plane + b * C + c] = s_gfa[c];
        pp[4 * plane + b * C + c] = s_gf[c];
      }
      if (dxp == nullptr) continue;
      for (int64_t g = 0; g < sh.G; ++g) {
        opmath_t sum_g = 0, sum_gxn = 0;
        for (int64_t c = g * sh.cpg; c < (g + 1) * sh.cpg; ++c) {
          sum_g += wc[c] * s_ga[c];
          sum_gxn += wc[c] * s_ga_xn[c];
        }
        mean_g[g] = sum_g / n;
        mean_gxn[g] = sum_gxn / n;
      }
      std::fill(s_dx.begin(), s_dx.end(), opmath_t(0));
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* xrow = xp + (b * S + s) * C;
        const scalar_t* grow = gp + (b * S + s) * C;
        scalar_t* drow = dxp + (b * S + s) * C;
        for (int64_t c = 0; c < C; ++c) {
          opmath_t xn, a;
          const opmath_t gf = grad_f(xrow, grow, c, xn, a);
          const int64_t g = c / sh.cpg;
          const opmath_t d = rr[c] * (gf * film[c] * wc[c] - mean_g[g] - xn * mean_gxn[g]);
          s_dx[c] += d;
          drow[c] = static_cast<scalar_t>(d);
        }
      }
      for (int64_t c = 0; c < C; ++c) pp[2 * plane + b * C + c] = s_dx[c];
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_film_silu_cpu(
    const at::Tensor& x_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& input_bias, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, int64_t num_groups, double eps, bool apply_silu) {
  const Shape sh = shape_of(x_in, num_groups);
  check_parameters(kOp, x_in, sh, weight, bias, input_bias, scale, shift);
  const bool channels_last = is_channels_last(x_in);
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  at::Tensor y = empty_in_layout(x, channels_last);
  const auto stat_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({sh.B, sh.G}, x.options().dtype(stat_dtype));
  at::Tensor rstd = at::empty({sh.B, sh.G}, x.options().dtype(stat_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_film_silu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor kw, kb, kib, ksc, ksh;
    const scalar_t* w = ptr_or_null<scalar_t>(weight, kw);
    const scalar_t* bb = ptr_or_null<scalar_t>(bias, kb);
    const scalar_t* ib = ptr_or_null<scalar_t>(input_bias, kib);
    const scalar_t* sc = ptr_or_null<scalar_t>(scale, ksc);
    const scalar_t* sf = ptr_or_null<scalar_t>(shift, ksh);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    opmath_t* mp = mean.data_ptr<opmath_t>();
    opmath_t* rp = rstd.data_ptr<opmath_t>();
    if (channels_last) {
      forward_channels_last<scalar_t, opmath_t>(sh, {w, bb, ib, sc, sf, sh.C}, xp, yp, mp, rp, eps, apply_silu);
      return;
    }
    at::parallel_for(0, sh.B * sh.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t b = bg / sh.G, g = bg % sh.G;
        const int64_t c0 = g * sh.cpg;
        const int64_t n = sh.cpg * sh.S;
        // the group's cpg rows are one contiguous run of n elements
        const scalar_t* group = xp + (b * sh.C + c0) * sh.S;
        opmath_t sum = row_sum<scalar_t, opmath_t>(group, n);
        if (ib) {
          for (int64_t c = c0; c < c0 + sh.cpg; ++c) sum += static_cast<opmath_t>(ib[b * sh.C + c]) * sh.S;
        }
        const opmath_t mu = n ? sum / n : opmath_t(0);
        opmath_t sq = 0;
        if (ib) {
          for (int64_t c = c0; c < c0 + sh.cpg; ++c) {
            const scalar_t* row = xp + (b * sh.C + c) * sh.S;
            sq += row_centred_squares<scalar_t, opmath_t>(row, sh.S, static_cast<opmath_t>(ib[b * sh.C + c]) - mu);
          }
        } else {
          sq = row_centred_squares<scalar_t, opmath_t>(group, n, -mu);
        }
        const opmath_t r = opmath_t(1) / std::sqrt((n ? sq / n : opmath_t(0)) + static_cast<opmath_t>(eps));
        mp[bg] = mu;
        rp[bg] = r;
        for (int64_t c = c0; c < c0 + sh.cpg; ++c) {
          const int64_t bc = b * sh.C + c;
          const scalar_t* row = xp + bc * sh.S;
          scalar_t* out = yp + bc * sh.S;
          // f = ((x + ib - mu) * r * w + bias) * (1 + scale) + shift = x * k + m, per channel
          const opmath_t wc = w ? static_cast<opmath_t>(w[c]) : opmath_t(1);
          const opmath_t bc_ = bb ? static_cast<opmath_t>(bb[c]) : opmath_t(0);
          const opmath_t film = sc ? opmath_t(1) + static_cast<opmath_t>(sc[bc]) : opmath_t(1);
          const opmath_t sft = sf ? static_cast<opmath_t>(sf[bc]) : opmath_t(0);
          const opmath_t centre = (ib ? static_cast<opmath_t>(ib[bc]) : opmath_t(0)) - mu;
          const opmath_t k = r * wc * film;
          const opmath_t m = (centre * r * wc + bc_) * film + sft;
          if (std::is_same_v<scalar_t, float>) {
            for (int64_t i = 0; i < sh.S; ++i) out[i] = static_cast<scalar_t>(static_cast<opmath_t>(row[i]) * k + m);
          } else {
            for (int64_t i = 0; i < sh.S; ++i) {
              const opmath_t f = static_cast<opmath_t>(row[i]) * k + m;
              out[i] = static_cast<scalar_t>(apply_silu ? f * sigmoid(f) : f);
            }
          }
        }
        if (apply_silu) silu_group(yp + (b * sh.C + c0) * sh.S, n);
      }
    });
  });
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_film_silu_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& x_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& input_bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift, const at::Tensor& mean_in,
    const at::Tensor& rstd_in, int64_t num_groups, bool apply_silu, c10::List<bool> output_mask) {
  const Shape sh = shape_of(x_in, num_groups);
  check_parameters("imer_fast::group_norm_film_silu_backward: ", x_in, sh, weight, bias, input_bias, scale, shift);
  TORCH_CHECK(mean_in.sizes() == at::IntArrayRef({sh.B, sh.G}) && rstd_in.sizes() == mean_in.sizes(),
              "imer_fast::group_norm_film_silu_backward: mean and rstd must be [B, G] = [", sh.B, ", ", sh.G,
              "]; got ", mean_in.sizes(), " and ", rstd_in.sizes());
  const bool channels_last = is_channels_last(x_in);
  // float32 channels-first with at least one vector of channels: the channels-last kernel on transposed
  // copies. Its rows of C channels run on vectors; a channel's row of S positions pays a per-row cost
  // that dominates at the U-Net's and ScoreNet's lengths (6 to 48). One thread, [32, 256, 6] G32 to
  // [32, 32, 48] G4: 0.72-0.75 ms in the scalar loop below, 0.23 ms this way, copies included.
  if (!channels_last && x_in.scalar_type() == at::kFloat && sh.C >= 8 && sh.S > 1 && sh.B > 0) {
    const auto transposed = [&](const at::Tensor& t) {
      return t.reshape({sh.B, sh.C, sh.S}).transpose(1, 2).contiguous().transpose(1, 2);
    };
    auto grads = group_norm_film_silu_backward_cpu(transposed(grad_y_in), transposed(x_in), weight, bias,
                                                   input_bias, scale, shift, mean_in, rstd_in, num_groups, apply_silu,
                                                   output_mask);
    at::Tensor& dx = std::get<0>(grads);
    if (dx.numel() != 0) dx = dx.contiguous().view(x_in.sizes());
    return grads;
  }
  const at::Tensor x = channels_last ? x_in : x_in.contiguous();
  const at::Tensor gy = channels_last ? grad_y_in.transpose(1, 2).contiguous().transpose(1, 2) : grad_y_in.contiguous();
  const at::Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  TORCH_CHECK(gy.sizes() == x.sizes(), "imer_fast::group_norm_film_silu_backward: grad_y must have x's shape");
  const bool want_x = output_mask[0], want_w = output_mask[1] && weight.has_value() && weight->defined();
  const bool want_b = output_mask[2] && bias.has_value() && bias->defined();
  const bool want_ib = output_mask[3] && input_bias.has_value() && input_bias->defined();
  const bool want_sc = output_mask[4] && scale.has_value() && scale->defined();
  const bool want_sh = output_mask[5] && shift.has_value() && shift->defined();
  const bool need_dx = want_x || want_ib;
  at::Tensor dx = need_dx ? empty_in_layout(x, channels_last) : at::empty({0}, x.options());
  auto opts = x.options();
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // per-(b, c) partials: 0 dweight, 1 dbias, 2 dinput_bias, 3 dscale, 4 dshift
  at::Tensor part = at::zeros({5, sh.B, sh.C}, opts.dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "group_norm_film_silu_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor kw, kb, kib, ksc, ksh;
    const scalar_t* w = ptr_or_null<scalar_t>(weight, kw);
    const scalar_t* bb = ptr_or_null<scalar_t>(bias, kb);
    const scalar_t* ib = ptr_or_null<scalar_t>(input_bias, kib);
    const scalar_t* sc = ptr_or_null<scalar_t>(scale, ksc);
    const scalar_t* sf = ptr_or_null<scalar_t>(shift, ksh);
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* gp = gy.data_ptr<scalar_t>();
    scalar_t* dxp = need_dx ? dx.data_ptr<scalar_t>() : nullptr;
    const opmath_t* mp = mean.data_ptr<opmath_t>();
    const opmath_t* rp = rstd.data_ptr<opmath_t>();
    opmath_t* pp = part.data_ptr<opmath_t>();
    const int64_t plane = sh.B * sh.C;
    if (channels_last) {
      backward_channels_last<scalar_t, opmath_t>(sh, {w, bb, ib, sc, sf, sh.C}, xp, gp, dxp, mp, rp, pp, apply_silu);
      return;
    }
    at::parallel_for(0, sh.B * sh.G, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        const int64_t b = bg / sh.G, g = bg % sh.G, c0 = g * sh.cpg;
        const opmath_t mu = mp[bg], r = rp[bg];
        const int64_t n = sh.cpg * sh.S;
        opmath_t sum_g = 0, sum_gxn = 0;
        for (int64_t c = c0; c < c0 + sh.cpg; ++c) {
          const int64_t bc = b * sh.C + c;
          const scalar_t* row = xp + bc * sh.S;
          const scalar_t* grow = gp + bc * sh.S;
          const opmath_t wc = w ? static_cast<opmath_t>(w[c]) : opmath_t(1);
          const opmath_t bc_ = bb ? static_cast<opmath_t>(bb[c]) : opmath_t(0);
          const opmath_t film = sc ? opmath_t(1) + static_cast<opmath_t>(sc[bc]) : opmath_t(1);
          const opmath_t sft = sf ? static_cast<opmath_t>(sf[bc]) : opmath_t(0);
          const opmath_t centre = (ib ? static_cast<opmath_t>(ib[bc]) : opmath_t(0)) - mu;
          opmath_t s_gf = 0, s_gfa = 0, s_ga_xn = 0, s_ga = 0, s_g = 0, s_gxn = 0;
          for (int64_t i = 0; i < sh.S; ++i) {
            const opmath_t xn = (static_cast<opmath_t>(row[i]) + centre) * r;
            const opmath_t a = xn * wc + bc_;
            opmath_t gf = static_cast<opmath_t>(grow[i]);
            if (apply_silu) {
              const opmath_t f = a * film + sft, sg = sigmoid(f);
              gf *= sg * (opmath_t(1) + f * (opmath_t(1) - sg));
            }
            const opmath_t ga = gf * film;
            s_gf += gf;
            s_gfa += gf * a;
            s_ga_xn += ga * xn;
            s_ga += ga;
            s_g += ga * wc;
            s_gxn += ga * wc * xn;
          }
          pp[0 * plane + bc] = s_ga_xn;
          pp[1 * plane + bc] = s_ga;
          pp[3 * plane + bc] = s_gfa;
          pp[4 * plane + bc] = s_gf;
          sum_g += s_g;
          sum_gxn += s_gxn;
        }
        if (!need_dx || n == 0) continue;
        const opmath_t mean_g = sum_g / n, mean_gxn = sum_gxn / n;
        for (int64_t c = c0; c < c0 + sh.cpg; ++c) {
          const int64_t bc = b * sh.C + c;
          const scalar_t* row = xp + bc * sh.S;
          const scalar_t* grow = gp + bc * sh.S;
          scalar_t* drow = dxp + bc * sh.S;
          const opmath_t wc = w ? static_cast<opmath_t>(w[c]) : opmath_t(1);
          const opmath_t bc_ = bb ? static_cast<opmath_t>(bb[c]) : opmath_t(0);
          const opmath_t film = sc ? opmath_t(1) + static_cast<opmath_t>(sc[bc]) : opmath_t(1);
          const opmath_t sft = sf ? static_cast<opmath_t>(sf[bc]) : opmath_t(0);
          const opmath_t centre = (ib ? static_cast<opmath_t>(ib[bc]) : opmath_t(0)) - mu;
          opmath_t s_dx = 0;
          for (int64_t i = 0; i < sh.S; ++i) {
            const opmath_t xn = (static_cast<opmath_t>(row[i]) + centre) * r;
            opmath_t gf = static_cast<opmath_t>(grow[i]);
            if (apply_silu) {
              const opmath_t f = (xn * wc + bc_) * film + sft, sg = sigmoid(f);
              gf *= sg * (opmath_t(1) + f * (opmath_t(1) - sg));
            }
            const opmath_t d = r * (gf * film * wc - mean_g - xn * mean_gxn);
            s_dx += d;
            drow[i] = static_cast<scalar_t>(d);
          }
          pp[2 * plane + bc] = s_dx;
        }
      }
    });
  });
  auto empty = [&] { return at::empty({0}, opts); };
  auto over_b = [&](int64_t k) { return part[k].sum(0).to(x.scalar_type()); };  // fixed-order reduction over b
  auto per_bc = [&](int64_t k, const std::optional<at::Tensor>& like) {
    return part[k].to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true).view(like->sizes());
  };
  return {want_x ? dx : empty(),
          want_w ? over_b(0) : empty(),
          want_b ? over_b(1) : empty(),
          want_ib ? per_bc(2, input_bias) : empty(),
          want_sc ? per_bc(3, scale) : empty(),
          want_sh ? per_bc(4, shift) : empty()};
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) {
  m.impl("group_norm_film_silu", &group_norm_film_silu_cpu);
  m.impl("group_norm_film_silu_backward", &group_norm_film_silu_backward_cpu);
}

}  // namespace imer_fast
