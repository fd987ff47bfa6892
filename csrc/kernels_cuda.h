// CUDA launchers (cuda_kernels.cu). Plain CUDA runtime types only, so that both nvcc and the host
// compiler can include this without torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "params.h"

namespace oreal {

// Grid of `p.rows` blocks; dz in place (kFloat32InPlace) or into `p.grad_lowp`.
cudaError_t launch_row_pass_cuda(const RowParams& p, GradDType grad_dtype, cudaStream_t stream);

// Grid of `p.num_seqs` blocks, one segmented scan per sequence.
cudaError_t launch_token_rm_weights_cuda(const TokenWeightParams& p, cudaStream_t stream);

}  // namespace oreal
