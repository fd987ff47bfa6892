"""`rollout/logprob_abs_diff`: the engine's log-prob of each sampled token against the trainer's, per step.

The engine's log-probs travel with each training sample (`extras["engine_logprobs"]`), are packed beside
the labels, and every policy forward before the step's first update compares its own log-probs with them.
Checked here against a direct per-sample computation on packed micro-batches; the end-to-end value (the
transformers and the vLLM engine against the trainer, < 1e-3 every step) is checked by .ci/run.
"""

import math
import random
from types import SimpleNamespace

import torch

from oreal.algorithms.loop import ENGINE_LOGPROBS, BaseTrainer
from oreal.data import TrainingSample, pack_rollouts


def bare_trainer() -> BaseTrainer:
    trainer = BaseTrainer.__new__(BaseTrainer)  # only the log-prob gap's state is used
    trainer.ctx = SimpleNamespace(device=torch.device("cpu"), world_size=1, rank=0)
    return trainer


def random_samples(rng: random.Random, g: torch.Generator, count: int):
    samples, trainer_lps = [], []
    for _ in range(count):
        response = [rng.randrange(50) for _ in range(rng.randint(0, 9))]  # empty responses too
        engine = -torch.rand(len(response), generator=g, dtype=torch.float64) * 5
        mine = engine + torch.randn(len(response), generator=g, dtype=torch.float64) * 1e-2
        samples.append(TrainingSample(prompt_ids=[rng.randrange(50) for _ in range(rng.randint(1, 6))],
                                      response_ids=response, extras={ENGINE_LOGPROBS: engine.float().tolist()}))
        trainer_lps.append(mine.float())
    return samples, trainer_lps


def test_mean_abs_diff_over_action_tokens_of_packed_batches():
    rng = random.Random()
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    samples, trainer_lps = random_samples(rng, g, 11)
    batches, _ = pack_rollouts(samples, max_tokens=24)
    expected = torch.cat([(torch.tensor(s.extras[ENGINE_LOGPROBS]).double() - lp.double()).abs()
                          for s, lp in zip(samples, trainer_lps)])
    by_key = {(tuple(s.prompt_ids), tuple(s.response_ids)): lp for s, lp in zip(samples, trainer_lps)}

    trainer = bare_trainer()
    trainer.open_logprob_gap()
    for batch in batches:
        # The trainer's log-probs as the policy forward returns them: one per position, 0 off actions.
        logprobs = torch.zeros(batch.num_tokens)
        ids, starts = batch.input_ids[0].tolist(), batch.cu_seqlens.tolist()
        for lo, hi in zip(starts[:-1], starts[1:]):
            seq = ids[lo:hi]
            action = batch.action_mask[lo:hi].nonzero().flatten()
            if len(action) == 0:
                continue
            prompt_len = int(action[0]) + 1
            lp = by_key[(tuple(seq[:prompt_len]), tuple(seq[prompt_len:]))]
            logprobs[lo + action] = lp
        trainer.note_logprob_gap(batch, logprobs)
    metric = trainer.logprob_gap_metrics()["rollout/logprob_abs_diff"]
    assert math.isclose(metric, float(expected.mean()), rel_tol=1e-5)


def test_only_forwards_before_the_first_update_count():
    rng = random.Random()
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    samples, _ = random_samples(rng, g, 4)
    batch = pack_rollouts(samples, max_tokens=1000)[0][0]
    trainer = bare_trainer()
    trainer.open_logprob_gap()
    engine = batch.extras[ENGINE_LOGPROBS]
    trainer.note_logprob_gap(batch, engine + torch.where(batch.action_mask, 0.25, 7.0))  # off-action values ignored
    trainer.close_logprob_gap()  # the weights change: later forwards are not compared
    trainer.note_logprob_gap(batch, engine + 3.0)
    assert math.isclose(trainer.logprob_gap_metrics()["rollout/logprob_abs_diff"], 0.25, rel_tol=1e-6)
    # A step with nothing noted (nothing kept, or a frozen clipped recipe) logs NaN, not a stale value.
    assert math.isnan(trainer.logprob_gap_metrics()["rollout/logprob_abs_diff"])
