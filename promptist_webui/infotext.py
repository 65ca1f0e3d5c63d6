"""The scripts' titles and the infotext keys they write; PNG Info / "Send to" puts the user's prompt back."""

from __future__ import annotations

import re

TITLE = "Promptist"
SCORE_TITLE = "Promptist score"
# LoRA / hypernetwork / extra-network tags pass through untouched: the policy never saw them (nor DF blocks).
EXTRA_NETWORK_TAG = re.compile(r"<[^<>]+>")
INFOTEXT_ORIGINAL = "Promptist original"
INFOTEXT_MODE = "Promptist mode"
INFOTEXT_DFPROMPT = "DF-Prompt"
INFOTEXT_SCORE = "Promptist score"
INFOTEXT_TERMS = "Promptist score terms"
INFOTEXT_PRESET = "Promptist score preset"
INFOTEXT_BEST_OF = "Promptist best of"


def restore_original_prompt(params: dict) -> None:
    """PNG Info / "Send to": put the user's own prompt back, so Generate reproduces the image.

    The infotext's Prompt is the rewrite (and DF blocks rendered to prompt editing); with "Optimize"
    ticked again from `Promptist mode`, the rewrite itself would be rewritten.
    """
    for key in (INFOTEXT_ORIGINAL, INFOTEXT_DFPROMPT):
        if isinstance(params.get(key), str) and params[key].strip():
            params["Prompt"] = params[key]
            return


def on_infotext_pasted(infotext: str, params: dict) -> None:
    """The webui's `on_infotext_pasted` callback."""
    restore_original_prompt(params)
