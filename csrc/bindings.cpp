// The binding of `oreal._C`: input checks (TORCH_CHECK, each naming the argument), the params
// blocks, and the registration of three torch.library custom ops in the namespace `oreal_native`:
//
//   oreal_native::linear_logprob_loss_fwd(hidden, weight, labels, pg_coef, ref_logprobs?, kl_weight,
//       temperature, chunk_size, grad_hidden, grad_weight)
//       -> (loss, logprobs, entropy, grad_hidden, grad_weight, grad_scale)
//   oreal_native::linear_policy_loss_fwd(hidden, weight, labels, advantages, old_logprobs, token_scale,
//       ref_logprobs?, kl_scale, clip_low, clip_high, temperature, chunk_size, grad_hidden, grad_weight)
//       -> (loss, logprobs, entropy, grad_hidden, grad_weight, grad_scale)      [PPO's clipped surrogate]
//
// The gradients are stored times grad_scale (a power of two, see grad_store.h); backward divides it out.
//   oreal_native::token_rm_weights(rm_scores, labels, cu_seqlens, is_positive) -> weights
//
// Their fake (meta) implementations and the autograd formula live in oreal/ops/native.py. The
// pybind11 module itself only reports how the extension was built.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "grad_store.h"
#include "kernels.h"
#include "linear_logprob.h"
#include "params.h"
#if defined(OREAL_WITH_CUDA)
#include "cuda_host.h"
#endif

namespace oreal {
namespace {

bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

bool is_float_dtype(at::ScalarType t) { return is_kernel_dtype(t) || t == at::kDouble; }

bool is_index_dtype(at::ScalarType t) { return t == at::kInt || t == at::kLong; }

void check_vector(const char* op, const char* name, const at::Tensor& x, int64_t length,
                  const at::Tensor& like) {
  TORCH_CHECK(x.dim() == 1, op, ": ", name, " must be a 1-D tensor, got shape ", x.sizes());
  TORCH_CHECK(x.size(0) == length, op, ": ", name, " must have ", length, " entries, got ", x.size(0));
  TORCH_CHECK(x.device() == like.device(), op, ": ", name, " is on ", x.device(), " but hidden is on ",
              like.device(), "; put all inputs on one device");
}

void check_fp32_vector(const char* op, const char* name, const at::Tensor& x, int64_t length,
                       const at::Tensor& like) {
  check_vector(op, name, x, length, like);
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", x.scalar_type());
}

// Checks what both loss ops share and fills those fields of `args`.
LinearLogprobArgs linear_args(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                              const at::Tensor& labels, const c10::optional<at::Tensor>& ref_logprobs,
                              double temperature, int64_t chunk_size, bool grad_hidden, bool grad_weight) {
  TORCH_CHECK(hidden.dim() == 2, op, ": hidden must be [T, H], got shape ", hidden.sizes());
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [V, H], got shape ", weight.sizes());
  TORCH_CHECK(weight.size(1) == hidden.size(1), op, ": weight shape ", weight.sizes(),
              " does not match hidden's hidden size ", hidden.size(1));
  TORCH_CHECK(weight.size(0) > 0, op, ": weight has an empty vocabulary");
  TORCH_CHECK_TYPE(is_kernel_dtype(hidden.scalar_type()), op, ": hidden dtype ", hidden.scalar_type(),
                   " is not supported (float32, bfloat16 or float16; the kernels accumulate in float32)");
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
                   " differs from hidden's ", hidden.scalar_type());
  TORCH_CHECK(weight.device() == hidden.device(), op, ": weight is on ", weight.device(),
              " but hidden is on ", hidden.device());
  TORCH_CHECK(hidden.is_cpu() || hidden.is_cuda(), op, ": only CPU and CUDA tensors are supported, got ",
              hidden.device());
  const int64_t num_tokens = hidden.size(0);
  check_vector(op, "labels", labels, num_tokens, hidden);
  TORCH_CHECK_TYPE(is_index_dtype(labels.scalar_type()), op, ": labels must be int32 or int64, got ",
                   labels.scalar_type());
  const bool has_ref = ref_logprobs.has_value() && ref_logprobs->defined();
  if (has_ref) check_fp32_vector(op, "ref_logprobs", *ref_logprobs, num_tokens, hidden);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op,
                    ": temperature must be a positive number, got ", temperature);
  TORCH_CHECK_VALUE(chunk_size >= 0, op, ": chunk_size must be >= 0 (0: automatic), got ", chunk_size);
#if !defined(OREAL_WITH_CUDA)
  TORCH_CHECK(!hidden.is_cuda(), op, ": oreal._C was built without CUDA; rebuild with nvcc available");
#endif
  LinearLogprobArgs args;
  args.hidden = hidden.contiguous();
  args.weight = weight;
  args.labels = labels.to(at::kLong).contiguous();
  if (has_ref) args.ref_logprobs = ref_logprobs->contiguous();
  args.temperature = temperature;
  args.chunk_size = chunk_size;
  args.grad_hidden = grad_hidden;
  args.grad_weight = grad_weight;
  return args;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_logprob_loss_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& pg_coef,
    const c10::optional<at::Tensor>& ref_logprobs, const at::Tensor& kl_weight, double temperature,
    int64_t chunk_size, bool grad_hidden, bool grad_weight) {
  constexpr const char* op = "oreal_native.linear_logprob_loss_fwd";
  LinearLogprobArgs args =
      linear_args(op, hidden, weight, labels, ref_logprobs, temperature, chunk_size, grad_hidden, grad_weight);
  check_fp32_vector(op, "pg_coef", pg_coef, hidden.size(0), hidden);
  TORCH_CHECK(kl_weight.numel() == 1, op, ": kl_weight must hold one value, got shape ", kl_weight.sizes());
  TORCH_CHECK_TYPE(kl_weight.scalar_type() == at::kFloat, op, ": kl_weight must be float32, got ",
                   kl_weight.scalar_type());
  TORCH_CHECK(kl_weight.device() == hidden.device(), op, ": kl_weight is on ", kl_weight.device(),
              " but hidden is on ", hidden.device());

  const at::OptionalDeviceGuard device_guard(at::device_of(hidden));
  args.mode = LossMode::kOreal;
  args.pg_coef = pg_coef.contiguous();
  args.kl_weight = kl_weight.reshape({}).contiguous();
  return linear_logprob_forward(args);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_policy_loss_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels, const at::Tensor& advantages,
    const at::Tensor& old_logprobs, const at::Tensor& token_scale, const c10::optional<at::Tensor>& ref_logprobs,
    const at::Tensor& kl_scale, double clip_low, double clip_high, double temperature, int64_t chunk_size,
    bool grad_hidden, bool grad_weight) {
  constexpr const char* op = "oreal_native.linear_policy_loss_fwd";
  LinearLogprobArgs args =
      linear_args(op, hidden, weight, labels, ref_logprobs, temperature, chunk_size, grad_hidden, grad_weight);
  const int64_t num_tokens = hidden.size(0);
  check_fp32_vector(op, "advantages", advantages, num_tokens, hidden);
  check_fp32_vector(op, "old_logprobs", old_logprobs, num_tokens, hidden);
  check_fp32_vector(op, "token_scale", token_scale, num_tokens, hidden);
  check_fp32_vector(op, "kl_scale", kl_scale, num_tokens, hidden);
  TORCH_CHECK_VALUE(std::isfinite(clip_low) && clip_low >= 0.0 && clip_low < 1.0, op,
                    ": clip_low must lie in [0, 1), got ", clip_low);
  TORCH_CHECK_VALUE(std::isfinite(clip_high) && clip_high >= 0.0, op,
                    ": clip_high must be a non-negative number, got ", clip_high);

  const at::OptionalDeviceGuard device_guard(at::device_of(hidden));
  args.mode = LossMode::kClippedSurrogate;
  args.advantages = advantages.contiguous();
  args.old_logprobs = old_logprobs.contiguous();
  args.token_scale = token_scale.contiguous();
  args.kl_scale = kl_scale.contiguous();
  args.clip_low = clip_low;
  args.clip_high = clip_high;
  return linear_logprob_forward(args);
}

at::Tensor token_rm_weights(const at::Tensor& rm_scores, const at::Tensor& labels, const at::Tensor& cu_seqlens,
                            const at::Tensor& is_positive) {
  constexpr const char* op = "oreal_native.token_rm_weights";
  TORCH_CHECK(rm_scores.dim() == 1, op, ": rm_scores must be a 1-D tensor, got shape ", rm_scores.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(rm_scores.scalar_type()), op, ": rm_scores must be floating point, got ",
                   rm_scores.scalar_type());
  TORCH_CHECK(rm_scores.is_cpu() || rm_scores.is_cuda(), op, ": only CPU and CUDA tensors are supported");
  const int64_t num_tokens = rm_scores.size(0);
  check_vector(op, "labels", labels, num_tokens, rm_scores);
  TORCH_CHECK_TYPE(is_index_dtype(labels.scalar_type()), op, ": labels must be int32 or int64, got ",
                   labels.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 1, op,
              ": cu_seqlens must be a 1-D tensor [S + 1], got shape ", cu_seqlens.sizes());
  TORCH_CHECK_TYPE(is_index_dtype(cu_seqlens.scalar_type()), op, ": cu_seqlens must be int32 or int64, got ",
                   cu_seqlens.scalar_type());
  const int64_t num_seqs = cu_seqlens.numel() - 1;
  check_vector(op, "cu_seqlens", cu_seqlens, num_seqs + 1, rm_scores);
  check_vector(op, "is_positive", is_positive, num_seqs, rm_scores);
#if !defined(OREAL_WITH_CUDA)
  TORCH_CHECK(!rm_scores.is_cuda(), op, ": oreal._C was built without CUDA; rebuild with nvcc available");
#endif

  const at::OptionalDeviceGuard device_guard(at::device_of(rm_scores));
  const at::Tensor scores = rm_scores.to(at::kFloat).contiguous();
  const at::Tensor labels64 = labels.to(at::kLong).contiguous();
  const at::Tensor bounds = cu_seqlens.to(at::kLong).contiguous();
  const at::Tensor positive = is_positive.to(at::kBool).contiguous();
  if (rm_scores.is_cpu()) {
    // the CPU kernel indexes with these bounds; check them here (free: they are on the host)
    const int64_t* b = bounds.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(b[0] == 0, op, ": cu_seqlens must start at 0, starts at ", b[0]);
    for (int64_t i = 0; i < num_seqs; ++i) {
      TORCH_CHECK_VALUE(b[i + 1] >= b[i], op, ": cu_seqlens must be non-decreasing (entry ", i + 1, ")");
    }
    TORCH_CHECK_VALUE(b[num_seqs] == num_tokens, op, ": cu_seqlens must end at T=", num_tokens, ", ends at ",
                      b[num_seqs]);
  }
  at::Tensor weights = at::zeros({num_tokens}, scores.options());
  TokenWeightParams p;
  p.rm_scores = scores.data_ptr<float>();
  p.labels = labels64.data_ptr<int64_t>();
  p.cu_seqlens = bounds.data_ptr<int64_t>();
  p.is_positive = positive.data_ptr<bool>();
  p.weights = weights.data_ptr<float>();
  p.num_tokens = num_tokens;
  p.num_seqs = num_seqs;
  if (rm_scores.is_cuda()) {
#if defined(OREAL_WITH_CUDA)
    token_rm_weights_cuda(p);
#endif
  } else {
    token_rm_weights_cpu(p);
  }
  return weights;
}

}  // namespace
}  // namespace oreal

TORCH_LIBRARY(oreal_native, m) {
  m.def(
      "linear_logprob_loss_fwd(Tensor hidden, Tensor weight, Tensor labels, Tensor pg_coef, "
      "Tensor? ref_logprobs, Tensor kl_weight, float temperature, int chunk_size, bool grad_hidden, "
      "bool grad_weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_policy_loss_fwd(Tensor hidden, Tensor weight, Tensor labels, Tensor advantages, "
      "Tensor old_logprobs, Tensor token_scale, Tensor? ref_logprobs, Tensor kl_scale, float clip_low, "
      "float clip_high, float temperature, int chunk_size, bool grad_hidden, bool grad_weight) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("token_rm_weights(Tensor rm_scores, Tensor labels, Tensor cu_seqlens, Tensor is_positive) -> Tensor");
}

TORCH_LIBRARY_IMPL(oreal_native, CPU, m) {
  m.impl("linear_logprob_loss_fwd", &oreal::linear_logprob_loss_fwd);
  m.impl("linear_policy_loss_fwd", &oreal::linear_policy_loss_fwd);
  m.impl("token_rm_weights", &oreal::token_rm_weights);
}

#if defined(OREAL_WITH_CUDA)
TORCH_LIBRARY_IMPL(oreal_native, CUDA, m) {
  m.impl("linear_logprob_loss_fwd", &oreal::linear_logprob_loss_fwd);
  m.impl("linear_policy_loss_fwd", &oreal::linear_policy_loss_fwd);
  m.impl("token_rm_weights", &oreal::token_rm_weights);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "OREAL native kernels; the ops are torch.ops.oreal_native.* (see oreal/ops/native.py)";
#if defined(OREAL_WITH_CUDA)
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.def("default_chunk_size", &oreal::default_chunk_size, "rows per chunk chosen when chunk_size is 0",
        pybind11::arg("num_tokens"), pybind11::arg("vocab_size"), pybind11::arg("on_cuda"));
  // For the tests: the bits the row kernels store for each value (grad_store.h, host side).
  m.def(
      "lowp_store_bits",
      [](const std::vector<float>& values, bool half) {
        std::vector<uint16_t> bits(values.size());
        const oreal::GradDType dtype = half ? oreal::GradDType::kFloat16 : oreal::GradDType::kBFloat16;
        const size_t vec_end = values.size() - values.size() % 4;
        for (size_t i = 0; i < vec_end; i += 4) {
          oreal::store_lowp4(bits.data(), static_cast<int64_t>(i), values[i], values[i + 1], values[i + 2],
                             values[i + 3], dtype);
        }
        for (size_t i = vec_end; i < values.size(); ++i) oreal::store_lowp(bits.data(), i, values[i], dtype);
        return bits;
      },
      "bf16 (half=False) or fp16 bits of each value, as the row kernels store them", pybind11::arg("values"),
      pybind11::arg("half"));
}
