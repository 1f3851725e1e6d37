// Linear layers for steps of a few tokens: y = x W^T + b for x of 1 to 8 rows, float32 on AVX-512.
//
// Such a step does little arithmetic per weight it reads, so its speed is how fast the weights
// stream from memory. oneDNN's kernels for a few rows read SmolLM2's projections at ~15-22 GB/s
// on the 2-core EPYC (Zen 4) we measure on, where a plain sum over the same bytes runs at ~28-55.
// Here each weight is stored a second time as panels of 16 output features, [ceil(N/16), K, 16]
// (cpu_linear.gemv_panels, zero-padded): a thread reads one panel front to back, one contiguous
// stream, holding each row's 16 sums in registers, and threads take equal runs of panels. The
// layers given in one call (q, k, v; gate, up) share one parallel region, and their outputs are
// separate tensors. A SmolLM2 decoder pass reads its weights at ~26-34 GB/s this way.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "common.h"

namespace {

constexpr int64_t kMaxRows = 8;

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,fma")
#include <immintrin.h>

#include "avx512_math.h"

// y[m, n0:n0+16] = x[m] . panel + bias[n0:n0+16] for every row m, lanes outside `mask` untouched.
// Two sets of sums (even and odd k) keep two FMA chains in flight even for one row.
template <int M>
void panel_rows(const float* x, int64_t K, const float* panel, const float* bias, float* y, int64_t ldy,
                __mmask16 mask) {
  __m512 even[M], odd[M];
  for (int m = 0; m < M; ++m) even[m] = odd[m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * 16), w1 = _mm512_loadu_ps(panel + k * 16 + 16);
    for (int m = 0; m < M; ++m) {
      even[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), w0, even[m]);
      odd[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k + 1]), w1, odd[m]);
    }
  }
  if (k < K) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * 16);
    for (int m = 0; m < M; ++m) even[m] = _mm512_fmadd_ps(_mm512_set1_ps(x[m * K + k]), w0, even[m]);
  }
  const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
  for (int m = 0; m < M; ++m) _mm512_mask_storeu_ps(y + m * ldy, mask, _mm512_add_ps(_mm512_add_ps(even[m], odd[m]), b));
}

using PanelFn = void (*)(const float*, int64_t, const float*, const float*, float*, int64_t, __mmask16);
constexpr PanelFn kPanelFns[kMaxRows] = {panel_rows<1>, panel_rows<2>, panel_rows<3>, panel_rows<4>,
                                         panel_rows<5>, panel_rows<6>, panel_rows<7>, panel_rows<8>};
#pragma GCC pop_options
#endif

std::vector<at::Tensor> gemv(const at::Tensor& x, const std::vector<at::Tensor>& panels,
                             const std::vector<std::optional<at::Tensor>>& biases,
                             const std::vector<int64_t>& out_features) {
  TORCH_CHECK(cpu_has_avx512(), "gemv needs AVX-512");
  check_float32(x, "gemv: x");
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kMaxRows, "gemv: x must have 1 to ", kMaxRows,
              " rows, got shape ", x.sizes());
  TORCH_CHECK(panels.size() == biases.size() && panels.size() == out_features.size(),
              "gemv: one bias (or None) and one output width per weight");
  const int64_t rows = x.size(0), K = x.size(1), layers = static_cast<int64_t>(panels.size());
  std::vector<at::Tensor> out(layers);
  std::vector<int64_t> first(layers + 1, 0);  // layer i owns panels [first[i], first[i + 1]) of the run
  std::vector<const float*> w(layers), b(layers);
  std::vector<float*> y(layers);
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor& p = panels[i];
    const int64_t n = out_features[i];
    check_float32(p, "gemv: panels");
    TORCH_CHECK(n >= 1 && p.dim() == 3 && p.size(0) == (n + 15) / 16 && p.size(1) == K && p.size(2) == 16,
                "gemv: panels of ", n, " outputs over ", K, " inputs must be [", (n + 15) / 16, ", ", K,
                ", 16], got ", p.sizes());
    if (biases[i]) {
      check_float32(*biases[i], "gemv: bias");
      TORCH_CHECK(biases[i]->numel() == n, "gemv: a bias of ", n, " values, got ", biases[i]->numel());
    }
    out[i] = at::empty({rows, n}, x.options());
    first[i + 1] = first[i] + p.size(0);
    w[i] = p.data_ptr<float>();
    b[i] = biases[i] ? biases[i]->data_ptr<float>() : nullptr;
    y[i] = out[i].data_ptr<float>();
  }
#if defined(__x86_64__)
  const PanelFn fn = kPanelFns[rows - 1];
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, first[layers], 1, [&](int64_t begin, int64_t end) {
    int64_t i = std::upper_bound(first.begin(), first.end(), begin) - first.begin() - 1;
    for (int64_t p = begin; p < end; ++p) {
      while (p >= first[i + 1]) ++i;
      const int64_t n0 = (p - first[i]) * 16, n = out_features[i];
      fn(xp, K, w[i] + n0 * K, b[i] ? b[i] + n0 : nullptr, y[i] + n0, n, tail_mask(n - n0));
    }
  });
#endif
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorafleet, m) {
  m.def("gemv(Tensor x, Tensor[] panels, Tensor?[] biases, int[] out_features) -> Tensor[]", gemv);
}
