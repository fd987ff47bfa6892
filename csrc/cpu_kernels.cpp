// CPU launchers: rows in parallel with OpenMP, each row through an ISA-specific clone.
//
// OpenMP here resolves to the libgomp that torch itself loads (same soname), so these threads
// share torch's pool and follow torch.set_num_threads / OMP_NUM_THREADS.
#include "kernels.h"

#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>

#include "row_kernel_cpu.h"

namespace oreal {
namespace {

// GCC builds one copy per ISA and picks at load time (ifunc), so the wheel stays portable while
// the exp/sum loops use AVX-512 or AVX2+FMA where the machine has them.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define OREAL_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define OREAL_ISA_CLONES
#endif

OREAL_ISA_CLONES bool process_row_dispatch(const RowParams& p, int64_t r, float kl_weight, float sigma) {
  return cpu::process_row(p, r, kl_weight, sigma);
}

}  // namespace

int64_t row_pass_cpu(const RowParams& p) {
  const float kl_weight = p.kl_weight != nullptr ? *p.kl_weight : 0.0f;  // null in kClippedSurrogate
  const float sigma = p.grad_scale != nullptr ? *p.grad_scale : 1.0f;
  int64_t first_bad_row = -1;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), p.rows));
  // dynamic: on a loaded machine a descheduled thread's rows go to the one that is running
#pragma omp parallel for schedule(dynamic, 4) num_threads(threads > 0 ? threads : 1)
  for (int64_t r = 0; r < p.rows; ++r) {
    if (!process_row_dispatch(p, r, kl_weight, sigma)) {
#pragma omp critical(oreal_bad_label)
      if (first_bad_row < 0 || r < first_bad_row) first_bad_row = r;
    }
  }
  return first_bad_row;
}

void token_rm_weights_cpu(const TokenWeightParams& p) {
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), p.num_seqs));
#pragma omp parallel for schedule(dynamic, 16) num_threads(threads > 0 ? threads : 1)
  for (int64_t seq = 0; seq < p.num_seqs; ++seq) cpu::token_rm_weights_segment(p, seq);
}

}  // namespace oreal
