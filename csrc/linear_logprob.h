// The chunk loop of the fused linear + log-prob loss (linear_logprob.cpp), device-generic.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "params.h"

namespace oreal {

// Checked inputs (see bindings.cpp): hidden [T, H] and weight [V, H] share a dtype and device;
// labels [T] int64; ref_logprobs [T] fp32 or undefined; the per-token inputs [T] fp32 of `mode`.
struct LinearLogprobArgs {
  at::Tensor hidden;
  at::Tensor weight;
  at::Tensor labels;
  at::Tensor ref_logprobs;  // undefined: no KL term
  LossMode mode = LossMode::kOreal;
  // kOreal
  at::Tensor pg_coef;
  at::Tensor kl_weight;  // 0-d
  // kClippedSurrogate
  at::Tensor advantages;
  at::Tensor old_logprobs;
  at::Tensor token_scale;
  at::Tensor kl_scale;
  double clip_low = 0.2;
  double clip_high = 0.2;
  double temperature = 1.0;
  int64_t chunk_size = 0;  // <= 0: pick from the device and the vocabulary size
  bool grad_hidden = true;
  bool grad_weight = true;
};

// Rows per chunk when the caller does not choose: the fp32 [chunk, V] logit buffer is capped at
// 64 MiB on the CPU (large enough for efficient GEMMs, small enough to stay cache-friendly and
// far below the [T, V] logits) and at 2 GiB on a GPU: every chunk after the first reads and writes
// the whole fp32 weight gradient (8 V H bytes, 4.4 GB at Qwen2.5-7B's shape), so fewer, larger
// chunks cut that traffic (3.5k-token chunks at V = 152k: 5 per 16k-token batch instead of 10).
int64_t default_chunk_size(int64_t num_tokens, int64_t vocab_size, bool on_cuda);

// Returns (loss 0-d fp32, logprobs [T] fp32, entropy [T] fp32,
//          grad_hidden [T, H] hidden.dtype or [0], grad_weight [V, H] fp32 or [0], grad_scale 0-d fp32):
// the gradients of `loss` w.r.t. hidden and weight, computed chunk by chunk during this call and
// stored times grad_scale (sigma, a power of two: see grad_store.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprob_forward(
    const LinearLogprobArgs& args);

}  // namespace oreal
