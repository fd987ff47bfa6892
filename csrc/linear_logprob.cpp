// The chunk loop: per chunk of C tokens, logits = h @ W^T (BLAS), the row kernel turns them into
// log-probs, entropies, token losses and, in place, the logit gradient dz; then
// grad_hidden[chunk] = dz @ W and grad_weight += dz^T @ h (BLAS). Nothing of size [T, V] exists.
//
// Matmul paths by input dtype:
//   fp32 (CPU, CUDA)   mm/addmm straight into the fp32 buffers, dz in place.
//   bf16/fp16 on CUDA  logits via mm(out_dtype=fp32); the row kernel writes dz in the input dtype
//                      to a second buffer; grad_hidden = mm(dz, W); grad_weight accumulated in fp32
//                      by cuBLAS GemmEx (cuda_host.cpp).
//   bf16/fp16 on CPU   fp32 logits from fp32 copies of the operands, the weight converted 4096 rows
//                      at a time (ATen's CPU mm has no fp32-output variant for 16-bit inputs); the row
//                      kernel writes dz in the input dtype to a second buffer through the CUDA
//                      kernel's store code (grad_store.h); grad_hidden = mm(dz, W),
//                      grad_weight += dz^T.float() @ h.float().
//
// The bf16/fp16 paths store the gradients times sigma, a power of two ~ 1 / max |dL/dlp| / T (see
// grad_store.h; 1 for fp32), returned as the op's last output: autograd's backward divides it out in fp32.
#include "linear_logprob.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "kernels.h"
#include "params.h"
#if defined(OREAL_WITH_CUDA)
#include "cuda_host.h"
#endif

namespace oreal {

namespace {

// sigma (grad_store.h) as a 0-d fp32 tensor on the inputs' device: no host synchronisation. The
// bound on |dL/dlp| takes the KL ratio near 1 and, for the clipped surrogate, the ratio at the
// upper clip bound (as the Triton backend's gradient_scale / surrogate_gradient_scale).
// fp32 gradients need no scale (fp32 range; 1 keeps their backward a plain multiply by grad_output).
at::Tensor gradient_scale(const LinearLogprobArgs& args) {
  const auto f32 = args.hidden.options().dtype(at::kFloat);
  if (args.hidden.scalar_type() == at::kFloat) return at::ones({}, f32);
  const bool has_ref = args.ref_logprobs.defined();
  at::Tensor bound;
  if (args.mode == LossMode::kClippedSurrogate) {
    if (args.token_scale.numel() == 0) return at::ones({}, f32);
    bound = (args.token_scale * args.advantages).abs().amax() * (1.0 + args.clip_high);
    if (has_ref) bound = bound + args.kl_scale.abs().amax();
  } else {
    if (args.pg_coef.numel() == 0) return at::ones({}, f32);
    bound = args.pg_coef.abs().amax();
    if (has_ref) bound = bound + args.kl_weight.abs();
  }
  bound = (bound / args.temperature).to(at::kFloat).clamp_min(std::ldexp(1.0, -60));
  return at::exp2(-at::ceil(at::log2(bound)));
}

}  // namespace

int64_t default_chunk_size(int64_t num_tokens, int64_t vocab_size, bool on_cuda) {
  const int64_t budget_bytes = on_cuda ? (int64_t{2} << 30) : (int64_t{64} << 20);
  const int64_t cap = std::max<int64_t>(1, budget_bytes / (4 * std::max<int64_t>(vocab_size, 1)));
  if (num_tokens <= cap) return std::max<int64_t>(num_tokens, 1);
  const int64_t chunks = (num_tokens + cap - 1) / cap;
  return (num_tokens + chunks - 1) / chunks;  // equal chunks, none much smaller than the rest
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprob_forward(
    const LinearLogprobArgs& args) {
  const at::Tensor& hidden = args.hidden;
  const at::Tensor& weight = args.weight;
  const int64_t num_tokens = hidden.size(0);
  const int64_t hidden_size = hidden.size(1);
  const int64_t vocab = weight.size(0);
  const bool on_cuda = hidden.is_cuda();
  const at::ScalarType dtype = hidden.scalar_type();
  const bool fp32 = dtype == at::kFloat;
  const bool lowp = dtype == at::kBFloat16 || dtype == at::kHalf;
  const bool cuda_lowp = on_cuda && lowp;
  const auto f32 = hidden.options().dtype(at::kFloat);

  at::Tensor logprobs = at::empty({num_tokens}, f32);
  at::Tensor entropy = at::empty({num_tokens}, f32);
  at::Tensor token_loss = at::empty({num_tokens}, f32);
  at::Tensor grad_hidden = args.grad_hidden ? at::empty({num_tokens, hidden_size}, hidden.options())
                                            : at::empty({0}, hidden.options());
  // the first chunk's GEMM overwrites the weight gradient (beta = 0): no zero fill unless no chunk runs
  at::Tensor grad_weight = !args.grad_weight ? at::empty({0}, f32)
                           : num_tokens > 0  ? at::empty({vocab, hidden_size}, f32)
                                             : at::zeros({vocab, hidden_size}, f32);
  const bool write_grad = args.grad_hidden || args.grad_weight;
  const at::Tensor sigma = write_grad ? gradient_scale(args) : at::ones({}, f32);

  const int64_t chunk = args.chunk_size > 0 ? std::min<int64_t>(args.chunk_size, std::max<int64_t>(num_tokens, 1))
                                            : default_chunk_size(num_tokens, vocab, on_cuda);
  at::Tensor logits = at::empty({num_tokens > 0 ? chunk : 0, vocab}, f32);
  at::Tensor grad_lowp = (lowp && write_grad) ? at::empty({chunk, vocab}, hidden.options()) : at::Tensor();
  const at::Tensor weight_t = weight.t();
  const GradDType grad_dtype = !lowp                ? GradDType::kFloat32InPlace
                               : dtype == at::kHalf ? GradDType::kFloat16
                                                    : GradDType::kBFloat16;

  for (int64_t start = 0; start < num_tokens; start += chunk) {
    const int64_t rows = std::min(chunk, num_tokens - start);
    const at::Tensor h = hidden.narrow(0, start, rows);
    at::Tensor z = logits.narrow(0, 0, rows);
    if (fp32) {
      at::mm_out(z, h, weight_t);
    } else if (cuda_lowp) {
      at::mm_out(z, h, weight_t, at::kFloat);
    } else {
      // fp32 logits as on CUDA (a bf16 product would round z by up to 0.125 at z = 32 before the
      // log-softmax); the weight goes through fp32 in blocks, so no fp32 copy of all of it exists
      const at::Tensor h32 = h.to(at::kFloat);
      constexpr int64_t kVocabBlock = 4096;
      for (int64_t v0 = 0; v0 < vocab; v0 += kVocabBlock) {
        const int64_t width = std::min(kVocabBlock, vocab - v0);
        at::Tensor out = z.narrow(1, v0, width);
        at::mm_out(out, h32, weight.narrow(0, v0, width).to(at::kFloat).t());
      }
    }

    RowParams p;
    p.logits = z.data_ptr<float>();
    p.grad_lowp = grad_lowp.defined() ? grad_lowp.data_ptr() : nullptr;
    p.grad_dtype = grad_dtype;
    p.grad_scale = sigma.data_ptr<float>();
    p.labels = args.labels.data_ptr<int64_t>() + start;
    p.mode = args.mode;
    p.ref_logprobs = args.ref_logprobs.defined() ? args.ref_logprobs.data_ptr<float>() + start : nullptr;
    if (args.mode == LossMode::kClippedSurrogate) {
      p.advantages = args.advantages.data_ptr<float>() + start;
      p.old_logprobs = args.old_logprobs.data_ptr<float>() + start;
      p.token_scale = args.token_scale.data_ptr<float>() + start;
      p.kl_scale = args.kl_scale.data_ptr<float>() + start;
      p.clip_low = static_cast<float>(args.clip_low);
      p.clip_high = static_cast<float>(args.clip_high);
    } else {
      p.pg_coef = args.pg_coef.data_ptr<float>() + start;
      p.kl_weight = args.kl_weight.data_ptr<float>();
    }
    p.logprobs = logprobs.data_ptr<float>() + start;
    p.entropy = entropy.data_ptr<float>() + start;
    p.token_loss = token_loss.data_ptr<float>() + start;
    p.rows = rows;
    p.vocab = vocab;
    p.inv_temperature = static_cast<float>(1.0 / args.temperature);
    p.write_grad = write_grad;
    if (on_cuda) {
#if defined(OREAL_WITH_CUDA)
      row_pass_cuda(p, grad_dtype);
#else
      TORCH_CHECK(false, "oreal._C was built without CUDA");
#endif
    } else {
      const int64_t bad_row = row_pass_cpu(p);
      TORCH_CHECK_VALUE(bad_row < 0, "labels: value ", args.labels[start + bad_row].item<int64_t>(),
                        " at position ", start + bad_row, " is outside [0, ", vocab,
                        ") and is not the ignore index -100");
    }
    if (!write_grad) continue;

    if (args.grad_hidden) {
      at::Tensor gh = grad_hidden.narrow(0, start, rows);
      if (fp32) {
        at::mm_out(gh, z, weight);
      } else {
        at::mm_out(gh, grad_lowp.narrow(0, 0, rows), weight);
      }
    }
    if (args.grad_weight) {
      const bool first = start == 0;  // overwrite the uninitialised buffer, then accumulate
      if (fp32) {
        if (first) {
          at::mm_out(grad_weight, z.t(), h);
        } else {
          grad_weight.addmm_(z.t(), h);
        }
      } else if (cuda_lowp) {
#if defined(OREAL_WITH_CUDA)
        accumulate_grad_weight_lowp_cuda(grad_weight, grad_lowp.narrow(0, 0, rows), h, first);
#endif
      } else {
        const at::Tensor dz = grad_lowp.narrow(0, 0, rows).t().to(at::kFloat);
        if (first) {
          at::mm_out(grad_weight, dz, h.to(at::kFloat));
        } else {
          grad_weight.addmm_(dz, h.to(at::kFloat));
        }
      }
    }
  }
  return {token_loss.sum(), logprobs, entropy, grad_hidden, grad_weight, sigma};
}

}  // namespace oreal
