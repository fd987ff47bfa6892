// Plain-old-data parameter blocks handed from the binding to the CPU and CUDA kernels.
//
// The binding (bindings.cpp) checks every tensor with TORCH_CHECK and then fills one of these; the
// kernels trust them. All pointers are already offset to the first row of the chunk being processed.
#pragma once

#include <cstdint>

namespace oreal {

// The dtype the row kernels write the logit gradient in: fp32 in place over the logits, or bf16/fp16
// bits into `RowParams::grad_lowp` (through grad_store.h, on the CPU and the GPU alike).
enum class GradDType : int { kFloat32InPlace = 0, kBFloat16 = 1, kFloat16 = 2 };

// Which per-token loss the row kernels apply to each log-prob (oreal_math.h has one function each).
enum class LossMode : int {
  kOreal = 0,             // token_loss: -pg_coef lp + kl_weight k3 (kl_weight one 0-d value)
  kClippedSurrogate = 1,  // clipped_surrogate_loss: PPO's clipped surrogate + per-token k3 KL
};

// One chunk of rows of the fused linear + log-prob loss: in `logits` the fp32 logits of `rows`
// tokens (before the temperature); out: per-token log-prob, entropy and loss, and (when
// `write_grad`) the logit gradient dz, in place in `logits` or into `grad_lowp`.
struct RowParams {
  float* logits = nullptr;              // [rows, vocab] fp32, row stride `vocab`
  void* grad_lowp = nullptr;            // [rows, vocab] bf16/fp16 dz (low-precision inputs) or null
  GradDType grad_dtype = GradDType::kFloat32InPlace;
  const float* grad_scale = nullptr;    // 0-d: sigma, the power of two dz is stored times (grad_store.h)
  const int64_t* labels = nullptr;      // [rows] target ids, or -100 where the token is no action
  LossMode mode = LossMode::kOreal;
  const float* ref_logprobs = nullptr;  // [rows] reference log-probs, or null: no KL term
  // kOreal
  const float* pg_coef = nullptr;       // [rows] policy-gradient coefficient (0 off action tokens)
  const float* kl_weight = nullptr;     // 0-d: weight of the k3 KL estimate
  // kClippedSurrogate
  const float* advantages = nullptr;    // [rows] A_t
  const float* old_logprobs = nullptr;  // [rows] log-probs of the policy that sampled the tokens
  const float* token_scale = nullptr;   // [rows] s_t, the loss aggregation weight
  const float* kl_scale = nullptr;      // [rows] k_t, the weight of the token's k3 KL estimate
  float clip_low = 0.2f;                // the ratio is clipped to [1 - clip_low, 1 + clip_high]
  float clip_high = 0.2f;
  float* logprobs = nullptr;            // [rows] out
  float* entropy = nullptr;             // [rows] out
  float* token_loss = nullptr;          // [rows] out; the op's loss is their sum
  int64_t rows = 0;
  int64_t vocab = 0;
  float inv_temperature = 1.0f;
  bool write_grad = true;
};

// Token-RM weights over packed sequences (a segmented scan: one segment per sequence).
struct TokenWeightParams {
  const float* rm_scores = nullptr;   // [T]
  const int64_t* labels = nullptr;    // [T]
  const int64_t* cu_seqlens = nullptr;  // [S + 1]
  const bool* is_positive = nullptr;  // [S]
  float* weights = nullptr;           // [T] out
  int64_t num_tokens = 0;
  int64_t num_seqs = 0;
};

}  // namespace oreal
