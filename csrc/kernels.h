// Entry points of the kernels, called by the chunk loop (linear_logprob.cpp) and the binding.
#pragma once

#include <cstdint>

#include "params.h"

namespace oreal {

// Processes every row of `p` on the CPU. Returns -1, or the first row whose label is neither -100
// nor inside [0, vocab) (that row's outputs are zeroed and the caller raises).
int64_t row_pass_cpu(const RowParams& p);

void token_rm_weights_cpu(const TokenWeightParams& p);

}  // namespace oreal
