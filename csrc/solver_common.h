// Input checks shared by the CPU and CUDA kernels of hypergrad._C. Each failure says what was
// wrong and what the op expects, so that a direct caller of torch.ops.hypergrad.* can act on it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#ifndef HYPERGRAD_TORCH_VERSION
#define HYPERGRAD_TORCH_VERSION "unknown"
#endif
#ifndef HYPERGRAD_CUDA_VERSION
#define HYPERGRAD_CUDA_VERSION ""
#endif

#ifdef __CUDACC__
#define HYPERGRAD_HOST_DEVICE __host__ __device__
#else
#define HYPERGRAD_HOST_DEVICE
#endif

namespace hypergrad {

// The [rows, n] view of a solver vector: rows = 1 for a [n] vector, B for a [B, n] batch.
struct RowLayout {
  int64_t rows;
  int64_t n;
};

inline RowLayout check_vector(const at::Tensor& t, const char* name, const at::Tensor& like,
                              const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1 || t.dim() == 2, "hypergrad::", op, ": ", name,
              " must be a vector [n] or a batch of vectors [B, n], got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "hypergrad::", op,
              ": ", name, " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), "hypergrad::", op, ": ", name, " has shape ", t.sizes(),
              " but the first vector argument has shape ", like.sizes(), "; all vectors must match");
  TORCH_CHECK_VALUE(t.scalar_type() == like.scalar_type(), "hypergrad::", op, ": ", name, " is ",
              t.scalar_type(), " but the first vector argument is ", like.scalar_type(),
              "; convert both to one dtype");
  TORCH_CHECK_VALUE(t.device() == like.device(), "hypergrad::", op, ": ", name, " is on ", t.device(),
              " but the first vector argument is on ", like.device(), "; move both to one device");
  TORCH_CHECK_VALUE(t.is_contiguous(), "hypergrad::", op, ": ", name,
              " must be contiguous; call .contiguous() on it first");
  if (t.dim() == 1) return {1, t.size(0)};
  return {t.size(0), t.size(1)};
}

// Per-row scalars: float64 (or bool for masks), shaped like the rows of `like`, same device.
inline void check_row_scalars(const at::Tensor& s, const char* name, const at::Tensor& like,
                              at::ScalarType dtype, const char* op) {
  auto rows = like.sizes().slice(0, like.dim() - 1);
  TORCH_CHECK_VALUE(s.sizes() == rows, "hypergrad::", op, ": ", name, " must hold one value per row, shape ",
              rows, ", got ", s.sizes());
  TORCH_CHECK_VALUE(s.scalar_type() == dtype, "hypergrad::", op, ": ", name, " must be ", dtype, ", got ",
              s.scalar_type());
  TORCH_CHECK_VALUE(s.device() == like.device(), "hypergrad::", op, ": ", name, " is on ", s.device(),
              " but the vectors are on ", like.device());
  TORCH_CHECK_VALUE(s.is_contiguous(), "hypergrad::", op, ": ", name, " must be contiguous");
}

inline at::Tensor new_row_scalars(const at::Tensor& like) {
  auto rows = like.sizes().slice(0, like.dim() - 1);
  return at::empty(rows, like.options().dtype(at::kDouble));
}

// The argument checks of each op, shared by its CPU and CUDA kernels.
inline RowLayout check_row_dot_args(const at::Tensor& a, const at::Tensor& b) {
  const auto layout = check_vector(a, "a", a, "row_dot");
  check_vector(b, "b", a, "row_dot");
  return layout;
}

inline RowLayout check_cg_step_args(const at::Tensor& x, const at::Tensor& r, const at::Tensor& p,
                                    const at::Tensor& q, const at::Tensor& num, const at::Tensor& den,
                                    const at::Tensor& active) {
  const auto layout = check_vector(x, "x", x, "cg_step");
  check_vector(r, "r", x, "cg_step");
  check_vector(p, "p", x, "cg_step");
  check_vector(q, "q", x, "cg_step");
  check_row_scalars(num, "num", x, at::kDouble, "cg_step");
  check_row_scalars(den, "den", x, at::kDouble, "cg_step");
  check_row_scalars(active, "active", x, at::kBool, "cg_step");
  return layout;
}

inline RowLayout check_cg_direction_args(const at::Tensor& p, const at::Tensor& z, const at::Tensor& num_new,
                                         const at::Tensor& num_old, const at::Tensor& active) {
  const auto layout = check_vector(p, "p", p, "cg_direction");
  check_vector(z, "z", p, "cg_direction");
  check_row_scalars(num_new, "num_new", p, at::kDouble, "cg_direction");
  check_row_scalars(num_old, "num_old", p, at::kDouble, "cg_direction");
  check_row_scalars(active, "active", p, at::kBool, "cg_direction");
  return layout;
}

// cg_track's per-row tensors: all shaped like den ([] or [B]), contiguous, on den's device; den, rr
// and tol2 float64, active and negative bool, iterations int64. Returns the number of rows.
inline int64_t check_cg_track_args(const at::Tensor& den, const at::Tensor& rr, const at::Tensor& tol2,
                                   const at::Tensor& active, const at::Tensor& iterations,
                                   const at::Tensor& negative) {
  TORCH_CHECK_VALUE(den.dim() <= 1, "hypergrad::cg_track: den must hold one value per row, shape [] or [B], got ",
                    den.sizes());
  const struct {
    const at::Tensor& t;
    const char* name;
    at::ScalarType dtype;
  } args[] = {{den, "den", at::kDouble},     {rr, "rr", at::kDouble},
              {tol2, "tol2", at::kDouble},   {active, "active", at::kBool},
              {iterations, "iterations", at::kLong}, {negative, "negative", at::kBool}};
  for (const auto& a : args) {
    TORCH_CHECK_VALUE(a.t.sizes() == den.sizes(), "hypergrad::cg_track: ", a.name,
                      " must hold one value per row, shaped like den ", den.sizes(), ", got ", a.t.sizes());
    TORCH_CHECK_VALUE(a.t.scalar_type() == a.dtype, "hypergrad::cg_track: ", a.name, " must be ", a.dtype, ", got ",
                      a.t.scalar_type());
    TORCH_CHECK_VALUE(a.t.device() == den.device(), "hypergrad::cg_track: ", a.name, " is on ", a.t.device(),
                      " but den is on ", den.device());
    TORCH_CHECK_VALUE(a.t.is_contiguous(), "hypergrad::cg_track: ", a.name, " must be contiguous");
  }
  return den.numel();
}

// One row of cg_track (den <= 0 rather than !(den > 0), so that a nan is neither a step nor negative
// curvature, as in the twin).
HYPERGRAD_HOST_DEVICE inline void track_row(double den, double rr, double tol2, bool& active, int64_t& iterations,
                                            bool& negative) {
  const bool stepping = active && den > 0.0;
  negative = negative || (active && den <= 0.0);
  iterations += stepping ? 1 : 0;
  active = stepping && rr > tol2;
}

// alpha of one row of cg_step: num / den where the row is active with positive den, else 0.
template <typename T>
HYPERGRAD_HOST_DEVICE inline T step_size(bool active, double num, double den) {
  return (active && den > 0.0) ? static_cast<T>(num / den) : T(0);
}

// beta of one row of cg_direction: num_new / num_old, 0 when num_old is 0.
template <typename T>
HYPERGRAD_HOST_DEVICE inline T direction_ratio(double num_new, double num_old) {
  return num_old != 0.0 ? static_cast<T>(num_new / num_old) : T(0);
}

}  // namespace hypergrad
