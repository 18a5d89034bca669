// CPU kernel of imer_fast::winograd_conv1d (semantics: imer_fast/ops/winograd_conv.py).
//
// A 3-tap convolution (stride 1, zero padding 1) over channels-last rows as Winograd F(2, 3): each
// pair of output positions (2i, 2i + 1) reads the four input rows d0..d3 = x[2i - 1 .. 2i + 2] and
//   m = (d0 - d2, d1 + d2, d2 - d1, d1 - d3)       input transform, one pass over x
//   M_k = m_k @ U_k  (k = 0..3)                     one batched GEMM (MKL through at::bmm)
//   y[2i] = M0 + M1 + M2,  y[2i + 1] = M1 - M2 - M3  output transform, + bias
// with U the transformed kernel. Four GEMMs over half the rows do the work of three over all of
// them: 2/3 of the direct convolution's multiply-adds, and the GEMMs run at MKL's full rate where
// oneDNN's small NWC convolutions do not. Rows are independent in both transforms and the GEMM is
// deterministic, so results are bitwise repeatable.
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

// One tile's rows. Restrict-qualified so that the loops vectorise without runtime alias checks
// (the padding rows all point at one shared zero row, which defeats GCC's overlap test).
template <typename T>
__attribute__((always_inline)) inline void input_tile(const T* __restrict d0, const T* __restrict d1,
                                                      const T* __restrict d2, const T* __restrict d3,
                                                      T* __restrict m0, T* __restrict m1, T* __restrict m2,
                                                      T* __restrict m3, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    m0[c] = d0[c] - d2[c];
    m1[c] = d1[c] + d2[c];
    m2[c] = d2[c] - d1[c];
    m3[c] = d1[c] - d3[c];
  }
}

template <typename T>
__attribute__((always_inline)) inline void output_tile(const T* __restrict M0, const T* __restrict M1,
                                                       const T* __restrict M2, const T* __restrict M3,
                                                       const T* __restrict bias, T* __restrict even,
                                                       T* __restrict odd, int64_t n) {
  for (int64_t c = 0; c < n; ++c) {
    even[c] = ((M0[c] + M1[c]) + M2[c]) + bias[c];
    if (odd) odd[c] = ((M1[c] - M2[c]) - M3[c]) + bias[c];
  }
}

// float32 tiles compiled per instruction set (the build has no -march flag); float64 as is.
IMER_FAST_ROW_CLONES void input_tile_f32(const float* d0, const float* d1, const float* d2, const float* d3,
                                         float* m0, float* m1, float* m2, float* m3, int64_t n) {
  input_tile<float>(d0, d1, d2, d3, m0, m1, m2, m3, n);
}
IMER_FAST_ROW_CLONES void output_tile_f32(const float* M0, const float* M1, const float* M2, const float* M3,
                                          const float* bias, float* even, float* odd, int64_t n) {
  output_tile<float>(M0, M1, M2, M3, bias, even, odd, n);
}

template <typename T>
void input_tile_any(const T* d0, const T* d1, const T* d2, const T* d3, T* m0, T* m1, T* m2, T* m3, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    input_tile_f32(d0, d1, d2, d3, m0, m1, m2, m3, n);
  } else {
    input_tile<T>(d0, d1, d2, d3, m0, m1, m2, m3, n);
  }
}

template <typename T>
void output_tile_any(const T* M0, const T* M1, const T* M2, const T* M3, const T* bias, T* even, T* odd, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    output_tile_f32(M0, M1, M2, M3, bias, even, odd, n);
  } else {
    output_tile<T>(M0, M1, M2, M3, bias, even, odd, n);
  }
}

// m_k[r, :] for tile r = (b, i) from the rows of x_rows [B, L, C]; rows outside [0, L) are zeros.
template <typename scalar_t>
void input_transform(const scalar_t* x, scalar_t* m, int64_t B, int64_t L, int64_t C, int64_t T) {
  const int64_t N = B * T;
  at::parallel_for(0, N, kTilesPerTask, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> zeros(C, scalar_t(0));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, p = 2 * (r % T) - 1;
      const scalar_t* d[4];
      for (int j = 0; j < 4; ++j) {
        const int64_t q = p + j;
        d[j] = (q >= 0 && q < L) ? x + (b * L + q) * C : zeros.data();
      }
      scalar_t* m0 = m + r * C;
      input_tile_any<scalar_t>(d[0], d[1], d[2], d[3], m0, m0 + N * C, m0 + 2 * N * C, m0 + 3 * N * C, C);
    }
  });
}

// y rows (2i, 2i + 1) of sample b from M_k[r, :] plus the bias (zeros when absent); the odd row is
// dropped past the end of an odd L.
template <typename scalar_t>
void output_transform(const scalar_t* M, const scalar_t* bias, scalar_t* y, int64_t B, int64_t L, int64_t Co,
                      int64_t T) {
  const int64_t N = B * T;
  at::parallel_for(0, N, kTilesPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / T, i = r % T;
      const scalar_t* M0 = M + r * Co;
      scalar_t* even = y + (b * L + 2 * i) * Co;
      output_tile_any<scalar_t>(M0, M0 + N * Co, M0 + 2 * N * Co, M0 + 3 * N * Co, bias, even,
                                2 * i + 1 < L ? even + Co : nullptr, Co);
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

at::Tensor winograd_conv1d_cpu(const at::Tensor& x, const at::Tensor& weight_tf, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 3, kOp, "x must be [B, C, L]; got shape ", x.sizes());
  TORCH_CHECK(weight_tf.dim() == 3 && weight_tf.size(0) == 4 && weight_tf.size(1) == x.size(1), kOp,
              "weight_tf must be [4, C = ", x.size(1), ", Co]; got shape ", weight_tf.sizes());
  TORCH_CHECK(x.scalar_type() == weight_tf.scalar_type(), kOp, "x and weight_tf must share a dtype; got ",
              x.scalar_type(), " and ", weight_tf.scalar_type());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, kOp,
              "x must be float32 or float64; got ", x.scalar_type());
  const int64_t B = x.size(0), C = x.size(1), L = x.size(2), Co = weight_tf.size(2), T = (L + 1) / 2;
  at::Tensor bias_c = at::zeros({Co}, x.options());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == Co && bias->scalar_type() == x.scalar_type(), kOp,
                "bias must be a [Co = ", Co, "] ", x.scalar_type(), " tensor; got ", bias->scalar_type(), " of shape ",
                bias->sizes());
    bias_c = bias->contiguous();
  }
  at::Tensor y_rows = at::empty({B, L, Co}, x.options());
  if (y_rows.numel() == 0) return y_rows.transpose(1, 2);
  const at::Tensor x_rows = x.transpose(1, 2).contiguous();  // no copy for a channels-last x
  at::Tensor m = scratch(0, {4, B * T, C}, x.options());
  at::Tensor M = scratch(1, {4, B * T, Co}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "winograd_conv1d", [&] {
    input_transform<scalar_t>(x_rows.data_ptr<scalar_t>(), m.data_ptr<scalar_t>(), B, L, C, T);
    at::bmm_out(M, m, weight_tf.contiguous());
    output_transform<scalar_t>(M.data_ptr<scalar_t>(), bias_c.data_ptr<scalar_t>(),
                               y_rows.data_ptr<scalar_t>(), B, L, Co, T);
  });
  return y_rows.transpose(1, 2);
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) { m.impl("winograd_conv1d", &winograd_conv1d_cpu); }

}  // namespace imer_fast
