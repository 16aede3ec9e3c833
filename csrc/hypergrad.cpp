// Schemas of every op of hypergrad._C (one TORCH_LIBRARY block) and the tiny Python module that
// loading the library needs. Kernels live in cpu/ and cuda/, registered there with
// TORCH_LIBRARY_IMPL; the dispatcher picks the device.
//
// The ops are the vector work of the Krylov solvers in hypergrad/solvers.py (conjugate gradient
// on (H + damping I) v = b, Lu, Kamath & Yu 2022, eq. 15-17). Vectors are contiguous float32 or
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
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "hypergrad._C: fused solver kernels, registered as torch.ops.hypergrad.*";
  module.def("compiled_torch_version", [] { return std::string(HYPERGRAD_TORCH_VERSION); },
             "torch version the extension was compiled against");
  module.def("compiled_cuda_version", [] { return std::string(HYPERGRAD_CUDA_VERSION); },
             "CUDA version the CUDA kernels were compiled with, or '' when they were not built");
}
