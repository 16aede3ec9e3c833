// CUDA kernels of the solver ops (schemas in csrc/hypergrad.cpp), mirroring cpu/solver_cpu.cpp.
// Every launch runs on the current stream and reads its per-row scalars from device memory, so a
// solve never waits on the host. Reductions are two-pass and deterministic: a grid of
// (blocks per row) x rows writes float64 partial sums (warp shuffles, then one value per block),
// and one block per row adds them up in a fixed order. Rows beyond gridDim.y's limit (65,535) are taken by
// the same blocks in turn (a row-stride loop), so one call takes any number of right-hand sides.
// Only c10's light CUDA headers: ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE
// headers, which a bare CUDA toolkit (nvcc and the runtime) does not ship.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "../solver_common.h"

namespace hypergrad {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocksPerRow = 1024;
constexpr int64_t kMaxGridRows = 65535;  // gridDim.y's limit

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = warpSize / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the block; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  v = warp_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0) v = warp_sum(v);
  return v;
}

// out[row] = sum of partial[row, 0..blocks).
__global__ void sum_partials_kernel(const double* __restrict__ partial, int blocks, double* __restrict__ out) {
  const int64_t row = blockIdx.x;  // gridDim.x takes 2**31 - 1 rows
  double s = 0.0;
  for (int i = threadIdx.x; i < blocks; i += blockDim.x) s += partial[row * blocks + i];
  s = block_sum(s);
  if (threadIdx.x == 0) out[row] = s;
}

// partial[row, block] = sum over this block's grid-stride slice of row `row` of a*b (float64).
template <typename T>
__global__ void row_dot_kernel(const T* __restrict__ a, const T* __restrict__ b, int64_t n, int64_t rows,
                               double* __restrict__ partial) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t off = row * n;
    double s = 0.0;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x)
      s += static_cast<double>(a[off + j]) * static_cast<double>(b[off + j]);
    s = block_sum(s);
    if (threadIdx.x == 0) partial[row * gridDim.x + blockIdx.x] = s;
    __syncthreads();  // block_sum's shared sums are read before the next row writes them
  }
}

// alpha = num/den on active rows; x += alpha p; r -= alpha q; partial sums of the new r.r.
template <typename T>
__global__ void cg_step_kernel(T* __restrict__ x, T* __restrict__ r, const T* __restrict__ p,
                               const T* __restrict__ q, const double* __restrict__ num,
                               const double* __restrict__ den, const bool* __restrict__ active,
                               int64_t n, int64_t rows, double* __restrict__ partial) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const int64_t off = row * n;
    const T alpha = step_size<T>(active[row], num[row], den[row]);
    double s = 0.0;
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x) {
      const int64_t k = off + j;
      x[k] += alpha * p[k];
      const T rk = r[k] - alpha * q[k];
      r[k] = rk;
      s += static_cast<double>(rk) * static_cast<double>(rk);
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[row * gridDim.x + blockIdx.x] = s;
    __syncthreads();  // as in row_dot_kernel
  }
}

// p = z + (num_new/num_old) p on active rows.
template <typename T>
__global__ void cg_direction_kernel(T* __restrict__ p, const T* __restrict__ z, const double* __restrict__ num_new,
                                    const double* __restrict__ num_old, const bool* __restrict__ active,
                                    int64_t n, int64_t rows) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    if (!active[row]) continue;
    const int64_t off = row * n;
    const T beta = direction_ratio<T>(num_new[row], num_old[row]);
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < n; j += (int64_t)gridDim.x * blockDim.x)
      p[off + j] = z[off + j] + beta * p[off + j];
  }
}

// One thread per row: the bookkeeping of cg_track.
__global__ void cg_track_kernel(const double* __restrict__ den, const double* __restrict__ rr,
                                const double* __restrict__ tol2, bool* __restrict__ active,
                                int64_t* __restrict__ iterations, bool* __restrict__ negative, int64_t rows) {
  const int64_t row = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
  if (row < rows) track_row(den[row], rr[row], tol2[row], active[row], iterations[row], negative[row]);
}

// Enough blocks per row to fill the device about four times over, at most one per kThreads elements.
dim3 row_grid(RowLayout layout) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = std::max<int64_t>(1, (4 * sms + layout.rows - 1) / layout.rows);
  const int64_t needed = (layout.n + kThreads - 1) / kThreads;
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>({wanted, needed, kMaxBlocksPerRow}));
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min<int64_t>(layout.rows, kMaxGridRows)));
}

void finish_row_sums(const at::Tensor& partial, dim3 grid, at::Tensor& out, cudaStream_t stream) {
  sum_partials_kernel<<<static_cast<unsigned>(partial.size(0)), kThreads, 0, stream>>>(
      partial.const_data_ptr<double>(), grid.x, out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor row_dot_cuda(const at::Tensor& a, const at::Tensor& b) {
  const auto layout = check_row_dot_args(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  auto out = new_row_scalars(a);
  if (layout.n == 0 || layout.rows == 0) return out.zero_();  // row_grid divides by the rows
  const dim3 grid = row_grid(layout);
  auto partial = at::empty({layout.rows, (int64_t)grid.x}, a.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "row_dot_cuda", [&] {
    row_dot_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                                                            layout.n, layout.rows, partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_row_sums(partial, grid, out, stream);
  return out;
}

at::Tensor cg_step_cuda(at::Tensor& x, at::Tensor& r, const at::Tensor& p, const at::Tensor& q,
                        const at::Tensor& num, const at::Tensor& den, const at::Tensor& active) {
  const auto layout = check_cg_step_args(x, r, p, q, num, den, active);
  const c10::cuda::CUDAGuard guard(x.device());
  auto rr = new_row_scalars(x);
  if (layout.n == 0 || layout.rows == 0) return rr.zero_();
  const dim3 grid = row_grid(layout);
  auto partial = at::empty({layout.rows, (int64_t)grid.x}, x.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cg_step_cuda", [&] {
    cg_step_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        x.mutable_data_ptr<scalar_t>(), r.mutable_data_ptr<scalar_t>(), p.const_data_ptr<scalar_t>(),
        q.const_data_ptr<scalar_t>(), num.const_data_ptr<double>(), den.const_data_ptr<double>(),
        active.const_data_ptr<bool>(), layout.n, layout.rows, partial.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  finish_row_sums(partial, grid, rr, stream);
  return rr;
}

void cg_direction_cuda(at::Tensor& p, const at::Tensor& z, const at::Tensor& num_new, const at::Tensor& num_old,
                       const at::Tensor& active) {
  const auto layout = check_cg_direction_args(p, z, num_new, num_old, active);
  const c10::cuda::CUDAGuard guard(p.device());
  if (layout.n == 0 || layout.rows == 0) return;
  const dim3 grid = row_grid(layout);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "cg_direction_cuda", [&] {
    cg_direction_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        p.mutable_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), num_new.const_data_ptr<double>(),
        num_old.const_data_ptr<double>(), active.const_data_ptr<bool>(), layout.n, layout.rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void cg_track_cuda(const at::Tensor& den, const at::Tensor& rr, const at::Tensor& tol2, at::Tensor& active,
                   at::Tensor& iterations, at::Tensor& negative) {
  const int64_t rows = check_cg_track_args(den, rr, tol2, active, iterations, negative);
  const c10::cuda::CUDAGuard guard(den.device());
  if (rows == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = (rows + kThreads - 1) / kThreads;
  cg_track_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      den.const_data_ptr<double>(), rr.const_data_ptr<double>(), tol2.const_data_ptr<double>(),
      active.mutable_data_ptr<bool>(), iterations.mutable_data_ptr<int64_t>(), negative.mutable_data_ptr<bool>(),
      rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// '' when this library holds an image of its kernels that device `device` can run (a binary for its architecture,
// or PTX of an older one to compile), else CUDA's reason ("no kernel image is available ..."): a build for other
// GPUs would otherwise fail at the first launch. hypergrad/_ops.py routes such a device to the twins.
std::string cuda_kernel_problem(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  const cudaError_t status = cudaFuncGetAttributes(&attributes, row_dot_kernel<float>);
  if (status == cudaErrorNoKernelImageForDevice || status == cudaErrorInvalidDeviceFunction ||
      status == cudaErrorUnsupportedPtxVersion) {
    (void)cudaGetLastError();  // this query's own error, not left for the next launch check to report
    return cudaGetErrorString(status);
  }
  C10_CUDA_CHECK(status);  // any other error is not an answer about the images: raised as it is
  return "";
}

TORCH_LIBRARY_IMPL(hypergrad, CUDA, m) {
  m.impl("row_dot", &row_dot_cuda);
  m.impl("cg_step", &cg_step_cuda);
  m.impl("cg_direction", &cg_direction_cuda);
  m.impl("cg_track", &cg_track_cuda);
}

}  // namespace hypergrad
