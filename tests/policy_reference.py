"""An independent float64 implementation of the clipped-surrogate loss, straight from the formula."""

from __future__ import annotations

import torch


def reference_policy_loss(hidden, weight, labels, cu_seqlens, advantages, old_logprobs, ref_logprobs=None, *,
                          clip_low=0.2, clip_high=0.2, kl_coef=0.0, loss_agg="token", temperature=1.0,
                          num_tokens=None, return_magnitude=False):
    """Returns (loss, logprobs, entropy, clip_fraction, ratio_mean, ratio_max); loss differentiable.

    With `return_magnitude=True` also returns the loss's L1 magnitude: the same aggregation of
    |term_t| instead of term_t, the scale that fp32 rounding of the loss is proportional to.
    """
    log_probs = torch.log_softmax(hidden.double() @ weight.double().T / temperature, dim=-1)
    entropy_all = -(log_probs.exp() * log_probs).sum(-1)
    bounds = [int(x) for x in cu_seqlens]
    num_tokens_total = labels.numel()
    per_token = advantages.numel() == num_tokens_total
    losses_per_seq, token_losses = [], []
    magnitudes_per_seq, token_magnitudes = [], []
    clipped = ratios = 0
    ratio_max = 0.0
    logprobs = torch.zeros(num_tokens_total, dtype=torch.float64)
    entropy = torch.zeros(num_tokens_total, dtype=torch.float64)
    for i in range(len(bounds) - 1):
        seq_terms, seq_magnitudes = [], []
        for t in range(bounds[i], bounds[i + 1]):
            if int(labels[t]) == -100:
                continue
            lp = log_probs[t, int(labels[t])]
            logprobs[t], entropy[t] = lp.detach(), entropy_all[t].detach()
            adv = float(advantages[t] if per_token else advantages[i])
            ratio = torch.exp(lp - float(old_logprobs[t]))
            clipped_ratio = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
            term = -torch.minimum(ratio * adv, clipped_ratio * adv)
            clipped += int(clipped_ratio.item() * adv < ratio.item() * adv)
            ratios += ratio.item()
            ratio_max = max(ratio_max, ratio.item())
            if ref_logprobs is not None:
                d = float(ref_logprobs[t]) - lp
                term = term + kl_coef * (torch.exp(d) - d - 1)
            seq_terms.append(term)
            seq_magnitudes.append(abs(term.item()))
        token_losses.extend(seq_terms)
        token_magnitudes.extend(seq_magnitudes)
        if seq_terms:
            losses_per_seq.append(sum(seq_terms) / len(seq_terms))
            magnitudes_per_seq.append(sum(seq_magnitudes) / len(seq_magnitudes))
    count = len(token_losses)
    zero = torch.zeros((), dtype=torch.float64)
    if loss_agg == "token":
        denominator = count if num_tokens is None else float(num_tokens)
        loss = sum(token_losses, zero) / denominator if denominator > 0 else zero
        magnitude = sum(token_magnitudes) / denominator if denominator > 0 else 0.0
    else:
        loss = sum(losses_per_seq, zero) / len(losses_per_seq) if losses_per_seq else zero
        magnitude = sum(magnitudes_per_seq) / len(magnitudes_per_seq) if magnitudes_per_seq else 0.0
    stats = (clipped / max(count, 1), ratios / max(count, 1), ratio_max)
    if return_magnitude:
        return (loss, logprobs, entropy) + stats + (magnitude,)
    return (loss, logprobs, entropy) + stats
