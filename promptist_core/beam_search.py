"""Beam search for the optimizer, with the candidates of transformers 5's `generate(num_beams=...)`.

Why our own loop: at batch 16 x 8 beams on a CPU, `generate` spends more time moving the KV cache than
multiplying matrices. It reorders every row of the cache at every step (an `index_select` of the whole
cache, ~800 MB per step at 75 new tokens for GPT-2 small), it runs the prompt through the model once per
beam, and a batch keeps running all its prompts until the slowest one is done. This loop makes the same
choices with less work:

- the prompt is run once per prompt, and its cache copied to the beams;
- beams live in fixed cache rows ("slots"): a beam's first child stays in its parent's row, and only
  the extra children of a parent are copied, into the rows of beams that had no child;
- a prompt whose result is settled (transformers' early-stop heuristic, which freezes its finished
  candidates) leaves the batch.

The selection itself is transformers 5's `GenerationMixin._beam_search` step for step (top 2 x num_beams
continuations, EOS candidates among the top num_beams become finished candidates scored
`sum_logprobs / generated_len ** length_penalty`, the "can a running beam still win" heuristic, the same
tensors in the same dtypes), so the candidates come out the same, in the same order; the tests and
`bench/optimizer.py` check that against `generate`. Used for plain decoder LMs on transformers' cache-layer
API (see `beam_cache.make_beam_cache`) with no logits processors configured; anything else goes to
`generate` (see `fast_beam_search_supported`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator

import torch

from .beam_cache import cache_keyword, make_beam_cache, output_cache
from .decoding_constraints import WrittenTokenConstraint

StepCallback = Callable[[int, int], None]

# generation_config fields whose non-default values make `generate` add logits processors or change the
# search; a model that sets any of them is left to `generate`.
_PLAIN_DEFAULTS = {
    "repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "exponential_decay_length_penalty": (None,), "renormalize_logits": (None, False),
    "remove_invalid_values": (None, False), "guidance_scale": (None, 1.0), "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0), "diversity_penalty": (None, 0.0), "num_beam_groups": (None, 1),
    "constraints": (None,), "force_words_ids": (None,), "early_stopping": (None, False),
    "max_time": (None,), "stop_strings": (None,), "watermarking_config": (None,), "low_memory": (None, False),
}


def fast_beam_search_supported(model) -> bool:
    """True when `beam_search` reproduces `model.generate`: a plain decoder on transformers' cache-layer API
    (`make_beam_cache` answers) whose generation config adds no logits processor."""
    if make_beam_cache(model, 1) is None:
        return False
    config = getattr(model, "generation_config", None)
    for name, plain in _PLAIN_DEFAULTS.items():
        value = getattr(config, name, None)
        if value not in plain:
            return False
    return "logits_to_keep" in inspect.signature(model.forward).parameters


class InPlaceNewGELU(torch.nn.Module):
    """transformers' `NewGELUActivation` (GPT-2's gelu_new), the same float operations in the same order but
    written in place: the same bits, without six fresh [rows, 4 x width] tensors per call (at batch 16 x 8
    beams on a CPU those allocations cost GPT-2 small ~8% of a decoding step). Inference only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 0.5 * x * (1.0 + tanh(sqrt(2 / pi) * (x + 0.044715 * x ** 3)))
        inner = torch.pow(x, 3.0).mul_(0.044715).add_(x).mul_(math.sqrt(2.0 / math.pi)).tanh_().add_(1.0)
        return (0.5 * x).mul_(inner)


@contextlib.contextmanager
def inplace_activations(model: torch.nn.Module) -> Iterator[None]:
    """Swap the model's `NewGELUActivation` modules for `InPlaceNewGELU` during a search, then put them back."""
    swapped = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__ == "NewGELUActivation" and type(child).__module__.startswith("transformers."):
                swapped.append((parent, name, child))
    try:
        for parent, name, _ in swapped:
            setattr(parent, name, InPlaceNewGELU())
        yield
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)


def with_inplace_activations(search: Callable) -> Callable:
    """Run `search(model, ...)` inside `inplace_activations(model)`."""
    @functools.wraps(search)
    def run(model, *args, **kwargs):
        with inplace_activations(model):
            return search(model, *args, **kwargs)
    return run


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` [A, K] of `tensor` [A, N, ...] per item (transformers' `_gather_beams`)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _assign_slots(slot_of: list[list[int]], parents: list[list[int]]) -> tuple[list[list[int]], list[int], list[int]]:
    """Cache rows for the next beams. A parent's first child keeps the parent's row; its other children get
    the rows of parents without children, which receive a copy of the parent's row (src -> dst)."""
    new_slots, src, dst = [], [], []
    for rows, item_parents in zip(slot_of, parents, strict=True):
        taken = [False] * len(rows)
        for p in item_parents:
            taken[p] = True
        free = [rows[p] for p in range(len(rows)) if not taken[p]]
        first = [True] * len(rows)
        slots = []
        for p in item_parents:
            if first[p]:
                first[p] = False
                slots.append(rows[p])
            else:
                slot = free.pop()
                slots.append(slot)
                src.append(rows[p])
                dst.append(slot)
        new_slots.append(slots)
    return new_slots, src, dst


@torch.inference_mode()
@with_inplace_activations
def beam_search(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    eos_token_id: int,
    pad_token_id: int,
    step_callback: StepCallback | None = None,
    constraint: WrittenTokenConstraint | None = None,
) -> torch.LongTensor:
    """Beam search as `model.generate(num_beams=..., do_sample=False, early_stopping=False)` runs it.

    Args:
        model: a plain causal LM for which `fast_beam_search_supported(model)` is True.
        input_ids: [batch, prompt_len], LEFT-padded; attention_mask: 1 for real tokens (None: no padding).
        num_beams, max_new_tokens, num_return_sequences, length_penalty, eos_token_id, pad_token_id: as in
            `generate`.
        step_callback: called as `(step, max_new_tokens)` after each step; the search may end earlier.
        constraint: rules on each candidate's new tokens (`decoding_constraints`: no n-gram twice, no end
            before k modifiers), applied to the log-probs as generate applies logits processors; None, the
            reference, bans nothing.

    Returns:
        [batch * num_return_sequences, prompt_len + max_new_tokens]: the prompt, then each candidate (best
        first per prompt), padded with `pad_token_id` after its EOS.
    """
    # 1. sizes and state; the state tensors hold the prompts still searching ("alive"), [A, beams, ...]
    device = input_ids.device
    batch_size, prompt_len = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    nb, keep = num_beams, 2 * num_beams
    top_num_beam_mask = torch.cat([torch.ones(nb, dtype=torch.bool), torch.zeros(keep - nb, dtype=torch.bool)]).to(device)

    alive = torch.arange(batch_size, device=device)  # original index of each alive prompt
    running_sequences = torch.full((batch_size, nb, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    sequences = running_sequences.clone()
    running_beam_scores = torch.zeros((batch_size, nb), dtype=torch.float, device=device)
    running_beam_scores[:, 1:] = -1e9
    beam_scores = torch.full((batch_size, nb), -1e9, dtype=torch.float, device=device)
    is_sent_finished = torch.zeros((batch_size, nb), dtype=torch.bool, device=device)
    unsatisfied = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
    results: dict[int, torch.Tensor] = {}

    # 2. prefill once per prompt, then give every beam its prompt's cache (beam b of prompt i: row i * nb + b)
    position_ids = attention_mask.cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    cache = make_beam_cache(model, max_new_tokens)
    cache_kw = cache_keyword(model)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
                logits_to_keep=1, **{cache_kw: cache})
    cache = output_cache(out)
    cache.batch_repeat_interleave(nb)
    log_probs = torch.log_softmax(out.logits[:, -1, :].to(dtype=torch.float32), dim=-1)
    log_probs = log_probs.unsqueeze(1).expand(-1, nb, -1)  # [A, nb, V], every beam starts from the prompt
    del out
    row_mask = attention_mask.repeat_interleave(nb, dim=0)
    next_position = attention_mask.sum(-1).repeat_interleave(nb).unsqueeze(-1)
    slot_of = torch.arange(batch_size * nb, device=device).view(batch_size, nb)

    for step in range(max_new_tokens):
        # 3. the top 2 x beams continuations of each prompt over all its beams (transformers' order)
        vocab_size = log_probs.shape[-1]
        if constraint is not None and constraint.active:
            log_probs = constraint(running_sequences[:, :, :step].reshape(len(alive) * nb, step),
                                   log_probs.reshape(-1, vocab_size)).view(len(alive), nb, vocab_size)
        accumulated = (log_probs + running_beam_scores[:, :, None]).reshape(len(alive), -1)
        topk_log_probs, topk_indices = torch.topk(accumulated, k=keep)
        topk_parents = topk_indices // vocab_size
        topk_ids = topk_indices % vocab_size
        topk_sequences = _gather(running_sequences, topk_parents)
        topk_sequences[:, :, step] = topk_ids
        hits = (topk_ids == eos_token_id) | (step + 1 >= max_new_tokens)

        # 4. running beams for the next step: the best num_beams continuations that did not just finish
        running_log_probs = topk_log_probs + hits.to(torch.float32) * -1.0e9
        next_topk = torch.topk(running_log_probs, k=nb)[1]
        running_sequences = _gather(topk_sequences, next_topk)
        running_beam_scores = _gather(running_log_probs, next_topk)
        parents = _gather(topk_parents, next_topk)

        # 5. finished candidates: EOS (or the length limit) within the top num_beams, length-penalised
        just_finished = hits & top_num_beam_mask[None, :]
        finished_scores = topk_log_probs / ((step + 1) ** length_penalty)
        finished_scores += (~unsatisfied).to(torch.float32) * -1.0e9
        finished_scores += (~just_finished) * -1.0e9
        merged_scores = torch.cat((beam_scores, finished_scores), dim=1)
        best = torch.topk(merged_scores, k=nb)[1]
        sequences = _gather(torch.cat((sequences, topk_sequences), dim=1), best)
        beam_scores = _gather(merged_scores, best)
        is_sent_finished = _gather(torch.cat((is_sent_finished, just_finished), dim=1), best)

        # 6. can a running beam still beat the worst finished candidate? (transformers' heuristic)
        best_running = running_beam_scores[:, :1] / ((step + 1) ** length_penalty)
        worst_finished = torch.where(is_sent_finished, torch.min(beam_scores, dim=1, keepdim=True)[0], -1.0e9)
        unsatisfied = unsatisfied & torch.any(best_running > worst_finished, dim=-1, keepdim=True)

        if step_callback is not None:
            step_callback(step + 1, max_new_tokens)
        if step + 1 == max_new_tokens or not bool(unsatisfied.any()):
            break

        # 7. settled prompts leave the batch (their finished candidates can no longer change)
        settled = ~unsatisfied[:, 0]
        if bool(settled.any()):
            for i in settled.nonzero()[:, 0].tolist():
                results[int(alive[i])] = sequences[i, :num_return_sequences]
            stay = (~settled).nonzero()[:, 0]
            rows = slot_of[stay].reshape(-1)
            remap = torch.empty(row_mask.shape[0], dtype=torch.long, device=device)
            remap[rows] = torch.arange(len(rows), device=device)
            cache.batch_select_indices(rows)
            row_mask, next_position = row_mask[rows], next_position[rows]
            alive, slot_of = alive[stay], remap[slot_of[stay]]
            running_sequences, running_beam_scores = running_sequences[stay], running_beam_scores[stay]
            sequences, beam_scores, is_sent_finished = sequences[stay], beam_scores[stay], is_sent_finished[stay]
            unsatisfied, parents = unsatisfied[stay], parents[stay]

        # 8. beams into cache rows (copy only the rows of parents with several children), one forward
        new_slots, src, dst = _assign_slots(slot_of.tolist(), parents.tolist())
        slot_of = torch.tensor(new_slots, dtype=torch.long, device=device)
        for layer in cache.layers:  # a prompt's beams share its prompt positions: copy the generated ones
            layer.copy_rows(src, dst, start=prompt_len)
        tokens = torch.empty(row_mask.shape[0], dtype=torch.long, device=device)
        tokens[slot_of.view(-1)] = running_sequences[:, :, step].reshape(-1)
        row_mask = torch.cat([row_mask, row_mask.new_ones((row_mask.shape[0], 1))], dim=-1)
        out = model(input_ids=tokens.unsqueeze(-1), attention_mask=row_mask, position_ids=next_position,
                    use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        cache = output_cache(out)
        logits = out.logits[:, -1, :].to(dtype=torch.float32)
        del out
        next_position = next_position + 1
        log_probs = torch.log_softmax(logits, dim=-1)[slot_of.view(-1)].view(len(alive), nb, -1)

    # 9. every prompt's best candidates, the prompt in front (left padding kept), in input order
    for i, index in enumerate(alive.tolist()):
        results[index] = sequences[i, :num_return_sequences]
    generated = torch.cat([results[i] for i in range(batch_size)], dim=0)
    prompts = input_ids.repeat_interleave(num_return_sequences, dim=0)
    return torch.cat([prompts, generated], dim=-1)
