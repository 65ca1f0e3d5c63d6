"""No n-gram twice in a rewrite: the constraint that keeps a small policy out of loops.

A policy that has learned the corpus's modifiers but not when to stop writes "by wes anderson, by wes
anderson, by wes anderson, ..." until the token limit. Banning, at every step, each token that would
complete an n-gram the rewrite already holds (transformers' `no_repeat_ngram_size`, applied to the new
tokens only: the user's prompt, which the policy may be made to copy, never bans anything) stops the loop
where it starts and sends the search to the next most likely modifier. One function serves our beam and
diverse searches; `RepeatedNgramBlocker` is the same rule as a logits processor for `generate`.
"""

from __future__ import annotations

import torch


def ban_repeated_ngrams(generated: torch.Tensor, scores: torch.Tensor, size: int) -> torch.Tensor:
    """`scores` [rows, vocab] with -inf where a token would repeat an n-gram of `generated` [rows, length].

    For each row, the last `size - 1` generated tokens are looked up among the row's earlier (size-1)-grams;
    every token that followed one of them is banned. Returns `scores` itself when nothing is banned, else a
    copy (the input may be a view that cannot be written)."""
    rows, length = generated.shape
    if size < 1 or length < size:
        return scores
    sequences = generated.tolist()
    banned_rows: list[int] = []
    banned_tokens: list[int] = []
    for row, tokens in enumerate(sequences):
        tail = tokens[length - size + 1:] if size > 1 else []
        for start in range(length - size + 1):
            if tokens[start:start + size - 1] == tail:
                banned_rows.append(row)
                banned_tokens.append(tokens[start + size - 1])
    if not banned_rows:
        return scores
    scores = scores.clone()
    scores[banned_rows, banned_tokens] = -float("inf")
    return scores


class RepeatedNgramBlocker:
    """`ban_repeated_ngrams` as a transformers logits processor (same signature in 4.x and 5.x), on the
    tokens after the first `prompt_length` (the left-padded input every row shares)."""

    def __init__(self, size: int, prompt_length: int):
        self.size, self.prompt_length = size, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return ban_repeated_ngrams(input_ids[:, self.prompt_length:], scores, self.size)
