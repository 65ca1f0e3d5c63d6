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

Built on the `transformers.cache_utils` layer API, which changed under us: transformers 5 marks a layer
with `is_initialized` and calls `lazy_initialization(keys, values)`; 4.56 (Forge Neo's pin) tests
`keys is None` and calls `lazy_initialization(keys)`; 4.30 (A1111 1.10's pin) has no layers at all. The
layer here answers both call forms, and `layer_api_available` runs it once against the installed
`DynamicLayer` (a capability test, no version strings). `make_beam_cache` returns None (use transformers'
default) when that test fails, or when the model's cache is not plain full attention (sliding windows,
encoder-decoder, custom reorder).
"""

from __future__ import annotations

import functools
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


@functools.cache
def layer_api_available() -> bool:
    """True when transformers has the per-layer cache API this module builds on and `BeamSearchCache` holds,
    through the installed `Cache`, what the installed `DynamicLayer` holds (a capability test, run once)."""
    if DynamicLayer is None or DynamicCache is None:
        return False
    needed = ("update", "reorder_cache", "get_seq_length", "lazy_initialization", "crop",
              "batch_repeat_interleave", "batch_select_indices", "reset")
    if not all(callable(getattr(DynamicLayer, name, None)) for name in needed):
        return False
    try:
        if "layers" not in inspect.signature(Cache.__init__).parameters:
            return False
        return _behaves_like_the_default_cache()
    except Exception as e:  # noqa: BLE001 - any failure of the probe means: use transformers' default cache
        logger.debug("beam cache: this transformers' cache layers do not fit (%s: %s); using the default cache",
                     type(e).__name__, e)
        return False


def _behaves_like_the_default_cache() -> bool:
    """Updates, a beam reorder, a repeat and a select through `Cache.update` on one BeamSearchCache layer and
    on a plain DynamicLayer: True when both hold the same keys and values after each."""
    g = torch.Generator().manual_seed(0)
    ours, default = BeamSearchCache(num_layers=1, extra_tokens=2), DynamicLayer()
    for rows, length in ((2, 3), (2, 1)):
        k, v = torch.randn(rows, 1, length, 2, generator=g), torch.randn(rows, 1, length, 2, generator=g)
        got, want = ours.update(k, v, 0), default.update(k, v)
        if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
            return False
    ours.reorder_cache(torch.tensor([1, 1]))
    default.reorder_cache(torch.tensor([1, 1]))
    ours.batch_repeat_interleave(2)
    default.batch_repeat_interleave(2)
    ours.batch_select_indices(torch.tensor([0, 3]))
    default.batch_select_indices(torch.tensor([0, 3]))
    layer = ours.layers[0]
    return (ours.get_seq_length() == default.get_seq_length() == 4
            and torch.equal(layer.keys, default.keys) and torch.equal(layer.values, default.values))


if DynamicLayer is not None:
    _CROP_TAKES_A_LENGTH = "max_length" in inspect.signature(DynamicLayer.crop).parameters

    class BeamSearchLayer(DynamicLayer):
        """One layer's keys and values in preallocated, double-buffered storage (see the module docstring)."""

        def __init__(self, extra_tokens: int = 0):
            super().__init__()
            self.is_initialized = False  # transformers 5 sets it in the base class; 4.56 has no such flag
            self.extra_tokens = int(extra_tokens)
            self._length = 0
            self._live: tuple[torch.Tensor, torch.Tensor] | None = None  # (keys, values) buffers in use
            self._spare: tuple[torch.Tensor, torch.Tensor] | None = None  # reorder target, then swapped in

        def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
            # transformers 5 passes (keys, values), 4.56 passes keys only
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
            # transformers 4.56 also takes a positive argument, as the length to keep; 5 refuses it
            if tokens_to_remove > 0 and not _CROP_TAKES_A_LENGTH:
                raise ValueError(f"crop takes a negative number of tokens to remove; got {tokens_to_remove}")
            if tokens_to_remove == 0 or self._live is None:
                return
            if tokens_to_remove > 0:
                self._length = min(self._length, tokens_to_remove)
            else:
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
            self.keys = self.values = None
            self.is_initialized = False
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
