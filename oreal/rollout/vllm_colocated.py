"""vLLM inside the trainer ranks: the colocated placement on GPUs.

Every trainer rank builds the same `vllm.LLM` with `distributed_executor_backend="external_launcher"`:
vLLM then runs in the torchrun process itself, on that rank's GPU, and joins the process group torchrun
made. Consecutive blocks of `tensor_parallel_size` trainer ranks form one engine (its tensor-parallel
group); `data_parallel_size = world size / tensor_parallel_size` engines sample in parallel, each its
own ranks' prompts (oreal/rollout/generator.py, `ColocatedEngines`).

Life cycle per step, driven by the generator and `LayerwiseLoader` (oreal/rollout/colocated.py):
generate -> `sleep(level)` (KV cache freed; weights offloaded to CPU at level 1, discarded at level 2) ->
the policy trains on the same GPUs -> `wake_up()` (weights' memory back) -> `load_weights` layer by layer
from the FSDP2 parameters, in process (vLLM's layerwise reload: each layer is processed once its tensors
are in, so the loader may free them at once) -> `finish_load()` (reload finalised, prefix cache reset, KV
cache memory back) -> generate. Sleep mode needs CUDA's memory pool; on CPU (vLLM's CPU build, tests)
sleep and wake only record the state and the weights stay where they are.

Only `oreal.rollout` imports vLLM, and this module only inside methods.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import torch

from oreal.rollout.colocated import call_with_timeout
from oreal.rollout.errors import EngineBrokenError
from oreal.rollout.types import Rollout, SamplingParams, TensorSpec


def external_launcher_kwargs(*, model: str, dtype: str, seed: int, world_size: int, tensor_parallel_size: int,
                             gpu_memory_utilization: float, max_model_len: int | None, sleep_mode: bool,
                             enable_prefix_caching: bool = True, engine_fields: Sequence[str] = (),
                             extra: dict | None = None) -> dict:
    """`vllm.LLM` arguments of one colocated engine (pure: tested without vLLM).

    All ranks pass the same seed: vLLM's external launcher needs identical arguments on every rank of a
    tensor-parallel group, and ranks of different engines sample different prompts anyway (the generator
    shifts each engine's per-request seeds)."""
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size {tensor_parallel_size} does not divide the {world_size} ranks")
    kwargs = dict(model=model, dtype=dtype, seed=seed, tensor_parallel_size=tensor_parallel_size,
                  data_parallel_size=world_size // tensor_parallel_size,
                  distributed_executor_backend="external_launcher", enable_sleep_mode=sleep_mode,
                  gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                  enable_prefix_caching=enable_prefix_caching, skip_tokenizer_init=True)
    if "logprobs_mode" in engine_fields:
        kwargs["logprobs_mode"] = "processed_logprobs"  # log-probs of the distribution sampled from
    kwargs.update(extra or {})
    return {k: v for k, v in kwargs.items() if v is not None}


def _worker_model(worker):
    """Runs inside vLLM's worker (in this very process): its model and config."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    return model, worker.vllm_config


class VllmColocatedEngine:
    """One rank's share of a colocated vLLM engine; the same calls as `InProcessEngine`."""

    kind = "vllm"

    def __init__(self, model: str, *, dtype: str = "bfloat16", seed: int = 0, rank: int = 0, world_size: int = 1,
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 max_model_len: int | None = None, enable_prefix_caching: bool = True, request_timeout_s: float = 0,
                 vllm_kwargs: dict | None = None):
        import vllm

        from oreal.rollout.vllm import read_checkpoint_specs

        if not os.path.isdir(model):
            raise FileNotFoundError(f"vLLM engine: model path {model!r} is not a directory")
        self.sleep_mode = torch.cuda.is_available()
        fields = [f.name for f in dataclasses.fields(vllm.EngineArgs)]
        self.llm = vllm.LLM(**external_launcher_kwargs(
            model=model, dtype=dtype, seed=seed, world_size=world_size, tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len, sleep_mode=self.sleep_mode,
            enable_prefix_caching=enable_prefix_caching, engine_fields=fields, extra=vllm_kwargs))
        self.rank = rank
        self._specs = read_checkpoint_specs(model, dtype)
        self._top_k_off = vllm.SamplingParams().top_k
        self.request_timeout_s = request_timeout_s
        self.sync_timeout_s = request_timeout_s
        self.version = 0
        self.asleep = False
        self.weights_valid = True
        self._kv_asleep = False
        self._reloading = None  # (model, vllm_config) while a layerwise reload is open
        self._broken: str | None = None

    # ----- description ------------------------------------------------------------------------
    def weight_specs(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    @property
    def weight_specs_cache(self) -> dict[str, TensorSpec]:
        return dict(self._specs)

    def remember_specs(self) -> None:
        pass  # read from the checkpoint's headers once, at start

    def state_dict(self):
        raise NotImplementedError("vLLM holds fused, sharded weights; compare generations instead")

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def broken(self) -> str | None:
        return self._broken

    # ----- generation --------------------------------------------------------------------------
    def generate(self, prompt_token_ids: Sequence[Sequence[int]], n: int = 1,
                 sampling: SamplingParams | None = None) -> list[Rollout]:
        import vllm
        from vllm.inputs import TokensPrompt

        from oreal.rollout.vllm import _rollouts_from_outputs, vllm_sampling_kwargs

        if self._broken:
            raise EngineBrokenError(f"colocated vLLM engine is unusable: {self._broken}")
        if self.asleep or not self.weights_valid:
            raise EngineBrokenError("refusing to generate: the engine is asleep or its weights were discarded")
        if self._kv_asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._kv_asleep = False
        sampling = sampling or SamplingParams()
        draws = 1 if sampling.greedy else n  # vLLM refuses n > 1 when greedy: the samples are identical anyway
        params = [vllm.SamplingParams(**vllm_sampling_kwargs(sampling, draws, i, self._top_k_off))
                  for i in range(len(prompt_token_ids))]
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_token_ids]
        try:  # a hung engine fails the step (on every rank, through the generator) instead of holding it
            outputs = call_with_timeout(lambda: self.llm.generate(requests, params, use_tqdm=False),
                                        self.request_timeout_s, "generate")
        except BaseException as exc:
            self._broken = f"generate failed: {type(exc).__name__}: {exc}"
            raise
        drawn = _rollouts_from_outputs(outputs, draws)
        rollouts = []
        for i in range(len(prompt_token_ids)):
            for j in range(n):
                r = drawn[i * draws + j % draws]
                rollouts.append(Rollout(prompt_index=i, sample_index=j, token_ids=list(r.token_ids),
                                        logprobs=list(r.logprobs), finish_reason=r.finish_reason,
                                        weights_version=self.version))
        return rollouts

    def set_fault(self, stage: str, kind: str, after_buckets: int = 0) -> None:
        raise NotImplementedError("fault injection is a transformers-engine test hook")

    # ----- sleep / wake -------------------------------------------------------------------------
    def sleep(self, level: int) -> None:
        if self.asleep:
            return
        if self.sleep_mode:
            self.llm.sleep(level=level)
            self._kv_asleep = True
            if level == 2:
                self.weights_valid = False
        self.asleep = True

    def wake_up(self) -> None:
        """The weights' memory back (their values too at level 1); the KV cache wakes at the next generate,
        after the reload, so the gathered layers and the cache never need the memory at once."""
        if self.asleep and self.sleep_mode:
            self.llm.wake_up(tags=["weights"])
        self.asleep = False

    # ----- weights --------------------------------------------------------------------------------
    @torch.no_grad()
    def load_weights(self, weights: Sequence[tuple[str, torch.Tensor]]) -> None:
        from vllm.config import set_current_vllm_config

        if self._reloading is None:
            model, config = self.llm.collective_rpc(_worker_model)[0]
            device = next(model.parameters()).device  # read now: the reload puts the layers on "meta" until loaded
            reload = _layerwise()
            with set_current_vllm_config(config):
                if reload is not None:
                    reload[0](model)  # initialize_layerwise_reload
            self._reloading = (model, config, device)
        model, config, device = self._reloading
        with set_current_vllm_config(config):
            model.load_weights(weights=[(name, tensor.to(device, non_blocking=True)) for name, tensor in weights])

    def finish_load(self) -> int:
        from vllm.config import set_current_vllm_config

        from oreal.rollout.vllm import reprocess_tied_layers

        if self._reloading is not None:
            model, config, _ = self._reloading
            reload = _layerwise()
            with set_current_vllm_config(config):
                if reload is not None:
                    reload[1](model, config.model_config)  # finalize_layerwise_reload
                    reprocess_tied_layers(model)  # a tied lm_head receives no weights of its own
            self._reloading = None
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self.weights_valid = True
        self.version += 1
        return self.version

    def close(self) -> None:
        self._broken = self._broken or "closed"
        self.llm = None


def _layerwise():
    """vLLM's layerwise reload (initialize, finalize), or None on versions without it (plain load_weights
    then copies in place, which GPU layouts allow)."""
    try:
        from vllm.model_executor.model_loader.reload import (
            finalize_layerwise_reload,
            initialize_layerwise_reload,
        )
    except ImportError:
        return None
    return initialize_layerwise_reload, finalize_layerwise_reload
