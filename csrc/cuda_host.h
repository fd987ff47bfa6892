// Torch-side CUDA glue (cuda_host.cpp): current stream, error checks, and the one GEMM ATen lacks.
#pragma once

#include <ATen/core/Tensor.h>

#include "params.h"

namespace oreal {

void row_pass_cuda(const RowParams& p, GradDType grad_dtype);

void token_rm_weights_cuda(const TokenWeightParams& p);

// grad_weight [V, H] fp32 += dz^T @ h with dz [n, V] and h [n, H] in bf16/fp16, accumulated in fp32
// by cuBLAS (GemmEx, fp32 C and compute type); `overwrite`: = instead of += (beta 0, the first chunk,
// so the buffer needs no zero fill). ATen's `addmm(..., out_dtype=float32)` requires the added
// matrix in the input dtype, so it cannot accumulate into an fp32 buffer.
void accumulate_grad_weight_lowp_cuda(at::Tensor& grad_weight, const at::Tensor& dz, const at::Tensor& h,
                                      bool overwrite);

}  // namespace oreal
