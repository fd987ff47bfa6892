"""Model loading and the packed forward: Hugging Face causal LMs with varlen attention backends.

- `load_causal_lm(path_or_config, dtype=..., attn_backend="auto", device=None, liger="auto",
  compute_device=None, compute_dtype=None)` (the backend is chosen for where the forwards run)
- `forward_hidden(model, batch) -> hidden [T, H]` (final normed hidden states, no lm_head)
- `lm_head_weight(model) -> [V, H]`
- `set_attn_backend(model, name)`, `available_backends(device, dtype)`, `resolve_backend(name, device, dtype)`
- `oreal.model.tiny`: offline tiny tokenizer and Qwen2/Llama configs for tests and demos.
"""

from oreal.model.attention import BACKENDS, VarlenMetadata, available_backends, resolve_backend
from oreal.model.loading import attn_backend_of, load_causal_lm, set_attn_backend
from oreal.model.runner import forward_hidden, lm_head_weight

__all__ = ["BACKENDS", "VarlenMetadata", "attn_backend_of", "available_backends", "forward_hidden",
           "lm_head_weight", "load_causal_lm", "resolve_backend", "set_attn_backend"]
