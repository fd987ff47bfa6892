// CUDA kernel bodies: one block per row of the fused loss, one block per sequence of the token-RM scan.
//
// Row kernel: pass 1 streams the row once, each thread keeping online softmax statistics
// (oreal_math.h's stats_push) that a warp-shuffle + shared-memory tree merges (stats_merge);
// thread 0 turns them into log-prob, entropy and the token's loss; pass 2 re-reads the row and
// writes sigma * dz = sigma g / T * (onehot - p), in place (fp32) or as bf16/fp16 for the
// low-precision GEMMs, through grad_store.h (the same code the CPU kernel stores with).
// Rows whose length is a multiple of 4 use 16-byte loads and 16-byte (fp32) or 8-byte (16-bit) stores.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "grad_store.h"
#include "oreal_math.h"
#include "params.h"

namespace oreal {
namespace cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ SoftmaxStats shfl_xor_stats(SoftmaxStats s, int mask) {
  SoftmaxStats o;
  o.max = __shfl_xor_sync(0xffffffffu, s.max, mask);
  o.sum = __shfl_xor_sync(0xffffffffu, s.sum, mask);
  o.dsum = __shfl_xor_sync(0xffffffffu, s.dsum, mask);
  return o;
}

// Every thread of the block gets the merged statistics.
template <int kThreads>
__device__ __forceinline__ SoftmaxStats block_merge_stats(SoftmaxStats s) {
  static_assert(kThreads % kWarp == 0 && kThreads <= kWarp * kWarp, "block size");
  constexpr int kWarps = kThreads / kWarp;
  __shared__ SoftmaxStats partial[kWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask /= 2) s = stats_merge(s, shfl_xor_stats(s, mask));
  if (lane == 0) partial[warp] = s;
  __syncthreads();
  s = lane < kWarps ? partial[lane] : stats_empty();
#pragma unroll
  for (int mask = kWarp / 2; mask > 0; mask /= 2) s = stats_merge(s, shfl_xor_stats(s, mask));
  return s;  // every warp reduced the same partials, so all threads agree
}

template <typename GradT>
constexpr GradDType grad_dtype_of() {
  return std::is_same<GradT, float>::value    ? GradDType::kFloat32InPlace
         : std::is_same<GradT, __half>::value ? GradDType::kFloat16
                                              : GradDType::kBFloat16;
}

// GradT: the dtype dz is written in. float: in place over the logits; otherwise into p.grad_lowp.
template <typename GradT, int kThreads>
__global__ void __launch_bounds__(kThreads) row_pass_kernel(RowParams p) {
  const int64_t r = blockIdx.x;
  const int64_t vocab = p.vocab;
  float* z = p.logits + r * vocab;
  constexpr bool kInPlace = std::is_same<GradT, float>::value;
  constexpr GradDType kDType = grad_dtype_of<GradT>();
  uint16_t* out = kInPlace ? nullptr : static_cast<uint16_t*>(p.grad_lowp) + r * vocab;
  const int64_t label = p.labels[r];
  const bool vec4 = (vocab % 4) == 0;

  if (label == kIgnoreIndex || label < 0 || label >= vocab) {
    if (threadIdx.x == 0) {
      // an out-of-range label (the Python checks were switched off) poisons the loss visibly
      const float bad = label == kIgnoreIndex ? 0.0f : NAN;
      p.logprobs[r] = bad;
      p.entropy[r] = bad;
      p.token_loss[r] = bad;
    }
    if (p.write_grad) {
      for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
        if constexpr (kInPlace) {
          z[v] = 0.0f;
        } else {
          out[v] = 0;
        }
      }
    }
    return;
  }

  const float inv_t = p.inv_temperature;
  SoftmaxStats s = stats_empty();
  if (vec4) {
    const float4* z4 = reinterpret_cast<const float4*>(z);
    for (int64_t i = threadIdx.x; i < vocab / 4; i += kThreads) {
      const float4 q = z4[i];
      s = stats_push(s, q.x * inv_t);
      s = stats_push(s, q.y * inv_t);
      s = stats_push(s, q.z * inv_t);
      s = stats_push(s, q.w * inv_t);
    }
  } else {
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) s = stats_push(s, z[v] * inv_t);
  }
  s = block_merge_stats<kThreads>(s);
  const float lse = stats_lse(s);
  const float logprob = z[label] * inv_t - lse;  // read before anyone overwrites the row
  const float kl_weight = p.kl_weight != nullptr ? *p.kl_weight : 0.0f;  // null in kClippedSurrogate
  const TokenLoss tl = row_token_loss(p, r, logprob, kl_weight);
  if (threadIdx.x == 0) {
    p.logprobs[r] = logprob;
    p.entropy[r] = stats_entropy(s);
    p.token_loss[r] = tl.loss;
  }
  if (!p.write_grad) return;
  // In place (GradT = float), the label's logit must be read by every thread before any write.
  __syncthreads();
  const float scale = stored_grad_scale(tl.grad, inv_t, *p.grad_scale);
  if (vec4) {
    const float4* z4 = reinterpret_cast<const float4*>(z);
    for (int64_t i = threadIdx.x; i < vocab / 4; i += kThreads) {
      const float4 q = z4[i];
      const int64_t v = 4 * i;
      const float g0 = logit_grad(fast_exp(q.x * inv_t - lse), v == label, scale);
      const float g1 = logit_grad(fast_exp(q.y * inv_t - lse), v + 1 == label, scale);
      const float g2 = logit_grad(fast_exp(q.z * inv_t - lse), v + 2 == label, scale);
      const float g3 = logit_grad(fast_exp(q.w * inv_t - lse), v + 3 == label, scale);
      if constexpr (kInPlace) {
        reinterpret_cast<float4*>(z)[i] = make_float4(g0, g1, g2, g3);
      } else {
        store_lowp4(out, v, g0, g1, g2, g3, kDType);
      }
    }
  } else {
    for (int64_t v = threadIdx.x; v < vocab; v += kThreads) {
      const float g = logit_grad(fast_exp(z[v] * inv_t - lse), v == label, scale);
      if constexpr (kInPlace) {
        z[v] = g;
      } else {
        store_lowp(out, v, g, kDType);
      }
    }
  }
}

// Inclusive block scan of (sum, count) pairs; also returns the block totals.
template <int kThreads>
__device__ __forceinline__ void block_scan_sum_count(double& sum, int& count, double& total_sum,
                                                     int& total_count) {
  constexpr int kWarps = kThreads / kWarp;
  __shared__ double warp_sum[kWarps];
  __shared__ int warp_count[kWarps];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
#pragma unroll
  for (int offset = 1; offset < kWarp; offset *= 2) {
    const double s = __shfl_up_sync(0xffffffffu, sum, offset);
    const int c = __shfl_up_sync(0xffffffffu, count, offset);
    if (lane >= offset) {
      sum += s;
      count += c;
    }
  }
  if (lane == kWarp - 1) {
    warp_sum[warp] = sum;
    warp_count[warp] = count;
  }
  __syncthreads();
  double before_sum = 0.0;
  int before_count = 0;
  total_sum = 0.0;
  total_count = 0;
  for (int w = 0; w < kWarps; ++w) {  // kWarps is small: a serial scan of the warp totals
    if (w < warp) {
      before_sum += warp_sum[w];
      before_count += warp_count[w];
    }
    total_sum += warp_sum[w];
    total_count += warp_count[w];
  }
  sum += before_sum;
  count += before_count;
  __syncthreads();  // the shared totals are reused by the next tile
}

// One block per sequence: tiles of kThreads tokens, a block scan per tile, a carry across tiles.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) token_rm_weights_kernel(TokenWeightParams p) {
  const int64_t seq = blockIdx.x;
  // clamped so that malformed bounds (Python-side checks switched off) cannot read out of range
  const int64_t begin = min(max(p.cu_seqlens[seq], int64_t{0}), p.num_tokens);
  const int64_t end = min(max(p.cu_seqlens[seq + 1], begin), p.num_tokens);
  const bool positive = p.is_positive[seq];
  double carry_sum = 0.0;
  int64_t carry_count = 0;
  for (int64_t base = begin; base < end; base += kThreads) {
    const int64_t t = base + threadIdx.x;
    const bool inside = t < end;
    const bool action = inside && p.labels[t] != kIgnoreIndex;
    double sum = action ? static_cast<double>(p.rm_scores[t]) : 0.0;
    int count = action ? 1 : 0;
    double tile_sum;
    int tile_count;
    block_scan_sum_count<kThreads>(sum, count, tile_sum, tile_count);
    if (inside) {
      const double mean = (carry_sum + sum) / static_cast<double>(carry_count + count > 0 ? carry_count + count : 1);
      p.weights[t] = action ? rm_weight(static_cast<float>(mean), positive) : 0.0f;
    }
    carry_sum += tile_sum;
    carry_count += tile_count;
  }
}

}  // namespace cuda
}  // namespace oreal
