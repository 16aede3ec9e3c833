// CPU kernels of the pointwise and per-row pieces of the structured Hessian-vector product
// (schemas in csrc/hypergrad.cpp, the R-operator itself in csrc/mlp_hvp.cpp). Elements, or rows
// for the softmax term, are processed in parallel with at::parallel_for. The activation is a
// compile-time constant inside each loop and the broadcast index runs without a division per
// element, so the piecewise-linear cases vectorise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../hvp_common.h"

namespace hypergrad {
namespace {

constexpr int64_t kPointwiseGrain = 1 << 14;

template <Activation A>
using ActivationConstant = std::integral_constant<Activation, A>;

// Calls f(ActivationConstant<act>{}) so that the body is compiled once per activation.
template <typename F>
void with_activation(Activation act, F&& f) {
  switch (act) {
    case Activation::kRelu: return f(ActivationConstant<Activation::kRelu>{});
    case Activation::kLeakyRelu: return f(ActivationConstant<Activation::kLeakyRelu>{});
    case Activation::kTanh: return f(ActivationConstant<Activation::kTanh>{});
    case Activation::kSigmoid: return f(ActivationConstant<Activation::kSigmoid>{});
    default: return f(ActivationConstant<Activation::kIdentity>{});
  }
}

// body(i, j) for every i in [0, total) in parallel, with j = i mod base (a [B, *z] tensor read
// against z): the loop is split at the multiples of base instead of dividing per element.
template <typename Body>
void for_each_broadcast(int64_t total, int64_t base, const Body& body) {
  at::parallel_for(0, total, kPointwiseGrain, [&](int64_t begin, int64_t end) {
    for (int64_t start = begin; start < end;) {
      const int64_t offset = start - start % base;
      const int64_t stop = std::min(end, offset + base);
      for (int64_t i = start; i < stop; ++i) body(i, i - offset);
      start = stop;
    }
  });
}

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
    with_activation(act, [&](auto kind) {
      for_each_broadcast(total, zn, [&](int64_t i, int64_t j) {
        op[i] = activation_derivatives(decltype(kind)::value, slope, zp[j]).first * rp[i];
      });
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
    with_activation(act, [&](auto kind) {
      constexpr Activation A = decltype(kind)::value;
      for_each_broadcast(total, zn, [&](int64_t i, int64_t j) {
        const auto d = activation_derivatives(A, slope, zp[j]);
        if constexpr (curved(A)) {
          op[i] = d.second * rzp[i] * gp[j] + d.first * rgp[i];
        } else {  // piecewise linear: sigma'' = 0, so R z and grad_a are not read
          op[i] = d.first * rgp[i];
        }
      });
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
