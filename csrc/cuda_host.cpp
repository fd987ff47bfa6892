// Host-side CUDA glue; compiled only in the CUDA build (OREAL_WITH_CUDA).
#include "cuda_host.h"

#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <cublas_v2.h>

#include "kernels_cuda.h"

namespace oreal {

void row_pass_cuda(const RowParams& p, GradDType grad_dtype) {
  C10_CUDA_CHECK(launch_row_pass_cuda(p, grad_dtype, at::cuda::getCurrentCUDAStream()));
}

void token_rm_weights_cuda(const TokenWeightParams& p) {
  C10_CUDA_CHECK(launch_token_rm_weights_cuda(p, at::cuda::getCurrentCUDAStream()));
}

void accumulate_grad_weight_lowp_cuda(at::Tensor& grad_weight, const at::Tensor& dz, const at::Tensor& h,
                                      bool overwrite) {
  TORCH_CHECK(grad_weight.scalar_type() == at::kFloat && grad_weight.is_contiguous(),
              "internal: grad_weight must be a contiguous fp32 buffer");
  TORCH_CHECK(dz.scalar_type() == h.scalar_type() && dz.stride(1) == 1 && h.stride(1) == 1,
              "internal: dz and h must share a dtype and have unit last strides");
  const int64_t rows = dz.size(0);
  if (rows == 0) return;
  const int64_t vocab = dz.size(1);
  const int64_t hidden = h.size(1);
  const cudaDataType_t dtype = dz.scalar_type() == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
  const float alpha = 1.0f;
  const float beta = overwrite ? 0.0f : 1.0f;  // beta = 0: the buffer's old contents are never read
  // cuBLAS is column-major: the row-major [V, H] buffer is the column-major [H, V] matrix
  // C = h^T (H x n, h's rows as columns) times dz (n x V, dz's storage read transposed).
  TORCH_CUDABLAS_CHECK(cublasGemmEx(at::cuda::getCurrentCUDABlasHandle(), CUBLAS_OP_N, CUBLAS_OP_T,
                                    static_cast<int>(hidden), static_cast<int>(vocab), static_cast<int>(rows),
                                    &alpha, h.data_ptr(), dtype, static_cast<int>(h.stride(0)),
                                    dz.data_ptr(), dtype, static_cast<int>(dz.stride(0)), &beta,
                                    grad_weight.data_ptr(), CUDA_R_32F, static_cast<int>(hidden),
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace oreal
