"""Prompt datasets (JSONL formats, difficulty re-sampling, templating, a resumable sharded sampler)
and packing of rollouts into balanced variable-length micro-batches."""

from oreal.data.balance import PackingPlan, PackingReport, partition, plan_packing
from oreal.data.dataset import Prompt, PromptDataset
from oreal.data.difficulty import OREAL_BANDS, DifficultyResampling
from oreal.data.formats import FORMATS, PromptExample, PromptFormatError, read_prompt_file
from oreal.data.packing import IGNORE_INDEX, PackedBatch, Rollout, pack_rollouts, pack_sequences
from oreal.data.sampler import PromptSampler
from oreal.data.templates import DEFAULT_INSTRUCTION, PromptRenderer

__all__ = [
    "DEFAULT_INSTRUCTION", "FORMATS", "IGNORE_INDEX", "OREAL_BANDS", "DifficultyResampling", "PackedBatch",
    "PackingPlan", "PackingReport", "Prompt", "PromptDataset", "PromptExample", "PromptFormatError",
    "PromptRenderer", "PromptSampler", "Rollout", "pack_rollouts", "pack_sequences", "partition",
    "plan_packing", "read_prompt_file",
]
