// Paged decode attention on CPU: one query token per request, read straight from the KV blocks.
//
// torch's path gathers each request's blocks into a padded copy and then runs SDPA over it, so
// every key and value crosses memory three times (read, write, read again) plus padding. Here
// each request's blocks are read once, in place, fetched ahead into L2: per block, every query
// head's scores, an online softmax update (running max m, sum l, unnormalized output acc) and
// the weighted sum of values. Threads split the batch by total context length, in torch's own
// OpenMP pool.
//
// Layout (engine/attention.py): q and out [tokens, q_heads, head_dim]; each cache
// [blocks, block_size, kv_heads, head_dim], float32. Query head h reads kv head h / (q_heads /
// kv_heads). On x86 CPUs with AVX-512 a vectorized kernel runs (head_dim a multiple of 16, up to
// 128); elsewhere a portable loop does the same arithmetic.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kMaxHeads = 128;
constexpr int64_t kMaxHeadDim = 256;

struct Args {
  const float *k, *v;
  int64_t q_heads, kv_heads, block_size;
  float scale;
};

// The portable kernel: one request, all of its query heads.
void attend(const Args& a, const float* q, const int32_t* table, int64_t ctx, int64_t d, float* out) {
  const int64_t group = a.q_heads / a.kv_heads, tok = a.kv_heads * d, blk = a.block_size * tok;
  std::vector<float> m(a.q_heads, -INFINITY), l(a.q_heads, 0.f), acc(a.q_heads * d, 0.f), s(a.block_size);
  for (int64_t b = 0; b * a.block_size < ctx; ++b) {
    const int64_t n = std::min(a.block_size, ctx - b * a.block_size);
    for (int64_t h = 0; h < a.q_heads; ++h) {
      const float* kh = a.k + table[b] * blk + (h / group) * d;
      const float* vh = a.v + table[b] * blk + (h / group) * d;
      const float* qh = q + h * d;
      float mx = m[h];
      for (int64_t t = 0; t < n; ++t) {
        float dot = 0.f;
        for (int64_t i = 0; i < d; ++i) dot += qh[i] * kh[t * tok + i];
        s[t] = dot * a.scale;
        mx = std::max(mx, s[t]);
      }
      const float corr = std::exp(m[h] - mx);
      float* ah = acc.data() + h * d;
      for (int64_t i = 0; i < d; ++i) ah[i] *= corr;
      l[h] *= corr;
      for (int64_t t = 0; t < n; ++t) {
        const float p = std::exp(s[t] - mx);
        l[h] += p;
        for (int64_t i = 0; i < d; ++i) ah[i] += p * vh[t * tok + i];
      }
      m[h] = mx;
    }
  }
  for (int64_t h = 0; h < a.q_heads; ++h)
    for (int64_t i = 0; i < d; ++i) out[h * d + i] = acc[h * d + i] / l[h];
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")
#include <immintrin.h>

#include "avx512_math.h"

// Up to 16 tokens (n) of one block for J query heads that share one kv head, head_dim 16 * V:
// scores, the online softmax update of (m, l, acc), the weighted sum of values. Each key and
// value row is loaded once for all J heads.
template <int V, int J>
inline void step16(const float* q, const float* kh, const float* vh, int64_t tok, int n, float scale,
                   float* m, float* l, float* acc) {
  alignas(64) float s[J][16];
  {
    __m512 qr[J][V];
    for (int j = 0; j < J; ++j)
      for (int v = 0; v < V; ++v) qr[j][v] = _mm512_loadu_ps(q + j * 16 * V + 16 * v);
    for (int t = 0; t < n; ++t) {
      __m512 kr[V];
      for (int v = 0; v < V; ++v) kr[v] = _mm512_loadu_ps(kh + t * tok + 16 * v);
      for (int j = 0; j < J; ++j) {
        __m512 p = _mm512_mul_ps(qr[j][0], kr[0]);
        for (int v = 1; v < V; ++v) p = _mm512_fmadd_ps(qr[j][v], kr[v], p);
        s[j][t] = _mm512_reduce_add_ps(p) * scale;
      }
    }
  }
  const __mmask16 mask = tail_mask(n);
  float corr[J];
  for (int j = 0; j < J; ++j) {
    const __m512 sv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), mask, s[j]);
    const float mx = std::max(m[j], _mm512_reduce_max_ps(sv));
    corr[j] = std::exp(m[j] - mx);
    const __m512 pv = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(mx))));
    l[j] = l[j] * corr[j] + _mm512_reduce_add_ps(pv);
    m[j] = mx;
    _mm512_store_ps(s[j], pv);
  }
  __m512 a[J][V];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < V; ++v)
      a[j][v] = _mm512_mul_ps(_mm512_loadu_ps(acc + j * 16 * V + 16 * v), _mm512_set1_ps(corr[j]));
  for (int t = 0; t < n; ++t) {
    __m512 vr[V];
    for (int v = 0; v < V; ++v) vr[v] = _mm512_loadu_ps(vh + t * tok + 16 * v);
    for (int j = 0; j < J; ++j) {
      const __m512 p = _mm512_set1_ps(s[j][t]);
      for (int v = 0; v < V; ++v) a[j][v] = _mm512_fmadd_ps(p, vr[v], a[j][v]);
    }
  }
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(acc + j * 16 * V + 16 * v, a[j][v]);
}

template <int V>
void attend512(const Args& a, const float* q, const int32_t* table, int64_t ctx, int64_t, float* out) {
  constexpr int64_t D = 16 * V;
  const int64_t group = a.q_heads / a.kv_heads, tok = a.kv_heads * D, blk = a.block_size * tok;
  float m[kMaxHeads], l[kMaxHeads];
  alignas(64) static thread_local float acc[kMaxHeads * D];
  std::fill(m, m + a.q_heads, -INFINITY);
  std::fill(l, l + a.q_heads, 0.f);
  std::fill(acc, acc + a.q_heads * D, 0.f);
  // Blocks lie anywhere in the cache, where the hardware prefetchers do not follow (they stop at
  // page boundaries): fetch each one into L2 two blocks ahead of its use. One block ahead leaves
  // too little time; two makes a cold decode step's attention ~12% faster here.
  const auto fetch = [&](int64_t b) {
    if (b * a.block_size >= ctx) return;
    const char* k = reinterpret_cast<const char*>(a.k + table[b] * blk);
    const char* v = reinterpret_cast<const char*>(a.v + table[b] * blk);
    const int64_t bytes = std::min(a.block_size, ctx - b * a.block_size) * tok * 4;
    for (int64_t at = 0; at < bytes; at += 64) {
      _mm_prefetch(k + at, _MM_HINT_T1);
      _mm_prefetch(v + at, _MM_HINT_T1);
    }
  };
  fetch(1);
  for (int64_t b = 0; b * a.block_size < ctx; ++b) {
    const int64_t n = std::min(a.block_size, ctx - b * a.block_size);
    fetch(b + 2);
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
      const int chunk = static_cast<int>(std::min<int64_t>(16, n - t0));
      const float* kb = a.k + table[b] * blk + t0 * tok;
      const float* vb = a.v + table[b] * blk + t0 * tok;
      for (int64_t h = 0; h < a.kv_heads; ++h) {
        // This kv head's query heads, up to four at a time.
        for (int64_t j = h * group, end = (h + 1) * group; j < end;) {
          const int64_t left = end - j;
          const float* qj = q + j * D;
          const float *kh = kb + h * D, *vh = vb + h * D;
          float *mj = m + j, *lj = l + j, *aj = acc + j * D;
          if (left >= 4) step16<V, 4>(qj, kh, vh, tok, chunk, a.scale, mj, lj, aj), j += 4;
          else if (left == 3) step16<V, 3>(qj, kh, vh, tok, chunk, a.scale, mj, lj, aj), j += 3;
          else if (left == 2) step16<V, 2>(qj, kh, vh, tok, chunk, a.scale, mj, lj, aj), j += 2;
          else step16<V, 1>(qj, kh, vh, tok, chunk, a.scale, mj, lj, aj), j += 1;
        }
      }
    }
  }
  for (int64_t h = 0; h < a.q_heads; ++h)
    for (int64_t i = 0; i < D; ++i) out[h * D + i] = acc[h * D + i] / l[h];
}
#pragma GCC pop_options
#endif

using Kernel = void (*)(const Args&, const float*, const int32_t*, int64_t, int64_t, float*);

Kernel pick_kernel(int64_t head_dim) {
#if defined(__x86_64__)
  if (cpu_has_avx512()) {
    switch (head_dim) {
      case 16: return attend512<1>;
      case 32: return attend512<2>;
      case 64: return attend512<4>;
      case 128: return attend512<8>;
    }
  }
#endif
  return attend;
}

void decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                      const at::Tensor& rows, const at::Tensor& ctx_lens, const at::Tensor& tables,
                      double scale, at::Tensor& out) {
  check_float32(q, "decode_attention: q"), check_float32(out, "decode_attention: out");
  check_float32(k_cache, "decode_attention: k_cache"), check_float32(v_cache, "decode_attention: v_cache");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && out.sizes() == q.sizes(),
              "decode_attention: q/out [tokens, heads, dim] and caches [blocks, block_size, kv_heads, dim]");
  const int64_t batch = rows.size(0), q_heads = q.size(1), head_dim = q.size(2);
  const int64_t blocks = k_cache.size(0), block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim && kv_heads > 0 && q_heads % kv_heads == 0 &&
                  q_heads <= kMaxHeads && head_dim <= kMaxHeadDim,
              "decode_attention: unsupported head layout");
  TORCH_CHECK(rows.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kInt &&
                  tables.scalar_type() == at::kInt && rows.is_contiguous() && ctx_lens.is_contiguous() &&
                  tables.is_contiguous() && tables.dim() == 2 && tables.size(0) == batch &&
                  ctx_lens.size(0) == batch,
              "decode_attention: rows int64 [B], ctx_lens int32 [B], tables int32 [B, blocks]");
  const int64_t* row = rows.data_ptr<int64_t>();
  const int32_t* ctx = ctx_lens.data_ptr<int32_t>();
  const int32_t* table = tables.data_ptr<int32_t>();
  const int64_t width = tables.size(1);
  // Nothing out of bounds, whatever the caller passed: checked once here, not in the kernel.
  std::vector<int64_t> cum(batch + 1, 0);
  for (int64_t i = 0; i < batch; ++i) {
    TORCH_CHECK(row[i] >= 0 && row[i] < q.size(0), "decode_attention: row out of range");
    TORCH_CHECK(ctx[i] > 0 && ctx[i] <= width * block_size, "decode_attention: context outside its table");
    for (int64_t b = 0; b * block_size < ctx[i]; ++b)
      TORCH_CHECK(table[i * width + b] >= 0 && table[i * width + b] < blocks, "decode_attention: block out of range");
    cum[i + 1] = cum[i] + ctx[i];
  }
  const Args args{k_cache.data_ptr<float>(), v_cache.data_ptr<float>(), q_heads, kv_heads, block_size,
                  static_cast<float>(scale)};
  const Kernel kernel = pick_kernel(head_dim);
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // Split by total context length, so every thread reads about as many keys and values.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), batch));
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      const auto lo = std::lower_bound(cum.begin(), cum.end(), cum[batch] * t / threads) - cum.begin();
      const auto hi = std::lower_bound(cum.begin(), cum.end(), cum[batch] * (t + 1) / threads) - cum.begin();
      for (int64_t i = lo; i < std::min<int64_t>(hi, batch); ++i)
        kernel(args, qp + row[i] * q_heads * head_dim, table + i * width, ctx[i], head_dim,
               op + row[i] * q_heads * head_dim);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorafleet, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor rows, Tensor ctx_lens, "
        "Tensor tables, float scale, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(lorafleet, CPU, m) { m.impl("decode_attention", decode_attention); }
