// The counter-based normal generator of imer_fast (spec: imer_fast/ops/counter_rng.py): element i of
// draw `offset` under `seed` is a function of (seed, offset, i) only, so every backend and every
// thread split produces the same noise.
#pragma once

#include <cmath>
#include <cstdint>

namespace imer_fast {

inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

struct CounterNormal {
  uint32_t key;

  CounterNormal(int64_t seed, int64_t offset) {
    const uint64_t s = static_cast<uint64_t>(seed);
    const uint32_t s_lo = static_cast<uint32_t>(s), s_hi = static_cast<uint32_t>(s >> 32);
    key = fmix32(s_lo ^ fmix32(static_cast<uint32_t>(offset) * 0x9E3779B9u + s_hi));
  }

  // Box-Muller on two 24-bit uniforms: u1 in (0, 1], u2 in [0, 1).
  template <typename T>
  T operator()(int64_t i) const {
    const uint32_t c = static_cast<uint32_t>(static_cast<uint64_t>(i)) * 2u;
    const uint32_t h1 = fmix32(key ^ fmix32(c)), h2 = fmix32(key ^ fmix32(c + 1u));
    const T u1 = static_cast<T>((h1 >> 8) + 1u) * static_cast<T>(5.9604644775390625e-08);
    const T u2 = static_cast<T>(h2 >> 8) * static_cast<T>(5.9604644775390625e-08);
    return std::sqrt(static_cast<T>(-2) * std::log(u1)) * std::cos(static_cast<T>(6.283185307179586) * u2);
  }
};

}  // namespace imer_fast
