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

    def args(self, dtype=None):
        hidden, weight = self.hidden, self.weight
        if dtype is not None:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        return (hidden, weight, self.labels, self.cu_seqlens, self.advantages, self.is_positive,
                self.rm_scores, self.ref_logprobs)


def make_case(seq_lens, hidden_size, vocab_size, *, seed, polarity=None, with_rm=True, with_ref=True,
              prompt_fraction=0.3, empty_seq=None, scale=1.0, **options) -> PackedCase:
    """A packed batch: random hidden states and weights, some prompt positions (label -100),
    each sequence's last position ignored, random advantages and polarities.

    `polarity`: None for random, True/False for all-positive/all-negative.
    `empty_seq`: index of a sequence whose every label is -100 (no action token).
    """
    g = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    hidden = torch.randn(total, hidden_size, generator=g) * scale
    weight = torch.randn(vocab_size, hidden_size, generator=g) / hidden_size ** 0.5
    labels = torch.randint(0, vocab_size, (total,), generator=g)
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


# Tolerances against the float64 reference for fp32 inputs (issue 2's acceptance bounds).
FP32_LOSS_RTOL = 1e-5
FP32_GRAD_RTOL = 1e-4


def run_fused(case: PackedCase, backend: str, dtype=torch.float32):
    """Loss output and (grad_hidden, grad_weight) of `oreal.fused_oreal_loss` on `case`."""
    from oreal import fused_oreal_loss

    hidden, weight, *rest = case.args(dtype)
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    out = fused_oreal_loss(hidden, weight, *rest, backend=backend, **case.options)
    grad_hidden, grad_weight = torch.autograd.grad(out.loss, (hidden, weight))
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


def assert_matches_reference_fp32(case: PackedCase, backend: str) -> None:
    """fp32 backend output vs the float64 reference within issue 2's bounds."""
    out, grad_hidden, grad_weight = run_fused(case, backend)
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


def low_precision_errors(case: PackedCase, backend: str, dtype) -> dict:
    """Errors vs the float64 reference (on the same rounded inputs) of `backend` and of plain torch
    autograd run in `dtype` (the baseline a user would otherwise have)."""
    out, gh, gw = run_fused(case, backend, dtype)
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
