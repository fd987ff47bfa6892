// CUDA launchers. This file includes no torch header (only the CUDA runtime and the kernel
// headers), which keeps its nvcc compile short; the torch-side glue is in cuda_host.cpp.
#include "kernels_cuda.h"
#include "row_kernel_cuda.cuh"

namespace oreal {

namespace {
constexpr int kRowThreads = 512;
constexpr int kScanThreads = 256;
}  // namespace

cudaError_t launch_row_pass_cuda(const RowParams& p, GradDType grad_dtype, cudaStream_t stream) {
  if (p.rows == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(p.rows));
  switch (grad_dtype) {
    case GradDType::kBFloat16:
      cuda::row_pass_kernel<__nv_bfloat16, kRowThreads><<<grid, kRowThreads, 0, stream>>>(p);
      break;
    case GradDType::kFloat16:
      cuda::row_pass_kernel<__half, kRowThreads><<<grid, kRowThreads, 0, stream>>>(p);
      break;
    default:
      cuda::row_pass_kernel<float, kRowThreads><<<grid, kRowThreads, 0, stream>>>(p);
      break;
  }
  return cudaGetLastError();
}

cudaError_t launch_token_rm_weights_cuda(const TokenWeightParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  cuda::token_rm_weights_kernel<kScanThreads><<<static_cast<unsigned>(p.num_seqs), kScanThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace oreal
