"""Keep transformers' per-load progress bars, open_clip's note on the random init we overwrite, and diffusers'
note on casting models without float32 modules, out of the hosts' consoles and the trainers' output.

transformers 5 draws a "Loading weights" bar for every `from_pretrained`, so each model a node or a
script loads adds a bar to ComfyUI's or the webui's log although the load takes a fraction of a second.
Downloads happen earlier (`weights.resolve`), so nothing worth watching is hidden.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off for the block, then back to what they were (the host's choice)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class _RandomInitNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")


@contextmanager
def no_random_init_note() -> Iterator[None]:
    """Drop open_clip's "No pretrained weights loaded for model '...'. Model initialized randomly." for the block.

    open_clip logs it (on the root logger) whenever `create_model` gets no `pretrained` tag, which is how we build
    every architecture before loading its real weights strictly ourselves: for our users it is only alarming."""
    note = _RandomInitNote()
    root = logging.getLogger()
    root.addFilter(note)
    try:
        yield
    finally:
        root.removeFilter(note)


class _Fp32CastNote(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32" not in record.getMessage()


# The diffusers logger that emits it (diffusers' loggers do not propagate to the root logger).
_FP32_CAST_LOGGER = "diffusers.models.modeling_utils"


@contextmanager
def no_fp32_cast_note() -> Iterator[None]:
    """Drop diffusers' "There are modules in UNet2DConditionModel that should be kept in float32: []. Casting
    directly with `to()` ..." for the block.

    diffusers logs it on every `model.to(dtype)`, which its own single-file loader does for each component (and
    we do around an SDXL VAE's float32 encode), even when the list of such modules is empty: nothing the user
    can or should act on."""
    note = _Fp32CastNote()
    emitter = logging.getLogger(_FP32_CAST_LOGGER)
    emitter.addFilter(note)
    try:
        yield
    finally:
        emitter.removeFilter(note)
