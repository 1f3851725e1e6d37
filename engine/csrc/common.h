// Checks shared by the ops.
#pragma once

#include <ATen/core/Tensor.h>

inline void check_float32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(), what,
              " must be a contiguous float32 CPU tensor");
}

// The CPU can run the ops' AVX-512 kernels (the code for them is compiled in on x86 only).
inline bool cpu_has_avx512() {
#if defined(__x86_64__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}
