// Shared by the CPU and CUDA kernels of the structured Hessian-vector product (csrc/mlp_hvp.cpp):
// the pointwise activations with their first and second derivatives, and the argument checks.
//
// For a chain of linear layers and one pointwise activation sigma, Pearlmutter's R-operator needs
// sigma'(z) in the forward R-pass (R a = sigma'(z) R z) and sigma''(z) in the backward R-pass
// (R delta = sigma''(z) R z dL/da + sigma'(z) R dL/da). Both are evaluated from the cached
// pre-activation z, so no activation output needs to be stored.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string_view>

#include "solver_common.h"

namespace hypergrad {

enum class Activation { kIdentity, kRelu, kLeakyRelu, kTanh, kSigmoid };

inline Activation parse_activation(std::string_view name, const char* op) {
  if (name == "identity") return Activation::kIdentity;
  if (name == "relu") return Activation::kRelu;
  if (name == "leaky_relu") return Activation::kLeakyRelu;
  if (name == "tanh") return Activation::kTanh;
  if (name == "sigmoid") return Activation::kSigmoid;
  TORCH_CHECK_VALUE(false, "hypergrad::", op, ": unknown activation '", std::string(name),
                    "'; supported: identity, relu, leaky_relu, tanh, sigmoid");
  return Activation::kIdentity;
}

// Whether sigma'' can be non-zero; the others are piecewise linear, and their products leave out the sigma'' term
// (rz and grad_a unread, as autograd's double backward: an inf there gives no 0 * inf = nan).
HYPERGRAD_HOST_DEVICE constexpr bool curved(Activation act) {
  return act == Activation::kTanh || act == Activation::kSigmoid;
}

// sigma'(z) and sigma''(z). ReLU-type activations have sigma'' = 0 away from the kink; at z = 0
// the derivative is taken from the left (slope), as autograd does.
template <typename T>
struct ActivationDerivatives {
  T first;
  T second;
};

template <typename T>
HYPERGRAD_HOST_DEVICE inline ActivationDerivatives<T> activation_derivatives(Activation act, T slope, T z) {
#ifndef __CUDA_ARCH__
  using std::exp;  // on the device the unqualified calls pick CUDA's float and double overloads
  using std::tanh;
#endif
  switch (act) {
    case Activation::kRelu:
      return {z > T(0) ? T(1) : T(0), T(0)};
    case Activation::kLeakyRelu:
      return {z > T(0) ? T(1) : slope, T(0)};
    case Activation::kTanh: {
      const T t = tanh(z);
      const T d = T(1) - t * t;
      return {d, T(-2) * t * d};
    }
    case Activation::kSigmoid: {
      const T s = T(1) / (T(1) + exp(-z));
      const T d = s * (T(1) - s);
      return {d, d * (T(1) - T(2) * s)};
    }
    default:
      return {T(1), T(0)};
  }
}

// `batched` has the shape of `base` or [B, *base.shape]; both contiguous, same dtype and device.
inline void check_broadcast_pair(const at::Tensor& base, const char* base_name, const at::Tensor& batched,
                                 const char* batched_name, const char* op) {
  TORCH_CHECK_VALUE(base.scalar_type() == at::kFloat || base.scalar_type() == at::kDouble, "hypergrad::", op,
                    ": ", base_name, " must be float32 or float64, got ", base.scalar_type());
  TORCH_CHECK_VALUE(batched.scalar_type() == base.scalar_type(), "hypergrad::", op, ": ", batched_name, " is ",
                    batched.scalar_type(), " but ", base_name, " is ", base.scalar_type(),
                    "; convert both to one dtype");
  TORCH_CHECK_VALUE(batched.device() == base.device(), "hypergrad::", op, ": ", batched_name, " is on ",
                    batched.device(), " but ", base_name, " is on ", base.device(), "; move both to one device");
  TORCH_CHECK_VALUE(base.is_contiguous() && batched.is_contiguous(), "hypergrad::", op, ": ", base_name, " and ",
                    batched_name, " must be contiguous; call .contiguous() first");
  const bool same = batched.sizes() == base.sizes();
  const bool leading = batched.dim() == base.dim() + 1 && batched.sizes().slice(1) == base.sizes();
  TORCH_CHECK_VALUE(same || leading, "hypergrad::", op, ": ", batched_name, " must have the shape of ", base_name,
                    " ", base.sizes(), " or a leading batch dimension [B, ...], got ", batched.sizes());
}

// The argument checks of each fused piece, shared by its CPU and CUDA kernels.
inline Activation check_activation_jvp_args(const at::Tensor& z, const at::Tensor& rz, std::string_view activation) {
  const Activation act = parse_activation(activation, "activation_jvp");
  check_broadcast_pair(z, "z", rz, "rz", "activation_jvp");
  return act;
}

inline Activation check_activation_hvp_backward_args(const at::Tensor& z, const at::Tensor& rz,
                                                     const at::Tensor& grad_a, const at::Tensor& r_grad_a,
                                                     std::string_view activation) {
  const char* op = "activation_hvp_backward";
  const Activation act = parse_activation(activation, op);
  check_broadcast_pair(z, "z", rz, "rz", op);
  check_broadcast_pair(z, "z", grad_a, "grad_a", op);
  TORCH_CHECK_VALUE(grad_a.sizes() == z.sizes(), "hypergrad::", op, ": grad_a must have the shape of z ", z.sizes(),
                    ", got ", grad_a.sizes());
  check_broadcast_pair(z, "z", r_grad_a, "r_grad_a", op);
  TORCH_CHECK_VALUE(r_grad_a.sizes() == rz.sizes(), "hypergrad::", op, ": r_grad_a must have the shape of rz ",
                    rz.sizes(), ", got ", r_grad_a.sizes());
  return act;
}

inline void check_softmax_ce_hvp_args(const at::Tensor& probs, const at::Tensor& rz) {
  check_broadcast_pair(probs, "probs", rz, "rz", "softmax_ce_hvp");
  TORCH_CHECK_VALUE(probs.dim() == 2, "hypergrad::softmax_ce_hvp: probs must be [N, C], got ", probs.sizes());
}

}  // namespace hypergrad
