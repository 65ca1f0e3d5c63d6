"""A KV cache for beam search that copies the cache once per step instead of twice.

Why: beam search on CPU (8 beams x 16 prompts = 128 rows) spends a growing share of every step moving
the KV cache around. transformers' default `DynamicLayer` grows each layer with `torch.cat` (a fresh
copy of the whole cache, plus a fresh large allocation that the OS has to fault in) and then
`reorder_cache` copies it again with `index_select` to follow the surviving beams. At 75 new tokens
that is ~850 MB written twice per step.

`BeamSearchCache` keeps, per layer, two preallocated buffers with room for the prompt plus
`max_new_tokens`: a new token is written in place, and the beam reorder gathers the live part into the
other buffer (one copy) and swaps. Attention sees views `[:, :, :length]` holding exactly the values
the default cache would hold, so the logits, and therefore the outputs, are bit-identical.

Built on transformers 5's `transformers.cache_utils` layer API. `make_beam_cache` returns None (use
transformers' default) when that API is missing (transformers 4.30, which A1111 ships), or when the
model's cache is not plain full attention (sliding windows, encoder-decoder, custom reorder).
"""

from __future__ import annotations

import inspect
import logging

import torch

logger = logging.getLogger(__name__)

try:  # transformers >= 5: a Cache is a list of per-layer objects
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
except ImportError:  # transformers 4.x without cache layers: nothing to subclass
    Cache = DynamicCache = DynamicLayer = None


def cache_keyword(model) -> str:
    """The keyword `model.forward` and `generate` take a KV cache by: `cache` in recent transformers 5
    releases, where `past_key_values` still works but warns (a FutureWarning on every call); before that,
    `past_key_values`. Feature test on the signature, no versions."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward returned (`output.cache`, or `output.past_key_values` before the rename)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def layer_api_available() -> bool:
    """True when transformers has the per-layer cache API this module builds on (feature test, no versions)."""
    if DynamicLayer is None or DynamicCache is None:
        return False
    needed = ("update", "reorder_cache", "get_seq_length", "lazy_initialization", "crop",
              "batch_repeat_interleave", "batch_select_indices", "reset")
    if not all(callable(getattr(DynamicLayer, name, None)) for name in needed):
        return False
    try:
        return "layers" in inspect.signature(Cache.__init__).parameters
    except (TypeError, ValueError):
        return False


if DynamicLayer is not None:

    class BeamSearchLayer(DynamicLayer):
        """One layer's keys and values in preallocated, double-buffered storage (see the module docstring)."""

        def __init__(self, extra_tokens: int = 0):
            super().__init__()
            self.extra_tokens = int(extra_tokens)
            self._length = 0
            self._live: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values) buffers in use
            self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # reorder target, then swapped in

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def _allocate(self, like_k: torch.Tensor, like_v: torch.Tensor, capacity: int):
            k = torch.empty((*like_k.shape[:2], capacity, like_k.shape[3]), dtype=like_k.dtype, device=like_k.device)
            v = torch.empty((*like_v.shape[:2], capacity, like_v.shape[3]), dtype=like_v.dtype, device=like_v.device)
            return k, v

        def _expose(self) -> None:
            k, v = self._live
            self.keys, self.values = k[:, :, : self._length], v[:, :, : self._length]

        def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Replace the contents by `keys`/`values` (any layout), with room for `extra_tokens` more."""
            self._length = keys.shape[2]
            self._live = self._allocate(keys, values, self._length + self.extra_tokens)
            self._spare = None
            self._live[0][:, :, : self._length].copy_(keys)
            self._live[1][:, :, : self._length].copy_(values)
            self._expose()

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self._live is None:
                self._store(key_states, value_states)
                return self.keys, self.values
            new_length = self._length + key_states.shape[2]
            if new_length > self._live[0].shape[2] or key_states.shape[0] != self._live[0].shape[0]:
                # Out of room (more tokens than announced): grow like the default cache would.
                self._store(torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2))
                return self.keys, self.values
            self._live[0][:, :, self._length:new_length].copy_(key_states)
            self._live[1][:, :, self._length:new_length].copy_(value_states)
            self._length = new_length
            self._expose()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._length if self.is_initialized else 0

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self._length == 0 or self._live is None:
                return
            beam_idx = beam_idx.to(self._live[0].device)
            if self._spare is None or self._spare[0].shape != self._live[0].shape:
                self._spare = self._allocate(*self._live, self._live[0].shape[2])
            n = self._length
            for live, spare in zip(self._live, self._spare, strict=True):
                torch.index_select(live[:, :, :n], 0, beam_idx, out=spare[:, :, :n])
            self._live, self._spare = self._spare, self._live
            self._expose()

        def copy_rows(self, src: list[int], dst: list[int], start: int = 0) -> None:
            """Rows `dst` become copies of rows `src` (disjoint sets) from position `start` on (before it the
            rows already agree: the prompt, shared by a prompt's beams). `beam_search` moves only the rows
            of beams that changed parent."""
            n = self._length
            for s, d in zip(src, dst, strict=True):
                for buffer in self._live:  # row by row: index_select on these strided views is far slower
                    buffer[d, :, start:n].copy_(buffer[s, :, start:n])

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError(f"crop takes a negative number of tokens to remove; got {tokens_to_remove}")
            if tokens_to_remove == 0 or self._live is None:
                return
            self._length = max(self._length + tokens_to_remove, 0)
            self._expose()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.get_seq_length() > 0:
                self._store(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0))

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if self.get_seq_length() > 0:
                self._store(self.keys[indices, ...], self.values[indices, ...])

        def reset(self) -> None:
            self._length, self._live, self._spare = 0, None, None
            super().reset()

    class BeamSearchCache(DynamicCache):
        """A DynamicCache whose layers are `BeamSearchLayer`s sized for `extra_tokens` new tokens."""

        def __init__(self, num_layers: int, extra_tokens: int):
            Cache.__init__(self, layers=[BeamSearchLayer(extra_tokens) for _ in range(num_layers)])


def make_beam_cache(model, max_new_tokens: int) -> BeamSearchCache | None:
    """A fresh `BeamSearchCache` for one `generate` call on `model`, or None to use transformers' default.

    None when the cache layer API is missing, or the model is not a plain full-attention decoder
    (encoder-decoder, sliding/chunked/linear attention layers, its own `_reorder_cache`), or its
    generation config names a cache of its own (generate refuses a cache object next to that).
    """
    if not layer_api_available():
        return None
    config = model.config
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text_config, "layer_types", None)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", None)
    plain = (
        not getattr(config, "is_encoder_decoder", False)
        and not getattr(text_config, "add_cross_attention", False)
        and getattr(text_config, "sliding_window", None) is None
        and getattr(text_config, "attention_chunk_size", None) is None
        and (layer_types is None or all(t == "full_attention" for t in layer_types))
        and getattr(text_config, "kv_sharing_modes", None) is None
        and isinstance(num_layers, int) and num_layers > 0
        and not hasattr(model, "_reorder_cache")
        and (supports_dynamic is None or supports_dynamic())
        and getattr(getattr(model, "generation_config", None), "cache_implementation", None) is None
    )
    if not plain:
        logger.debug("beam cache: %s is not a plain full-attention decoder; using the default cache",
                     type(model).__name__)
        return None
    return BeamSearchCache(num_layers, max_new_tokens)
