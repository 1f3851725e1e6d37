// Fused elementwise ops of the decoder layer, float32 on AVX-512 CPUs (the engine asks
// `lorafleet::fused_ops_supported` first and keeps torch's ops elsewhere).
//
// In torch each is 2-6 kernels, each a pass over [tokens, hidden] or [tokens, intermediate]
// activations; here each is one pass, rows split across torch's threads:
//   rms_norm:      out = weight * (x * rsqrt(mean(x^2) + eps))
//   add_rms_norm:  x += delta (in place), then out = rms_norm(x)   (the residual stream)
//   silu_and_mul:  out = silu(gate) * up                           (the MLP)
//   rope_write_kv: q = q * cos + rotate_half(q) * sin in place; k likewise, written with v
//                  straight into their KV cache slots (attention.write_kv)
// The same ops as vLLM's CPU backend fuses, with the arithmetic of model.py's torch versions.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "common.h"

namespace {

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")
#include <immintrin.h>

#include "avx512_math.h"

// One row: optionally x += delta first, then out = w * (x * rsqrt(mean(x^2) + eps)).
void norm_row(float* x, const float* delta, const float* w, float* out, int64_t n, float eps) {
  __m512 sq = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    if (delta != nullptr) {
      v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, delta + i));
      _mm512_mask_storeu_ps(x + i, m, v);
    }
    sq = _mm512_fmadd_ps(v, v, sq);
  }
  const __m512 r = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / n + eps));
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), r);
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, w + i), v));
  }
}

void silu_mul_row(const float* g, const float* u, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 x = _mm512_maskz_loadu_ps(m, g + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 s = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    _mm512_mask_storeu_ps(out + i, m, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(m, u + i)));
  }
}

// heads rows of head_dim from x into y (which may be x); cos and sin [head_dim] of this token.
void rope_token(const float* x, float* y, int64_t heads, int64_t dim, const float* cos, const float* sin) {
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h, x += dim, y += dim) {
    for (int64_t i = 0; i < half; i += 16) {
      const __mmask16 m = tail_mask(half - i);
      const __m512 x1 = _mm512_maskz_loadu_ps(m, x + i), x2 = _mm512_maskz_loadu_ps(m, x + half + i);
      const __m512 c1 = _mm512_maskz_loadu_ps(m, cos + i), c2 = _mm512_maskz_loadu_ps(m, cos + half + i);
      const __m512 s1 = _mm512_maskz_loadu_ps(m, sin + i), s2 = _mm512_maskz_loadu_ps(m, sin + half + i);
      _mm512_mask_storeu_ps(y + i, m, _mm512_sub_ps(_mm512_mul_ps(x1, c1), _mm512_mul_ps(x2, s1)));
      _mm512_mask_storeu_ps(y + half + i, m, _mm512_add_ps(_mm512_mul_ps(x2, c2), _mm512_mul_ps(x1, s2)));
    }
  }
}
#pragma GCC pop_options
#endif

// Rows of `width` floats, split so that each task has at least ~16k elements.
template <typename F>
void for_rows(int64_t rows, int64_t width, const F& f) {
  TORCH_CHECK(cpu_has_avx512(), "the fused ops need AVX-512");
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1)), [&](int64_t a, int64_t b) {
    for (int64_t r = a; r < b; ++r) f(r);
  });
}

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor& out) {
  check_float32(x, "x"), check_float32(weight, "weight"), check_float32(out, "out");
  const int64_t n = weight.numel();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n && out.sizes() == x.sizes(), "rms_norm: x [T, H], weight [H]");
#if defined(__x86_64__)
  float* xp = x.data_ptr<float>();
  for_rows(x.size(0), n, [&](int64_t r) {
    norm_row(xp + r * n, nullptr, weight.data_ptr<float>(), out.data_ptr<float>() + r * n, n, eps);
  });
#endif
}

void add_rms_norm(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps, at::Tensor& out) {
  check_float32(x, "x"), check_float32(delta, "delta"), check_float32(weight, "weight"), check_float32(out, "out");
  const int64_t n = weight.numel();
  TORCH_CHECK(x.dim() == 2 && x.size(1) == n && delta.sizes() == x.sizes() && out.sizes() == x.sizes(),
              "add_rms_norm: x and delta [T, H], weight [H]");
#if defined(__x86_64__)
  for_rows(x.size(0), n, [&](int64_t r) {
    norm_row(x.data_ptr<float>() + r * n, delta.data_ptr<float>() + r * n, weight.data_ptr<float>(),
             out.data_ptr<float>() + r * n, n, eps);
  });
#endif
}

void silu_and_mul(const at::Tensor& gate, const at::Tensor& up, at::Tensor& out) {
  check_float32(gate, "gate"), check_float32(up, "up"), check_float32(out, "out");
  TORCH_CHECK(gate.dim() == 2 && up.sizes() == gate.sizes() && out.sizes() == gate.sizes(),
              "silu_and_mul: gate, up and out [T, I]");
#if defined(__x86_64__)
  const int64_t n = gate.size(1);
  for_rows(gate.size(0), n, [&](int64_t r) {
    silu_mul_row(gate.data_ptr<float>() + r * n, up.data_ptr<float>() + r * n, out.data_ptr<float>() + r * n, n);
  });
#endif
}

void rope_write_kv(at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                   const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots) {
  check_float32(q, "q"), check_float32(k, "k"), check_float32(v, "v"), check_float32(cos, "cos"), check_float32(sin, "sin");
  check_float32(k_cache, "k_cache"), check_float32(v_cache, "v_cache");
  const int64_t tokens = q.size(0), dim = q.size(2), kv_heads = k.size(1);
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.size(0) == tokens && k.size(2) == dim && v.sizes() == k.sizes() &&
                  dim % 2 == 0 && cos.numel() == tokens * dim && sin.numel() == tokens * dim,
              "rope_write_kv: q [T, Hq, D], k and v [T, Hkv, D], cos and sin [T, D]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(2) == kv_heads &&
                  k_cache.size(3) == dim,
              "rope_write_kv: caches [blocks, block_size, Hkv, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == tokens,
              "rope_write_kv: slots int64 [T]");
  const int64_t capacity = k_cache.size(0) * k_cache.size(1), row = kv_heads * dim;
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot[t] >= 0 && slot[t] < capacity, "rope_write_kv: slot out of range");
#if defined(__x86_64__)
  for_rows(tokens, (q.size(1) + 2 * kv_heads) * dim, [&](int64_t t) {
    const float *c = cos.data_ptr<float>() + t * dim, *s = sin.data_ptr<float>() + t * dim;
    float* qt = q.data_ptr<float>() + t * q.size(1) * dim;
    rope_token(qt, qt, q.size(1), dim, c, s);
    rope_token(k.data_ptr<float>() + t * row, k_cache.data_ptr<float>() + slot[t] * row, kv_heads, dim, c, s);
    std::copy_n(v.data_ptr<float>() + t * row, row, v_cache.data_ptr<float>() + slot[t] * row);
  });
#endif
}

bool fused_ops_supported() { return cpu_has_avx512(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorafleet, m) {
  m.def("fused_ops_supported() -> bool", fused_ops_supported);
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor delta, Tensor weight, float eps, Tensor(b!) out) -> ()");
  m.def("silu_and_mul(Tensor gate, Tensor up, Tensor(a!) out) -> ()");
  m.def("rope_write_kv(Tensor(a!) q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(b!) k_cache, "
        "Tensor(c!) v_cache, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(lorafleet, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("add_rms_norm", add_rms_norm);
  m.impl("silu_and_mul", silu_and_mul);
  m.impl("rope_write_kv", rope_write_kv);
}
