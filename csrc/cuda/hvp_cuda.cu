// CUDA kernels of the pointwise and per-row pieces of the structured Hessian-vector product,
// mirroring cpu/hvp_cpu.cpp: grid-stride loops on the current stream; the softmax term takes one
// thread per row (C classes, usually 10, are read twice from registers' worth of memory).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../hvp_common.h"

namespace hypergrad {
namespace {

constexpr int kHvpThreads = 256;

int blocks_for(int64_t work) {
  return static_cast<int>(std::min<int64_t>((work + kHvpThreads - 1) / kHvpThreads, 65535 * 8));
}

template <typename T>
__global__ void activation_jvp_kernel(const T* __restrict__ z, const T* __restrict__ rz, T* __restrict__ out,
                                      int64_t zn, int64_t total, Activation act, T slope) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    out[i] = activation_derivatives(act, slope, z[i % zn]).first * rz[i];
  }
}

template <typename T>
__global__ void activation_hvp_backward_kernel(const T* __restrict__ z, const T* __restrict__ rz,
                                               const T* __restrict__ grad_a, const T* __restrict__ r_grad_a,
                                               T* __restrict__ out, int64_t zn, int64_t total, Activation act,
                                               T slope) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(blockDim.x) * gridDim.x) {
    const int64_t j = i % zn;
    const auto d = activation_derivatives(act, slope, z[j]);
    out[i] = curved(act) ? d.second * rz[i] * grad_a[j] + d.first * r_grad_a[i] : d.first * r_grad_a[i];
  }
}

template <typename T>
__global__ void softmax_ce_hvp_kernel(const T* __restrict__ probs, const T* __restrict__ rz, T* __restrict__ out,
                                      int64_t n_rows, int64_t rows, int64_t classes, T scale) {
  for (int64_t row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; row < rows;
       row += int64_t(blockDim.x) * gridDim.x) {
    const T* p = probs + (row % n_rows) * classes;
    const T* r = rz + row * classes;
    T dot = 0;
    for (int64_t c = 0; c < classes; ++c) dot += p[c] * r[c];
    for (int64_t c = 0; c < classes; ++c) out[row * classes + c] = scale * p[c] * (r[c] - dot);
  }
}

at::Tensor activation_jvp_cuda(const at::Tensor& z, const at::Tensor& rz, c10::string_view activation,
                               double negative_slope) {
  const Activation act = check_activation_jvp_args(z, rz, activation);
  const c10::cuda::CUDAGuard guard(z.device());
  auto out = at::empty_like(rz);
  const int64_t total = rz.numel();
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_jvp_cuda", [&] {
    activation_jvp_kernel<scalar_t><<<blocks_for(total), kHvpThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), rz.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), z.numel(),
        total, act, static_cast<scalar_t>(negative_slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor activation_hvp_backward_cuda(const at::Tensor& z, const at::Tensor& rz, const at::Tensor& grad_a,
                                        const at::Tensor& r_grad_a, c10::string_view activation,
                                        double negative_slope) {
  const Activation act = check_activation_hvp_backward_args(z, rz, grad_a, r_grad_a, activation);
  const c10::cuda::CUDAGuard guard(z.device());
  auto out = at::empty_like(rz);
  const int64_t total = rz.numel();
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "activation_hvp_backward_cuda", [&] {
    activation_hvp_backward_kernel<scalar_t><<<blocks_for(total), kHvpThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), rz.const_data_ptr<scalar_t>(), grad_a.const_data_ptr<scalar_t>(),
        r_grad_a.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), z.numel(), total, act,
        static_cast<scalar_t>(negative_slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor softmax_ce_hvp_cuda(const at::Tensor& probs, const at::Tensor& rz, double scale) {
  check_softmax_ce_hvp_args(probs, rz);
  const c10::cuda::CUDAGuard guard(probs.device());
  auto out = at::empty_like(rz);
  const int64_t classes = probs.size(1);
  if (rz.numel() == 0 || classes == 0) return out;
  const int64_t rows = rz.numel() / classes;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(probs.scalar_type(), "softmax_ce_hvp_cuda", [&] {
    softmax_ce_hvp_kernel<scalar_t><<<blocks_for(rows), kHvpThreads, 0, stream>>>(
        probs.const_data_ptr<scalar_t>(), rz.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        probs.size(0), rows, classes, static_cast<scalar_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(hypergrad, CUDA, m) {
  m.impl("activation_jvp", &activation_jvp_cuda);
  m.impl("activation_hvp_backward", &activation_hvp_backward_cuda);
  m.impl("softmax_ce_hvp", &softmax_ce_hvp_cuda);
}

}  // namespace hypergrad
