"""Loading Hugging Face causal LMs (Qwen2/Qwen2.5, Llama) with a packed attention backend.

    model = load_causal_lm("/models/Qwen2.5-7B", dtype=torch.bfloat16, device="cuda")   # local files only
    model = load_causal_lm(tiny_qwen2_config(), dtype=torch.float32)                    # random init

The model's `attn_implementation` becomes the backend's registered name (`oreal.model.attention.IMPLEMENTATIONS`):
packed forwards go through `forward_hidden`, and ordinary forwards and `generate()` still work.
"""

from __future__ import annotations

import logging
import os

import torch

from oreal.model.attention import backend_of_implementation, implementation_name, register_backends, resolve_backend
from oreal.model.liger import apply_liger, resolve_liger

logger = logging.getLogger(__name__)

TESTED_MODEL_TYPES = ("qwen2", "llama")
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32, "float64": torch.float64}


def _resolve_dtype(dtype):
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype: expected a floating-point dtype, got {dtype}")
        return dtype
    if dtype == "auto":
        return "auto"
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype: expected a torch dtype, 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")


def _check_config(config) -> None:
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or "sliding_attention" in layer_types:
        raise ValueError("config: sliding-window attention layers are not supported by the packed attention "
                         "backends; set use_sliding_window=False (Qwen2.5 checkpoints ship it off)")
    if config.model_type not in TESTED_MODEL_TYPES:
        logger.warning("model type %r is untested with oreal's packed attention (tested: %s)",
                       config.model_type, ", ".join(TESTED_MODEL_TYPES))


def load_causal_lm(path_or_config, *, dtype=torch.bfloat16, attn_backend: str = "auto", device=None,
                   liger: bool | str | None = "auto", trust_remote_code: bool = False, compute_device=None,
                   compute_dtype=None):
    """A causal LM ready for packed forwards.

    Args:
        path_or_config: a local checkpoint directory (nothing is downloaded) or a `PretrainedConfig`
            (random weights, e.g. `oreal.model.tiny.tiny_qwen2_config()`).
        dtype: parameter dtype (torch dtype, a name such as "bfloat16", or "auto" for the checkpoint's).
        attn_backend: "auto", "flash_attn", "xformers" or "sdpa", chosen for `compute_device` and
            `compute_dtype`; one asked for by name that cannot run there raises ValueError saying why.
        device: where to put the model (default: stays on CPU).
        compute_device, compute_dtype: where and in which dtype the forwards will run, when that is
            not `device` and `dtype` (e.g. fp32 master weights loaded on CPU, then sharded onto CUDA
            by FSDP2 with a bf16 mixed-precision policy); they only steer the backend choice.
        liger: True applies Liger's RMSNorm/RoPE/SwiGLU (ValueError if it cannot), False never,
            "auto" when on CUDA with liger-kernel installed.
    """
    from transformers import AutoModelForCausalLM, PretrainedConfig

    dtype = _resolve_dtype(dtype)
    target = torch.device(device) if device is not None else torch.device("cpu")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} was asked for, but torch sees no CUDA device here")
    run_on = torch.device(compute_device) if compute_device is not None else target
    if run_on.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"compute_device: {compute_device!r} was asked for, but torch sees no CUDA device here")
    run_in = _resolve_dtype(compute_dtype) if compute_dtype is not None else dtype
    run_in = None if run_in == "auto" else run_in
    backend = resolve_backend(attn_backend, run_on, run_in)
    register_backends()
    implementation = implementation_name(backend)
    if isinstance(path_or_config, PretrainedConfig):
        _check_config(path_or_config)
        model = AutoModelForCausalLM.from_config(path_or_config, attn_implementation=implementation,
                                                 dtype=torch.float32 if dtype == "auto" else dtype,
                                                 trust_remote_code=trust_remote_code)
    elif isinstance(path_or_config, (str, os.PathLike)):
        path = os.fspath(path_or_config)
        if not os.path.isdir(path):
            raise ValueError(f"path_or_config: {path!r} is not a local directory; models load from local files "
                             "only (download the checkpoint first)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"path_or_config: {path!r} has no config.json; is it a Hugging Face checkpoint?")
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        _check_config(config)
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype,
                                                     attn_implementation=implementation, local_files_only=True,
                                                     trust_remote_code=trust_remote_code)
    else:
        raise ValueError(f"path_or_config: expected a local directory or a PretrainedConfig, "
                         f"got {type(path_or_config).__name__}")
    if device is not None:
        model = model.to(target)
    if resolve_liger(liger, model.config.model_type, target):
        apply_liger(model)
    return model


def attn_backend_of(model) -> str | None:
    """The packed backend the model uses ("flash_attn", "xformers", "sdpa"), or None if it uses none."""
    return backend_of_implementation(getattr(model.config, "_attn_implementation", None))


def set_attn_backend(model, attn_backend: str = "auto", device=None, dtype: torch.dtype | None = None) -> str:
    """Switches a loaded model to a packed backend (e.g. one loaded without `load_causal_lm`); returns its name.

    `device` and `dtype` are where and in which dtype its forwards run (default: its parameters').
    """
    if device is None or dtype is None:
        parameter = next(model.parameters())
        device = parameter.device if device is None else device
        dtype = parameter.dtype if dtype is None else dtype
    backend = resolve_backend(attn_backend, device, dtype)
    register_backends()
    implementation = implementation_name(backend)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
    else:  # older transformers
        model.config._attn_implementation = implementation
    return backend
