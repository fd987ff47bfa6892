"""Random packed batches for the clipped-surrogate (policy) loss tests, shared by every backend's tests.

Old log-probs are placed so that both branches of the clip are taken in every case with two or more
action tokens: `(lp - old) sign(A)` cycles, shuffled, through {0.6 (clip active), -0.6 (outside the
range on the unclipped side), +-0.05 (inside)} plus a little noise, so no ratio sits within 0.1 (in log
space) of a clip bound, where the fp32 and float64 log-probs could pick different branches. Advantages
stay away from 0 and KL reference log-probs away from the current ones (see `reference_logprobs_near`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loss_cases import make_case, reference_logprobs_near
from policy_reference import reference_policy_loss


def fresh_seed() -> int:
    return torch.randint(0, 2**31 - 2, ()).item()  # fresh inputs every run; pytest shows it on failure


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

    def args(self, dtype=torch.float32):
        return (self.hidden.to(dtype), self.weight.to(dtype), self.labels, self.cu_seqlens, self.advantages,
                self.old_logprobs, self.ref_logprobs)


def current_logprobs(hidden, weight, labels, temperature):
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T / temperature, -1)
    return log_probs.gather(1, labels.clamp(min=0)[:, None])[:, 0].float()


def make_policy_case(seq_lens, hidden_size, vocab_size, *, seed, per_token=False, with_ref=True, empty_seq=None,
                     round_to=torch.float32, **options) -> PolicyCase:
    """A packed batch (prompt positions and each sequence's last position ignored) with advantages,
    old log-probs that put ratios on both sides of the clip range, and KL reference log-probs 0.1 to ~0.7
    from the current ones. `round_to`: the dtype whose rounded inputs the ratios are placed for."""
    base = make_case(seq_lens, hidden_size, vocab_size, seed=seed, empty_seq=empty_seq)
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
    ref = reference_logprobs_near(current, g) if with_ref else None
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
