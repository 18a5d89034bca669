// CPU kernel of imer_fast::winograd_conv1d (semantics and transform matrices:
// imer_fast/ops/winograd_conv.py).
//
// A 3-tap convolution (stride 1, zero padding 1) over channels-last rows as Winograd F(n, 3), n = 2,
// 4 or 6 output positions per tile, picked by the transformed kernel's first dimension R = n + 2:
//   m_k = sum_j BT[k][j] d_j      input transform of the tile's rows d_j = x[n t - 1 + j], one pass
//   M_k = m_k @ U_k  (k < R)       one batched GEMM (MKL through at::bmm_out)
//   y[n t + i] = sum_k AT[i][k] M_k + bias    output transform
// F(2, 3) does 4 GEMM rows per 2 outputs, F(4, 3) 6 per 4 and F(6, 3) 8 per 6, against 3 per output
// for the direct convolution: 2/3, 1/2 and 4/9 of its multiply-adds, on MKL's GEMM where oneDNN's
// small NWC convolutions run slower. The transforms are explicit formulas (no zero coefficients multiplied). Rows are
// independent in both transforms and the GEMM is deterministic: bitwise repeatable.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "vec_rows.h"

namespace imer_fast {
namespace {

constexpr const char* kOp = "imer_fast::winograd_conv1d: ";
constexpr int64_t kTilesPerTask = 8;

// One tile's rows: R inputs (or M_k) and R transformed rows (or n outputs), n channels each.
// Restrict-qualified so that the loops vectorise without runtime alias checks (the padding rows all
// point at one shared zero row, which defeats GCC's overlap test).
template <typename T, int R>
__attribute__((always_inline)) inline void input_tile(const T* const* d_in, T* const* m_out, int64_t n) {
  const T* __restrict d0 = d_in[0];
  const T* __restrict d1 = d_in[1];
  const T* __restrict d2 = d_in[2];
  const T* __restrict d3 = d_in[3];
  T* __restrict m0 = m_out[0];
  T* __restrict m1 = m_out[1];
  T* __restrict m2 = m_out[2];
  T* __restrict m3 = m_out[3];
  if constexpr (R == 4) {
    for (int64_t c = 0; c < n; ++c) {
      m0[c] = d0[c] - d2[c];
      m1[c] = d1[c] + d2[c];
      m2[c] = d2[c] - d1[c];
      m3[c] = d1[c] - d3[c];
    }
  } else if constexpr (R == 6) {
    const T* __restrict d4 = d_in[4];
    const T* __restrict d5 = d_in[5];
    T* __restrict m4 = m_out[4];
    T* __restrict m5 = m_out[5];
    for (int64_t c = 0; c < n; ++c) {
      const T a = d4[c] - T(4) * d2[c], b = d3[c] - T(4) * d1[c];  // shared by m1, m2
      const T e = d4[c] - d2[c], f = T(2) * (d3[c] - d1[c]);        // shared by m3, m4
      m0[c] = T(4) * d0[c] - T(5) * d2[c] + d4[c];
      m1[c] = a + b;
      m2[c] = a - b;
      m3[c] = e + f;
      m4[c] = e - f;
      m5[c] = T(4) * d1[c] - T(5) * d3[c] + d5[c];
    }
  } else {
    static_assert(R == 8, "F(2, 3), F(4, 3) or F(6, 3)");
    const T* __restrict d4 = d_in[4];
    const T* __restrict d5 = d_in[5];
    const T* __restrict d6 = d_in[6];
    const T* __restrict d7 = d_in[7];
    T* __restrict m4 = m_out[4];
    T* __restrict m5 = m_out[5];
    T* __restrict m6 = m_out[6];
    T* __restrict m7 = m_out[7];
    for (int64_t c = 0; c < n; ++c) {
      // rows k = 2i - 1, 2i share an even part (d2, d4, d6) and an odd part (d1, d3, d5)
      const T e12 = T(4) * (d2[c] + d6[c]) - T(17) * d4[c], o12 = T(4) * (d1[c] + d5[c]) - T(17) * d3[c];
      const T e34 = (d2[c] - T(5) * d4[c]) + T(4) * d6[c], o34 = T(2) * (d1[c] - T(5) * d3[c]) + T(8) * d5[c];
      const T e56 = T(2) * ((T(4) * d2[c] - T(5) * d4[c]) + d6[c]), o56 = (T(4) * d1[c] - T(5) * d3[c]) + d5[c];
      m0[c] = T(4) * (d6[c] - d0[c]) + T(21) * (d2[c] - d4[c]);
      m1[c] = e12 + o12;
      m2[c] = e12 - o12;
      m3[c] = e34 + o34;
      m4[c] = e34 - o34;
      m5[c] = e56 + o56;
      m6[c] = e56 - o56;
      m7[c] = T(4) * (d7[c] - d1[c]) + T(21) * (d3[c] - d5[c]);
    }
  }
}

// v + residual row r at channel c when the op has a residual (kRes), else v.
template <bool kRes, typename T>
__attribute__((always_inline)) inline T plus_residual(T v, const T* __restrict r, int64_t c) {
  if constexpr (kRes) {
    return v + r[c];
  } else {
    return v;
  }
}

// One tile's outputs y_i = (sum_k AT[i][k] M_k + bias) + residual_i (residual only when kRes; r_in
// then holds the tile's residual rows, laid out as y_out).
template <typename T, int R, bool kRes>
__attribute__((always_inline)) inline void output_tile(const T* const* M_in, const T* __restrict bias, T* const* y_out,
                                                       const T* const* r_in, int valid, int64_t n) {
  const T* __restrict M0 = M_in[0];
  const T* __restrict M1 = M_in[1];
  const T* __restrict M2 = M_in[2];
  const T* __restrict M3 = M_in[3];
  T* __restrict y0 = y_out[0];
  const T* __restrict r0 = kRes ? r_in[0] : nullptr;
  if constexpr (R == 4) {
    T* __restrict y1 = y_out[1];
    const T* __restrict r1 = kRes ? r_in[1] : nullptr;
    for (int64_t c = 0; c < n; ++c) {
      y0[c] = plus_residual<kRes>(((M0[c] + M1[c]) + M2[c]) + bias[c], r0, c);
      if (valid > 1) y1[c] = plus_residual<kRes>(((M1[c] - M2[c]) - M3[c]) + bias[c], r1, c);
    }
  } else if constexpr (R == 6) {
    const T* __restrict M4 = M_in[4];
    const T* __restrict M5 = M_in[5];
    T* __restrict y1 = y_out[1];
    const T* __restrict r1 = kRes ? r_in[1] : nullptr;
    T* __restrict y2 = y_out[2];
    const T* __restrict r2 = kRes ? r_in[2] : nullptr;
    T* __restrict y3 = y_out[3];
    const T* __restrict r3 = kRes ? r_in[3] : nullptr;
    for (int64_t c = 0; c < n; ++c) {
      const T s12 = M1[c] + M2[c], d12 = M1[c] - M2[c], s34 = M3[c] + M4[c], d34 = M3[c] - M4[c];
      y0[c] = plus_residual<kRes>(((M0[c] + s12) + s34) + bias[c], r0, c);
      if (valid > 1) y1[c] = plus_residual<kRes>((d12 + T(2) * d34) + bias[c], r1, c);
      if (valid > 2) y2[c] = plus_residual<kRes>((s12 + T(4) * s34) + bias[c], r2, c);
      if (valid > 3) y3[c] = plus_residual<kRes>(((d12 + T(8) * d34) + M5[c]) + bias[c], r3, c);
    }
  } else {
    static_assert(R == 8, "F(2, 3), F(4, 3) or F(6, 3)");
    const T* __restrict M4 = M_in[4];
    const T* __restrict M5 = M_in[5];
    const T* __restrict M6 = M_in[6];
    const T* __restrict M7 = M_in[7];
    T* __restrict y1 = y_out[1];
    const T* __restrict r1 = kRes ? r_in[1] : nullptr;
    T* __restrict y2 = y_out[2];
    const T* __restrict r2 = kRes ? r_in[2] : nullptr;
    T* __restrict y3 = y_out[3];
    const T* __restrict r3 = kRes ? r_in[3] : nullptr;
    T* __restrict y4 = y_out[4];
    const T* __restrict r4 = kRes ? r_in[4] : nullptr;
    T* __restrict y5 = y_out[5];
    const T* __restrict r5 = kRes ? r_in[5] : nullptr;
    for (int64_t c = 0; c < n; ++c) {
      // y_i = (M1 ± M2) + 2^i (M3 ± M4) + 2^-i (M5 ± M6), + for even i, - for odd i
      const T s12 = M1[c] + M2[c], d12 = M1[c] - M2[c], s34 = M3[c] + M4[c], d34 = M3[c] - M4[c];
      const T s56 = M5[c] + M6[c], d56 = M5[c] - M6[c];
      y0[c] = plus_residual<kRes>(((M0[c] + s12) + s34 + s56) + bias[c], r0, c);
      if (valid > 1) y1[c] = plus_residual<kRes>(((d12 + T(2) * d34) + T(0.5) * d56) + bias[c], r1, c);
      if (valid > 2) y2[c] = plus_residual<kRes>(((s12 + T(4) * s34) + T(0.25) * s56) + bias[c], r2, c);
      if (valid > 3) y3[c] = plus_residual<kRes>(((d12 + T(8) * d34) + T(0.125) * d56) + bias[c], r3, c);
      if (valid > 4) y4[c] = plus_residual<kRes>(((s12 + T(16) * s34) + T(0.0625) * s56) + bias[c], r4, c);
      if (valid > 5) {
        y5[c] = plus_residual<kRes>((((d12 + T(32) * d34) + T(0.03125) * d56) + M7[c]) + bias[c], r5, c);
      }
    }
  }
}

// float32 tiles compiled per instruction set (the build has no -march flag); float64 as is.
IMER_FAST_ROW_CLONES void input_tile4_f32(const float* const* d, float* const* m, int64_t n) {
  input_tile<float, 4>(d, m, n);
}
IMER_FAST_ROW_CLONES void input_tile6_f32(const float* const* d, float* const* m, int64_t n) {
  input_tile<float, 6>(d, m, n);
}
IMER_FAST_ROW_CLONES void input_tile8_f32(const float* const* d, float* const* m, int64_t n) {
  input_tile<float, 8>(d, m, n);
}
IMER_FAST_ROW_CLONES void output_tile4_f32(const float* const* M, const float* bias, float* const* y,
                                           const float* const* r, int valid, int64_t n) {
  if (r != nullptr) {
    output_tile<float, 4, true>(M, bias, y, r, valid, n);
  } else {
    output_tile<float, 4, false>(M, bias, y, r, valid, n);
  }
}
IMER_FAST_ROW_CLONES void output_tile6_f32(const float* const* M, const float* bias, float* const* y,
                                           const float* const* r, int valid, int64_t n) {
  if (r != nullptr) {
    output_tile<float, 6, true>(M, bias, y, r, valid, n);
  } else {
    output_tile<float, 6, false>(M, bias, y, r, valid, n);
  }
}
IMER_FAST_ROW_CLONES void output_tile8_f32(const float* const* M, const float* bias, float* const* y,
                                           const float* const* r, int valid, int64_t n) {
  if (r != nullptr) {
    output_tile<float, 8, true>(M, bias, y, r, valid, n);
  } else {
    output_tile<float, 8, false>(M, bias, y, r, valid, n);
  }
}

template <typename T, int R>
void input_tile_any(const T* const* d, T* const* m, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    (R == 4 ? input_tile4_f32 : R == 6 ? input_tile6_f32 : input_tile8_f32)(d, m, n);
  } else {
    input_tile<T, R>(d, m, n);
  }
}

template <typename T, int R>
void output_tile_any(const T* const* M, const T* bias, T* const* y, const T* const* r, int valid, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    (R == 4 ? output_tile4_f32 : R == 6 ? output_tile6_f32 : output_tile8_f32)(M, bias, y, r, valid, n);
  } else if (r != nullptr) {
    output_tile<T, R, true>(M, bias, y, r, valid, n);
  } else {
    output_tile<T, R, false>(M, bias, y, r, valid, n);
  }
}

// m_k[r, :] for tile r = (b, t) from the rows of x_rows [B, L, C]; rows outside [0, L) are zeros.
template <typename scalar_t, int R>
void input_transform(const scalar_t* x, scalar_t* m, int64_t B, int64_t L, int64_t C, int64_t T) {
  constexpr int kOut = R - 2;
  const int64_t N = B * T;
  at::parallel_for(0, N, kTilesPerTask, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> zeros(C, scalar_t(0));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, p = kOut * (r % T) - 1;
      const scalar_t* d[R];
      scalar_t* mk[R];
      for (int j = 0; j < R; ++j) {
        const int64_t q = p + j;
        d[j] = (q >= 0 && q < L) ? x + (b * L + q) * C : zeros.data();
        mk[j] = m + (j * N + r) * C;
      }
      input_tile_any<scalar_t, R>(d, mk, C);
    }
  });
}

// y rows n t .. n t + n - 1 of sample b from M_k[r, :] plus the bias (zeros when absent) plus the
// residual's rows (when res is not null; laid out as y, [B, L, Co]); rows past the end of L are dropped.
template <typename scalar_t, int R>
void output_transform(const scalar_t* M, const scalar_t* bias, const scalar_t* res, scalar_t* y, int64_t B, int64_t L,
                      int64_t Co, int64_t T) {
  constexpr int kOut = R - 2;
  const int64_t N = B * T;
  at::parallel_for(0, N, kTilesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, first = kOut * (r % T);
      const scalar_t* Mk[R];
      scalar_t* rows[kOut];
      const scalar_t* res_rows[kOut];
      for (int k = 0; k < R; ++k) Mk[k] = M + (k * N + r) * Co;
      const int valid = static_cast<int>(std::min<int64_t>(kOut, L - first));
      for (int i = 0; i < kOut; ++i) {
        const int64_t row = (b * L + first + std::min(i, valid - 1)) * Co;
        rows[i] = y + row;
        res_rows[i] = res ? res + row : nullptr;
      }
      output_tile_any<scalar_t, R>(Mk, bias, rows, res ? res_rows : nullptr, valid, Co);
    }
  });
}

// Scratch for m and M, kept per thread between calls: fresh multi-megabyte buffers come from mmap
// and pay a page fault per 4 KiB on first touch, which cost as much as the transforms themselves.
at::Tensor scratch(int slot, at::IntArrayRef shape, const at::TensorOptions& options) {
  thread_local at::Tensor buffers[2];
  at::Tensor& buffer = buffers[slot];
  const int64_t numel = c10::multiply_integers(shape);
  if (!buffer.defined() || buffer.numel() < numel || buffer.scalar_type() != options.dtype().toScalarType()) {
    buffer = at::empty({numel}, options);
  }
  return buffer.narrow(0, 0, numel).view(shape);
}

at::Tensor winograd_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight_tf, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 3, kOp, "x must be [B, C, L]; got shape ", x.sizes());
  TORCH_CHECK(weight_tf.dim() == 3 && (weight_tf.size(0) == 4 || weight_tf.size(0) == 6 || weight_tf.size(0) == 8) &&
                  weight_tf.size(1) == x.size(1),
              kOp, "weight_tf must be [R, C = ", x.size(1), ", Co] with R = 4 (F(2, 3)), 6 (F(4, 3)) or 8 (F(6, 3)); got shape ",
              weight_tf.sizes());
  TORCH_CHECK(x.scalar_type() == weight_tf.scalar_type(), kOp, "x and weight_tf must share a dtype; got ",
              x.scalar_type(), " and ", weight_tf.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              "x must be float32 or float64; got ", x.scalar_type());
  const int64_t R = weight_tf.size(0), n_out = R - 2;
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), Co = weight_tf.size(2), T = (L + n_out - 1) / n_out;
  at::Tensor bias_c = at::zeros({Co}, x.options());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Co && bias->scalar_type() == x.scalar_type(), kOp,
                "bias must be a [Co = ", Co, "] ", x.scalar_type(), " tensor; got ", bias->scalar_type(), " of shape ",
                bias->sizes());
    bias_c = bias->contiguous();
  }
  at::Tensor res_rows;  // residual [B, Co, L] as rows [B, L, Co] (no copy when it is channels-last)
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->dim() == 3 && residual->size(0) == B && residual->size(1) == Co && residual->size(2) == L &&
                    residual->scalar_type() == x.scalar_type(),
                kOp, "residual must be a [B, Co, L] = [", B, ", ", Co, ", ", L, "] ", x.scalar_type(), " tensor; got ",
                residual->scalar_type(), " of shape ", residual->sizes());
    res_rows = residual->transpose(1, 2).contiguous();
  }
  at::Tensor y_rows = at::empty({B, L, Co}, x.options());
  if (y_rows.numel() == 0) return y_rows.transpose(1, 2);
  const at::Tensor x_rows = x.transpose(1, 2).contiguous();  // no copy for a channels-last x
  at::Tensor m = scratch(0, {R, B * T, C}, x.options());
  at::Tensor M = scratch(1, {R, B * T, Co}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv1d", [&] {
    const scalar_t* xp = x_rows.data_ptr<scalar_t>();
    scalar_t* mp = m.data_ptr<scalar_t>();
    if (R == 4) {
      input_transform<scalar_t, 4>(xp, mp, B, L, C, T);
    } else if (R == 6) {
      input_transform<scalar_t, 6>(xp, mp, B, L, C, T);
    } else {
      input_transform<scalar_t, 8>(xp, mp, B, L, C, T);
    }
    at::bmm_out(M, m, weight_tf.contiguous());
    const scalar_t* Mp = M.data_ptr<scalar_t>();
    scalar_t* yp = y_rows.data_ptr<scalar_t>();
    const scalar_t* bp = bias_c.data_ptr<scalar_t>();
    const scalar_t* rp = res_rows.defined() ? res_rows.data_ptr<scalar_t>() : nullptr;
    if (R == 4) {
      output_transform<scalar_t, 4>(Mp, bp, rp, yp, B, L, Co, T);
    } else if (R == 6) {
      output_transform<scalar_t, 6>(Mp, bp, rp, yp, B, L, Co, T);
    } else {
      output_transform<scalar_t, 8>(Mp, bp, rp, yp, B, L, Co, T);
    }
  });
  return y_rows.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) { m.impl("winograd_conv1d", &winograd_conv1d_cpu); }

}  // namespace imer_fast
