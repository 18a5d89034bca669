// Per-thread scratch buffers that CPU kernels reuse across calls: multi-megabyte intermediates freshly
// allocated come from mmap and pay a page fault per 4 KiB on first touch (and the allocator's zeroing),
// which cost as much as the work itself. A scratch view never leaves its op (outputs are fresh tensors).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <unordered_map>

namespace imer_fast {

enum class ScratchOwner : int64_t { kRgcn = 0, kWinograd = 1 };

// A [numel] view of this thread's buffer for (owner, slot, dtype, inference mode), grown on demand; slots
// live at once within a call must differ. Keyed by inference mode too: a buffer made under
// torch.inference_mode() is an inference tensor, which out= kernels may not write outside that mode.
inline at::Tensor thread_scratch(ScratchOwner owner, int slot, int64_t numel, const at::TensorOptions& options) {
  thread_local std::unordered_map<int64_t, at::Tensor> buffers;
  const int64_t dtype = static_cast<int64_t>(c10::typeMetaToScalarType(options.dtype()));
  const int64_t key = ((static_cast<int64_t>(owner) * 16 + slot) * 64 + dtype) * 2 +
                      static_cast<int64_t>(c10::InferenceMode::is_enabled());
  at::Tensor& buffer = buffers[key];
  if (!buffer.defined() || buffer.numel() < numel) buffer = at::empty({std::max<int64_t>(numel, 1)}, options);
  return buffer.narrow(0, 0, numel);
}

}  // namespace imer_fast
