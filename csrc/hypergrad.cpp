// Schemas of every op of hypergrad._C (one TORCH_LIBRARY block) and the tiny Python module that
// loading the library needs. Kernels live in cpu/ and cuda/, registered there with
// TORCH_LIBRARY_IMPL; the dispatcher picks the device.
//
// The ops are the vector work of the Krylov solvers in hypergrad/solvers.py (conjugate gradient
// on (H + damping I) v = b, Lu, Kamath & Yu 2022, eq. 15-17) and the structured Hessian-vector
// product of csrc/mlp_hvp.cpp that those solvers call for linear-activation chains. Vectors are contiguous float32 or
// float64 buffers shaped [n] (one system) or [B, n] (B systems, one per row); every per-row
// scalar is a float64 tensor shaped like the rows ([] or [B]) that stays on the device.
#include <torch/extension.h>

#include "solver_common.h"

TORCH_LIBRARY(hypergrad, m) {
  // <a_i, b_i> for every row i, accumulated in float64.
  m.def("row_dot(Tensor a, Tensor b) -> Tensor");
  // alpha_i = num_i / den_i where active_i and den_i > 0, else 0;
  // x_i += alpha_i p_i; r_i -= alpha_i q_i; returns <r_i, r_i> of the updated r (float64).
  m.def("cg_step(Tensor(a!) x, Tensor(b!) r, Tensor p, Tensor q, Tensor num, Tensor den, "
        "Tensor active) -> Tensor");
  // beta_i = num_new_i / num_old_i (0 where num_old_i == 0); p_i = z_i + beta_i p_i where
  // active_i, p_i unchanged elsewhere.
  m.def("cg_direction(Tensor(a!) p, Tensor z, Tensor num_new, Tensor num_old, Tensor active) -> ()");
  // The per-row bookkeeping of one CG iteration, in place (den = p.Ap, or |A p|^2 for CGNR):
  // stepping = active & den > 0; negative |= active & den <= 0; iterations += stepping;
  // active = stepping & rr > tol2. den, rr, tol2 float64, active and negative bool, iterations int64.
  m.def("cg_track(Tensor den, Tensor rr, Tensor tol2, Tensor(a!) active, Tensor(b!) iterations, "
        "Tensor(c!) negative) -> ()");

  // The structured Hessian-vector product of csrc/mlp_hvp.cpp (the R-operator of a chain of
  // linear layers and one activation under the mean softmax cross-entropy) and its fused pieces.
  // rz, r_grad_a have the shape of z or [B, *z.shape]; activation is identity, relu, leaky_relu,
  // tanh or sigmoid.
  // sigma'(z) * rz.
  m.def("activation_jvp(Tensor z, Tensor rz, str activation, float negative_slope) -> Tensor");
  // sigma''(z) * rz * grad_a + sigma'(z) * r_grad_a.
  m.def("activation_hvp_backward(Tensor z, Tensor rz, Tensor grad_a, Tensor r_grad_a, str activation, "
        "float negative_slope) -> Tensor");
  // scale * (p * rz - p <p, rz>) per row of C classes; probs [N, C].
  m.def("softmax_ce_hvp(Tensor probs, Tensor rz, float scale) -> Tensor");
  // H v for v of shape [P] or [B, P] (P = the layers' weights and biases, in that order per layer).
  m.def("mlp_ce_hvp(Tensor[] weights, Tensor[] inputs, Tensor[] pre_activations, Tensor[] grad_activations, "
        "Tensor[] deltas, Tensor probs, Tensor v, str activation, float negative_slope) -> Tensor");
}

#ifdef HYPERGRAD_WITH_CUDA
namespace hypergrad {
std::string cuda_kernel_problem(int64_t device);  // cuda/solver_cuda.cu
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "hypergrad._C: fused solver kernels, registered as torch.ops.hypergrad.*";
  module.def("compiled_torch_version", [] { return std::string(HYPERGRAD_TORCH_VERSION); },
             "torch version the extension was compiled against");
  module.def("compiled_cuda_version", [] { return std::string(HYPERGRAD_CUDA_VERSION); },
             "CUDA version the CUDA kernels were compiled with, or '' when they were not built");
  module.def("cuda_kernel_problem", [](int64_t device) -> std::string {
#ifdef HYPERGRAD_WITH_CUDA
    return hypergrad::cuda_kernel_problem(device);
#else
    (void)device;
    return "hypergrad._C was built without CUDA kernels";
#endif
  }, "why the CUDA kernels cannot run on CUDA device `device` (no image for its architecture), or '' when they can");
}
