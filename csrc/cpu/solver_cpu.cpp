// CPU kernels of the solver ops (schemas in csrc/hypergrad.cpp). Rows are processed in
// parallel; within a row, chunks of at least kGrain elements run in parallel and their float64
// partial sums are combined in a fixed order, so results do not depend on the thread count's
// scheduling. Inner loops are written for the compiler's vectoriser (omp simd reductions).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../solver_common.h"

namespace hypergrad {
namespace {

constexpr int64_t kGrain = 1 << 15;

// Calls body(row, begin, end) for chunks of every row; returns the per-(row, chunk) float64
// partial sums that body returns, summed per row in chunk order.
template <typename Body>
void for_each_row_chunk(RowLayout layout, double* row_sums, const Body& body) {
  const int64_t chunks = std::max<int64_t>(1, (layout.n + kGrain - 1) / kGrain);
  std::vector<double> partial(layout.rows * chunks, 0.0);
  at::parallel_for(0, layout.rows * chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t row = task / chunks, chunk = task % chunks;
      const int64_t begin = chunk * kGrain, end = std::min(layout.n, begin + kGrain);
      partial[task] = body(row, begin, end);
    }
  });
  if (row_sums == nullptr) return;
  for (int64_t row = 0; row < layout.rows; ++row) {
    double s = 0.0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) s += partial[row * chunks + chunk];
    row_sums[row] = s;
  }
}

// Loops over one chunk [begin, end) of one row. Kept outside the dispatch macros, since a
// #pragma cannot stand inside a macro argument.
template <typename T>
double dot_chunk(const T* a, const T* b, int64_t begin, int64_t end) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = begin; j < end; ++j) s += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return s;
}

template <typename T>
double cg_step_chunk(T* x, T* r, const T* p, const T* q, T alpha, int64_t begin, int64_t end) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = begin; j < end; ++j) {
    x[j] += alpha * p[j];
    const T rj = r[j] - alpha * q[j];
    r[j] = rj;
    s += static_cast<double>(rj) * static_cast<double>(rj);
  }
  return s;
}

template <typename T>
void direction_chunk(T* p, const T* z, T beta, int64_t begin, int64_t end) {
#pragma omp simd
  for (int64_t j = begin; j < end; ++j) p[j] = z[j] + beta * p[j];
}

// out_i = <a_i, b_i>, float64 accumulation.
at::Tensor row_dot_cpu(const at::Tensor& a, const at::Tensor& b) {
  const auto layout = check_row_dot_args(a, b);
  auto out = new_row_scalars(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "row_dot_cpu", [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    for_each_row_chunk(layout, out.mutable_data_ptr<double>(), [&](int64_t row, int64_t begin, int64_t end) {
      const int64_t off = row * layout.n;
      return dot_chunk(pa + off, pb + off, begin, end);
    });
  });
  return out;
}

// alpha_i = num_i/den_i (active rows with den_i > 0, else 0); x_i += alpha_i p_i;
// r_i -= alpha_i q_i; returns <r_i, r_i> after the update.
at::Tensor cg_step_cpu(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& q,
                       const at::Tensor& num, const at::Tensor& den, const at::Tensor& active) {
  const auto layout = check_cg_step_args(x, r, p, q, num, den, active);
  auto rr = new_row_scalars(x);
  const double* pnum = num.const_data_ptr<double>();
  const double* pden = den.const_data_ptr<double>();
  const bool* pact = active.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cpu", [&] {
    scalar_t* px = x.mutable_data_ptr<scalar_t>();
    scalar_t* pr = r.mutable_data_ptr<scalar_t>();
    const scalar_t* pp = p.const_data_ptr<scalar_t>();
    const scalar_t* pq = q.const_data_ptr<scalar_t>();
    for_each_row_chunk(layout, rr.mutable_data_ptr<double>(), [&](int64_t row, int64_t begin, int64_t end) {
      const scalar_t alpha = step_size<scalar_t>(pact[row], pnum[row], pden[row]);
      const int64_t off = row * layout.n;
      return cg_step_chunk(px + off, pr + off, pp + off, pq + off, alpha, begin, end);
    });
  });
  return rr;
}

// beta_i = num_new_i/num_old_i; p_i = z_i + beta_i p_i on active rows.
void cg_direction_cpu(at::Tensor& p, const at::Tensor& z, const at::Tensor& num_new,
                      const at::Tensor& num_old, const at::Tensor& active) {
  const auto layout = check_cg_direction_args(p, z, num_new, num_old, active);
  const double* pnew = num_new.const_data_ptr<double>();
  const double* pold = num_old.const_data_ptr<double>();
  const bool* pact = active.const_data_ptr<bool>();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_cpu", [&] {
    scalar_t* pp = p.mutable_data_ptr<scalar_t>();
    const scalar_t* pz = z.const_data_ptr<scalar_t>();
    for_each_row_chunk(layout, nullptr, [&](int64_t row, int64_t begin, int64_t end) {
      if (!pact[row]) return 0.0;
      const scalar_t beta = direction_ratio<scalar_t>(pnew[row], pold[row]);
      const int64_t off = row * layout.n;
      direction_chunk(pp + off, pz + off, beta, begin, end);
      return 0.0;
    });
  });
}

void cg_track_cpu(const at::Tensor& den, const at::Tensor& rr, const at::Tensor& tol2, at::Tensor& active,
                  at::Tensor& iterations, at::Tensor& negative) {
  const int64_t rows = check_cg_track_args(den, rr, tol2, active, iterations, negative);
  const double* pden = den.const_data_ptr<double>();
  const double* prr = rr.const_data_ptr<double>();
  const double* ptol = tol2.const_data_ptr<double>();
  bool* pact = active.mutable_data_ptr<bool>();
  int64_t* pit = iterations.mutable_data_ptr<int64_t>();
  bool* pneg = negative.mutable_data_ptr<bool>();
  for (int64_t row = 0; row < rows; ++row) track_row(pden[row], prr[row], ptol[row], pact[row], pit[row], pneg[row]);
}

}  // namespace

TORCH_LIBRARY_IMPL(hypergrad, CPU, m) {
  m.impl("row_dot", &row_dot_cpu);
  m.impl("cg_step", &cg_step_cpu);
  m.impl("cg_direction", &cg_direction_cpu);
  m.impl("cg_track", &cg_track_cpu);
}

}  // namespace hypergrad
