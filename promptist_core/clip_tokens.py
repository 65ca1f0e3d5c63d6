"""CLIP's 77-token window: count a prompt's CLIP tokens and trim it at a comma boundary.

Stable Diffusion's text encoder sees 77 tokens including start and end, so 75 for the prompt;
beyond that A1111 and ComfyUI split into chunks, which weakens the tail. The optimizer reports the
count and can trim whole comma-separated modifiers from the end. Uses open_clip's bundled BPE
vocabulary (the same as CLIP's), so it works offline.
"""

from __future__ import annotations

from functools import lru_cache

CLIP_CONTEXT = 77
CLIP_PROMPT_TOKENS = CLIP_CONTEXT - 2  # start and end tokens


@lru_cache(maxsize=1)
def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def count_clip_tokens(text: str) -> int:
    """Number of CLIP BPE tokens in `text`, without the start/end tokens."""
    return len(_tokenizer().encode(text))


def trim_to_clip(text: str, max_tokens: int = CLIP_PROMPT_TOKENS) -> str:
    """Drop trailing comma-separated parts until `text` fits in `max_tokens` CLIP tokens.

    The first part (the subject) is never dropped; if it alone is too long it is cut at a word.
    """
    if count_clip_tokens(text) <= max_tokens:
        return text
    parts = [p.strip() for p in text.split(",")]
    kept = parts[:1]
    for part in parts[1:]:
        candidate = ", ".join(kept + [part])
        if count_clip_tokens(candidate) > max_tokens:
            break
        kept.append(part)
    result = ", ".join(p for p in kept if p)
    words = result.split()
    while len(words) > 1 and count_clip_tokens(" ".join(words)) > max_tokens:
        words.pop()
    return " ".join(words)
