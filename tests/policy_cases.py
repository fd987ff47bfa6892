"""Random packed batches for the clipped-surrogate (policy) loss tests, shared by every backend's tests.

Old log-probs are placed so that both branches of the clip are taken in every case with two or more
action tokens: `(lp - old) sign(A)` cycles, shuffled, through {0.6 (clip active), -0.6 (outside the
range on the unclipped side), +-0.05 (inside)} plus a little noise, so no ratio sits within 0.1 (in log
space) of a clip bound, where the fp32 and float64 log-probs could pick different branches. Advantages
stay away from 0 and KL reference log-probs away from the current ones (see `loss_cases.reference_logprobs_away`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import oreal
from loss_cases import (LOW_PRECISION_SEEDS, current_logprobs, make_case, reference_logprobs_away, relative_error,
                        scalar_relative_error)
from oreal.ops.policy_loss import token_scales
from policy_reference import reference_policy_loss


def fresh_seed() -> int:
    return torch.randint(0, 2**31 - 8, ()).item()  # fresh inputs every run; pytest shows it on failure


@dataclass
class PolicyCase:
    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    ref_logprobs: torch.Tensor | None
    options: dict

    def args(self, dtype=torch.float32, device=None):
        """The inputs of `fused_policy_loss`, hidden and weight in `dtype`, all on `device` (default: CPU)."""
        args = (self.hidden.to(dtype), self.weight.to(dtype), self.labels, self.cu_seqlens, self.advantages,
                self.old_logprobs, self.ref_logprobs)
        return args if device is None else tuple(None if a is None else a.to(device) for a in args)


def make_policy_case(seq_lens, hidden_size, vocab_size, *, seed, per_token=False, with_ref=True, empty_seq=None,
                     round_to=torch.float32, confident=False, **options) -> PolicyCase:
    """A packed batch (prompt positions and each sequence's last position ignored) with advantages,
    old log-probs that put ratios on both sides of the clip range, and KL reference log-probs 0.1 to 0.7
    from the current ones. `round_to`: the dtype whose rounded inputs the ratios are placed for."""
    base = make_case(seq_lens, hidden_size, vocab_size, seed=seed, empty_seq=empty_seq, confident=confident)
    g = torch.Generator().manual_seed(seed + 1)
    total = len(base.labels)
    current = current_logprobs(base.hidden.to(round_to), base.weight.to(round_to), base.labels,
                               options.get("temperature", 1.0))
    advantages = torch.randn(total if per_token else len(seq_lens), generator=g)
    advantages = advantages.sign() * (0.2 + advantages.abs())  # no advantage near 0
    seq = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(seq_lens))
    token_adv = advantages if per_token else advantages[seq]
    # a shuffled cycle over the action tokens: with two or more, both branches are taken whatever the seed
    choice = torch.randint(0, 4, (total,), generator=g)
    action = (base.labels != -100).nonzero()[:, 0]
    choice[action] = (torch.arange(len(action)) % 4)[torch.randperm(len(action), generator=g)]
    log_ratio = torch.tensor([0.6, -0.6, 0.05, -0.05])[choice] + 0.02 * (torch.rand(total, generator=g) - 0.5)
    old = current - log_ratio * token_adv.sign()
    ref = reference_logprobs_away(current, g, max_gap=0.7) if with_ref else None
    if with_ref:
        options.setdefault("kl_coef", 0.05)
    return PolicyCase(base.hidden, base.weight, base.labels, base.cu_seqlens, advantages, old, ref, options)


def run_reference(case: PolicyCase, dtype=torch.float32):
    """float64 on the inputs rounded to `dtype`: (loss, logprobs, entropy, clip_frac, ratio_mean, ratio_max,
    magnitude), (grad_hidden, grad_weight); `magnitude` is the loss's L1 magnitude (policy_reference.py)."""
    hidden, weight, *rest = case.args(dtype)
    hidden = hidden.double().requires_grad_()
    weight = weight.double().requires_grad_()
    loss, *others, magnitude = reference_policy_loss(hidden, weight, *rest, return_magnitude=True, **case.options)
    others = others + [magnitude]
    if loss.requires_grad:
        grads = torch.autograd.grad(loss, (hidden, weight))
    else:  # no action token: the loss is the constant 0
        grads = (torch.zeros_like(hidden), torch.zeros_like(weight))
    return (loss.detach(), *others), grads


# ---- checks shared by every backend's policy-loss tests ----

LOSS_RTOL = 1e-5  # relative to the loss's L1 magnitude: mixed-sign advantages can cancel the loss to ~0
GRAD_RTOL = 1e-4

MIXED = [7, 1, 13, 0, 9]  # a length-1 sequence (one action token) and an empty one
CASES = {  # each backend's tests add their own odd-shape case
    "token_kl_per_sequence_adv": dict(seq_lens=MIXED, hidden_size=24, vocab_size=101),
    "token_no_kl_per_token_adv_asymmetric": dict(seq_lens=MIXED, hidden_size=24, vocab_size=101, per_token=True,
                                                 with_ref=False, clip_low=0.2, clip_high=0.28),
    "sequence_kl_per_token_adv_no_action_seq": dict(seq_lens=[6, 8, 4, 1], hidden_size=12, vocab_size=57,
                                                    per_token=True, empty_seq=1, loss_agg="sequence"),
    "sequence_no_kl_temperature_asymmetric": dict(seq_lens=MIXED, hidden_size=16, vocab_size=77, with_ref=False,
                                                  loss_agg="sequence", temperature=0.7, clip_low=0.1,
                                                  clip_high=0.3),
    "global_num_tokens_temperature": dict(seq_lens=[10, 3, 12], hidden_size=12, vocab_size=57, num_tokens=100,
                                          temperature=1.3, kl_coef=0.1),
}


def run_fused(case: PolicyCase, backend: str, dtype=torch.float32, device=None):
    """`fused_policy_loss` on the case's inputs in `dtype` on `device` (default CPU): (output, (grad_hidden,
    grad_weight)), returned on the CPU."""
    hidden, weight, *rest = case.args(dtype, device)
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = oreal.fused_policy_loss(hidden, weight, *rest, backend=backend, **case.options)
    grads = torch.autograd.grad(out.loss, (hidden, weight), allow_unused=True)
    grads = tuple((torch.zeros_like(x) if g is None else g).cpu() for x, g in zip((hidden, weight), grads))
    if device is not None:
        out = type(out)(*(x.detach().cpu() for x in out))
    return out, grads


def assert_loss_close(loss, ref_loss, magnitude):
    bound = LOSS_RTOL * max(abs(float(ref_loss)), magnitude)
    loss, ref_loss = float(loss.detach()), float(ref_loss)
    assert abs(loss - ref_loss) <= bound, (loss, ref_loss, magnitude)


def assert_stats_match(stats, clip_fraction, ratio_mean, ratio_max):
    for stat in stats:
        assert stat.shape == () and stat.dtype == torch.float32 and not stat.requires_grad
    assert abs(float(stats[0]) - clip_fraction) < 1e-6, (float(stats[0]), clip_fraction)
    assert abs(float(stats[1]) - ratio_mean) < 1e-5 * max(1.0, ratio_mean)
    assert abs(float(stats[2]) - ratio_max) < 1e-5 * max(1.0, ratio_max)


def assert_matches_reference(case: PolicyCase, backend: str, *, both_branches=True, device=None):
    """fp32 `backend` against the float64 reference: loss, gradients, log-probs, entropy, statistics."""
    out, (grad_hidden, grad_weight) = run_fused(case, backend, device=device)
    (loss, lp, ent, clip_fraction, ratio_mean, ratio_max, magnitude), (ref_gh, ref_gw) = run_reference(case)
    assert out.loss.dtype == torch.float32
    assert_loss_close(out.loss, loss, magnitude)
    for grad, ref in ((grad_hidden, ref_gh), (grad_weight, ref_gw)):
        if ref.norm() > 0:
            assert relative_error(grad, ref) < GRAD_RTOL
        else:
            assert grad.abs().max() == 0
    action = case.labels != -100
    assert torch.allclose(out.logprobs.double(), lp, rtol=1e-5, atol=1e-5)
    assert torch.allclose(out.entropy.double(), ent, rtol=1e-5, atol=1e-4)
    assert (out.logprobs[~action] == 0).all() and (out.entropy[~action] == 0).all()
    assert_stats_match((out.clip_fraction, out.ratio_mean, out.ratio_max), clip_fraction, ratio_mean, ratio_max)
    if both_branches:
        assert 0 < clip_fraction < 1, clip_fraction  # the clip is active on some tokens and not on others


def assert_no_action_token_gives_zeros(backend: str):
    """Every label ignored: loss, gradients and statistics are exactly 0."""
    case = make_policy_case([3, 5], 8, 31, seed=fresh_seed(), loss_agg="sequence")
    case.labels[:] = -100
    out, (grad_hidden, grad_weight) = run_fused(case, backend)
    assert float(out.loss.detach()) == 0 and grad_hidden.abs().max() == 0 and grad_weight.abs().max() == 0
    assert float(out.clip_fraction) == float(out.ratio_mean) == float(out.ratio_max) == 0


def assert_internal_op_chunks_and_no_grad(linear_policy_loss):
    """A backend's internal op directly: 9 chunks of 7 tokens (statistics and the weight gradient gathered
    across chunks), and the same call under torch.no_grad() (statistics and log-probs, no gradient)."""
    case = make_policy_case([30, 1, 20, 12], 16, 203, seed=fresh_seed(), per_token=True, temperature=1.3)
    (loss, lp, _, clip_fraction, ratio_mean, ratio_max, magnitude), (ref_gh, ref_gw) = run_reference(case)
    scale = token_scales(case.labels, case.cu_seqlens, "token")
    args = (case.labels, case.advantages, case.old_logprobs, scale, case.ref_logprobs, 0.05 * scale, 0.2, 0.2)
    hidden = case.hidden.clone().requires_grad_()
    weight = case.weight.clone().requires_grad_()
    out_loss, _, _, stats = linear_policy_loss(hidden, weight, *args, temperature=1.3, chunk_size=7)
    out_loss.backward()
    assert_loss_close(out_loss, loss, magnitude)
    assert relative_error(hidden.grad, ref_gh) < GRAD_RTOL and relative_error(weight.grad, ref_gw) < GRAD_RTOL
    assert_stats_match((stats["clip_fraction"], stats["ratio_mean"], stats["ratio_max"]), clip_fraction,
                       ratio_mean, ratio_max)
    assert 0 < clip_fraction < 1
    with torch.no_grad():
        nograd_loss, nograd_lp, _, nograd_stats = linear_policy_loss(hidden, weight, *args, temperature=1.3)
    assert not nograd_loss.requires_grad
    assert torch.allclose(nograd_lp.double(), lp, rtol=1e-5, atol=1e-5)
    assert abs(float(nograd_stats["clip_fraction"]) - clip_fraction) < 1e-6


# ---- bf16 / fp16: no worse than what a user writes in plain torch in that dtype (every backend) ----

LOW_PRECISION_CASES = {
    "token_kl": dict(seq_lens=[30, 17, 40], hidden_size=64, vocab_size=515, per_token=True),
    "sequence_odd_vocab_temperature": dict(seq_lens=[33, 1, 20], hidden_size=48, vocab_size=1531,
                                           loss_agg="sequence", temperature=0.7, clip_high=0.28),
    # label logits 20-40, p_label 0.9-0.999 (loss_cases.make_confident): where rounding shows
    "confident_token_kl": dict(seq_lens=[30, 17, 40], hidden_size=64, vocab_size=515, per_token=True,
                               confident=True),
}


def plain_torch_policy_loss(case: PolicyCase, dtype):
    """Logits, softmax, ratios and the loss in `dtype`, autograd for the gradients."""
    hidden, weight, labels, cu_seqlens, advantages, old, ref = case.args(dtype)
    hidden, weight = hidden.requires_grad_(), weight.requires_grad_()
    options = case.options
    log_probs = torch.log_softmax(hidden @ weight.T / options.get("temperature", 1.0), -1)
    lp = log_probs.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    seq = torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())
    adv = (advantages if len(advantages) == len(labels) else advantages[seq]).to(dtype)
    ratio = torch.exp(lp - old.to(dtype))
    clipped = ratio.clamp(1 - options.get("clip_low", 0.2), 1 + options.get("clip_high", 0.2))
    term = -torch.minimum(ratio * adv, clipped * adv)
    if ref is not None:
        d = ref.to(dtype) - lp
        term = term + options["kl_coef"] * (torch.exp(d) - d - 1)
    scale = token_scales(labels, cu_seqlens, options.get("loss_agg", "token"), options.get("num_tokens"))
    loss = torch.where(labels != -100, term * scale.to(dtype), 0).sum()
    return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))


def assert_low_precision_within_twice_plain(name: str, backend: str, dtype, first_seed: int, device=None) -> dict:
    """Errors of `backend` vs float64 (on the same rounded inputs), summed over fresh batches, at most
    twice those of plain torch in `dtype` (a single scalar loss error is a coin toss)."""
    totals: dict = {}
    for seed in range(first_seed, first_seed + LOW_PRECISION_SEEDS):
        case = make_policy_case(seed=seed, round_to=dtype, **LOW_PRECISION_CASES[name])
        out, (grad_hidden, grad_weight) = run_fused(case, backend, dtype, device)
        (loss, *_), (ref_gh, ref_gw) = run_reference(case, dtype)
        plain_loss, plain_gh, plain_gw = plain_torch_policy_loss(case, dtype)
        assert grad_hidden.dtype == dtype and grad_weight.dtype == dtype
        errors = {"loss": scalar_relative_error(out.loss, loss), "loss_plain": scalar_relative_error(plain_loss, loss),
                  "grad_hidden": relative_error(grad_hidden, ref_gh),
                  "grad_hidden_plain": relative_error(plain_gh, ref_gh),
                  "grad_weight": relative_error(grad_weight, ref_gw),
                  "grad_weight_plain": relative_error(plain_gw, ref_gw)}
        for key, value in errors.items():
            totals[key] = totals.get(key, 0.0) + value
    print(name, backend, dtype, {k: f"{v:.2e}" for k, v in totals.items()})
    for key in ("loss", "grad_hidden", "grad_weight"):
        assert totals[key] <= 2 * totals[key + "_plain"] + 1e-6, (name, first_seed, totals)
    return totals
