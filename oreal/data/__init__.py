"""Prompt datasets (JSONL formats, difficulty re-sampling, templating, a resumable sharded sampler)
and packing of training samples into balanced variable-length micro-batches.

An engine's output is `oreal.rollout.Rollout`; what the trainer builds from it to train on is a
`TrainingSample` (called `Rollout` here until 0.1; the old name warns for one release).
"""

from oreal.data.balance import PackingPlan, PackingReport, partition, plan_packing
from oreal.data.dataset import Prompt, PromptDataset
from oreal.data.difficulty import OREAL_BANDS, DifficultyResampling
from oreal.data.formats import FORMATS, PromptExample, PromptFormatError, read_prompt_file
from oreal.data.packing import IGNORE_INDEX, PackedBatch, TrainingSample, pack_rollouts, pack_sequences
from oreal.data.sampler import PromptSampler
from oreal.data.templates import DEFAULT_INSTRUCTION, PromptRenderer

__all__ = [
    "DEFAULT_INSTRUCTION", "FORMATS", "IGNORE_INDEX", "OREAL_BANDS", "DifficultyResampling", "PackedBatch",
    "PackingPlan", "PackingReport", "Prompt", "PromptDataset", "PromptExample", "PromptFormatError",
    "PromptRenderer", "PromptSampler", "TrainingSample", "pack_rollouts", "pack_sequences", "partition",
    "plan_packing", "read_prompt_file",
]


def __getattr__(name):
    if name == "Rollout":
        from oreal._compat import warn_moved

        warn_moved("oreal.data.Rollout", "oreal.data.TrainingSample")
        return TrainingSample
    raise AttributeError(f"module 'oreal.data' has no attribute {name!r}")
