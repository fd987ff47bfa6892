// CPU kernel bodies: one row of the fused loss, and the token-RM segmented scan.
//
// A row (one token, `vocab` fp32 logits, 128 KiB at V = 32k: it stays in L2 between passes) takes
// three sweeps: the max; exp(z - max) with the sums for log-sum-exp and entropy, stored in place;
// and the logit gradient scale * (onehot - p), written in place. One exp per logit; the loops are
// `omp simd` reductions, which GCC vectorises for the ISA of the clone it is compiled into
// (cpu_kernels.cpp builds AVX-512, AVX2 and baseline clones).
#pragma once

#include <cstdint>
#include <cstring>

#include "grad_store.h"
#include "oreal_math.h"
#include "params.h"

namespace oreal {
namespace cpu {

// Returns false when the row's label is neither the ignore index nor inside [0, vocab).
// `sigma`: *p.grad_scale, read once per launch.
__attribute__((always_inline)) inline bool process_row(const RowParams& p, int64_t r, float kl_weight, float sigma) {
  const int64_t vocab = p.vocab;
  float* __restrict__ z = p.logits + r * vocab;
  const bool lowp = p.grad_dtype != GradDType::kFloat32InPlace;
  uint16_t* __restrict__ out = lowp ? static_cast<uint16_t*>(p.grad_lowp) + r * vocab : nullptr;
  const int64_t label = p.labels[r];
  if (label == kIgnoreIndex || label < 0 || label >= vocab) {
    p.logprobs[r] = 0.0f;
    p.entropy[r] = 0.0f;
    p.token_loss[r] = 0.0f;
    if (p.write_grad) {
      if (lowp) {
        std::memset(out, 0, sizeof(uint16_t) * vocab);
      } else {
        std::memset(z, 0, sizeof(float) * vocab);
      }
    }
    return label == kIgnoreIndex;
  }
  const float inv_t = p.inv_temperature;

  float raw_max = -INFINITY;
#pragma omp simd reduction(max : raw_max)
  for (int64_t v = 0; v < vocab; ++v) raw_max = z[v] > raw_max ? z[v] : raw_max;
  const float row_max = raw_max * inv_t;  // temperature > 0, so max(z / T) = max(z) / T
  const float target = z[label] * inv_t;

  float sum = 0.0f;
  float dsum = 0.0f;
  if (p.write_grad) {
#pragma omp simd reduction(+ : sum, dsum)
    for (int64_t v = 0; v < vocab; ++v) {
      const float d = z[v] * inv_t - row_max;
      const float e = fast_exp(d);
      sum += e;
      dsum += e * d;
      z[v] = e;
    }
  } else {
#pragma omp simd reduction(+ : sum, dsum)
    for (int64_t v = 0; v < vocab; ++v) {
      const float d = z[v] * inv_t - row_max;
      const float e = fast_exp(d);
      sum += e;
      dsum += e * d;
    }
  }
  const SoftmaxStats stats{row_max, sum, dsum};
  const float logprob = target - stats_lse(stats);
  const TokenLoss tl = row_token_loss(p, r, logprob, kl_weight);
  p.logprobs[r] = logprob;
  p.entropy[r] = stats_entropy(stats);
  p.token_loss[r] = tl.loss;
  if (p.write_grad) {
    const float scale = stored_grad_scale(tl.grad, inv_t, sigma);
    const float inv_sum = 1.0f / sum;
    const float target_prob = z[label] * inv_sum;
    if (lowp) {
      // the CUDA kernel's store path (grad_store.h): 4-wide packed stores, then the tail
      const GradDType dtype = p.grad_dtype;
      const int64_t vec_end = vocab - vocab % 4;
      for (int64_t v = 0; v < vec_end; v += 4) {
        store_lowp4(out, v, logit_grad(z[v] * inv_sum, v == label, scale),
                    logit_grad(z[v + 1] * inv_sum, v + 1 == label, scale),
                    logit_grad(z[v + 2] * inv_sum, v + 2 == label, scale),
                    logit_grad(z[v + 3] * inv_sum, v + 3 == label, scale), dtype);
      }
      for (int64_t v = vec_end; v < vocab; ++v) store_lowp(out, v, logit_grad(z[v] * inv_sum, v == label, scale), dtype);
    } else {
#pragma omp simd
      for (int64_t v = 0; v < vocab; ++v) z[v] = logit_grad(z[v] * inv_sum, false, scale);
      z[label] = logit_grad(target_prob, true, scale);
    }
  }
  return true;
}

// Weights of one packed sequence: a sequential running mean (double sums) over its action tokens.
inline void token_rm_weights_segment(const TokenWeightParams& p, int64_t seq) {
  const int64_t begin = p.cu_seqlens[seq];
  const int64_t end = p.cu_seqlens[seq + 1];
  const bool positive = p.is_positive[seq];
  double total = 0.0;
  int64_t count = 0;
  for (int64_t t = begin; t < end; ++t) {
    if (p.labels[t] == kIgnoreIndex) {
      p.weights[t] = 0.0f;
      continue;
    }
    total += static_cast<double>(p.rm_scores[t]);
    count += 1;
    p.weights[t] = rm_weight(static_cast<float>(total / static_cast<double>(count)), positive);
  }
}

}  // namespace cpu
}  // namespace oreal
