// CPU kernels of the diffusion sampler updates and the counter normal generator (semantics:
// imer_fast/ops/sampler_steps.py and imer_fast/ops/counter_rng.py). Every output element depends on
// its own inputs and its flat index only, so the loops split freely across threads and stay
// bitwise-repeatable. Inputs are read through .contiguous() (a copy only for strided inputs); outputs
// are fresh contiguous tensors of x's shape. Half types are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>

#include "counter_rng.h"

namespace imer_fast {
namespace {

constexpr int64_t kGrain = 16384;

// Where z comes from: an explicit noise tensor, the counter generator, or nowhere (z unused).
struct NoiseSource {
  const at::Tensor noise;  // contiguous, or undefined
  bool has_seed = false;
  int64_t seed = 0;
  int64_t offset = 0;
};

NoiseSource noise_source(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& noise,
                         const std::optional<at::Tensor>& seed, int64_t offset, bool needed) {
  NoiseSource src{};
  if (noise.has_value() && noise->defined()) {
    TORCH_CHECK(noise->sizes() == x.sizes(), op, "noise must have x's shape ", x.sizes(), "; got ", noise->sizes());
    TORCH_CHECK(noise->scalar_type() == x.scalar_type(), op, "noise has dtype ", noise->scalar_type(),
                " but x has ", x.scalar_type());
    return NoiseSource{noise->contiguous(), false, 0, 0};
  }
  if (seed.has_value() && seed->defined()) {
    TORCH_CHECK(seed->numel() == 1 && seed->scalar_type() == at::kLong, op,
                "seed must be a one-element int64 tensor; got ", seed->sizes(), " ", seed->scalar_type());
    TORCH_CHECK(offset >= 0 && offset <= 0xFFFFFFFFLL, op, "offset must be in [0, 2**32); got ", offset);
    src.has_seed = true;
    src.seed = seed->item<int64_t>();
    src.offset = offset;
    return src;
  }
  TORCH_CHECK(!needed, op, "this step adds noise: pass noise (a tensor like x) or seed (an int64 tensor)");
  return src;
}

void check_pair(const char* op, const at::Tensor& x, const at::Tensor& other, const char* name) {
  TORCH_CHECK(x.is_floating_point(), op, "x must be a floating tensor; got ", x.scalar_type());
  TORCH_CHECK(other.sizes() == x.sizes(), op, name, " must have x's shape ", x.sizes(), "; got ", other.sizes());
  TORCH_CHECK(other.scalar_type() == x.scalar_type(), op, name, " has dtype ", other.scalar_type(), " but x has ",
              x.scalar_type());
}

template <typename scalar_t, typename F>
void for_each_index(int64_t n, const F& body) {
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) body(i);
  });
}

template <typename opmath_t, typename scalar_t>
inline opmath_t draw(const NoiseSource& src, const CounterNormal& gen, const scalar_t* noise, int64_t i) {
  return noise != nullptr ? static_cast<opmath_t>(noise[i]) : gen.template operator()<opmath_t>(i);
}

at::Tensor counter_normal_cpu(const at::Tensor& seed, int64_t offset, at::IntArrayRef size, at::ScalarType dtype) {
  constexpr const char* op = "imer_fast::counter_normal: ";
  TORCH_CHECK(at::isFloatingType(dtype), op, "dtype must be floating; got ", dtype);
  auto src = noise_source(op, at::empty({0}), std::nullopt, seed, offset, true);
  at::Tensor out = at::empty(size, seed.options().dtype(dtype));
  const CounterNormal gen(src.seed, src.offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "counter_normal", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_index<scalar_t>(out.numel(), [&](int64_t i) { o[i] = static_cast<scalar_t>(gen.operator()<opmath_t>(i)); });
  });
  return out;
}

at::Tensor diffusion_step_cpu(const at::Tensor& x_in, const at::Tensor& eps_in, double p, double q, bool clip,
                              double r, double s, double u, double sigma, const std::optional<at::Tensor>& noise,
                              const std::optional<at::Tensor>& seed, int64_t offset) {
  constexpr const char* op = "imer_fast::diffusion_step: ";
  check_pair(op, x_in, eps_in, "eps");
  const at::Tensor x = x_in.contiguous(), eps = eps_in.contiguous();
  const auto src = noise_source(op, x, noise, seed, offset, sigma != 0.0);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const CounterNormal gen(src.seed, src.offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "diffusion_step", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* ep = eps.data_ptr<scalar_t>();
    const scalar_t* np = src.noise.defined() ? src.noise.data_ptr<scalar_t>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    const opmath_t P = p, Q = q, R = r, S = s, U = u, SIG = sigma;
    const bool noisy = sigma != 0.0;
    for_each_index<scalar_t>(x.numel(), [&](int64_t i) {
      const opmath_t xi = xp[i], ei = ep[i];
      opmath_t x0 = P * xi - Q * ei;
      if (clip) x0 = std::min(std::max(x0, opmath_t(-1)), opmath_t(1));
      opmath_t v = R * x0 + S * xi + U * ei;
      if (noisy) v += SIG * draw<opmath_t>(src, gen, np, i);
      o[i] = static_cast<scalar_t>(v);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> ve_em_step_cpu(const at::Tensor& x_in, const at::Tensor& score_in, double drift,
                                                  double diffusion, const std::optional<at::Tensor>& noise,
                                                  const std::optional<at::Tensor>& seed, int64_t offset) {
  constexpr const char* op = "imer_fast::ve_em_step: ";
  check_pair(op, x_in, score_in, "score");
  const at::Tensor x = x_in.contiguous(), score = score_in.contiguous();
  const auto src = noise_source(op, x, noise, seed, offset, diffusion != 0.0);
  at::Tensor next = at::empty_like(x, at::MemoryFormat::Contiguous);
  at::Tensor mean = at::empty_like(x, at::MemoryFormat::Contiguous);
  const CounterNormal gen(src.seed, src.offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ve_em_step", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* sp = score.data_ptr<scalar_t>();
    const scalar_t* np = src.noise.defined() ? src.noise.data_ptr<scalar_t>() : nullptr;
    scalar_t* no = next.data_ptr<scalar_t>();
    scalar_t* mo = mean.data_ptr<scalar_t>();
    const opmath_t DR = drift, DI = diffusion;
    const bool noisy = diffusion != 0.0;
    for_each_index<scalar_t>(x.numel(), [&](int64_t i) {
      const opmath_t m = static_cast<opmath_t>(xp[i]) + DR * static_cast<opmath_t>(sp[i]);
      mo[i] = static_cast<scalar_t>(m);
      no[i] = static_cast<scalar_t>(noisy ? m + DI * draw<opmath_t>(src, gen, np, i) : m);
    });
  });
  return {next, mean};
}

at::Tensor add_scaled_noise_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& std_in, double std_scalar,
                                const std::optional<at::Tensor>& noise, const std::optional<at::Tensor>& seed,
                                int64_t offset) {
  constexpr const char* op = "imer_fast::add_scaled_noise: ";
  TORCH_CHECK(x_in.is_floating_point(), op, "x must be a floating tensor; got ", x_in.scalar_type());
  const at::Tensor x = x_in.contiguous();
  const bool per_row = std_in.has_value() && std_in->defined();
  at::Tensor stds;
  if (per_row) {
    TORCH_CHECK(x.dim() >= 1 && std_in->dim() == 1 && std_in->size(0) == x.size(0), op,
                "std must be a float or a [B] tensor with B = x.shape[0]; got ", std_in->sizes(), " for x ", x.sizes());
    stds = std_in->to(at::kDouble).contiguous();
  }
  const auto src = noise_source(op, x, noise, seed, offset, true);
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const CounterNormal gen(src.seed, src.offset);
  const int64_t row = (per_row && x.size(0) > 0) ? x.numel() / x.size(0) : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "add_scaled_noise", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* np = src.noise.defined() ? src.noise.data_ptr<scalar_t>() : nullptr;
    const double* sd = per_row ? stds.data_ptr<double>() : nullptr;
    scalar_t* o = out.data_ptr<scalar_t>();
    for_each_index<scalar_t>(x.numel(), [&](int64_t i) {
      const opmath_t sdev = static_cast<opmath_t>(per_row ? sd[i / row] : std_scalar);
      o[i] = static_cast<scalar_t>(static_cast<opmath_t>(xp[i]) + sdev * draw<opmath_t>(src, gen, np, i));
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) {
  m.impl("counter_normal", &counter_normal_cpu);
  m.impl("diffusion_step", &diffusion_step_cpu);
  m.impl("ve_em_step", &ve_em_step_cpu);
  m.impl("add_scaled_noise", &add_scaled_noise_cpu);
}

}  // namespace imer_fast
