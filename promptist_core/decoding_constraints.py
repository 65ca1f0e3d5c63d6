"""Constraints on what a policy writes: no n-gram twice, and no stop before a few modifiers.

A policy that has learned the corpus's modifiers but not when to stop writes "by wes anderson, by wes
anderson, ..." until the token limit, or stops after one word. Two rules, applied at every step to the
tokens the policy wrote so far (never to the user's prompt, which it may be made to copy):
- `no_repeat_ngram_size` n: each token that would complete an n-gram the rewrite already holds is banned
  (transformers' `no_repeat_ngram_size`, on the new tokens only), so a loop ends where it starts and the
  search goes to the next most likely modifier;
- `min_modifiers` k: the end-of-text token is banned until the rewrite holds k commas (with a kept prompt
  each comma opens a modifier), so a rewrite adds at least k of them.
`WrittenTokenConstraint` applies both to [rows, written] tokens and their [rows, vocab] scores; our beam and
diverse searches call it directly, `ConstraintProcessor` hands it to transformers' `generate`.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def ban_early_end(generated: torch.Tensor, scores: torch.Tensor, eos_token_id: int,
                  separator_ids: frozenset[int], minimum: int) -> torch.Tensor:
    """`scores` with the end token banned in every row of `generated` holding fewer than `minimum` separator
    tokens (commas). Returns `scores` itself when no row is held back, else a copy."""
    if minimum < 1:
        return scores
    held = [row for row, tokens in enumerate(generated.tolist())
            if sum(t in separator_ids for t in tokens) < minimum]
    if not held:
        return scores
    scores = scores.clone()
    scores[held, eos_token_id] = -float("inf")
    return scores


def comma_token_ids(tokenizer) -> frozenset[int]:
    """The tokens whose text holds a comma (GPT-2's BPE has "," and merges like ",\"" or " ,")."""
    vocab = tokenizer.get_vocab()
    return frozenset(i for i in vocab.values() if "," in tokenizer.decode([i]))


@dataclass(frozen=True)
class WrittenTokenConstraint:
    """Both rules, over the written tokens [rows, length] and their next-token scores [rows, vocab]."""

    no_repeat_ngram_size: int = 0
    min_modifiers: int = 0
    eos_token_id: int = -1
    separator_ids: frozenset[int] = frozenset()

    @property
    def active(self) -> bool:
        return self.no_repeat_ngram_size > 0 or self.min_modifiers > 0

    def __call__(self, generated: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = ban_repeated_ngrams(generated, scores, self.no_repeat_ngram_size)
        return ban_early_end(generated, scores, self.eos_token_id, self.separator_ids, self.min_modifiers)


class ConstraintProcessor:
    """A `WrittenTokenConstraint` as a transformers logits processor (same signature in 4.x and 5.x), on the
    tokens after the first `prompt_length` columns (the left-padded input every row shares)."""

    def __init__(self, constraint: WrittenTokenConstraint, prompt_length: int):
        self.constraint, self.prompt_length = constraint, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.constraint(input_ids[:, self.prompt_length:], scores)
