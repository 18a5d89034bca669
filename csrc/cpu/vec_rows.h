// Float32 row kernels on GCC vector extensions, compiled once per instruction set through
// target_clones (SSE2 baseline, AVX2, AVX-512F; dispatched on CPU features, not model names) and picked by the loader for the running CPU:
// the build has no -march flag, and the scalar libm exp would otherwise dominate SiLU-heavy passes.
// Sums use four 8-lane accumulators combined in a fixed order, so results do not depend on the CPU's
// thread count (they may differ in the last bits between instruction sets).
#pragma once

#include <cstdint>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define IMER_FAST_ROW_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define IMER_FAST_ROW_CLONES
#endif

namespace imer_fast {
namespace vec_rows {

typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));

typedef float F16 __attribute__((vector_size(64)));
typedef int32_t I16 __attribute__((vector_size(64)));

// exp for float lanes (Cephes expf, relative error below 2e-7); below -87 gives 0, clamped at 88.
// V is F8 or F16 (16 lanes: one AVX-512 register, two AVX2 ones; the SiLU rows use it), I its lanes as int32.
template <typename V, typename I>
__attribute__((always_inline)) inline V vexp_lanes(V x) {
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  const I tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = V{} + 12582912.0f;
  const V n = (x * 1.44269504088896341f + magic) - magic;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V y = V{} + 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const I e = (__builtin_convertvector(n, I) + 127) << 23;
  return (V)((I)(y * (V)e) & ~tiny);
}
__attribute__((always_inline)) inline F8 vexp(F8 x) { return vexp_lanes<F8, I8>(x); }

// silu(f) = f / (1 + exp(-f)) on 8 or 16 lanes.
__attribute__((always_inline)) inline F8 silu8(F8 f) { return f / (1.0f + vexp(-f)); }
__attribute__((always_inline)) inline F16 silu16(F16 f) { return f / (1.0f + vexp_lanes<F16, I16>(-f)); }

// sin and cos of float lanes together (Cephes sinf / cosf: octant reduction with a three-part pi/4,
// then the minimax polynomials on [-pi/4, pi/4]; within ~2 ulp of the true values for |x| < 8192).
// Lanes beyond that range are recomputed with libm by the caller (vsincos_in_range tells).
__attribute__((always_inline)) inline bool vsincos_in_range(F8 x) {
  const I8 big = (x > 8192.0f) | (x < -8192.0f) | (x != x);
  I8 any = big;
  for (int k = 0; k < 8; ++k) any[0] |= big[k];
  return any[0] == 0;
}

__attribute__((always_inline)) inline void vsincos(F8 x, F8* sin_out, F8* cos_out) {
  const I8 sign_bit = (I8)x & (int32_t)0x80000000;
  const F8 ax = (F8)((I8)x & (int32_t)0x7FFFFFFF);
  I8 j = __builtin_convertvector(ax * 1.27323954473516f, I8);  // |x| * 4 / pi, truncated
  j = (j + 1) & ~1;                                              // even octant: z in [-pi/4, pi/4]
  const F8 y = __builtin_convertvector(j, F8);
  const F8 z = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const F8 zz = z * z;
  const F8 sp = ((-1.9515295891e-4f * zz + 8.3321608736e-3f) * zz - 1.6666654611e-1f) * zz * z + z;
  const F8 cp = ((2.443315711809948e-5f * zz - 1.388731625493765e-3f) * zz + 4.166664568298827e-2f) * zz * zz -
                0.5f * zz + 1.0f;
  const I8 q = j & 7;  // 0, 2, 4 or 6
  const I8 swap = (q == 2) | (q == 6);
  const F8 s_abs = swap ? cp : sp, c_abs = swap ? sp : cp;
  const I8 s_neg = ((q == 4) | (q == 6)) & (int32_t)0x80000000;
  const I8 c_neg = ((q == 2) | (q == 4)) & (int32_t)0x80000000;
  *sin_out = (F8)((I8)s_abs ^ s_neg ^ sign_bit);
  *cos_out = (F8)((I8)c_abs ^ c_neg);
}

__attribute__((always_inline)) inline F8 load8(const float* p) {
  F8 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void store8(float* p, F8 v) { __builtin_memcpy(p, &v, sizeof(v)); }

__attribute__((always_inline)) inline F16 load16(const float* p) {
  F16 v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void store16(float* p, F16 v) { __builtin_memcpy(p, &v, sizeof(v)); }

__attribute__((always_inline)) inline float hsum(F8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// sum_i (x[i] + shift)^p for p = 1 (squares = false) or 2.
IMER_FAST_ROW_CLONES inline float row_power_sum(const float* x, int64_t n, float shift, bool squares) {
  F8 a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    F8 d0 = load8(x + i) + shift, d1 = load8(x + i + 8) + shift, d2 = load8(x + i + 16) + shift,
       d3 = load8(x + i + 24) + shift;
    if (squares) {
      d0 *= d0;
      d1 *= d1;
      d2 *= d2;
      d3 *= d3;
    }
    a0 += d0;
    a1 += d1;
    a2 += d2;
    a3 += d3;
  }
  for (; i + 8 <= n; i += 8) {
    F8 d = load8(x + i) + shift;
    a0 += squares ? d * d : d;
  }
  float tail = 0.0f;
  for (; i < n; ++i) {
    const float d = x[i] + shift;
    tail += squares ? d * d : d;
  }
  return hsum((a0 + a1) + (a2 + a3)) + tail;
}

// x[i] = x[i] * sigmoid(x[i]) in place.
IMER_FAST_ROW_CLONES inline void silu_inplace(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(x + i, silu16(load16(x + i)));
  for (; i + 8 <= n; i += 8) store8(x + i, silu8(load8(x + i)));
  if (i < n) {
    float buf[8] = {};
    for (int64_t j = i; j < n; ++j) buf[j - i] = x[j];
    store8(buf, silu8(load8(buf)));
    for (int64_t j = i; j < n; ++j) x[j] = buf[j - i];
  }
}

// acc[i] += (x[i] + shift[i])^p over a row of n channels, p = 1 (squares = false) or 2; shift may be
// null (zero). The channels-last GroupNorm accumulates per-channel sums one spatial row at a time.
IMER_FAST_ROW_CLONES inline void column_power_accumulate(const float* x, const float* shift, float* acc, int64_t n,
                                                         bool squares) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    F8 d = load8(x + i);
    if (shift) d += load8(shift + i);
    store8(acc + i, load8(acc + i) + (squares ? d * d : d));
  }
  for (; i < n; ++i) {
    const float d = x[i] + (shift ? shift[i] : 0.0f);
    acc[i] += squares ? d * d : d;
  }
}

// out[i] = f or silu(f), f = x[i] * k[i] + m[i] over a row of n channels.
IMER_FAST_ROW_CLONES inline void affine_silu_row(const float* x, const float* k, const float* m, float* out, int64_t n,
                                                 bool silu) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const F16 f = load16(x + i) * load16(k + i) + load16(m + i);
    store16(out + i, silu ? silu16(f) : f);
  }
  for (; i + 8 <= n; i += 8) {
    const F8 f = load8(x + i) * load8(k + i) + load8(m + i);
    store8(out + i, silu ? silu8(f) : f);
  }
  if (i < n) {
    float buf[8] = {}, kb[8] = {}, mb[8] = {};
    for (int64_t j = i; j < n; ++j) {
      buf[j - i] = x[j];
      kb[j - i] = k[j];
      mb[j - i] = m[j];
    }
    const F8 f = load8(buf) * load8(kb) + load8(mb);
    store8(buf, silu ? silu8(f) : f);
    for (int64_t j = i; j < n; ++j) out[j] = buf[j - i];
  }
}

// Channels-last GroupNorm backward, first pass over one spatial row of n channels (every pointer but x,
// g, gf_out holds one value per channel): xn = (x + centre) * rstd, a = xn * w + b, f = a * film + shift,
// gf = g * silu'(f) (or g). Stores gf and accumulates per channel s_gf += gf, s_gfa += gf * a,
// s_ga_xn += ga * xn and s_ga += ga, with ga = gf * film. Tail channels use libm's exp.
IMER_FAST_ROW_CLONES inline void group_norm_backward_sums_row(
    const float* x, const float* g, const float* centre, const float* rstd, const float* w, const float* b,
    const float* film, const float* shift, float* gf_out, float* s_gf, float* s_gfa, float* s_ga_xn, float* s_ga,
    int64_t n, bool silu) {
  const F8 one = F8{} + 1.0f;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const F8 xn = (load8(x + i) + load8(centre + i)) * load8(rstd + i);
    const F8 a = xn * load8(w + i) + load8(b + i);
    const F8 fm = load8(film + i);
    F8 gf = load8(g + i);
    if (silu) {
      const F8 f = a * fm + load8(shift + i);
      const F8 sg = one / (one + vexp(-f));
      gf *= sg * (one + f * (one - sg));
    }
    const F8 ga = gf * fm;
    store8(gf_out + i, gf);
    store8(s_gf + i, load8(s_gf + i) + gf);
    store8(s_gfa + i, load8(s_gfa + i) + gf * a);
    store8(s_ga_xn + i, load8(s_ga_xn + i) + ga * xn);
    store8(s_ga + i, load8(s_ga + i) + ga);
  }
  for (; i < n; ++i) {
    const float xn = (x[i] + centre[i]) * rstd[i], a = xn * w[i] + b[i];
    float gf = g[i];
    if (silu) {
      const float f = a * film[i] + shift[i], sg = 1.0f / (1.0f + __builtin_expf(-f));
      gf *= sg * (1.0f + f * (1.0f - sg));
    }
    const float ga = gf * film[i];
    gf_out[i] = gf;
    s_gf[i] += gf;
    s_gfa[i] += gf * a;
    s_ga_xn[i] += ga * xn;
    s_ga[i] += ga;
  }
}

// Channels-last GroupNorm backward, second pass over one spatial row (per-channel k = film * w and the
// channel's group means mg of g, mgx of g * xn): d = rstd * (gf * k - mg - xn * mgx), xn = (x + centre)
// * rstd; out = d, s_dx += d.
IMER_FAST_ROW_CLONES inline void group_norm_backward_dx_row(const float* x, const float* gf, const float* centre,
                                                            const float* rstd, const float* k, const float* mg,
                                                            const float* mgx, float* out, float* s_dx, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const F8 r = load8(rstd + i);
    const F8 xn = (load8(x + i) + load8(centre + i)) * r;
    const F8 d = r * (load8(gf + i) * load8(k + i) - load8(mg + i) - xn * load8(mgx + i));
    store8(out + i, d);
    store8(s_dx + i, load8(s_dx + i) + d);
  }
  for (; i < n; ++i) {
    const float xn = (x[i] + centre[i]) * rstd[i];
    const float d = rstd[i] * (gf[i] * k[i] - mg[i] - xn * mgx[i]);
    out[i] = d;
    s_dx[i] += d;
  }
}

}  // namespace vec_rows
}  // namespace imer_fast
