"""Keep transformers' per-load progress bars, and open_clip's note on the random init we overwrite, out of the
hosts' consoles.

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
