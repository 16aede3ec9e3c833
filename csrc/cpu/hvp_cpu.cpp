// CPU kernels of the pointwise and per-row pieces of the structured Hessian-vector product
// (schemas in csrc/hypergrad.cpp, the R-operator itself in csrc/mlp_hvp.cpp). Elements, or rows
// for the softmax term, are processed in parallel with at::parallel_for.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../hvp_common.h"

namespace hypergrad {
namespace {

constexpr int64_t kPointwiseGrain = 1 << 14;

// R a = sigma'(z) R z, with R z shaped like z or [B, *z.shape].
at::Tensor activation_jvp_cpu(const at::Tensor& z, const at::Tensor& rz, c10::string_view activation,
                              double negative_slope) {
  const Activation act = check_activation_jvp_args(z, rz, activation);
  auto out = at::empty_like(rz);
  const int64_t zn = z.numel(), total = rz.numel();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_jvp_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* rp = rz.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto slope = static_cast<scalar_t>(negative_slope);
    at::parallel_for(0, total, kPointwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        op[i] = activation_derivatives(act, slope, zp[i % zn]).first * rp[i];
      }
    });
  });
  return out;
}

// R delta = sigma''(z) R z grad_a + sigma'(z) R grad_a, where grad_a = dL/da (shaped like z) and
// R z, R grad_a are shaped like z or [B, *z.shape].
at::Tensor activation_hvp_backward_cpu(const at::Tensor& z, const at::Tensor& rz, const at::Tensor& grad_a,
                                       const at::Tensor& r_grad_a, c10::string_view activation,
                                       double negative_slope) {
  const Activation act = check_activation_hvp_backward_args(z, rz, grad_a, r_grad_a, activation);
  auto out = at::empty_like(rz);
  const int64_t zn = z.numel(), total = rz.numel();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_hvp_backward_cpu", [&] {
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* rzp = rz.data_ptr<scalar_t>();
    const scalar_t* gp = grad_a.data_ptr<scalar_t>();
    const scalar_t* rgp = r_grad_a.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto slope = static_cast<scalar_t>(negative_slope);
    at::parallel_for(0, total, kPointwiseGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t j = i % zn;
        const auto d = activation_derivatives(act, slope, zp[j]);
        op[i] = d.second * rzp[i] * gp[j] + d.first * rgp[i];
      }
    });
  });
  return out;
}

// R g = scale (p * R z - p <p, R z>) per row: the softmax cross-entropy Hessian diag(p) - p p^T
// applied to R z, where p = softmax(logits) is [N, C] and R z is [N, C] or [B, N, C].
at::Tensor softmax_ce_hvp_cpu(const at::Tensor& probs, const at::Tensor& rz, double scale) {
  check_softmax_ce_hvp_args(probs, rz);
  auto out = at::empty_like(rz);
  const int64_t classes = probs.size(1), n_rows = probs.size(0), rows = rz.numel() / std::max<int64_t>(classes, 1);
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "softmax_ce_hvp_cpu", [&] {
    const scalar_t* pp = probs.data_ptr<scalar_t>();
    const scalar_t* rp = rz.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto s = static_cast<scalar_t>(scale);
    at::parallel_for(0, rows, std::max<int64_t>(1, kPointwiseGrain / std::max<int64_t>(classes, 1)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* p = pp + (row % n_rows) * classes;
        const scalar_t* r = rp + row * classes;
        scalar_t dot = 0;
        for (int64_t c = 0; c < classes; ++c) dot += p[c] * r[c];
        for (int64_t c = 0; c < classes; ++c) op[row * classes + c] = s * p[c] * (r[c] - dot);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hypergrad, CPU, m) {
  m.impl("activation_jvp", &activation_jvp_cpu);
  m.impl("activation_hvp_backward", &activation_hvp_backward_cpu);
  m.impl("softmax_ce_hvp", &softmax_ce_hvp_cpu);
}

}  // namespace hypergrad
