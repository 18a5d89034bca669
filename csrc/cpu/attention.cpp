// CPU kernels of imer_fast::attention and imer_fast::attention_backward (the contract, with the
// dropout hash, is the module doc of imer_fast/ops/attention.py).
//
// Flash-style: the Lq x Lk scores never exist. A forward task owns (sequence, head, block of up to
// kBlockQ queries); it packs its queries once, then walks the null tokens and blocks of kBlockK keys
// with an online softmax (running row max m and sum l, the output rescaled when m grows), so memory
// is a few tiles per thread whatever the length. Blocks that the causal / MulT mask hides from every
// query of the task are skipped. A backward task owns a whole (sequence, head): it recomputes the
// probabilities from the saved lse, key block by key block, and accumulates dK, dV of that block and
// dQ of the whole sequence in its own scratch (FA2 math), so every output row has one writer: no
// atomics, and results do not depend on the number of threads. dnull_k / dnull_v are per-(sequence,
// head) partials summed afterwards in sequence order.
//
// Why this shape: the workloads are many small heads (MulT / IMDer: B = 32, H = 8, L <= 50, head dim
// 4..32; dialogues: L <= 110) where the eager composite pays for several passes over a materialised
// [B, H, L, L] tensor and its masks, plus long DRKF sequences (L = 2,800, head dim 128) where it
// writes L^2 floats per head. Every product (Q K^T, P V and the five of the backward) runs through
// one register-blocked micro-kernel C[4 x 2W] += A B, with A read through strides (so transposed
// operands need no copy), written with GCC vector extensions; the exp of the softmax is a vectorised
// Cephes polynomial (float; float64 uses std::exp). Inputs are read in place through their strides
// (a permuted view of a [L, B, H, D] projection costs nothing), packed per tile into the compute
// dtype (fp16 / bf16 accumulate in fp32, float64 stays float64); the scale is folded into the packed
// queries.
//
// The build has no -march flag, so the kernel section below is compiled once per instruction set
// (this file includes itself: plain SSE2, AVX2 + FMA, AVX-512) and the widest one the CPU supports is
// picked at run time; IMER_FAST_CPU_ISA=generic|avx2|avx512 pins one (tests of every path). The
// kernel section uses no std:: function templates, so no instantiation compiled for a wider ISA can
// be shared with the narrower passes. Tasks are handed out dynamically (longest sequences first) to
// balance varlen batches; which thread runs a task never changes what it computes.
#ifndef IMER_FAST_ATTENTION_KERNEL_PASS

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <numeric>
#include <string>
#include <type_traits>
#include <vector>

namespace imer_fast {
namespace attention_cpu {

constexpr const char* kOp = "imer_fast::attention: ";
constexpr int64_t kBlockQ = 64;   // queries per forward task and per backward query block
constexpr int64_t kBlockK = 128;  // keys per block of the online softmax
constexpr int64_t kMR = 4;        // rows of the micro-kernel's register block

// Element (b, i, h, d) of a padded [B, H, L, D] or packed [T, H, D] tensor sits at
// b * sb + (first + i) * si + h * sh + d * sd, with `first` the sequence's first packed row (0 when
// padded) and sb = 0 in the packed layout. null_k / null_v [H, Nn, D] use si for n.
struct View {
  void* data = nullptr;
  int64_t sb = 0, si = 0, sh = 0, sd = 0;
};

struct Seq {
  int64_t q_first, lq, k_first, lk;  // first packed row (0 padded) and length of queries and keys
  int64_t drop_row;                  // dropout row of query 0: b * Lq (padded) or q_first (varlen)
  int64_t lse_base;                  // lse index of (h = 0, i = 0); (h, i) adds h * lse_sh + i
};

struct Params {
  int64_t batch = 0, heads = 0, dim = 0, num_null = 0, mask_kind = 0, max_lq = 0;
  double scale = 1.0;
  bool dropout = false;
  uint32_t threshold = 0, seed_lo = 0, seed_hi = 0;
  double keep_scale = 1.0;  // 1 / (1 - dropout_p)
  const Seq* seqs = nullptr;
  View q, k, v, null_k, null_v, out, grad_out, dq, dk, dv;
  const bool* key_mask = nullptr;
  int64_t km_sb = 0, km_si = 0;
  void* lse = nullptr;  // compute dtype (float32, float64 for float64 inputs), contiguous
  int64_t lse_sh = 0;
  void* dnull_k_part = nullptr;  // [B, H, Nn, D] compute dtype: one partial per (sequence, head)
  void* dnull_v_part = nullptr;
  bool need_dq = false, need_dk = false, need_dv = false, need_dnull_k = false, need_dnull_v = false;
};

// Keys [0, end) of query i that mask_kind does not hide (key_mask aside).
inline int64_t visible_end(const Params& p, const Seq& s, int64_t i) {
  int64_t end = s.lk;
  if (p.mask_kind == 1) end = i + 1;
  if (p.mask_kind == 2) end = i + 1 + (s.lk > s.lq ? s.lk - s.lq : s.lq - s.lk);
  return end < 0 ? 0 : (end > s.lk ? s.lk : end);
}

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// MurmurHash3's finaliser; the dropout hash of the module doc.
inline uint32_t fmix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

inline uint32_t dropout_row_key(const Params& p, const Seq& s, int64_t i, int64_t h) {
  const uint32_t row = static_cast<uint32_t>(static_cast<uint64_t>(s.drop_row + i));
  return fmix32(p.seed_lo ^ fmix32(row * static_cast<uint32_t>(p.heads) + static_cast<uint32_t>(h) + p.seed_hi));
}

// Bump allocator over a worker's scratch; with base == nullptr it only measures.
struct Carver {
  char* base;
  size_t used = 0;
  template <typename X>
  X* take(int64_t n) {
    used = (used + 63) / 64 * 64;
    X* at = base == nullptr ? nullptr : reinterpret_cast<X*>(base + used);
    used += static_cast<size_t>(n < 1 ? 1 : n) * sizeof(X) + 64;  // slack: vector tails never leave it
    return at;
  }
};

// Keys (null tokens included) up to which a forward may take the few-keys path (module doc, above
// few_keys_forward in the kernel section).
constexpr int64_t kFewKeys = 8;

struct Kernels {
  size_t (*forward_workspace)(const Params&);
  void (*forward)(const Params&, int64_t b, int64_t h, int64_t i0, int64_t i1, char* ws);
  size_t (*backward_workspace)(const Params&);
  void (*backward)(const Params&, int64_t b, int64_t h, char* ws);
  bool (*few_keys_fits)(const Params&);  // the vector width and the head dim allow the few-keys path
  size_t (*few_keys_workspace)(const Params&);
  void (*few_keys_forward)(const Params&, int64_t b, int64_t i0, int64_t i1, char* ws);
};

}  // namespace attention_cpu
}  // namespace imer_fast

// ---- the kernel section, once per instruction set -----------------------------------------------
#define IMER_FAST_ATTENTION_KERNEL_PASS 1

#define IMER_FAST_ATTENTION_NS isa_generic
#define IMER_FAST_ATTENTION_VEC_BYTES 16
#include "attention.cpp"  // this file, once per instruction set
#undef IMER_FAST_ATTENTION_NS
#undef IMER_FAST_ATTENTION_VEC_BYTES

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define IMER_FAST_ATTENTION_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define IMER_FAST_ATTENTION_NS isa_avx2
#define IMER_FAST_ATTENTION_VEC_BYTES 32
#include "attention.cpp"  // this file, once per instruction set
#undef IMER_FAST_ATTENTION_NS
#undef IMER_FAST_ATTENTION_VEC_BYTES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma")
#define IMER_FAST_ATTENTION_NS isa_avx512
#define IMER_FAST_ATTENTION_VEC_BYTES 64
#include "attention.cpp"  // this file, once per instruction set
#undef IMER_FAST_ATTENTION_NS
#undef IMER_FAST_ATTENTION_VEC_BYTES
#pragma GCC pop_options
#endif

#undef IMER_FAST_ATTENTION_KERNEL_PASS

namespace imer_fast {
namespace attention_cpu {
namespace {

// ---- instruction-set selection -----------------------------------------------------------------

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa pick_isa() {
  Isa best = Isa::kGeneric;
#ifdef IMER_FAST_ATTENTION_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f")) best = Isa::kAvx512;
#endif
  const char* env = std::getenv("IMER_FAST_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  Isa asked = best;
  if (want == "generic") asked = Isa::kGeneric;
  else if (want == "avx2") asked = Isa::kAvx2;
  else if (want == "avx512") asked = Isa::kAvx512;
  TORCH_CHECK(want == "generic" || want == "avx2" || want == "avx512", kOp,
              "IMER_FAST_CPU_ISA must be generic, avx2 or avx512; got '", want, "'");
  TORCH_CHECK(static_cast<int>(asked) <= static_cast<int>(best), kOp, "IMER_FAST_CPU_ISA=", want,
              " but this CPU (or build) does not support it");
  return asked;
}

const Kernels& kernels_for(at::ScalarType dtype) {
  static const Isa isa = pick_isa();
#ifdef IMER_FAST_ATTENTION_X86
  if (isa == Isa::kAvx512) return isa_avx512::kernels(dtype);
  if (isa == Isa::kAvx2) return isa_avx2::kernels(dtype);
#endif
  (void)isa;
  return isa_generic::kernels(dtype);
}

// ---- argument checks and the problem description -----------------------------------------------

const char* layout_name(bool varlen) {
  return varlen ? "[total, heads, head_dim] (varlen layout)" : "[batch, heads, length, head_dim]";
}

bool kernel_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::ScalarType compute_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

View view_of(const at::Tensor& t, bool varlen) {
  View w;
  w.data = t.data_ptr();
  if (varlen) {
    w.sb = 0, w.si = t.stride(0), w.sh = t.stride(1), w.sd = t.stride(2);
  } else {
    w.sb = t.stride(0), w.sh = t.stride(1), w.si = t.stride(2), w.sd = t.stride(3);
  }
  return w;
}

View null_view(const at::Tensor& t) {
  View w;
  w.data = t.data_ptr();
  w.sh = t.stride(0), w.si = t.stride(1), w.sd = t.stride(2);
  return w;
}

std::vector<int64_t> read_cu_seqlens(const at::Tensor& cu, const char* name, int64_t total) {
  TORCH_CHECK(cu.dim() == 1 && (cu.scalar_type() == at::kInt || cu.scalar_type() == at::kLong) && cu.numel() >= 1,
              kOp, name, " must be a 1-D int32/int64 tensor [batch + 1]; got ", cu.scalar_type(), " of shape ",
              cu.sizes());
  const auto c = cu.to(at::kLong).contiguous();
  const int64_t* v = c.data_ptr<int64_t>();
  std::vector<int64_t> out(v, v + c.numel());
  TORCH_CHECK(out.front() == 0, kOp, name, " must start at 0; got ", out.front());
  for (size_t i = 1; i < out.size(); ++i) {
    TORCH_CHECK(out[i] >= out[i - 1], kOp, name, " must never decrease; it does at entry ", i, " (", out[i - 1],
                " then ", out[i], ")");
  }
  TORCH_CHECK(out.back() == total, kOp, name, " must end at the number of packed rows (", total, "); got ",
              out.back());
  return out;
}

struct Problem {
  Params p;
  std::vector<Seq> seqs;
  bool varlen = false;
  at::ScalarType dtype, compute;
};

Problem prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                const c10::optional<at::Tensor>& key_mask, const c10::optional<at::Tensor>& null_k,
                const c10::optional<at::Tensor>& null_v, const c10::optional<at::Tensor>& cu_seqlens_q,
                const c10::optional<at::Tensor>& cu_seqlens_k, double scale, int64_t mask_kind, double dropout_p,
                const c10::optional<at::Tensor>& dropout_seed) {
  Problem pr;
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(), kOp,
              "cu_seqlens_q and cu_seqlens_k must be given together (varlen layout) or both omitted; got ",
              cu_seqlens_q.has_value() ? "only cu_seqlens_q" : "only cu_seqlens_k");
  const bool varlen = pr.varlen = cu_seqlens_q.has_value();
  const int64_t rank = varlen ? 3 : 4;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->dim() == rank, kOp, name, " must be ", layout_name(varlen), "; got shape ", t->sizes());
    TORCH_CHECK(t->device().is_cpu(), kOp, name, " must be on the CPU; got ", t->device());
  }
  TORCH_CHECK(kernel_dtype(q.scalar_type()), kOp, "q must be float16, bfloat16, float32 or float64; got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), kOp,
              "k and v must have q's dtype (", q.scalar_type(), "); got ", k.scalar_type(), " and ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), kOp, "k and v must have the same shape; got ", k.sizes(), " and ", v.sizes());
  const int64_t hd = rank - 1, hh = 1;
  TORCH_CHECK(k.size(hd) == q.size(hd), kOp, "head dim mismatch: q has ", q.size(hd), " but k and v have ", k.size(hd));
  TORCH_CHECK(k.size(hh) == q.size(hh), kOp, "q has ", q.size(hh), " heads but k and v have ", k.size(hh));
  if (!varlen) {
    TORCH_CHECK(k.size(0) == q.size(0), kOp, "q has batch ", q.size(0), " but k and v have batch ", k.size(0));
  }
  TORCH_CHECK(mask_kind >= 0 && mask_kind <= 2, kOp, "mask_kind must be 0 (none), 1 (causal) or 2 (future); got ",
              mask_kind);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, kOp, "dropout_p must be in [0, 1); got ", dropout_p);
  TORCH_CHECK(std::isfinite(scale), kOp, "scale must be finite; got ", scale);
  pr.dtype = q.scalar_type();
  pr.compute = compute_dtype(pr.dtype);

  Params& p = pr.p;
  p.heads = q.size(1);
  p.dim = q.size(hd);
  p.mask_kind = mask_kind;
  p.scale = scale;
  p.q = view_of(q, varlen);
  p.k = view_of(k, varlen);
  p.v = view_of(v, varlen);

  if (varlen) {
    const auto cq = read_cu_seqlens(*cu_seqlens_q, "cu_seqlens_q", q.size(0));
    const auto ck = read_cu_seqlens(*cu_seqlens_k, "cu_seqlens_k", k.size(0));
    TORCH_CHECK(cq.size() == ck.size(), kOp, "cu_seqlens_q and cu_seqlens_k must both be [batch + 1]; got ",
                cq.size(), " and ", ck.size(), " entries");
    p.batch = static_cast<int64_t>(cq.size()) - 1;
    pr.seqs.resize(p.batch);
    for (int64_t b = 0; b < p.batch; ++b) {
      pr.seqs[b] = Seq{cq[b], cq[b + 1] - cq[b], ck[b], ck[b + 1] - ck[b], cq[b], cq[b]};
    }
    p.lse_sh = q.size(0);
  } else {
    p.batch = q.size(0);
    const int64_t lq = q.size(2), lk = k.size(2);
    pr.seqs.resize(p.batch);
    for (int64_t b = 0; b < p.batch; ++b) pr.seqs[b] = Seq{0, lq, 0, lk, b * lq, b * p.heads * lq};
    p.lse_sh = lq;
  }
  for (const auto& s : pr.seqs) p.max_lq = std::max(p.max_lq, s.lq);

  if (key_mask.has_value()) {
    const auto& m = *key_mask;
    const bool ok = m.scalar_type() == at::kBool &&
                    (varlen ? (m.dim() == 1 && m.size(0) == k.size(0))
                            : (m.dim() == 2 && m.size(0) == k.size(0) && m.size(1) == k.size(2)));
    const std::vector<int64_t> expected =
        varlen ? std::vector<int64_t>{k.size(0)} : std::vector<int64_t>{k.size(0), k.size(2)};
    TORCH_CHECK(ok, kOp, "key_mask must be a bool tensor of shape ", at::IntArrayRef(expected),
                " (True = the key may be attended); got ", m.scalar_type(), " of shape ", m.sizes());
    TORCH_CHECK(m.device().is_cpu(), kOp, "key_mask must be on the CPU; got ", m.device());
    p.key_mask = m.data_ptr<bool>();
    if (varlen) {
      p.km_si = m.stride(0);
    } else {
      p.km_sb = m.stride(0), p.km_si = m.stride(1);
    }
  }
  TORCH_CHECK(null_k.has_value() == null_v.has_value(), kOp, "null_k and null_v must be given together; got only ",
              null_k.has_value() ? "null_k" : "null_v");
  if (null_k.has_value()) {
    for (const auto& [name, t] :
         {std::pair<const char*, const at::Tensor*>{"null_k", &*null_k}, {"null_v", &*null_v}}) {
      TORCH_CHECK(t->dim() == 3 && t->size(0) == p.heads && t->size(2) == p.dim && t->sizes() == null_k->sizes(),
                  kOp, name, " must have shape [heads = ", p.heads, ", num_null, head_dim = ", p.dim,
                  "] (same as null_k); got ", t->sizes());
      TORCH_CHECK(t->scalar_type() == q.scalar_type() && t->device().is_cpu(), kOp, name,
                  " must be a CPU tensor of q's dtype (", q.scalar_type(), "); got ", t->scalar_type(), " on ",
                  t->device());
    }
    p.num_null = null_k->size(1);
    p.null_k = null_view(*null_k);
    p.null_v = null_view(*null_v);
  }
  if (dropout_p > 0.0) {
    TORCH_CHECK(dropout_seed.has_value(), kOp, "dropout_p = ", dropout_p, " > 0 needs dropout_seed; got None");
    const auto& seed = *dropout_seed;
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(), kOp,
                "dropout_seed must be a one-element int64 CPU tensor; got ", seed.scalar_type(), " of shape ",
                seed.sizes(), " on ", seed.device());
    const uint64_t bits = static_cast<uint64_t>(seed.reshape({}).item<int64_t>());
    p.dropout = true;
    p.seed_lo = static_cast<uint32_t>(bits);
    p.seed_hi = static_cast<uint32_t>(bits >> 32);
    p.threshold = static_cast<uint32_t>(dropout_p * 16777216.0);
    p.keep_scale = 1.0 / (1.0 - dropout_p);
  }
  return pr;
}

// ---- scheduling ---------------------------------------------------------------------------------

// A worker's scratch, kept per thread across calls (a fresh multi-megabyte buffer per call costs page
// faults); buffers above 64 MiB are freed after the call.
char* worker_scratch(size_t bytes, std::vector<char>& oversized) {
  constexpr size_t kKeep = size_t{64} << 20;
  thread_local std::vector<char> kept;
  std::vector<char>& buf = bytes <= kKeep ? kept : oversized;
  if (buf.size() < bytes + 64) buf.assign(bytes + 64, 0);
  const uintptr_t raw = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<char*>((raw + 63) / 64 * 64);
}

// Runs task(t, scratch) for t in [0, num_tasks), handed out in order to the workers as they free
// up, in runs of consecutive tasks: about 16 runs per worker, so that the shared counter is not
// bounced between cores after every microsecond-long task, and neighbouring tasks (adjacent heads,
// whose output rows share cache lines in a [L, B, H, D] layout) mostly stay on one core. Each task
// writes its own outputs, so the schedule does not change the results.
template <typename Task>
void run_tasks(int64_t num_tasks, size_t scratch_bytes, const Task& task) {
  if (num_tasks <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), num_tasks);
  const int64_t run = std::max<int64_t>(1, num_tasks / (16 * workers));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<char> oversized;
    char* ws = worker_scratch(scratch_bytes, oversized);
    for (int64_t t0 = next.fetch_add(run); t0 < num_tasks; t0 = next.fetch_add(run)) {
      for (int64_t t = t0; t < std::min(t0 + run, num_tasks); ++t) task(t, ws);
    }
  });
}

// Sequences by decreasing work, so the longest start first and the short ones fill the gaps.
std::vector<int64_t> sequence_order(const Problem& pr) {
  std::vector<int64_t> order(pr.seqs.size());
  std::iota(order.begin(), order.end(), 0);
  const int64_t nn = pr.p.num_null;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const auto& sa = pr.seqs[a];
    const auto& sb = pr.seqs[b];
    return sa.lq * (sa.lk + nn) + sa.lk > sb.lq * (sb.lk + nn) + sb.lk;
  });
  return order;
}

// The few-keys forward serves float32 / float64 without a causal or MulT mask or dropout when every
// sequence has at most kFewKeys keys, null tokens included (the kernel checks the rest).
bool takes_few_keys_path(const Problem& pr, const Kernels& kern) {
  const Params& p = pr.p;
  if (p.dropout || p.mask_kind != 0 || !(pr.dtype == at::kFloat || pr.dtype == at::kDouble)) return false;
  for (const auto& s : pr.seqs) {
    if (s.lk + p.num_null > kFewKeys) return false;
  }
  return kern.few_keys_fits(p);
}

// ---- ATen's flash kernel where it is faster ------------------------------------------------------

// For long sequences with head dims from 64 up, ATen's CPU flash attention (blocked MKL GEMMs, and a
// backward that also splits over query blocks) beats this file's register-tiled kernel on what it can
// express. Measured on the 2-core VM, float32, inputs read in place from [L, B, 3, H, D] projections,
// forward / backward: D = 64, L = 192: 1.30x / 1.08x; D = 128, L = 192: 1.45x / 1.10x; DRKF's
// [4, 8, 2800, 128]: 1.36x / 1.15x (single runs). Below L ~ 128 the tiled kernel is level or faster
// (D = 64, L = 24: 0.92x / 0.84x; the U-Net's self-attention at L = 6 / 12: 0.63x / 0.34x forward),
// and below D = 64 it wins by 1.5-3x (MulT's and IMDer's heads). So dense float32 / float64 problems
// with a head dim >= kAtenFlashMinDim, both lengths >= kAtenFlashMinLength and nothing ATen cannot
// express (no key mask that hides a key, no null tokens or dropout; causal, or MulT's future mask when
// Lq == Lk, which is the same) go to it. Its log-sum-exp is ours (natural log of the row's sum of
// exp(scaled score)), so either backward follows either forward. Its backward splits reductions by
// thread: bitwise repeatable for a given thread count, not across thread counts (unlike the rest of
// this file).
constexpr int64_t kAtenFlashMinDim = 64;
constexpr int64_t kAtenFlashMinLength = 128;

// `rows` are the tensors ATen's kernel would read (q, k, v; in the backward also grad_out and out): it
// assumes unit stride along the head dim (ATen's own SDPA checks that before picking it), which the
// contract here does not promise, so any other stride keeps the tiled kernel.
bool takes_aten_flash_path(const Problem& pr, const at::Tensor& q, const at::Tensor& k,
                           const c10::optional<at::Tensor>& key_mask, std::initializer_list<at::Tensor> rows) {
  const Params& p = pr.p;
  if (pr.varlen || p.num_null > 0 || p.dropout || p.dim < kAtenFlashMinDim) return false;
  for (const at::Tensor& t : rows) {
    if (t.stride(-1) != 1) return false;
  }
  if (!(pr.dtype == at::kFloat || pr.dtype == at::kDouble) || q.numel() == 0 || k.numel() == 0) return false;
  if (q.size(2) < kAtenFlashMinLength || k.size(2) < kAtenFlashMinLength) return false;
  if (p.mask_kind == 2 && q.size(2) != k.size(2)) return false;
  return !key_mask.has_value() || key_mask->all().item<bool>();  // a key mask that hides nothing is no mask
}

bool aten_is_causal(const Params& p) { return p.mask_kind != 0; }

// `t` with the layout empty_like(like) gives (what the tiled kernel returns), copied only if ATen chose
// another one.
at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& like) {
  at::Tensor dst = at::empty_like(like);
  return dst.strides() == t.strides() ? t : dst.copy_(t);
}

// ---- the operators -------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& key_mask,
    const c10::optional<at::Tensor>& null_k, const c10::optional<at::Tensor>& null_v,
    const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double scale, int64_t mask_kind, double dropout_p,
    const c10::optional<at::Tensor>& dropout_seed) {
  // max_seqlen_* size the GPU grids; the CPU kernel reads the lengths from cu_seqlens.
  (void)max_seqlen_q, (void)max_seqlen_k;
  Problem pr = prepare(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, scale, mask_kind, dropout_p,
                       dropout_seed);
  Params& p = pr.p;
  if (takes_aten_flash_path(pr, q, k, key_mask, {q, k, v})) {
    auto [aten_out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, aten_is_causal(p),
                                                                          c10::nullopt, scale);
    // out keeps q's layout, as below (a free view back to the rows q came from), and lse is contiguous
    // [B, H, Lq] (ATen's is laid out [B, Lq, H])
    return {laid_out_like(aten_out, q), lse.contiguous()};
  }
  auto out = at::empty_like(q);
  auto lse = pr.varlen ? at::empty({p.heads, q.size(0)}, q.options().dtype(pr.compute))
                       : at::empty({p.batch, p.heads, q.size(2)}, q.options().dtype(pr.compute));
  p.seqs = pr.seqs.data();
  p.out = view_of(out, pr.varlen);
  p.lse = lse.data_ptr();

  const Kernels& kern = kernels_for(pr.dtype);
  if (takes_few_keys_path(pr, kern)) {
    // Tasks of up to kFewKeysRows query rows of one sequence, all heads at once.
    constexpr int64_t kFewKeysRows = 32;
    std::vector<std::array<int64_t, 3>> rows;
    for (const int64_t b : sequence_order(pr)) {
      const Seq& s = pr.seqs[b];
      for (int64_t i0 = 0; i0 < s.lq; i0 += kFewKeysRows) rows.push_back({b, i0, std::min(i0 + kFewKeysRows, s.lq)});
    }
    run_tasks(static_cast<int64_t>(rows.size()), kern.few_keys_workspace(p), [&](int64_t t, char* ws) {
      kern.few_keys_forward(p, rows[t][0], rows[t][1], rows[t][2], ws);
    });
    return {out, lse};
  }
  struct Task {
    int64_t b, h, i0, i1;
  };
  std::vector<Task> tasks;
  for (const int64_t b : sequence_order(pr)) {
    const Seq& s = pr.seqs[b];
    for (int64_t i0 = 0; i0 < s.lq; i0 += kBlockQ) {
      for (int64_t h = 0; h < p.heads; ++h) tasks.push_back({b, h, i0, std::min(i0 + kBlockQ, s.lq)});
    }
  }
  run_tasks(static_cast<int64_t>(tasks.size()), kern.forward_workspace(p), [&](int64_t t, char* ws) {
    const Task& task = tasks[t];
    kern.forward(p, task.b, task.h, task.i0, task.i1, ws);
  });
  return {out, lse};
}

// dst[h, n, d] = sum_b part[b, h, n, d], in sequence order.
template <typename F>
void reduce_null_partials(const at::Tensor& part, int64_t batch, at::Tensor& dst) {
  const F* src = part.data_ptr<F>();
  const int64_t per = dst.numel();  // H * Nn * D
  std::vector<F> acc(per, F(0));
  for (int64_t b = 0; b < batch; ++b) {
    const F* s = src + b * per;
    for (int64_t e = 0; e < per; ++e) acc[e] += s[e];
  }
  auto sum = at::from_blob(acc.data(), dst.sizes(), part.options());
  dst.copy_(sum);
}

// dk and dv like k and v. When k and v are the two halves of one packed k|v projection (rows of
// [Lk, B, 2, H, D], as a MulT layer computes them: k = view(...).select(2, 0).permute(1, 2, 0, 3)),
// so are dk and dv, and the caller can use the pair as one [Lk * B, 2 * H * D] matrix instead of
// copying them together. (empty_like would give each a dense [B, H, Lk, D] tensor: the halves are
// not dense on their own.)
std::pair<at::Tensor, at::Tensor> key_value_gradients(const at::Tensor& k, const at::Tensor& v, bool need_dk,
                                                      bool need_dv, bool varlen) {
  const auto none = [&] { return at::empty({0}, k.options()); };
  if (!varlen && need_dk && need_dv && k.sizes() == v.sizes() && k.strides() == v.strides()) {
    const int64_t batch = k.size(0), heads = k.size(1), lk = k.size(2), dim = k.size(3), row = 2 * heads * dim;
    const std::vector<int64_t> packed_strides{row, dim, batch * row, 1};
    if (k.strides() == at::IntArrayRef(packed_strides) && k.is_alias_of(v) &&
        static_cast<const char*>(v.data_ptr()) - static_cast<const char*>(k.data_ptr()) ==
            static_cast<std::ptrdiff_t>(heads * dim * k.element_size())) {
      const at::Tensor packed = at::empty({lk, batch, 2, heads, dim}, k.options());
      return {packed.select(2, 0).permute({1, 2, 0, 3}), packed.select(2, 1).permute({1, 2, 0, 3})};
    }
  }
  return {need_dk ? at::empty_like(k) : none(), need_dv ? at::empty_like(v) : none()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse_in, const c10::optional<at::Tensor>& key_mask, const c10::optional<at::Tensor>& null_k,
    const c10::optional<at::Tensor>& null_v, const c10::optional<at::Tensor>& cu_seqlens_q,
    const c10::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t mask_kind, double dropout_p, const c10::optional<at::Tensor>& dropout_seed,
    std::array<bool, 5> output_mask) {
  (void)max_seqlen_q, (void)max_seqlen_k;
  Problem pr = prepare(q, k, v, key_mask, null_k, null_v, cu_seqlens_q, cu_seqlens_k, scale, mask_kind, dropout_p,
                       dropout_seed);
  Params& p = pr.p;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_out", &grad_out}, {"out", &out}}) {
    TORCH_CHECK(t->sizes() == q.sizes() && t->scalar_type() == q.scalar_type() && t->device().is_cpu(), kOp, name,
                " must be a CPU tensor of q's shape ", q.sizes(), " and dtype ", q.scalar_type(), "; got ",
                t->scalar_type(), " of shape ", t->sizes(), " on ", t->device());
  }
  const std::vector<int64_t> lse_shape =
      pr.varlen ? std::vector<int64_t>{p.heads, q.size(0)} : std::vector<int64_t>{p.batch, p.heads, q.size(2)};
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef(lse_shape) && lse_in.scalar_type() == pr.compute &&
                  lse_in.device().is_cpu(),
              kOp, "lse must be the forward's ", pr.compute, " CPU tensor of shape ", at::IntArrayRef(lse_shape),
              "; got ", lse_in.scalar_type(), " of shape ", lse_in.sizes(), " on ", lse_in.device());
  const auto lse = lse_in.contiguous();
  const bool has_null = p.num_null > 0 || null_k.has_value();
  // Outputs not asked for are distinct empty tensors (one shared tensor would alias the outputs).
  const auto none = [&] { return at::empty({0}, q.options()); };
  if (takes_aten_flash_path(pr, q, k, key_mask, {q, k, v, grad_out, out}) &&
      (output_mask[0] || output_mask[1] || output_mask[2])) {
    auto [dq, dk, dv] = at::_scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, aten_is_causal(p), c10::nullopt, scale);
    const auto grad = [&](bool need, const at::Tensor& g, const at::Tensor& x) {
      return need ? laid_out_like(g, x) : none();
    };
    return {grad(output_mask[0], dq, q), grad(output_mask[1], dk, k), grad(output_mask[2], dv, v), none(), none()};
  }
  at::Tensor dq = output_mask[0] ? at::empty_like(q) : none();
  auto [dk, dv] = key_value_gradients(k, v, output_mask[1], output_mask[2], pr.varlen);
  at::Tensor dnk = output_mask[3] && has_null ? at::empty_like(*null_k) : none();
  at::Tensor dnv = output_mask[4] && has_null ? at::empty_like(*null_v) : none();
  p.need_dq = output_mask[0], p.need_dk = output_mask[1], p.need_dv = output_mask[2];
  p.need_dnull_k = output_mask[3] && has_null, p.need_dnull_v = output_mask[4] && has_null;
  if (!(p.need_dq || p.need_dk || p.need_dv || p.need_dnull_k || p.need_dnull_v)) return {dq, dk, dv, dnk, dnv};

  p.seqs = pr.seqs.data();
  p.grad_out = view_of(grad_out, pr.varlen);
  p.out = view_of(out, pr.varlen);
  p.lse = lse.data_ptr();
  if (p.need_dq) p.dq = view_of(dq, pr.varlen);
  if (p.need_dk) p.dk = view_of(dk, pr.varlen);
  if (p.need_dv) p.dv = view_of(dv, pr.varlen);
  const auto part_options = q.options().dtype(pr.compute);
  at::Tensor dnk_part, dnv_part;
  if (p.need_dnull_k) {
    dnk_part = at::empty({p.batch, p.heads, p.num_null, p.dim}, part_options);
    p.dnull_k_part = dnk_part.data_ptr();
  }
  if (p.need_dnull_v) {
    dnv_part = at::empty({p.batch, p.heads, p.num_null, p.dim}, part_options);
    p.dnull_v_part = dnv_part.data_ptr();
  }

  const std::vector<int64_t> order = sequence_order(pr);
  const Kernels& kern = kernels_for(pr.dtype);
  run_tasks(p.batch * p.heads, kern.backward_workspace(p), [&](int64_t t, char* ws) {
    kern.backward(p, order[t / p.heads], t % p.heads, ws);
  });

  for (const auto& [need, part, dst] :
       {std::tuple<bool, at::Tensor*, at::Tensor*>{p.need_dnull_k, &dnk_part, &dnk}, {p.need_dnull_v, &dnv_part, &dnv}}) {
    if (!need) continue;
    if (pr.compute == at::kDouble) {
      reduce_null_partials<double>(*part, p.batch, *dst);
    } else {
      reduce_null_partials<float>(*part, p.batch, *dst);
    }
  }
  return {dq, dk, dv, dnk, dnv};
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace attention_cpu
}  // namespace imer_fast

#else  // IMER_FAST_ATTENTION_KERNEL_PASS --------------------------------------------------------------
// The kernels, compiled once per instruction set (IMER_FAST_ATTENTION_VEC_BYTES wide vectors) in
// namespace imer_fast::attention_cpu::IMER_FAST_ATTENTION_NS.
//
// Tiles are transposed: queries run along the vector lanes. Scores come as S^T = K (scale Q)^T
// [keys x queries], so the softmax statistics of a query are lanes of a vector (no horizontal
// reductions) and masking a key is clearing a tile row. With (c, r) a key and a query of the tiles,
// the causal / MulT masks hide r < c + shift (shift = j0 - i0 - offset): the products skip the
// hidden triangle (Tri below).

namespace imer_fast {
namespace attention_cpu {
namespace IMER_FAST_ATTENTION_NS {

constexpr int kVecBytes = IMER_FAST_ATTENTION_VEC_BYTES;
// Narrower vectors serve narrow products (small head dims) while they still fill an SSE register.
constexpr bool kHalfVectors = kVecBytes / 2 >= 16;
constexpr bool kQuarterVectors = kVecBytes / 4 >= 16;
constexpr int kHalfBytes = kHalfVectors ? kVecBytes / 2 : kVecBytes;
constexpr int kQuarterBytes = kQuarterVectors ? kVecBytes / 4 : kVecBytes;

template <typename F>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(kVecBytes)));
  typedef float Half __attribute__((vector_size(kHalfBytes)));
  typedef float Quarter __attribute__((vector_size(kQuarterBytes)));
  typedef int32_t I __attribute__((vector_size(kVecBytes)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(kVecBytes)));
  typedef double Half __attribute__((vector_size(kHalfBytes)));
  typedef double Quarter __attribute__((vector_size(kQuarterBytes)));
  typedef int64_t I __attribute__((vector_size(kVecBytes)));
};
typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));

template <typename F>
constexpr int64_t lanes() {
  return kVecBytes / static_cast<int64_t>(sizeof(F));
}
// Padded head dim of the row-major tiles: a multiple of kMR that is a quarter, half or whole
// multiple of the vector width (the N of the dK / dV products).
template <typename F>
int64_t dim_pad(int64_t d) {
  constexpr int64_t w = lanes<F>();
  const int64_t d4 = round_up(d < 1 ? 1 : d, kMR);
  if (kQuarterVectors && d4 <= w / 4) return w / 4;
  if (kHalfVectors && d4 <= w / 2) return w / 2;
  return round_up(d4, w);
}

template <typename V, typename F>
inline V vload(const F* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename F>
inline void vstore(F* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

template <typename F>
inline void fill(F* s, int64_t n, F value) {
  for (int64_t c = 0; c < n; ++c) s[c] = value;
}

template <typename F>
inline typename Simd<F>::V lane_index() {
  typename Simd<F>::V v;
  for (int64_t l = 0; l < lanes<F>(); ++l) v[l] = static_cast<F>(l);
  return v;
}

// ---- C[M x N] (+)= A[M x K] B[K x N]: A(m, k) = A[m * sam + k * sak], B and C row-major. M is a
// multiple of kMR (callers pad); N a multiple of the vector width, or a half / quarter vector.

// The masked triangle, for the products whose operands hold zeros there (or that the softmax pass
// overwrites): kRowsK: rows m are keys, k queries: k starts at m0 + shift; kColsK: columns n are
// queries, k keys: k ends at n_end - shift; kSkipBlocks: rows keys, columns queries: blocks entirely
// hidden are not computed.
struct Tri {
  enum Mode { kNone, kRowsK, kColsK, kSkipBlocks } mode = kNone;
  int64_t shift = 0;
};

inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

template <typename F, typename V, int NV>
inline void micro(int64_t k0, int64_t k1, const F* a, int64_t sam, int64_t sak, const F* b, int64_t ldb, F* c,
                  int64_t ldc, bool accumulate) {
  constexpr int w = sizeof(V) / sizeof(F);
  V acc[kMR][NV];
  for (int m = 0; m < kMR; ++m) {
    for (int n = 0; n < NV; ++n) acc[m][n] = accumulate ? vload<V>(c + m * ldc + n * w) : V{};
  }
  for (int64_t k = k0; k < k1; ++k) {
    V bv[NV];
    for (int n = 0; n < NV; ++n) bv[n] = vload<V>(b + k * ldb + n * w);
    for (int m = 0; m < kMR; ++m) {
      const F x = a[m * sam + k * sak];
      for (int n = 0; n < NV; ++n) acc[m][n] += x * bv[n];
    }
  }
  for (int m = 0; m < kMR; ++m) {
    for (int n = 0; n < NV; ++n) vstore(c + m * ldc + n * w, acc[m][n]);
  }
}

template <typename F, typename V, int NV>
inline void micro_tri(int64_t m0, int64_t n0, int64_t kk, const Tri& tri, int64_t k_lo, const F* a, int64_t sam,
                      int64_t sak, const F* b, int64_t ldb, F* c, int64_t ldc, bool accumulate) {
  constexpr int64_t nw = static_cast<int64_t>(sizeof(V) / sizeof(F)) * NV;
  int64_t k_hi = kk;
  if (tri.mode == Tri::kSkipBlocks && n0 + nw <= m0 + tri.shift) return;
  if (tri.mode == Tri::kColsK) k_hi = clamp64(n0 + nw - tri.shift, 0, kk);
  micro<F, V, NV>(k_lo, k_hi, a, sam, sak, b + n0, ldb, c + n0, ldc, accumulate);
}

template <typename F>
void gemm(int64_t mm, int64_t nn, int64_t kk, const F* a, int64_t sam, int64_t sak, const F* b, int64_t ldb, F* c,
          int64_t ldc, bool accumulate, Tri tri = Tri{}) {
  using S = Simd<F>;
  constexpr int64_t w = lanes<F>();
  if (nn <= 0) return;
  for (int64_t m0 = 0; m0 < mm; m0 += kMR) {
    const F* am = a + m0 * sam;
    F* cm = c + m0 * ldc;
    const int64_t k_lo = tri.mode == Tri::kRowsK ? clamp64(m0 + tri.shift, 0, kk) : 0;
    if constexpr (kQuarterVectors) {
      if (nn == w / 4) {
        micro_tri<F, typename S::Quarter, 1>(m0, 0, kk, tri, k_lo, am, sam, sak, b, ldb, cm, ldc, accumulate);
        continue;
      }
    }
    if constexpr (kHalfVectors) {
      if (nn == w / 2) {
        micro_tri<F, typename S::Half, 1>(m0, 0, kk, tri, k_lo, am, sam, sak, b, ldb, cm, ldc, accumulate);
        continue;
      }
    }
    int64_t n0 = 0;
    for (; n0 + 2 * w <= nn; n0 += 2 * w) {
      micro_tri<F, typename S::V, 2>(m0, n0, kk, tri, k_lo, am, sam, sak, b, ldb, cm, ldc, accumulate);
    }
    if (n0 < nn) micro_tri<F, typename S::V, 1>(m0, n0, kk, tri, k_lo, am, sam, sak, b, ldb, cm, ldc, accumulate);
  }
}

// ---- exp and the dropout keep factors on vectors of query lanes ----------------------------------

// exp(x) for float lanes (Cephes expf: relative error below 2e-7). Inputs below -87 (and -inf) give
// 0, which keeps every intermediate a normal number; inputs are clamped above at 88.
inline Simd<float>::V vexp(Simd<float>::V x) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  const V lo = V{} - 87.0f, hi = V{} + 88.0f;
  const I tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
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
  const V out = y * (V)e;
  return (V)((I)out & ~tiny);
}
// float64 keeps libm's exp.
inline Simd<double>::V vexp(Simd<double>::V x) {
  for (int64_t l = 0; l < lanes<double>(); ++l) x[l] = std::exp(x[l]);
  return x;
}

inline U32 fmix32v(U32 x) {
  x ^= x >> 16;
  x *= 0x85EBCA6Bu;
  x ^= x >> 13;
  x *= 0xC2B2AE35u;
  x ^= x >> 16;
  return x;
}

// keep_scale where the dropout hash keeps (row_key[l], column with hash col_hash), else 0.
inline Simd<float>::V keep_factor(const uint32_t* row_key, uint32_t col_hash, uint32_t threshold, float keep_scale) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  const U32 bits = fmix32v(vload<U32>(row_key) ^ col_hash);
  const I keep = (bits >> 8) >= threshold;
  return (V)(keep & (I)(V{} + keep_scale));
}
inline Simd<double>::V keep_factor(const uint32_t* row_key, uint32_t col_hash, uint32_t threshold,
                                   double keep_scale) {
  Simd<double>::V z;
  for (int64_t l = 0; l < lanes<double>(); ++l) z[l] = (fmix32(row_key[l] ^ col_hash) >> 8) >= threshold ? keep_scale : 0.0;
  return z;
}

inline uint32_t column_hash(int64_t c) { return static_cast<uint32_t>(c) * 0x9E3779B9u; }

// ---- packing (strided storage dtype -> compute dtype tiles) --------------------------------------

// dst[r * ld + d] = mul * src[r * rs + d * ds] for r < rows, d < dim; zeros up to rows_pad x ld.
template <typename T, typename F>
void pack_rows(F* dst, int64_t ld, const T* src, int64_t rows, int64_t rows_pad, int64_t rs, int64_t ds, int64_t dim,
               F mul) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* in = src + r * rs;
    F* o = dst + r * ld;
    if (ds == 1) {
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<F>(in[d]) * mul;
    } else {
      for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<F>(in[d * ds]) * mul;
    }
    for (int64_t d = dim; d < ld; ++d) o[d] = F(0);
  }
  for (int64_t r = rows; r < rows_pad; ++r) fill(dst + r * ld, ld, F(0));
}

// dst[d * ld + c] = mul * src[c * rs + d * ds] for c < cols, d < dim; columns cols .. cols_pad zero.
template <typename T, typename F>
void pack_transposed(F* dst, int64_t ld, const T* src, int64_t cols, int64_t cols_pad, int64_t rs, int64_t ds,
                     int64_t dim, F mul) {
  for (int64_t c = 0; c < cols; ++c) {
    const T* in = src + c * rs;
    for (int64_t d = 0; d < dim; ++d) dst[d * ld + c] = static_cast<F>(in[d * ds]) * mul;
  }
  for (int64_t d = 0; d < dim; ++d) fill(dst + d * ld + cols, cols_pad - cols, F(0));
}

// A block of keys: the null tokens or keys j0 .. j0 + nk of the sequence.
struct KeyBlock {
  int64_t j0, nk, hash_c0;  // hash_c0: dropout column of the block's first key
  bool null_tokens;
};

template <typename T>
const T* key_rows(const View& w, int64_t b, const Seq& s, int64_t h, const KeyBlock& kb) {
  if (kb.null_tokens) return static_cast<const T*>(w.data) + h * w.sh;
  return static_cast<const T*>(w.data) + b * w.sb + (s.k_first + kb.j0) * w.si + h * w.sh;
}

// hidden[c] = 1 for the keys of the block that key_mask hides.
inline void hidden_keys(const Params& p, int64_t b, const Seq& s, const KeyBlock& kb, uint8_t* hidden) {
  if (p.key_mask == nullptr || kb.null_tokens) {
    for (int64_t c = 0; c < kb.nk; ++c) hidden[c] = 0;
    return;
  }
  const bool* m = p.key_mask + b * p.km_sb + (s.k_first + kb.j0) * p.km_si;
  for (int64_t c = 0; c < kb.nk; ++c) hidden[c] = m[c * p.km_si] ? 0 : 1;
}

// The masked triangle of (key block, query block i0): queries r < c + shift cannot see key c.
inline Tri triangle(const Params& p, const Seq& s, const KeyBlock& kb, int64_t i0) {
  Tri t;
  if (kb.null_tokens || p.mask_kind == 0) return t;
  const int64_t offset = p.mask_kind == 2 ? (s.lk > s.lq ? s.lk - s.lq : s.lq - s.lk) : 0;
  t.mode = Tri::kSkipBlocks;
  t.shift = kb.j0 - i0 - offset;
  return t;
}
inline Tri with_mode(Tri t, Tri::Mode mode) {
  if (t.mode != Tri::kNone) t.mode = mode;
  return t;
}

// ---- forward -------------------------------------------------------------------------------------

template <typename F>
struct ForwardTiles {
  F *qt, *kr, *vr, *st, *ot, *m, *l, *mb, *sh, *lacc;
  uint32_t* row_key;
  uint8_t* hidden;
  int64_t dp, dr, ldq, nk_max;
};

template <typename F>
ForwardTiles<F> forward_tiles(const Params& p, char* base, size_t* bytes) {
  ForwardTiles<F> t;
  t.dp = dim_pad<F>(p.dim);
  t.dr = round_up(p.dim, kMR);
  t.ldq = round_up(kBlockQ, lanes<F>());
  t.nk_max = kBlockK > p.num_null ? kBlockK : p.num_null;
  const int64_t nkr = round_up(t.nk_max, kMR);
  Carver cv{base};
  t.qt = cv.take<F>(p.dim * t.ldq);
  t.kr = cv.take<F>(nkr * t.dp);
  t.vr = cv.take<F>(nkr * t.dp);
  t.st = cv.take<F>(nkr * t.ldq);
  t.ot = cv.take<F>(t.dr * t.ldq);
  t.m = cv.take<F>(t.ldq);
  t.l = cv.take<F>(t.ldq);
  t.mb = cv.take<F>(t.ldq);
  t.sh = cv.take<F>(t.ldq);
  t.lacc = cv.take<F>(t.ldq);
  t.row_key = cv.take<uint32_t>(t.ldq);
  t.hidden = cv.take<uint8_t>(t.nk_max);
  if (bytes != nullptr) *bytes = cv.used;
  return t;
}

template <typename F>
size_t forward_workspace(const Params& p) {
  size_t bytes = 0;
  forward_tiles<F>(p, nullptr, &bytes);
  return bytes;
}

// One key block against the task's queries: online-softmax update of m, l and O^T.
template <typename T, typename F>
void forward_block(const Params& p, int64_t b, const Seq& s, int64_t h, int64_t i0, int64_t nq,
                   const ForwardTiles<F>& t, const KeyBlock& kb) {
  using V = typename Simd<F>::V;
  constexpr int64_t w = lanes<F>();
  constexpr F kNegInf = -std::numeric_limits<F>::infinity();
  const int64_t dim = p.dim, dp = t.dp, nqp = round_up(nq, w), nk = kb.nk, nkr = round_up(nk, kMR);
  const View& kw = kb.null_tokens ? p.null_k : p.k;
  const View& vw = kb.null_tokens ? p.null_v : p.v;
  pack_rows<T, F>(t.kr, dp, key_rows<T>(kw, b, s, h, kb), nk, nkr, kw.si, kw.sd, dim, F(1));
  pack_rows<T, F>(t.vr, dp, key_rows<T>(vw, b, s, h, kb), nk, nk, vw.si, vw.sd, dim, F(1));
  hidden_keys(p, b, s, kb, t.hidden);
  const Tri tri = triangle(p, s, kb, i0);
  const bool masked = tri.mode != Tri::kNone;
  gemm<F>(nkr, nqp, dim, t.kr, dp, 1, t.qt, t.ldq, t.st, nqp, false, tri);  // S^T = K (scale Q)^T
  const V lane = lane_index<F>();

  // Block max per query (queries a key may not see become -inf).
  for (int64_t v = 0; v < nqp; v += w) vstore(t.mb + v, vload<V>(t.m + v));
  for (int64_t c = 0; c < nk; ++c) {
    const int64_t lo = masked ? clamp64(c + tri.shift, 0, nqp) : 0;  // first query that sees key c
    if (t.hidden[c] || lo >= nqp) continue;
    F* row = t.st + c * nqp;
    const int64_t v0 = lo / w * w;
    for (int64_t v = v0; v < nqp; v += w) {
      V x = vload<V>(row + v);
      if (v < lo) {
        x = lane + static_cast<F>(v) < static_cast<F>(lo) ? V{} + kNegInf : x;
        vstore(row + v, x);
      }
      const V mv = vload<V>(t.mb + v);
      vstore(t.mb + v, x > mv ? x : mv);
    }
  }
  // Rescale what the earlier blocks accumulated.
  for (int64_t v = 0; v < nqp; v += w) {
    const V m_new = vload<V>(t.mb + v);
    const V shift = m_new == kNegInf ? V{} : m_new;  // rows that see nothing yet: exp(-inf - 0) = 0
    vstore(t.sh + v, shift);
    const V alpha = vexp(vload<V>(t.m + v) - shift);
    vstore(t.m + v, m_new);
    vstore(t.l + v, vload<V>(t.l + v) * alpha);
    vstore(t.lacc + v, V{});
    for (int64_t d = 0; d < dim; ++d) vstore(t.ot + d * t.ldq + v, vload<V>(t.ot + d * t.ldq + v) * alpha);
  }
  // P^T = exp(S^T - m): row sums into l; dropout keeps (and rescales) entries for the product.
  for (int64_t c = 0; c < nk; ++c) {
    F* row = t.st + c * nqp;
    const int64_t lo = masked ? clamp64(c + tri.shift, 0, nqp) : 0;
    if (t.hidden[c] || lo >= nqp) {
      fill(row, nqp, F(0));
      continue;
    }
    const int64_t v0 = lo / w * w;
    fill(row, v0, F(0));
    const uint32_t col_hash = column_hash(kb.hash_c0 + c);
    for (int64_t v = v0; v < nqp; v += w) {
      V e = vexp(vload<V>(row + v) - vload<V>(t.sh + v));
      vstore(t.lacc + v, vload<V>(t.lacc + v) + e);
      if (p.dropout) e *= keep_factor(t.row_key + v, col_hash, p.threshold, static_cast<F>(p.keep_scale));
      vstore(row + v, e);
    }
  }
  for (int64_t v = 0; v < nqp; v += w) vstore(t.l + v, vload<V>(t.l + v) + vload<V>(t.lacc + v));
  gemm<F>(t.dr, nqp, nk, t.vr, 1, dp, t.st, nqp, t.ot, t.ldq, true, with_mode(tri, Tri::kColsK));  // O^T += V^T P^T
}

template <typename T, typename F>
void forward_task(const Params& p, int64_t b, int64_t h, int64_t i0, int64_t i1, char* ws) {
  const ForwardTiles<F> t = forward_tiles<F>(p, ws, nullptr);
  const Seq& s = p.seqs[b];
  const int64_t nq = i1 - i0, dim = p.dim, nqp = round_up(nq, lanes<F>());
  const T* q = static_cast<const T*>(p.q.data) + b * p.q.sb + (s.q_first + i0) * p.q.si + h * p.q.sh;
  pack_transposed<T, F>(t.qt, t.ldq, q, nq, nqp, p.q.si, p.q.sd, dim, static_cast<F>(p.scale));
  for (int64_t d = 0; d < t.dr; ++d) fill(t.ot + d * t.ldq, nqp, F(0));
  fill(t.m, nqp, -std::numeric_limits<F>::infinity());
  fill(t.l, nqp, F(0));
  if (p.dropout) {
    for (int64_t r = 0; r < nqp; ++r) t.row_key[r] = r < nq ? dropout_row_key(p, s, i0 + r, h) : 0u;
  }
  if (p.num_null > 0) forward_block<T, F>(p, b, s, h, i0, nq, t, KeyBlock{0, p.num_null, 0, true});
  const int64_t k_end = visible_end(p, s, i1 - 1);  // no query of the task sees a key past it
  for (int64_t j0 = 0; j0 < k_end; j0 += kBlockK) {
    const int64_t nk = k_end - j0 < kBlockK ? k_end - j0 : kBlockK;
    forward_block<T, F>(p, b, s, h, i0, nq, t, KeyBlock{j0, nk, p.num_null + j0, false});
  }
  T* out = static_cast<T*>(p.out.data) + b * p.out.sb + (s.q_first + i0) * p.out.si + h * p.out.sh;
  F* lse = static_cast<F*>(p.lse) + s.lse_base + h * p.lse_sh + i0;
  for (int64_t r = 0; r < nq; ++r) {
    const F l = t.l[r];
    const F f = l > F(0) ? F(1) / l : F(0);
    T* dst = out + r * p.out.si;
    for (int64_t d = 0; d < dim; ++d) dst[d * p.out.sd] = static_cast<T>(t.ot[d * t.ldq + r] * f);
    lse[r] = l > F(0) ? t.m[r] + std::log(l) : std::numeric_limits<F>::infinity();
  }
}

// ---- backward ------------------------------------------------------------------------------------

template <typename F>
struct BackwardTiles {
  F *qs, *qt, *dout, *dot, *dqt, *delta, *lse, *kr, *vr, *dk, *dv, *st, *dpt;
  uint32_t* row_key;
  uint8_t* hidden;
  int64_t dp, dr, lqp, lqw, ldq, nk_max;
};

template <typename F>
BackwardTiles<F> backward_tiles(const Params& p, char* base, size_t* bytes) {
  BackwardTiles<F> t;
  t.dp = dim_pad<F>(p.dim);
  t.dr = round_up(p.dim, kMR);
  t.lqp = round_up(p.max_lq, kMR);
  t.lqw = round_up(p.max_lq, lanes<F>());
  t.ldq = round_up(kBlockQ, lanes<F>());
  t.nk_max = kBlockK > p.num_null ? kBlockK : p.num_null;
  const int64_t nkr = round_up(t.nk_max, kMR);
  Carver cv{base};
  t.qs = cv.take<F>(t.lqp * t.dp);
  t.qt = cv.take<F>(p.dim * t.lqw);
  t.dout = cv.take<F>(t.lqp * t.dp);
  t.dot = cv.take<F>(p.dim * t.lqw);
  t.dqt = cv.take<F>(t.dr * t.lqw);
  t.delta = cv.take<F>(t.lqw);
  t.lse = cv.take<F>(t.lqw);
  t.row_key = cv.take<uint32_t>(t.lqw);
  t.kr = cv.take<F>(nkr * t.dp);
  t.vr = cv.take<F>(nkr * t.dp);
  t.dk = cv.take<F>(nkr * t.dp);
  t.dv = cv.take<F>(nkr * t.dp);
  t.st = cv.take<F>(nkr * t.ldq);
  t.dpt = cv.take<F>(nkr * t.ldq);
  t.hidden = cv.take<uint8_t>(t.nk_max);
  if (bytes != nullptr) *bytes = cv.used;
  return t;
}

template <typename F>
size_t backward_workspace(const Params& p) {
  size_t bytes = 0;
  backward_tiles<F>(p, nullptr, &bytes);
  return bytes;
}

// One key block against every query block of the sequence: dK and dV of the block (t.dk, t.dv)
// and dQ^T (t.dqt, without the scale) accumulate.
template <typename T, typename F>
void backward_block(const Params& p, int64_t b, const Seq& s, int64_t h, const BackwardTiles<F>& t,
                    const KeyBlock& kb, bool need_dk, bool need_dv) {
  using V = typename Simd<F>::V;
  constexpr int64_t w = lanes<F>();
  constexpr F kNegInf = -std::numeric_limits<F>::infinity();
  const int64_t dim = p.dim, dp = t.dp, nk = kb.nk, nkr = round_up(nk, kMR);
  const View& kw = kb.null_tokens ? p.null_k : p.k;
  const View& vw = kb.null_tokens ? p.null_v : p.v;
  pack_rows<T, F>(t.kr, dp, key_rows<T>(kw, b, s, h, kb), nk, nkr, kw.si, kw.sd, dim, F(1));
  pack_rows<T, F>(t.vr, dp, key_rows<T>(vw, b, s, h, kb), nk, nkr, vw.si, vw.sd, dim, F(1));
  fill(t.dk, nkr * dp, F(0));
  fill(t.dv, nkr * dp, F(0));
  hidden_keys(p, b, s, kb, t.hidden);
  const F keep_scale = static_cast<F>(p.keep_scale);
  const V lane = lane_index<F>();
  for (int64_t i0 = 0; i0 < s.lq; i0 += kBlockQ) {
    const int64_t nq = s.lq - i0 < kBlockQ ? s.lq - i0 : kBlockQ, nqp = round_up(nq, w);
    if (!kb.null_tokens && visible_end(p, s, i0 + nq - 1) <= kb.j0) continue;  // hidden from the whole block
    const Tri tri = triangle(p, s, kb, i0);
    const bool masked = tri.mode != Tri::kNone;
    gemm<F>(nkr, nqp, dim, t.kr, dp, 1, t.qt + i0, t.lqw, t.st, nqp, false, tri);    // S^T = K (scale Q)^T
    gemm<F>(nkr, nqp, dim, t.vr, dp, 1, t.dot + i0, t.lqw, t.dpt, nqp, false, tri);  // dP^T = V dO^T
    for (int64_t c = 0; c < nk; ++c) {
      F* srow = t.st + c * nqp;
      F* dprow = t.dpt + c * nqp;
      const int64_t lo = masked ? clamp64(c + tri.shift, 0, nqp) : 0;
      if (t.hidden[c] || lo >= nqp) {
        fill(srow, nqp, F(0));
        fill(dprow, nqp, F(0));
        continue;
      }
      const int64_t v0 = lo / w * w;
      fill(srow, v0, F(0));
      fill(dprow, v0, F(0));
      const uint32_t col_hash = column_hash(kb.hash_c0 + c);
      for (int64_t v = v0; v < nqp; v += w) {
        V x = vload<V>(srow + v);
        if (v < lo) x = lane + static_cast<F>(v) < static_cast<F>(lo) ? V{} + kNegInf : x;
        V prob = vexp(x - vload<V>(t.lse + i0 + v));  // P; rows without a valid key have lse = +inf
        V dprob = vload<V>(dprow + v);
        const V delta = vload<V>(t.delta + i0 + v);
        if (p.dropout) {
          const V z = keep_factor(t.row_key + i0 + v, col_hash, p.threshold, keep_scale);
          vstore(dprow + v, prob * (dprob * z - delta));  // dS
          prob *= z;                                       // the dropped P, for dV
        } else {
          vstore(dprow + v, prob * (dprob - delta));
        }
        vstore(srow + v, prob);
      }
    }
    const Tri rows_k = with_mode(tri, Tri::kRowsK);
    if (need_dv) gemm<F>(nkr, dp, nq, t.st, nqp, 1, t.dout + i0 * dp, dp, t.dv, dp, true, rows_k);  // dV += P^T dO
    if (need_dk) gemm<F>(nkr, dp, nq, t.dpt, nqp, 1, t.qs + i0 * dp, dp, t.dk, dp, true, rows_k);  // dK += dS^T sQ
    if (p.need_dq) {  // dQ^T += K^T dS^T
      gemm<F>(t.dr, nqp, nk, t.kr, 1, dp, t.dpt, nqp, t.dqt + i0, t.lqw, true, with_mode(tri, Tri::kColsK));
    }
  }
}

template <typename T, typename F>
void store_rows(const F* src, int64_t ld, T* dst, int64_t rows, int64_t rs, int64_t ds, int64_t dim) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t d = 0; d < dim; ++d) dst[r * rs + d * ds] = static_cast<T>(src[r * ld + d]);
  }
}

template <typename T, typename F>
void backward_task(const Params& p, int64_t b, int64_t h, char* ws) {
  const BackwardTiles<F> t = backward_tiles<F>(p, ws, nullptr);
  const Seq& s = p.seqs[b];
  const int64_t dim = p.dim, dp = t.dp, lq = s.lq, lqp = round_up(lq, kMR), lqw = round_up(lq, lanes<F>());
  const F scale = static_cast<F>(p.scale);
  const T* q = static_cast<const T*>(p.q.data) + b * p.q.sb + s.q_first * p.q.si + h * p.q.sh;
  pack_rows<T, F>(t.qs, dp, q, lq, lqp, p.q.si, p.q.sd, dim, scale);
  pack_transposed<T, F>(t.qt, t.lqw, q, lq, lqw, p.q.si, p.q.sd, dim, scale);
  const T* go = static_cast<const T*>(p.grad_out.data) + b * p.grad_out.sb + s.q_first * p.grad_out.si +
                h * p.grad_out.sh;
  pack_rows<T, F>(t.dout, dp, go, lq, lqp, p.grad_out.si, p.grad_out.sd, dim, F(1));
  pack_transposed<T, F>(t.dot, t.lqw, go, lq, lqw, p.grad_out.si, p.grad_out.sd, dim, F(1));
  const T* o = static_cast<const T*>(p.out.data) + b * p.out.sb + s.q_first * p.out.si + h * p.out.sh;
  const F* lse = static_cast<const F*>(p.lse) + s.lse_base + h * p.lse_sh;
  for (int64_t i = 0; i < lq; ++i) {  // delta_i = <dO_i, O_i>
    F acc = F(0);
    const F* g = t.dout + i * dp;
    for (int64_t d = 0; d < dim; ++d) acc += g[d] * static_cast<F>(o[i * p.out.si + d * p.out.sd]);
    t.delta[i] = acc;
    t.lse[i] = lse[i];
    t.row_key[i] = p.dropout ? dropout_row_key(p, s, i, h) : 0u;
  }
  for (int64_t i = lq; i < lqw; ++i) {  // padding lanes: P = 0
    t.delta[i] = F(0);
    t.lse[i] = std::numeric_limits<F>::infinity();
    t.row_key[i] = 0u;
  }
  if (p.need_dq) {
    for (int64_t d = 0; d < t.dr; ++d) fill(t.dqt + d * t.lqw, lqw, F(0));
  }

  if (p.num_null > 0 && (p.need_dq || p.need_dnull_k || p.need_dnull_v)) {
    backward_block<T, F>(p, b, s, h, t, KeyBlock{0, p.num_null, 0, true}, p.need_dnull_k, p.need_dnull_v);
    const int64_t part = (b * p.heads + h) * p.num_null * dim;
    if (p.need_dnull_k) store_rows<F, F>(t.dk, dp, static_cast<F*>(p.dnull_k_part) + part, p.num_null, dim, 1, dim);
    if (p.need_dnull_v) store_rows<F, F>(t.dv, dp, static_cast<F*>(p.dnull_v_part) + part, p.num_null, dim, 1, dim);
  }
  if (p.need_dk || p.need_dv || p.need_dq) {
    for (int64_t j0 = 0; j0 < s.lk; j0 += kBlockK) {
      const int64_t nk = s.lk - j0 < kBlockK ? s.lk - j0 : kBlockK;
      backward_block<T, F>(p, b, s, h, t, KeyBlock{j0, nk, p.num_null + j0, false}, p.need_dk, p.need_dv);
      const int64_t row0 = s.k_first + j0;
      if (p.need_dk) {
        T* dst = static_cast<T*>(p.dk.data) + b * p.dk.sb + row0 * p.dk.si + h * p.dk.sh;
        store_rows<T, F>(t.dk, dp, dst, nk, p.dk.si, p.dk.sd, dim);
      }
      if (p.need_dv) {
        T* dst = static_cast<T*>(p.dv.data) + b * p.dv.sb + row0 * p.dv.si + h * p.dv.sh;
        store_rows<T, F>(t.dv, dp, dst, nk, p.dv.si, p.dv.sd, dim);
      }
    }
  }
  if (p.need_dq) {
    T* dst = static_cast<T*>(p.dq.data) + b * p.dq.sb + s.q_first * p.dq.si + h * p.dq.sh;
    for (int64_t i = 0; i < lq; ++i) {
      for (int64_t d = 0; d < dim; ++d) dst[i * p.dq.si + d * p.dq.sd] = static_cast<T>(t.dqt[d * t.lqw + i] * scale);
    }
  }
}

// ---- few keys: every head of a query row at once ---------------------------------------------------
// FedDISC's condition cross-attention has one null token and two condition tokens, head dim 4 and 8
// heads: a (sequence, head) task of the tiled path spends more on packing and set-up than on its few
// multiply-adds. Here the vector lanes run along a query row's heads x head dims (a row is read and
// written in place when its heads are contiguous, else through a packed H x D copy). With D dividing
// the vector width, log2(D) butterfly steps leave a key's score in every lane of its head, so the
// softmax and P V are lane-wise; with D a multiple of the width, a head's score is a horizontal sum
// and its softmax scalar. The keys of the sequence (null tokens first, key_mask-hidden ones left out) are packed once
// per task into rows of H x D. Same results as the tiled path up to float rounding; no row depends on
// the schedule.

template <typename F>
bool few_keys_fits(const Params& p) {
  constexpr int64_t w = lanes<F>();
  const int64_t d = p.dim;
  const bool pow2 = d > 0 && (d & (d - 1)) == 0;
  return pow2 && (w % d == 0 || d % w == 0);
}

// Butterfly partners: swap[k][l] = l ^ 2^k, for group sums of up to a whole vector.
template <typename F>
struct Butterfly {
  typename Simd<F>::I swap[8];
  Butterfly() {
    for (int64_t k = 0; (int64_t{1} << k) < lanes<F>(); ++k) {
      for (int64_t l = 0; l < lanes<F>(); ++l) swap[k][l] = l ^ (int64_t{1} << k);
    }
  }
  // Sum of the lanes of each group of `group` lanes (a power of two dividing the width), in every lane.
  typename Simd<F>::V group_sum(typename Simd<F>::V x, int64_t group) const {
    for (int64_t k = 0; (int64_t{1} << k) < group; ++k) x += __builtin_shuffle(x, swap[k]);
    return x;
  }
};

// log(x) for float lanes with x >= 1 finite (Cephes logf; relative error below 2e-7); float64 keeps libm's.
inline Simd<float>::V vlog_at_least_one(Simd<float>::V x) {
  using V = Simd<float>::V;
  using I = Simd<float>::I;
  const I bits = (I)x;
  V e = __builtin_convertvector((bits >> 23) - 126, V);
  V m = (V)((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const I small = m < 0.707106781186547524f;
  e = (V)(((I)(e - 1.0f) & small) | ((I)e & ~small));
  m = (V)(((I)(m + m) & small) | ((I)m & ~small)) - 1.0f;
  const V z = m * m;
  V y = V{} + 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += e * -2.12194440e-4f;
  y -= 0.5f * z;
  return m + y + e * 0.693359375f;
}
inline Simd<double>::V vlog_at_least_one(Simd<double>::V x) {
  for (int64_t l = 0; l < lanes<double>(); ++l) x[l] = std::log(x[l]);
  return x;
}

// A task's scratch: the visible keys and values as rows of H x D padded to whole vectors (null tokens
// first), and one packed query / output row.
template <typename F>
struct FewKeysTiles {
  F *kp, *vp, *qrow, *orow;
  int64_t row, rowp;
};

template <typename F>
FewKeysTiles<F> few_keys_tiles(const Params& p, char* base, size_t* bytes) {
  FewKeysTiles<F> t;
  t.row = p.heads * p.dim;
  t.rowp = round_up(t.row, lanes<F>());
  Carver cv{base};
  t.kp = cv.take<F>(kFewKeys * t.rowp);
  t.vp = cv.take<F>(kFewKeys * t.rowp);
  t.qrow = cv.take<F>(t.rowp);
  t.orow = cv.take<F>(t.rowp);
  if (bytes != nullptr) *bytes = cv.used;
  return t;
}

template <typename F>
size_t few_keys_workspace(const Params& p) {
  size_t bytes = 0;
  few_keys_tiles<F>(p, nullptr, &bytes);
  return bytes;
}

template <typename F>
void few_keys_forward(const Params& p, int64_t b, int64_t i0, int64_t i1, char* ws) {
  using V = typename Simd<F>::V;
  constexpr int64_t w = lanes<F>();
  constexpr F kInf = std::numeric_limits<F>::infinity();
  const Seq& s = p.seqs[b];
  const FewKeysTiles<F> t = few_keys_tiles<F>(p, ws, nullptr);
  F *kp = t.kp, *vp = t.vp, *qrow = t.qrow, *orow = t.orow;
  const int64_t d = p.dim, row = t.row, rowp = t.rowp;
  const F scale = static_cast<F>(p.scale);
  int64_t nk = 0;
  const auto pack_key = [&](const View& kw, const View& vw, const F* kbase, const F* vbase) {
    for (int64_t h = 0; h < p.heads; ++h) {
      for (int64_t e = 0; e < d; ++e) {
        kp[nk * rowp + h * d + e] = kbase[h * kw.sh + e * kw.sd];
        vp[nk * rowp + h * d + e] = vbase[h * vw.sh + e * vw.sd];
      }
    }
    fill(kp + nk * rowp + row, rowp - row, F(0));
    fill(vp + nk * rowp + row, rowp - row, F(0));
    ++nk;
  };
  for (int64_t n = 0; n < p.num_null; ++n) {
    pack_key(p.null_k, p.null_v, static_cast<const F*>(p.null_k.data) + n * p.null_k.si,
             static_cast<const F*>(p.null_v.data) + n * p.null_v.si);
  }
  for (int64_t j = 0; j < s.lk; ++j) {
    if (p.key_mask != nullptr && !p.key_mask[b * p.km_sb + (s.k_first + j) * p.km_si]) continue;
    pack_key(p.k, p.v, static_cast<const F*>(p.k.data) + b * p.k.sb + (s.k_first + j) * p.k.si,
             static_cast<const F*>(p.v.data) + b * p.v.sb + (s.k_first + j) * p.v.si);
  }
  F* lse = static_cast<F*>(p.lse) + s.lse_base;
  const Butterfly<F> butterfly;
  // Rows whose heads are contiguous (the projections' layout) and fill whole vectors are used in place.
  const bool q_rows = p.q.sd == 1 && p.q.sh == d, out_rows = p.out.sd == 1 && p.out.sh == d;
  for (int64_t i = i0; i < i1; ++i) {
    const F* q = static_cast<const F*>(p.q.data) + b * p.q.sb + (s.q_first + i) * p.q.si;
    F* out = static_cast<F*>(p.out.data) + b * p.out.sb + (s.q_first + i) * p.out.si;
    if (nk == 0) {  // no key to attend: zeros, lse = +inf (the op's contract)
      for (int64_t h = 0; h < p.heads; ++h) {
        for (int64_t e = 0; e < d; ++e) out[h * p.out.sh + e * p.out.sd] = F(0);
        lse[h * p.lse_sh + i] = kInf;
      }
      continue;
    }
    if (!q_rows || row % w != 0) {
      for (int64_t h = 0; h < p.heads; ++h) {
        for (int64_t e = 0; e < d; ++e) qrow[h * d + e] = q[h * p.q.sh + e * p.q.sd];
      }
      fill(qrow + row, rowp - row, F(0));
    }
    const F* qsrc = q_rows && row % w == 0 ? q : qrow;
    F* odst = out_rows && row % w == 0 ? out : orow;
    if (d <= w) {
      for (int64_t c0 = 0; c0 < rowp; c0 += w) {
        const V qv = vload<V>(qsrc + c0) * scale;
        V score[kFewKeys];
        V m = V{} - kInf;
        for (int64_t j = 0; j < nk; ++j) {
          score[j] = butterfly.group_sum(qv * vload<V>(kp + j * rowp + c0), d);
          m = score[j] > m ? score[j] : m;
        }
        V l{}, o{};
        for (int64_t j = 0; j < nk; ++j) {
          const V e = vexp(score[j] - m);
          l += e;
          o += e * vload<V>(vp + j * rowp + c0);
        }
        vstore(odst + c0, o / l);
        const V row_lse = m + vlog_at_least_one(l);  // l >= 1: the largest score contributes exp(0)
        for (int64_t lane = 0; lane < w && c0 + lane < row; lane += d) {
          lse[(c0 + lane) / d * p.lse_sh + i] = row_lse[lane];
        }
      }
    } else {
      for (int64_t h = 0; h < p.heads; ++h) {
        const int64_t h0 = h * d;
        F score[kFewKeys];
        F m = -kInf;
        for (int64_t j = 0; j < nk; ++j) {
          V acc{};
          for (int64_t c0 = 0; c0 < d; c0 += w) acc += vload<V>(qsrc + h0 + c0) * vload<V>(kp + j * rowp + h0 + c0);
          score[j] = butterfly.group_sum(acc, w)[0] * scale;
          m = score[j] > m ? score[j] : m;
        }
        F l = F(0);
        for (int64_t j = 0; j < nk; ++j) {
          score[j] = std::exp(score[j] - m);
          l += score[j];
        }
        for (int64_t c0 = 0; c0 < d; c0 += w) {
          V o{};
          for (int64_t j = 0; j < nk; ++j) o += score[j] * vload<V>(vp + j * rowp + h0 + c0);
          vstore(odst + h0 + c0, o / l);
        }
        lse[h * p.lse_sh + i] = m + std::log(l);
      }
    }
    if (odst == orow) {
      for (int64_t h = 0; h < p.heads; ++h) {
        for (int64_t e = 0; e < d; ++e) out[h * p.out.sh + e * p.out.sd] = orow[h * d + e];
      }
    }
  }
}

// ---- the table the dispatcher picks from -----------------------------------------------------------

template <typename T, typename F>
void forward_entry(const Params& p, int64_t b, int64_t h, int64_t i0, int64_t i1, char* ws) {
  forward_task<T, F>(p, b, h, i0, i1, ws);
}
template <typename T, typename F>
void backward_entry(const Params& p, int64_t b, int64_t h, char* ws) {
  backward_task<T, F>(p, b, h, ws);
}
// float16 / bfloat16 never take the few-keys path (takes_few_keys_path).
template <typename T, typename F>
bool few_keys_fits_entry(const Params& p) {
  return std::is_same<T, F>::value && few_keys_fits<F>(p);
}
template <typename T, typename F>
size_t few_keys_workspace_entry(const Params& p) {
  return few_keys_workspace<F>(p);
}
template <typename T, typename F>
void few_keys_entry(const Params& p, int64_t b, int64_t i0, int64_t i1, char* ws) {
  if constexpr (std::is_same<T, F>::value) few_keys_forward<F>(p, b, i0, i1, ws);
}

const Kernels& kernels(at::ScalarType dtype) {
  static const Kernels f32{&forward_workspace<float>, &forward_entry<float, float>, &backward_workspace<float>,
                           &backward_entry<float, float>,
                           &few_keys_fits_entry<float, float>,
                           &few_keys_workspace_entry<float, float>, &few_keys_entry<float, float>};
  static const Kernels f64{&forward_workspace<double>, &forward_entry<double, double>, &backward_workspace<double>,
                           &backward_entry<double, double>,
                           &few_keys_fits_entry<double, double>,
                           &few_keys_workspace_entry<double, double>, &few_keys_entry<double, double>};
  static const Kernels f16{&forward_workspace<float>, &forward_entry<c10::Half, float>, &backward_workspace<float>,
                           &backward_entry<c10::Half, float>,
                           &few_keys_fits_entry<c10::Half, float>,
                           &few_keys_workspace_entry<c10::Half, float>, &few_keys_entry<c10::Half, float>};
  static const Kernels bf16{&forward_workspace<float>, &forward_entry<c10::BFloat16, float>,
                            &backward_workspace<float>, &backward_entry<c10::BFloat16, float>,
                           &few_keys_fits_entry<c10::BFloat16, float>,
                           &few_keys_workspace_entry<c10::BFloat16, float>, &few_keys_entry<c10::BFloat16, float>};
  switch (dtype) {
    case at::kDouble: return f64;
    case at::kHalf: return f16;
    case at::kBFloat16: return bf16;
    default: return f32;
  }
}

}  // namespace IMER_FAST_ATTENTION_NS
}  // namespace attention_cpu
}  // namespace imer_fast

#endif  // IMER_FAST_ATTENTION_KERNEL_PASS
