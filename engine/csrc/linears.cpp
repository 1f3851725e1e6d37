// Independent linear layers on the same input (q, k, v; gate, up), run at once, one per thread.
//
// A step of a few tokens is bound by reading the weights, and oneDNN splits a small matrix
// poorly across threads: on the 2-core EPYC we measure on, q, k and v (576x576, 192x576 twice)
// read at ~13 GB/s one after another with two threads each, and at ~17-18 GB/s when each layer
// gets one thread and they run side by side. Each call is oneDNN's own linear on its prepacked
// weight (torch's mkldnn::_linear_pointwise); inside the parallel region oneDNN runs on one
// thread. The caller's thread-local state (inference mode among it) is carried into the threads.

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <exception>
#include <optional>
#include <string_view>
#include <vector>

namespace {

std::vector<at::Tensor> linears(const at::Tensor& x, std::vector<at::Tensor> weights,
                                std::vector<std::optional<at::Tensor>> biases) {
  TORCH_CHECK(weights.size() == biases.size(), "linears: one bias (or None) per weight");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                               std::string_view, c10::List<std::optional<c10::Scalar>>,
                                               std::optional<std::string_view>)>();

  const int64_t n = static_cast<int64_t>(weights.size());
  std::vector<at::Tensor> out(n);
  const at::ThreadLocalState state;
  std::exception_ptr error;
#pragma omp parallel for num_threads(std::min<int64_t>(n, at::get_num_threads())) schedule(dynamic, 1)
  for (int64_t i = 0; i < n; ++i) {
    try {
      at::ThreadLocalStateGuard guard(state);
      out[i] = op.call(x, weights[i], biases[i], "none", c10::List<std::optional<c10::Scalar>>(), std::nullopt);
    } catch (...) {
#pragma omp critical
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  return out;
}

}  // namespace

// A catch-all kernel: the weights are oneDNN (MkldnnCPU) tensors and x a plain CPU one.
TORCH_LIBRARY_FRAGMENT(lorafleet, m) { m.def("linears(Tensor x, Tensor[] weights, Tensor?[] biases) -> Tensor[]", linears); }
