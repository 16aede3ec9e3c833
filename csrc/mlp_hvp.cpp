// The exact Hessian-vector product of the mean softmax cross-entropy of a chain of linear layers
// and one pointwise activation (the LR and NN defenders of Lu, Kamath & Yu, TMLR 2022), for a
// batch of B directions at once, by Pearlmutter's R-operator (Neural Computation 1994).
//
// Layer k (k = 0..L-1) computes z_k = a_k W_k^T + b_k from its input a_k, with a_{k+1} = sigma(z_k)
// for every layer but the last, whose z is the logits. For a direction V = (dW_k, db_k):
//   forward R-pass:  R z_k = R a_k W_k^T + a_k dW_k^T + db_k,   R a_{k+1} = sigma'(z_k) R z_k,
//   at the loss:     R delta_{L-1} = (diag(p) - p p^T) R z_{L-1} / N      (p = softmax(logits)),
//   backward R-pass: (H V)_{W_k} = R delta_k^T a_k + delta_k^T R a_k,  (H V)_{b_k} = sum_n R delta_k,
//                    R g_k = R delta_k W_k + delta_k dW_k   (g_k = dL/da_k),
//                    R delta_{k-1} = sigma''(z_{k-1}) R z_{k-1} g_k + sigma'(z_{k-1}) R g_k.
// The forward quantities (a_k, z_k, g_k, delta_k, p) come from one ordinary forward and backward
// pass that the caller makes once per solve (hypergrad/mlp_hvp.py) and reuses for every product.
// The matrix products run in ATen (cuBLAS / the CPU BLAS), batched over the B directions; the
// activation and softmax terms run in this extension's fused kernels (cpu/hvp_cpu.cpp,
// cuda/hvp_cuda.cu), reached through the dispatcher so that this function serves both devices.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <vector>

#include "hvp_common.h"

namespace hypergrad {
namespace {

at::Tensor activation_jvp(const at::Tensor& z, const at::Tensor& rz, c10::string_view act, double slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hypergrad::activation_jvp", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::string_view, double)>();
  return op.call(z, rz, act, slope);
}

at::Tensor activation_hvp_backward(const at::Tensor& z, const at::Tensor& rz, const at::Tensor& g,
                                   const at::Tensor& rg, c10::string_view act, double slope) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hypergrad::activation_hvp_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, c10::string_view, double)>();
  return op.call(z, rz, g, rg, act, slope);
}

at::Tensor softmax_ce_hvp(const at::Tensor& probs, const at::Tensor& rz, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("hypergrad::softmax_ce_hvp", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(probs, rz, scale);
}

void check_mlp_args(at::TensorList weights, at::TensorList inputs, at::TensorList pre_activations,
                    at::TensorList grad_activations, at::TensorList deltas, const at::Tensor& probs,
                    const at::Tensor& v) {
  const char* op = "hypergrad::mlp_ce_hvp: ";
  const size_t layers = weights.size();
  TORCH_CHECK_VALUE(layers >= 1, op, "needs at least one linear layer");
  TORCH_CHECK_VALUE(inputs.size() == layers && deltas.size() == layers, op, "inputs and deltas need one tensor per ",
                    "layer (", layers, "), got ", inputs.size(), " and ", deltas.size());
  TORCH_CHECK_VALUE(pre_activations.size() == layers - 1 && grad_activations.size() == layers - 1, op,
                    "pre_activations and grad_activations need one tensor per hidden layer (", layers - 1, "), got ",
                    pre_activations.size(), " and ", grad_activations.size());
  TORCH_CHECK_VALUE(probs.dim() == 2, op, "probs must be [N, C], got ", probs.sizes());
  const int64_t n = probs.size(0);
  int64_t params = 0;
  for (size_t k = 0; k < layers; ++k) {
    const auto& w = weights[k];
    TORCH_CHECK_VALUE(w.dim() == 2, op, "weights[", k, "] must be [out, in], got ", w.sizes());
    TORCH_CHECK_VALUE(inputs[k].dim() == 2 && inputs[k].size(0) == n && inputs[k].size(1) == w.size(1), op,
                      "inputs[", k, "] must be [", n, ", ", w.size(1), "], got ", inputs[k].sizes());
    TORCH_CHECK_VALUE(deltas[k].dim() == 2 && deltas[k].size(0) == n && deltas[k].size(1) == w.size(0), op,
                      "deltas[", k, "] must be [", n, ", ", w.size(0), "], got ", deltas[k].sizes());
    if (k + 1 < layers) {
      TORCH_CHECK_VALUE(weights[k + 1].size(1) == w.size(0), op, "weights[", k + 1, "] takes ", weights[k + 1].size(1),
                        " inputs but weights[", k, "] gives ", w.size(0));
      TORCH_CHECK_VALUE(pre_activations[k].sizes() == deltas[k].sizes() &&
                            grad_activations[k].sizes() == deltas[k].sizes(),
                        op, "pre_activations[", k, "] and grad_activations[", k, "] must be ", deltas[k].sizes());
    } else {
      TORCH_CHECK_VALUE(probs.size(1) == w.size(0), op, "probs has ", probs.size(1), " classes but the last layer gives ",
                        w.size(0));
    }
    params += w.numel() + w.size(0);
  }
  TORCH_CHECK_VALUE(v.dim() == 1 || v.dim() == 2, op, "v must be [P] or [B, P], got ", v.sizes());
  TORCH_CHECK_VALUE(v.size(-1) == params, op, "v has ", v.size(-1), " entries per direction but the layers have ",
                    params, " parameters (weights and biases, in that order per layer)");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.scalar_type() == v.scalar_type() && t.device() == v.device(), op, name, " is ",
                      t.scalar_type(), " on ", t.device(), " but v is ", v.scalar_type(), " on ", v.device(),
                      "; every tensor must share one dtype and device");
  };
  same(probs, "probs");
  for (const auto& list : {weights, inputs, pre_activations, grad_activations, deltas})
    for (const auto& t : list) same(t, "a layer tensor");
}

// out (+)= a @ b for every direction: out is [B, M, K]; a is [M, J] (shared) or [B, M, J]; b is [J, K]
// (shared) or [B, J, K]. One direction, or a shared right operand, folds into a single mm (when out
// and a are contiguous, so that their directions stack into rows); the rest is a (broadcast) bmm.
void gemm(at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t batch = out.size(0);
  if (batch == 1 || (a.dim() == 3 && b.dim() == 2 && a.is_contiguous() && out.is_contiguous())) {
    at::Tensor o = batch == 1 ? out.select(0, 0) : out.view({-1, out.size(2)});
    at::Tensor lhs = a.dim() == 3 ? (batch == 1 ? a.select(0, 0) : a.reshape({-1, a.size(2)})) : a;
    at::Tensor rhs = b.dim() == 3 ? b.select(0, 0) : b;
    if (accumulate) {
      o.addmm_(lhs, rhs);
    } else {
      at::mm_out(o, lhs, rhs);
    }
    return;
  }
  const at::Tensor lhs = a.dim() == 2 ? a.expand({batch, a.size(0), a.size(1)}) : a;
  const at::Tensor rhs = b.dim() == 2 ? b.expand({batch, b.size(0), b.size(1)}) : b;
  if (accumulate) {
    out.baddbmm_(lhs, rhs);
  } else {
    at::bmm_out(out, lhs, rhs);
  }
}

at::Tensor mlp_ce_hvp(at::TensorList weights, at::TensorList inputs, at::TensorList pre_activations,
                      at::TensorList grad_activations, at::TensorList deltas, const at::Tensor& probs,
                      const at::Tensor& v, c10::string_view activation, double negative_slope) {
  parse_activation(activation, "mlp_ce_hvp");
  check_mlp_args(weights, inputs, pre_activations, grad_activations, deltas, probs, v);
  const int64_t layers = static_cast<int64_t>(weights.size());
  const int64_t n = probs.size(0);
  const at::Tensor directions = (v.dim() == 1 ? v.unsqueeze(0) : v).contiguous();
  const int64_t batch = directions.size(0);
  // H v is written block by block into its final buffer, laid out like v.
  at::Tensor hv = at::empty_like(directions);

  // Per layer: the direction's blocks dW_k [B, out, in], db_k [B, out] and the same blocks of H v.
  std::vector<at::Tensor> d_weight, d_bias, h_weight, h_bias;
  int64_t offset = 0;
  for (const auto& w : weights) {
    d_weight.push_back(directions.narrow(1, offset, w.numel()).view({batch, w.size(0), w.size(1)}));
    h_weight.push_back(hv.narrow(1, offset, w.numel()).view({batch, w.size(0), w.size(1)}));
    offset += w.numel();
    d_bias.push_back(directions.narrow(1, offset, w.size(0)));
    h_bias.push_back(hv.narrow(1, offset, w.size(0)));
    offset += w.size(0);
  }

  // Forward R-pass. r_inputs[k] = R a_k ([B, N, in_k]; undefined for the data, whose R is 0).
  std::vector<at::Tensor> r_inputs(layers), r_pre(layers);
  for (int64_t k = 0; k < layers; ++k) {
    at::Tensor rz = at::empty({batch, n, weights[k].size(0)}, directions.options());
    gemm(rz, inputs[k], d_weight[k].transpose(1, 2), false);
    rz.add_(d_bias[k].unsqueeze(1));
    if (r_inputs[k].defined()) gemm(rz, r_inputs[k], weights[k].t(), true);
    r_pre[k] = rz;
    if (k + 1 < layers) r_inputs[k + 1] = activation_jvp(pre_activations[k].contiguous(), rz, activation, negative_slope);
  }

  // Backward R-pass, from the softmax cross-entropy's Hessian at the logits.
  at::Tensor r_delta = softmax_ce_hvp(probs.contiguous(), r_pre[layers - 1], 1.0 / static_cast<double>(n));
  for (int64_t k = layers - 1; k >= 0; --k) {
    gemm(h_weight[k], r_delta.transpose(1, 2), inputs[k], false);
    if (r_inputs[k].defined()) gemm(h_weight[k], deltas[k].t(), r_inputs[k], true);
    at::sum_out(h_bias[k], r_delta, 1);
    if (k > 0) {
      at::Tensor r_grad = at::empty({batch, n, weights[k].size(1)}, directions.options());
      gemm(r_grad, r_delta, weights[k], false);
      gemm(r_grad, deltas[k], d_weight[k], true);
      r_delta = activation_hvp_backward(pre_activations[k - 1].contiguous(), r_pre[k - 1],
                                        grad_activations[k - 1].contiguous(), r_grad, activation, negative_slope);
    }
  }
  return v.dim() == 1 ? hv.squeeze(0) : hv;
}

}  // namespace

TORCH_LIBRARY_IMPL(hypergrad, CompositeExplicitAutograd, m) {
  m.impl("mlp_ce_hvp", &mlp_ce_hvp);
}

}  // namespace hypergrad
