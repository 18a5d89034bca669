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

#include "scratch.h"
#include "vec_rows.h"

namespace imer_fast {
namespace {

constexpr const char* kOp = "imer_fast::winograd_conv1d: ";
constexpr int64_t kTilesPerTask = 8;

// Lanes of V (a float32 vector of vec_rows.h, or the scalar type itself for the channel tail and
// float64) at p + c. memcpy: the rows carry no vector alignment.
template <typename V, typename T>
__attribute__((always_inline)) inline V lanes(const T* p, int64_t c) {
  V v;
  __builtin_memcpy(&v, p + c, sizeof(V));
  return v;
}

template <typename V, typename T>
__attribute__((always_inline)) inline void put(T* p, int64_t c, V v) {
  __builtin_memcpy(p + c, &v, sizeof(V));
}

// Channels [c, c + lanes of V) of one tile's input transform: the R input rows d_in (positions
// outside [0, L) point at a zero row) into the R transformed rows m_out. Explicit lanes: GCC does not
// vectorise these loops over arrays of row pointers by itself.
template <typename V, typename T, int R>
__attribute__((always_inline)) inline void input_columns(const T* const* d_in, T* const* m_out, int64_t c) {
  const V d0 = lanes<V>(d_in[0], c), d1 = lanes<V>(d_in[1], c), d2 = lanes<V>(d_in[2], c), d3 = lanes<V>(d_in[3], c);
  if constexpr (R == 4) {
    put(m_out[0], c, d0 - d2);
    put(m_out[1], c, d1 + d2);
    put(m_out[2], c, d2 - d1);
    put(m_out[3], c, d1 - d3);
  } else if constexpr (R == 6) {
    const V d4 = lanes<V>(d_in[4], c), d5 = lanes<V>(d_in[5], c);
    const V a = d4 - T(4) * d2, b = d3 - T(4) * d1;  // shared by m1, m2
    const V e = d4 - d2, f = T(2) * (d3 - d1);        // shared by m3, m4
    put(m_out[0], c, T(4) * d0 - T(5) * d2 + d4);
    put(m_out[1], c, a + b);
    put(m_out[2], c, a - b);
    put(m_out[3], c, e + f);
    put(m_out[4], c, e - f);
    put(m_out[5], c, T(4) * d1 - T(5) * d3 + d5);
  } else {
    static_assert(R == 8, "F(2, 3), F(4, 3) or F(6, 3)");
    const V d4 = lanes<V>(d_in[4], c), d5 = lanes<V>(d_in[5], c), d6 = lanes<V>(d_in[6], c),
            d7 = lanes<V>(d_in[7], c);
    // rows k = 2i - 1, 2i share an even part (d2, d4, d6) and an odd part (d1, d3, d5)
    const V e12 = T(4) * (d2 + d6) - T(17) * d4, o12 = T(4) * (d1 + d5) - T(17) * d3;
    const V e34 = (d2 - T(5) * d4) + T(4) * d6, o34 = T(2) * (d1 - T(5) * d3) + T(8) * d5;
    const V e56 = T(2) * ((T(4) * d2 - T(5) * d4) + d6), o56 = (T(4) * d1 - T(5) * d3) + d5;
    put(m_out[0], c, T(4) * (d6 - d0) + T(21) * (d2 - d4));
    put(m_out[1], c, e12 + o12);
    put(m_out[2], c, e12 - o12);
    put(m_out[3], c, e34 + o34);
    put(m_out[4], c, e34 - o34);
    put(m_out[5], c, e56 + o56);
    put(m_out[6], c, e56 - o56);
    put(m_out[7], c, T(4) * (d7 - d1) + T(21) * (d3 - d5));
  }
}

// Channels [c, c + lanes of V) of one tile's output transform: y_i = (sum_k AT[i][k] M_k + bias) +
// residual_i for the valid outputs i < valid (the residual only when kRes; r_rows then holds the tile's
// residual rows, laid out as y_rows).
template <typename V, typename T, int R, bool kRes>
__attribute__((always_inline)) inline void output_columns(const T* const* M_in, const T* bias, T* const* y_rows,
                                                          const T* const* r_rows, int valid, int64_t c) {
  const V b = lanes<V>(bias, c);
  auto emit = [&](int i, V v) __attribute__((always_inline)) {
    v = v + b;
    if constexpr (kRes) v = v + lanes<V>(r_rows[i], c);
    put(y_rows[i], c, v);
  };
  const V M0 = lanes<V>(M_in[0], c), M1 = lanes<V>(M_in[1], c), M2 = lanes<V>(M_in[2], c), M3 = lanes<V>(M_in[3], c);
  if constexpr (R == 4) {
    emit(0, (M0 + M1) + M2);
    if (valid > 1) emit(1, (M1 - M2) - M3);
  } else {  // F(4, 3) and F(6, 3) share their first rows' sums and differences
    static_assert(R == 6 || R == 8, "F(2, 3), F(4, 3) or F(6, 3)");
    const V M4 = lanes<V>(M_in[4], c), M5 = lanes<V>(M_in[5], c);
    const V s12 = M1 + M2, d12 = M1 - M2, s34 = M3 + M4, d34 = M3 - M4;
    if constexpr (R == 6) {
      emit(0, (M0 + s12) + s34);
      if (valid > 1) emit(1, d12 + T(2) * d34);
      if (valid > 2) emit(2, s12 + T(4) * s34);
      if (valid > 3) emit(3, (d12 + T(8) * d34) + M5);
    } else {
      const V M6 = lanes<V>(M_in[6], c), M7 = lanes<V>(M_in[7], c);
      // y_i = (M1 ± M2) + 2^i (M3 ± M4) + 2^-i (M5 ± M6), + for even i, - for odd i
      const V s56 = M5 + M6, d56 = M5 - M6;
      emit(0, ((M0 + s12) + s34) + s56);
      if (valid > 1) emit(1, (d12 + T(2) * d34) + T(0.5) * d56);
      if (valid > 2) emit(2, (s12 + T(4) * s34) + T(0.25) * s56);
      if (valid > 3) emit(3, (d12 + T(8) * d34) + T(0.125) * d56);
      if (valid > 4) emit(4, (s12 + T(16) * s34) + T(0.0625) * s56);
      if (valid > 5) emit(5, ((d12 + T(32) * d34) + T(0.03125) * d56) + M7);
    }
  }
}

// One tile over all n channels: 16-lane vectors for float32 (one AVX-512 register, two AVX2 ones),
// then the scalar tail; float64 scalar.
template <typename T, int R>
__attribute__((always_inline)) inline void input_tile(const T* const* d_in, T* const* m_out, int64_t n) {
  int64_t c = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; c + 16 <= n; c += 16) input_columns<vec_rows::F16, T, R>(d_in, m_out, c);
  }
  for (; c < n; ++c) input_columns<T, T, R>(d_in, m_out, c);
}

template <typename T, int R, bool kRes>
__attribute__((always_inline)) inline void output_tile(const T* const* M_in, const T* bias, T* const* y_out,
                                                       const T* const* r_in, int valid, int64_t n) {
  int64_t c = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; c + 16 <= n; c += 16) output_columns<vec_rows::F16, T, R, kRes>(M_in, bias, y_out, r_in, valid, c);
  }
  for (; c < n; ++c) output_columns<T, T, R, kRes>(M_in, bias, y_out, r_in, valid, c);
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

// Scratch for m and M, kept per thread between calls (scratch.h).
at::Tensor scratch(int slot, at::IntArrayRef shape, const at::TensorOptions& options) {
  return thread_scratch(ScratchOwner::kWinograd, slot, c10::multiply_integers(shape), options).view(shape);
}

at::Tensor winograd_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight_tf, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.dim() == 3, kOp, "x must be [B, C, L]; got shape ", x.sizes());
  const int64_t rows_per_tile = weight_tf.dim() == 3 ? weight_tf.size(0) : 0;
  TORCH_CHECK((rows_per_tile == 4 || rows_per_tile == 6 || rows_per_tile == 8) && weight_tf.size(1) == x.size(1),
              kOp, "weight_tf must be [R, C = ", x.size(1),
              ", Co] with R = 4 (F(2, 3)), 6 (F(4, 3)) or 8 (F(6, 3)); got shape ", weight_tf.sizes());
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
