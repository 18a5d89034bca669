// CPU kernel of imer_fast::timestep_embedding (semantics: imer_fast/ops/timestep_embedding.py):
// out[i, j] = first(angle_ij), out[i, half + j] = second(angle_ij) with angle_ij = (t_i * freqs_j) * scale
// in freqs' dtype (float32 for half types), (first, second) = (sin, cos) or (cos, sin), float32 rows eight
// lanes at a time through a vectorised sincos (csrc/cpu/vec_rows.h); column 2 * half
// (odd dim) is zero. Rows are independent and split across threads, so the result is
// bitwise repeatable.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "vec_rows.h"

namespace imer_fast {
namespace {

constexpr int64_t kRowsPerTask = 16;

// One float32 row: eight frequencies per step through the vectorised sincos; lanes outside its range
// (|angle| >= 8192, NaN) and the tail go through libm.
IMER_FAST_ROW_CLONES void float_row(const float* freqs, int64_t half, float t, float scale, bool sin_first,
                                    float* row) {
  using namespace vec_rows;
  float* sin_dst = sin_first ? row : row + half;
  float* cos_dst = sin_first ? row + half : row;
  int64_t j = 0;
  for (; j + 8 <= half; j += 8) {
    const F8 angle = (load8(freqs + j) * t) * scale;
    if (vsincos_in_range(angle)) {
      F8 sn, cs;
      vsincos(angle, &sn, &cs);
      store8(sin_dst + j, sn);
      store8(cos_dst + j, cs);
    } else {
      for (int k = 0; k < 8; ++k) {
        sin_dst[j + k] = std::sin(angle[k]);
        cos_dst[j + k] = std::cos(angle[k]);
      }
    }
  }
  for (; j < half; ++j) {
    const float angle = (t * freqs[j]) * scale;
    sin_dst[j] = std::sin(angle);
    cos_dst[j] = std::cos(angle);
  }
}

template <typename scalar_t>
void generic_row(const scalar_t* freqs, int64_t half, scalar_t t, double scale, bool sin_first, scalar_t* row) {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t ti = static_cast<opmath_t>(t), s = static_cast<opmath_t>(scale);
  for (int64_t j = 0; j < half; ++j) {
    // Rounded like the eager expression: the product in the compute type, then the scale.
    const opmath_t angle = static_cast<opmath_t>(ti * static_cast<opmath_t>(freqs[j])) * s;
    const opmath_t sn = std::sin(angle), cs = std::cos(angle);
    row[j] = static_cast<scalar_t>(sin_first ? sn : cs);
    row[half + j] = static_cast<scalar_t>(sin_first ? cs : sn);
  }
}

void embed_row(const float* freqs, int64_t half, float t, double scale, bool sin_first, float* row) {
  float_row(freqs, half, t, static_cast<float>(scale), sin_first, row);
}

template <typename scalar_t>
void embed_row(const scalar_t* freqs, int64_t half, scalar_t t, double scale, bool sin_first, scalar_t* row) {
  generic_row(freqs, half, t, scale, sin_first, row);
}

at::Tensor timestep_embedding_cpu(const at::Tensor& t_in, const at::Tensor& freqs_in, double scale, bool sin_first,
                                  int64_t dim) {
  constexpr const char* op = "imer_fast::timestep_embedding: ";
  TORCH_CHECK(t_in.dim() == 1, op, "t must be one-dimensional [N]; got shape ", t_in.sizes());
  TORCH_CHECK(freqs_in.dim() == 1, op, "freqs must be one-dimensional [half]; got shape ", freqs_in.sizes());
  TORCH_CHECK(freqs_in.is_floating_point(), op, "freqs must be a floating tensor; got ", freqs_in.scalar_type());
  const int64_t half = freqs_in.size(0);
  TORCH_CHECK(dim == 2 * half || dim == 2 * half + 1, op, "dim must be 2 * freqs.numel() = ", 2 * half,
              " or one more (a zero column); got ", dim);
  const at::Tensor freqs = freqs_in.contiguous();
  const at::Tensor t = t_in.to(freqs.scalar_type()).contiguous();
  const int64_t n = t.size(0);
  at::Tensor out = at::empty({n, dim}, freqs.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, freqs.scalar_type(), "timestep_embedding", [&] {
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const scalar_t* fp = freqs.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, kRowsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* row = o + i * dim;
        embed_row(fp, half, tp[i], scale, sin_first, row);
        if (dim > 2 * half) row[2 * half] = scalar_t(0);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) { m.impl("timestep_embedding", &timestep_embedding_cpu); }

}  // namespace imer_fast
