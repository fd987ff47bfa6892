// Per-token math of the fused OREAL loss, shared by the C++ (CPU) and CUDA kernels.
//
// Every function here is `__host__ __device__` inline and works on fp32 scalars, so the CPU row
// loop and the CUDA row kernel compute the same numbers the same way; only the loops around them
// (OpenMP + vectorisation on the CPU, warps and blocks on the GPU) differ. The semantics are the
// internal contract of `oreal/ops/torch_backend.py`:
//
//   lp_t   = log_softmax(z_t)[label_t],                 z_t = hidden_t @ weight^T / temperature
//   loss_t = -pg_coef_t * lp_t + kl_weight * (exp(d_t) - d_t - 1),   d_t = ref_t - lp_t
//   g_t    = dloss_t / dlp_t = -pg_coef_t + kl_weight * (1 - exp(d_t))
//   dz_tv  = g_t / temperature * (onehot(label_t)_v - softmax(z_t)_v)
//
// The clipped-surrogate mode (PPO/GRPO) replaces loss_t and g_t, with r_t = exp(lp_t - old_t):
//
//   loss_t = -s_t min(r_t A_t, clip(r_t, 1 - cl, 1 + ch) A_t) + k_t (exp(d_t) - d_t - 1)
//   g_t    = -s_t A_t r_t where the unclipped term is <= the clipped one (else 0) + k_t (1 - exp(d_t))
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "params.h"

#if defined(__CUDACC__)
#define OREAL_HD __host__ __device__ __forceinline__
#else
#define OREAL_HD inline
#endif

namespace oreal {

constexpr int64_t kIgnoreIndex = -100;

// exp(x) for fp32. On the GPU the hardware approximation (2 ulp); on the CPU a branch-free
// Cody-Waite range reduction plus a degree-6 polynomial (max rel. error ~2e-7 on [-87, 88]),
// written so that GCC vectorises loops calling it (no libm call, no branch, no table).
OREAL_HD float fast_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // n = round(x / ln 2) through the 1.5 * 2^23 trick: adding it leaves the rounded integer in the
  // low mantissa bits (valid for |x / ln 2| < 2^22), with no call to rint/floor.
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;  // ln 2 split in a high part exact in fp32 ...
  r = r - n * -2.12194440e-4f;     // ... and the remainder
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof(bits));  // low bits of t hold n (two's complement)
  bits = (bits - 0x4B400000) + 127;      // 0x4B400000 is the bit pattern of the shifter
  bits <<= 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

OREAL_HD float fast_log(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return std::log(x);
#endif
}

// Streaming softmax statistics of one row of logits z: `max`, `sum` = sum_v exp(z_v - max) and
// `dsum` = sum_v exp(z_v - max) * (z_v - max). From them, lse = max + log(sum) and the entropy
// H = lse - E_p[z] = log(sum) - dsum / sum; keeping z - max (not z) avoids cancellation.
struct SoftmaxStats {
  float max;
  float sum;
  float dsum;
};

OREAL_HD SoftmaxStats stats_empty() { return SoftmaxStats{-INFINITY, 0.0f, 0.0f}; }

// Adds one logit to the statistics (online softmax).
OREAL_HD SoftmaxStats stats_push(SoftmaxStats s, float z) {
  if (z > s.max) {
    // rescale the old terms to the new max: e^{z'-m} (z'-m) = f e^{z'-m_old} ((z'-m_old) + (m_old-m))
    const float diff = s.max - z;
    const float f = s.sum > 0.0f ? fast_exp(diff) : 0.0f;
    s.dsum = s.sum > 0.0f ? f * (s.dsum + diff * s.sum) : 0.0f;
    s.sum = s.sum * f + 1.0f;
    s.max = z;
  } else {
    const float d = z - s.max;
    const float e = fast_exp(d);
    s.sum += e;
    s.dsum += e * d;
  }
  return s;
}

// Merges the statistics of two disjoint parts of a row (log-sum-exp merge).
OREAL_HD SoftmaxStats stats_merge(SoftmaxStats a, SoftmaxStats b) {
  if (!(a.sum > 0.0f)) return b;
  if (!(b.sum > 0.0f)) return a;
  const float m = a.max > b.max ? a.max : b.max;
  const float da = a.max - m;
  const float db = b.max - m;
  const float fa = fast_exp(da);
  const float fb = fast_exp(db);
  SoftmaxStats out;
  out.max = m;
  out.sum = a.sum * fa + b.sum * fb;
  out.dsum = fa * (a.dsum + da * a.sum) + fb * (b.dsum + db * b.sum);
  return out;
}

OREAL_HD float stats_lse(SoftmaxStats s) { return s.max + fast_log(s.sum); }

OREAL_HD float stats_entropy(SoftmaxStats s) { return fast_log(s.sum) - s.dsum / s.sum; }

// Loss of one action token and its derivative with respect to the token's log-prob.
struct TokenLoss {
  float loss;
  float grad;  // dloss / dlp
};

OREAL_HD TokenLoss token_loss(float logprob, float pg_coef, bool has_ref, float ref_logprob,
                              float kl_weight) {
  TokenLoss out{-pg_coef * logprob, -pg_coef};
  if (has_ref) {
    const float delta = ref_logprob - logprob;
    const float ratio = expf(delta);  // accurate exp: one per token, not per logit
    out.loss += kl_weight * (ratio - delta - 1.0f);
    out.grad += kl_weight * (1.0f - ratio);
  }
  return out;
}

// PPO's clipped surrogate of one action token, plus the k3 KL estimate when has_ref.
OREAL_HD TokenLoss clipped_surrogate_loss(float logprob, float advantage, float old_logprob, float scale,
                                          bool has_ref, float ref_logprob, float kl_scale, float clip_low,
                                          float clip_high) {
  const float ratio = expf(logprob - old_logprob);  // accurate exp: one per token
  const float lo = 1.0f - clip_low;
  const float hi = 1.0f + clip_high;
  const float clipped_ratio = ratio < lo ? lo : (ratio > hi ? hi : ratio);
  const float unclipped = ratio * advantage;
  const float clipped = clipped_ratio * advantage;
  const bool use_unclipped = unclipped <= clipped;
  TokenLoss out{-scale * (use_unclipped ? unclipped : clipped), use_unclipped ? -scale * unclipped : 0.0f};
  if (has_ref) {
    const float delta = ref_logprob - logprob;
    const float kl_ratio = expf(delta);
    out.loss += kl_scale * (kl_ratio - delta - 1.0f);
    out.grad += kl_scale * (1.0f - kl_ratio);
  }
  return out;
}

// The loss of row r of `p` in its mode. `kl_weight` is *p.kl_weight (kOreal), read once per launch.
OREAL_HD TokenLoss row_token_loss(const RowParams& p, int64_t r, float logprob, float kl_weight) {
  const bool has_ref = p.ref_logprobs != nullptr;
  const float ref = has_ref ? p.ref_logprobs[r] : 0.0f;
  if (p.mode == LossMode::kClippedSurrogate) {
    return clipped_surrogate_loss(logprob, p.advantages[r], p.old_logprobs[r], p.token_scale[r], has_ref, ref,
                                  has_ref ? p.kl_scale[r] : 0.0f, p.clip_low, p.clip_high);
  }
  return token_loss(logprob, p.pg_coef[r], has_ref, ref, kl_weight);
}

// Gradient of the loss with respect to one logit: scale * (onehot - p), scale = g / temperature.
OREAL_HD float logit_grad(float prob, bool is_target, float scale) {
  return scale * ((is_target ? 1.0f : 0.0f) - prob);
}

// Token-RM importance weight from the running mean c of the raw scores (OREAL section 3.3):
// q = sigmoid(c); w = clamp(2q - 1, 0, 1) for a positive sequence, clamp(1 - 2q, 0, 1) for a negative
// one. 2 sigmoid(c) - 1 = tanh(c / 2), which stays accurate near c = 0 where 2q - 1 would cancel.
OREAL_HD float rm_weight(float mean_score, bool positive) {
  const float w = tanhf(0.5f * mean_score);
  const float signed_w = positive ? w : -w;
  return signed_w < 0.0f ? 0.0f : (signed_w > 1.0f ? 1.0f : signed_w);
}

}  // namespace oreal
