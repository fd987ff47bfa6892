"""Random packed batches for the fused-loss tests, shared by every backend's tests."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PackedCase:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    advantages: torch.Tensor
    is_positive: torch.Tensor
    rm_scores: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    options: dict = field(default_factory=dict)

    def args(self, dtype=None, device=None):
        """The inputs of `fused_oreal_loss`, hidden and weight in `dtype`, all on `device` (default: CPU)."""
        hidden, weight = self.hidden, self.weight
        if dtype is not None:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        args = (hidden, weight, self.labels, self.cu_seqlens, self.advantages, self.is_positive,
                self.rm_scores, self.ref_logprobs)
        return args if device is None else tuple(None if a is None else a.to(device) for a in args)


def make_case(seq_lens, hidden_size, vocab_size, *, seed, polarity=None, with_rm=True, with_ref=True,
              prompt_fraction=0.3, empty_seq=None, scale=1.0, confident=False, **options) -> PackedCase:
    """A packed batch: random hidden states and weights, some prompt positions (label -100),
    each sequence's last position ignored, random advantages and polarities.

    `polarity`: None for random, True/False for all-positive/all-negative.
    `empty_seq`: index of a sequence whose every label is -100 (no action token).
    `confident`: every position predicts its label as a trained model does (see `make_confident`).
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    hidden = torch.randn(total, hidden_size, generator=g) * scale
    weight = torch.randn(vocab_size, hidden_size, generator=g) / hidden_size ** 0.5
    labels = torch.randint(0, vocab_size, (total,), generator=g)
    if confident:
        hidden = make_confident(hidden, weight, labels, g)
    cu = [0]
    for length in seq_lens:
        cu.append(cu[-1] + length)
    for i, length in enumerate(seq_lens):
        start, end = cu[i], cu[i + 1]
        if length == 0:
            continue
        prompt = int(prompt_fraction * length)
        labels[start:start + prompt] = -100
        labels[end - 1] = -100 if length > 1 else labels[end - 1]  # keep length-1 sequences as one action
        if empty_seq == i:
            labels[start:end] = -100
    num_seqs = len(seq_lens)
    if polarity is None:
        is_positive = torch.rand(num_seqs, generator=g) < 0.5
    else:
        is_positive = torch.full((num_seqs,), bool(polarity))
    # As RLOO gives them: correct samples get a positive advantage, wrong ones a negative one.
    magnitude = 0.25 + torch.rand(num_seqs, generator=g) * 1.5
    advantages = torch.where(is_positive, magnitude, -magnitude)
    rm_scores = torch.randn(total, generator=g) * 2 if with_rm else None
    ref_logprobs = None
    if with_ref:
        current = current_logprobs(hidden, weight, labels, options.get("temperature", 1.0))
        ref_logprobs = reference_logprobs_away(current, g, max_gap=3.1)
    return PackedCase(hidden, weight, labels, torch.tensor(cu, dtype=torch.int32), advantages, is_positive,
                      rm_scores, ref_logprobs, options)


def make_confident(hidden, weight, labels, generator, *, competitors=3):
    """Hidden states moved so that each row's label logit is 20-40 and its probability mostly 0.9-0.999.

    What RL on a trained model sees most: confident tokens, a few close competitors, a long tail.
    There low-precision rounding of the logits shows (an error of 1 ulp at 32 is 0.125 in bf16) and
    `1 - p` is a small difference of large numbers. Per row, the label's and `competitors` other
    tokens' logits are set exactly (least-norm change of the row, in float64): the label at
    `z ~ U(20, 40)`, the competitors sharing `(1 - p) / p` of the label's weight, `p ~ U(0.9, 0.999)`.
    The change also lifts a few unconstrained logits (random rows of W are not orthogonal at small H):
    at H = 64 the label's probability has a median of ~0.93 and is below 0.9 for ~10-20% of rows.
    """
    num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
    rows = min(competitors + 1, vocab_size, hidden.shape[1])
    # per row: the label and rows - 1 distinct other tokens
    offsets = 1 + torch.argsort(torch.rand(num_tokens, vocab_size - 1, generator=generator), dim=1)[:, :rows - 1]
    tokens = torch.cat([labels[:, None], (labels[:, None] + offsets) % vocab_size], dim=1)
    top = 20 + 20 * torch.rand(num_tokens, 1, generator=generator, dtype=torch.float64)
    p = 0.9 + 0.099 * torch.rand(num_tokens, 1, generator=generator, dtype=torch.float64)
    share = torch.rand(num_tokens, rows - 1, generator=generator, dtype=torch.float64) + 0.2
    share = share / share.sum(1, keepdim=True) * (1 - p) / p  # exp(z_c - z_label) per competitor
    target = torch.cat([top, top + torch.log(share)], dim=1)
    w_s = weight.double()[tokens]  # [T, rows, H]
    out = hidden.double()
    rhs = target - (w_s @ out[:, :, None])[:, :, 0]
    correction = torch.linalg.lstsq(w_s @ w_s.transpose(1, 2), rhs[:, :, None]).solution
    out = out + (w_s.transpose(1, 2) @ correction)[:, :, 0]
    return out.to(hidden.dtype)


def current_logprobs(hidden, weight, labels, temperature=1.0) -> torch.Tensor:
    """Log-probabilities of the labels (float64 log-softmax, returned in fp32); ignored labels read token 0."""
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T / temperature, -1)
    return log_probs.gather(1, labels.clamp(min=0)[:, None])[:, 0].float()


def reference_logprobs_away(current: torch.Tensor, generator: torch.Generator, *, max_gap: float) -> torch.Tensor:
    """KL reference log-probs 0.1 to `max_gap` away from `current`, on either side, always below 0.

    Never closer: the k3 term exp(d) - d - 1 ~ d^2 / 2 and its derivative 1 - exp(d) are
    cancellations in fp32 when d = ref - lp is near 0 (relative error ~|lp| 1e-7 / |d|), which says
    nothing about a kernel; and in a batch with one action token (a zero token-RM weight, or the
    clip active) the KL term is the whole loss and gradient.
    """
    gap = 0.1 + (max_gap - 0.1) * torch.rand(current.shape, generator=generator)
    sign = torch.where(torch.rand(current.shape, generator=generator) < 0.5, -1.0, 1.0)
    ref = current + sign * gap
    return torch.where(ref < 0, ref, current - gap)  # a log-probability: below 0


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.double(), reference.double()
    denom = reference.norm().item()
    diff = (value - reference).norm().item()
    return diff / denom if denom > 0 else diff


# fp32 cases every backend runs against the float64 reference (odd sizes, every option of the loss).
FP32_CASES = {
    "mixed": dict(seq_lens=[7, 1, 13, 0, 30], hidden_size=24, vocab_size=101, kl_coef=0.1),
    "single_token": dict(seq_lens=[1], hidden_size=8, vocab_size=17),
    "odd_shapes": dict(seq_lens=[5, 9, 2], hidden_size=33, vocab_size=1531),
    "qwen_vocab": dict(seq_lens=[3, 1], hidden_size=16, vocab_size=151936),
    "length_one_sequences": dict(seq_lens=[1, 1, 1, 4, 1], hidden_size=12, vocab_size=57),
    "two_token_blocks_long_hidden": dict(seq_lens=[70, 30, 1], hidden_size=200, vocab_size=300, kl_coef=0.2),
    "no_action_sequence": dict(seq_lens=[6, 8, 4], hidden_size=12, vocab_size=57, empty_seq=1),
    "all_positive": dict(seq_lens=[6, 9], hidden_size=12, vocab_size=57, polarity=True),
    "all_negative": dict(seq_lens=[6, 9], hidden_size=12, vocab_size=57, polarity=False),
    "no_rm_no_ref": dict(seq_lens=[6, 9], hidden_size=12, vocab_size=57, with_rm=False, with_ref=False),
    "no_ref": dict(seq_lens=[10, 3], hidden_size=12, vocab_size=57, with_ref=False),
    "no_rm": dict(seq_lens=[10, 3], hidden_size=12, vocab_size=57, with_rm=False),
    "temperature": dict(seq_lens=[10, 3], hidden_size=12, vocab_size=57, temperature=0.6, kl_coef=0.05),
    "hot_temperature": dict(seq_lens=[12, 7], hidden_size=16, vocab_size=203, temperature=1.7, scale=3.0),
    "large_logits": dict(seq_lens=[9, 14], hidden_size=32, vocab_size=301, scale=6.0, kl_coef=0.2),
    "global_counts": dict(seq_lens=[10, 3, 4], hidden_size=12, vocab_size=57, pos_tokens=40, neg_tokens=31),
    "coefficients": dict(seq_lens=[10, 3, 4], hidden_size=12, vocab_size=57, pos_coef=0.7, neg_coef=1.3,
                         kl_coef=0.2),
}

# Tolerances against the float64 reference for fp32 inputs (issue 2's acceptance bounds).
FP32_LOSS_RTOL = 1e-5
FP32_GRAD_RTOL = 1e-4


def run_fused(case: PackedCase, backend: str, dtype=torch.float32, device=None):
    """Loss output and (grad_hidden, grad_weight) of `oreal.fused_oreal_loss` on `case`, run on `device`
    (default CPU) and returned on the CPU."""
    from oreal import fused_oreal_loss

    hidden, weight, *rest = case.args(dtype, device)
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = fused_oreal_loss(hidden, weight, *rest, backend=backend, **case.options)
    grad_hidden, grad_weight = torch.autograd.grad(out.loss, (hidden, weight))
    if device is not None:
        out = type(out)(*(x.detach().cpu() for x in out))
        grad_hidden, grad_weight = grad_hidden.cpu(), grad_weight.cpu()
    return out, grad_hidden, grad_weight


def run_reference(case: PackedCase, dtype=torch.float64):
    """The independent float64 reference on the same inputs (optionally first rounded to `dtype`)."""
    from oreal_reference import reference_oreal_loss

    hidden, weight, *rest = case.args(dtype)
    hidden = hidden.detach().double().requires_grad_()
    weight = weight.detach().double().requires_grad_()
    loss, logprobs, entropy, magnitude = reference_oreal_loss(hidden, weight, *rest, return_magnitude=True,
                                                              **case.options)
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight), allow_unused=True)
    grad_hidden = torch.zeros_like(hidden) if grad_hidden is None else grad_hidden
    grad_weight = torch.zeros_like(weight) if grad_weight is None else grad_weight
    return loss.detach(), logprobs, entropy, grad_hidden, grad_weight, magnitude


def scalar_relative_error(value, reference) -> float:
    value, reference = float(torch.as_tensor(value).detach()), float(torch.as_tensor(reference).detach())
    return abs(value - reference) / max(abs(reference), 1e-12)


def assert_matches_reference_fp32(case: PackedCase, backend: str, device=None) -> None:
    """fp32 backend output vs the float64 reference within issue 2's bounds."""
    out, grad_hidden, grad_weight = run_fused(case, backend, device=device)
    ref_loss, ref_lp, ref_ent, ref_gh, ref_gw, magnitude = run_reference(case)
    action = case.labels != -100
    assert out.loss.dtype == torch.float32
    # Relative to the loss's L1 magnitude sum_t |term_t|: equal to the plain relative error when the
    # terms share a sign, and still meaningful when positive and negative terms cancel (a plain relative
    # error of a sum near 0 measures the cancellation, not the kernel).
    if magnitude > 0:
        assert abs(out.loss.item() - ref_loss.item()) / magnitude < FP32_LOSS_RTOL
    else:
        assert out.loss.item() == 0
    assert torch.allclose(out.logprobs.double(), ref_lp, rtol=1e-5, atol=1e-4)
    assert torch.allclose(out.entropy.double(), ref_ent, rtol=1e-5, atol=1e-4)
    assert (out.logprobs[~action] == 0).all() and (out.entropy[~action] == 0).all()
    for grad, ref in ((grad_hidden, ref_gh), (grad_weight, ref_gw)):
        assert grad.dtype == torch.float32
        if ref.norm() > 0:
            assert relative_error(grad, ref) < FP32_GRAD_RTOL
        else:
            assert grad.abs().max() == 0


def low_precision_errors(case: PackedCase, backend: str, dtype, device=None) -> dict:
    """Errors vs the float64 reference (on the same rounded inputs) of `backend` (run on `device`) and of
    plain torch autograd run in `dtype` on the CPU (the baseline a user would otherwise have)."""
    out, gh, gw = run_fused(case, backend, dtype, device)
    ref_loss, _, _, ref_gh, ref_gw, _ = run_reference(case, dtype)
    base_loss, base_gh, base_gw = plain_torch_loss(case, dtype)
    return {
        "loss": scalar_relative_error(out.loss, ref_loss), "loss_plain": scalar_relative_error(base_loss, ref_loss),
        "grad_hidden": relative_error(gh, ref_gh), "grad_hidden_plain": relative_error(base_gh, ref_gh),
        "grad_weight": relative_error(gw, ref_gw), "grad_weight_plain": relative_error(base_gw, ref_gw),
    }


def plain_torch_loss(case: PackedCase, dtype):
    """What a user writes without fused kernels: logits and softmax in `dtype`, autograd for gradients."""
    from oreal_reference import reference_token_weights

    hidden, weight, labels, cu, adv, pos, rm, ref = case.args(dtype)
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    logits = (hidden @ weight.T) / case.options.get("temperature", 1.0)
    log_probs = torch.log_softmax(logits, dim=-1)
    action = labels != -100
    lp = log_probs.gather(1, torch.where(action, labels, 0)[:, None].long())[:, 0]
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    positive = pos[seq]
    n_pos = (action & positive).sum().float()
    n_neg = (action & ~positive).sum().float()
    if case.options.get("pos_tokens") is not None:
        n_pos = torch.tensor(float(case.options["pos_tokens"]))
    if case.options.get("neg_tokens") is not None:
        n_neg = torch.tensor(float(case.options["neg_tokens"]))
    tw = torch.ones(len(labels)) if rm is None else reference_token_weights(rm, labels, cu, pos).float()
    coef = torch.where(positive, case.options.get("pos_coef", 1.0) / n_pos.clamp(min=1),
                       case.options.get("neg_coef", 0.5) / n_neg.clamp(min=1))
    pg = -(coef * adv[seq] * tw).to(dtype) * lp
    loss = torch.where(action, pg, 0).sum()
    if ref is not None:
        d = ref.to(dtype) - lp
        kl = torch.where(action, torch.exp(d) - d - 1, 0).sum()
        loss = loss + case.options.get("kl_coef", 0.01) / (n_pos + n_neg).clamp(min=1) * kl
    grad_hidden, grad_weight = torch.autograd.grad(loss, (hidden, weight))
    return loss.detach(), grad_hidden, grad_weight


# ---- low-precision checks shared by every backend's tests ----

# Every backend runs every case in bf16 and fp16: errors vs float64 (on the same rounded inputs) within
# 2x of plain torch autograd in that dtype. The confident cases are where rounding shows (DESIGN.md).
LOW_PRECISION_CASES = {
    "packed": dict(seq_lens=[40, 25, 60], hidden_size=64, vocab_size=515, kl_coef=0.1),
    # no KL here: plain fp16 torch overflows summing exp(d) over the tokens (its baseline would be NaN)
    "odd_vocab_temperature": dict(seq_lens=[33, 1, 20], hidden_size=48, vocab_size=1531, temperature=0.7,
                                  with_ref=False),
    "confident": dict(seq_lens=[40, 25, 60], hidden_size=64, vocab_size=515, confident=True, with_ref=False),
    "confident_kl_temperature": dict(seq_lens=[30, 1, 33], hidden_size=64, vocab_size=1531, confident=True,
                                     kl_coef=0.1, temperature=1.3),
}
LOW_PRECISION_SEEDS = 3  # errors summed over fresh batches: one scalar's error alone is a coin toss


def assert_low_precision_within_twice_plain(name: str, backend: str, dtype, first_seed: int, device=None) -> dict:
    """Errors of `backend` on case `name` in `dtype`, summed over fresh batches, at most twice plain torch's."""
    totals: dict = {}
    for seed in range(first_seed, first_seed + LOW_PRECISION_SEEDS):
        case = make_case(seed=seed, **LOW_PRECISION_CASES[name])
        for key, value in low_precision_errors(case, backend, dtype, device).items():
            totals[key] = totals.get(key, 0.0) + value
    print(name, backend, dtype, {k: f"{v:.2e}" for k, v in totals.items()})
    for key in ("loss", "grad_hidden", "grad_weight"):
        assert totals[key] <= 2 * totals[key + "_plain"] + 1e-6, (name, first_seed, totals)
    return totals


def assert_fp16_survives_large_token_counts(backend: str, seed: int, device=None) -> None:
    """Global token counts of a large data-parallel batch (7e6 action tokens) make every per-token
    coefficient ~1e-7, and fp16 training multiplies the loss by a scaler's 2^16 before backward. The
    gradients formed in the forward pass must not have flushed to zero by then: they are stored under a
    power-of-two scale and unscaled in fp32 in backward."""
    from oreal import fused_oreal_loss

    case = make_case([30, 20], 32, 257, seed=seed, pos_tokens=4_000_000, neg_tokens=3_000_000)
    loss_scale = 2.0 ** 16
    hidden, weight, *rest = case.args(torch.float16, device)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    out = fused_oreal_loss(hidden, weight, *rest, backend=backend, **case.options)
    (out.loss * loss_scale).backward()
    grad_hidden, grad_weight = hidden.grad.double().cpu(), weight.grad.double().cpu()
    _, _, _, ref_gh, ref_gw, _ = run_reference(case, torch.float16)
    assert ref_gh.abs().max() < 1e-5  # the regime under test: true gradients below fp16's normal range
    errors = (relative_error(grad_hidden / loss_scale, ref_gh), relative_error(grad_weight / loss_scale, ref_gw))
    print(backend, "fp16 large-N grad errors (hidden, weight):", errors)
    assert max(errors) < 1e-2, errors


def assert_upstream_gradient_applied_in_fp32(backend: str, dtype, seed: int, device=None) -> None:
    """backward multiplies the stored gradients by grad_output (here 1/3) in fp32: rounding the factor to
    bf16 first (1/3 -> 0.33398) would bias every gradient by +0.2%. The bias is the mean of
    grad(1/3) / (grad(1) / 3) - 1 over the gradient's entries (single roundings average out)."""
    from oreal import fused_oreal_loss

    # coefficients ~1 (not ~1/N): most gradient entries in fp16's normal range
    case = make_case([40, 30], 48, 301, seed=seed, pos_coef=50.0, neg_coef=25.0)
    grads = []
    for factor in (1.0, 1.0 / 3.0):
        hidden, weight, *rest = case.args(dtype, device)
        hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
        out = fused_oreal_loss(hidden, weight, *rest, backend=backend, **case.options)
        out.loss.backward(torch.tensor(factor, dtype=out.loss.dtype, device=out.loss.device))
        grads.append((hidden.grad.double().cpu(), weight.grad.double().cpu()))
    for one, third in zip(*grads):
        # entries in the normal range with room to spare: a subnormal's rounding is not relative
        normal = one.abs() > 8 * torch.finfo(dtype).tiny
        assert normal.sum() > 200, int(normal.sum())
        bias = (third[normal] / (one[normal] / 3) - 1).mean().item()
        # rounding the factor would give bf16(1/3): +2.0e-3, fp16(1/3): -2.4e-4; the mean of >= 200 correct
        # roundings has a standard deviation of < 8e-5 (bf16) and < 2e-5 (fp16)
        bound = 5e-4 if dtype == torch.bfloat16 else 1e-4
        assert abs(bias) < bound, (backend, dtype, bias)
