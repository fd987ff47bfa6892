"""Plain data passed between the trainer, the engine client and the engine process.

Everything here is picklable and free of torch objects (dtypes travel as names such as
"bfloat16"), so the same values cross the control channel to a transformers engine or to
vLLM workers unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample: the options both engines honour identically.

    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_p: nucleus sampling mass in (0, 1]; 1 disables it.
    top_k: keep the k most likely tokens; 0 disables it.
    max_new_tokens: response length limit; hitting it gives finish_reason "length".
    stop_token_ids: generation stops after any of these (the stop token is kept in the
        response, so the policy is trained to emit it); the model's own EOS also stops.
    seed: makes sampling reproducible for a given engine, batch and weights, with distinct
        noise for every (prompt, sample) of a call (vLLM: sample j of prompt i draws with
        seed + i * n + j). None draws from the engine's running generator.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"SamplingParams.temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(kw_only=True)
class Rollout:
    """One sampled response.

    prompt_index: position of its prompt in the `generate` call; sample_index: 0..n-1.
    token_ids: the response tokens (stop token included when finish_reason is "stop").
    logprobs: per response token, the log-probability under the distribution the sampler
        actually drew from (after temperature, top-k and top-p), in fp32.
    weights_version: how many weight syncs the engine had applied when it generated this.
    policy_version: how many policy updates the weights that generated this had seen (the trainer's
        count, stamped by the generator; -1 when generated outside a trainer). With
        `rollout.max_staleness` 1 a step trained from version v gets samples of version v or v - 1.
    """

    prompt_index: int
    sample_index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weights_version: int = 0
    policy_version: int = -1


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one weight, as the engine holds it or the trainer sends it."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        dtype_from_name(self.dtype)  # validates the name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def element_size(self) -> int:
        return dtype_from_name(self.dtype).itemsize

    @property
    def nbytes(self) -> int:
        return self.numel * self.element_size


@dataclass(kw_only=True)
class EngineInfo:
    """What an engine process reports once it is up."""

    kind: str
    pid: int
    transport: str  # "gloo" or "nccl"
    receivers: int  # data-plane ranks on the engine side (vLLM: one per worker)
    specs: dict[str, TensorSpec] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    nccl: dict[str, str | None] = field(default_factory=dict)  # vLLM on GPU: its workers' NCCL settings


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype
