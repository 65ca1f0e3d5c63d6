"""Diverse (group) beam search for causal LMs, as transformers 4.46 ran it.

Why here: transformers 5 dropped `num_beam_groups` / `diversity_penalty` from `generate` (group beam
search moved to a Hub `custom_generate` repo that cannot be loaded offline). Promptist's PPO rollouts
use it (16 groups x 1 beam, diversity_penalty 1.0), so we carry our own copy. It reproduces
`GenerationMixin._group_beam_search` + `BeamSearchScorer` of transformers 4.46 candidate for candidate:

- the beams are split into G groups of `num_beams // G`; at each step the groups choose in order, and
  group g's log-softmax scores get `-diversity_penalty * count(token chosen by groups < g at this step,
  in this batch item)` (HammingDiversityLogitsProcessor; a group that is already done "chooses" the pad
  token, so it penalises the pad id, as 4.46 did);
- each group runs BeamSearchScorer's rules: the top 2 x group_size continuations, an EOS among the
  top group_size becomes a finished hypothesis scored `sum_logprobs / generated_len ** length_penalty`
  (negative `length_penalty` favours short outputs), the rest refill the group's beams;
- a group is done when it holds group_size hypotheses and (early_stopping or no running beam can beat
  the worst of them, judged at the current length); the search stops when all groups are done or after
  `max_new_tokens` steps, and then the running beams of unfinished groups join the hypotheses;
- per prompt, the hypotheses of all groups are sorted by score and the best `num_return_sequences`
  are returned, EOS appended where it fits and right-padded with `pad_token_id`.

Validated against outputs recorded with transformers 4.46.3 (tests/data/record_group_beam_446.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .beam_cache import cache_keyword, make_beam_cache, output_cache
from .beam_search import with_inplace_activations
from .decoding_constraints import WrittenTokenConstraint

StepCallback = Callable[[int, int], None]


@dataclass
class DiverseBeamOutput:
    """What `diverse_beam_search` returns.

    sequences: [batch * num_return_sequences, prompt_len + generated] prompt included, best first per prompt.
    sequence_scores: [batch * num_return_sequences] length-penalised sum of token log-probs of each sequence.
    """

    sequences: torch.LongTensor
    sequence_scores: torch.FloatTensor


class _Hypotheses:
    """Best finished candidates of one (prompt, group): BeamHypotheses of transformers 4.46.

    Scores are Python floats (float64), computed and compared exactly as 4.46 did, so ties and the
    `is_done` heuristic resolve the same way.
    """

    def __init__(self, size: int):
        self.size = size
        self.beams: list[tuple[float, torch.Tensor]] = []
        self.worst_score = 1e9

    def add(self, tokens: torch.Tensor, score: float) -> None:
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                ranked = sorted((s, idx) for idx, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)


def _check_inputs(model, input_ids, attention_mask, num_beams, num_beam_groups, diversity_penalty,
                  max_new_tokens, num_return_sequences, length_penalty) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor [batch, prompt_len] with batch >= 1, got {shape}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has an empty prompt (prompt_len 0); give at least one token")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, "
                         f"input_ids has {tuple(input_ids.shape)}; they must match")
    if not isinstance(num_beams, int) or num_beams < 2:
        raise ValueError(f"num_beams must be an integer >= 2, got {num_beams!r} "
                         "(for one beam use greedy decoding)")
    if not isinstance(num_beam_groups, int) or num_beam_groups < 1:
        raise ValueError(f"num_beam_groups must be an integer >= 1, got {num_beam_groups!r}")
    if num_beams % num_beam_groups:
        raise ValueError(f"num_beams ({num_beams}) must be divisible by num_beam_groups ({num_beam_groups})")
    if not isinstance(num_return_sequences, int) or not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be between 1 and num_beams ({num_beams}), "
                         f"got {num_return_sequences!r}")
    if not diversity_penalty >= 0.0 or diversity_penalty == float("inf"):
        raise ValueError(f"diversity_penalty must be a finite number >= 0, got {diversity_penalty!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not abs(length_penalty) < float("inf"):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    context = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and input_ids.shape[1] + max_new_tokens > context:
        raise ValueError(f"prompt_len ({input_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {context} positions")


def _repeat_cache(cache, times: int):
    """Copy each prompt's KV cache to its beams: a transformers Cache object (4.36+) or legacy tuples (4.30)."""
    if hasattr(cache, "batch_repeat_interleave"):
        cache.batch_repeat_interleave(times)
        return cache
    return tuple(tuple(t.repeat_interleave(times, dim=0) for t in layer) for layer in cache)


def _reorder_cache(cache, index: torch.LongTensor):
    """Rows of the KV cache follow their parent beams (Cache object or legacy tuples)."""
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)


@torch.inference_mode()
@with_inplace_activations
def diverse_beam_search(
    model,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_beams: int,
    num_beam_groups: int,
    diversity_penalty: float,
    max_new_tokens: int,
    num_return_sequences: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool = False,
    eos_token_id: int,
    pad_token_id: int,
    step_callback: StepCallback | None = None,
    constraint: WrittenTokenConstraint | None = None,
) -> DiverseBeamOutput:
    """Group beam search with a Hamming diversity penalty, matching transformers 4.46 `generate`.

    transformers 5 no longer ships `num_beam_groups`/`diversity_penalty` offline, and Promptist's PPO
    rollouts depend on them; this returns the same candidates, in the same order, as 4.46 did.

    Args:
        model: a transformers causal LM (e.g. GPT2LMHeadModel) in eval mode; dropout is not switched off here.
        input_ids: [batch, prompt_len], LEFT-padded.
        attention_mask: [batch, prompt_len], 1 for real tokens, 0 for padding; None means no padding.
        num_beams: total beams per prompt (>= 2).
        num_beam_groups: groups the beams are split into; `num_beams` must be divisible by it.
        diversity_penalty: subtracted from a group's log-probs once per use of a token by earlier groups
            at the same step (0 turns the groups into independent beam searches).
        max_new_tokens: most tokens generated per candidate.
        num_return_sequences: candidates returned per prompt, best first (<= num_beams).
        length_penalty: finished scores are `sum_logprobs / generated_len ** length_penalty`; < 0 favours
            short candidates (Promptist's inference uses -1.0).
        early_stopping: True stops a group as soon as it holds group-size finished candidates; False
            (4.46's default) uses the "no running beam can still win" heuristic.
        eos_token_id: token that ends a candidate.
        pad_token_id: fills finished positions (Promptist pads with eos).
        step_callback: called as `(step, max_new_tokens)` after each generation step (1-based); the
            search may end before `max_new_tokens` steps. An exception raised in it propagates.
        constraint: rules on each candidate's new tokens (`decoding_constraints`; not a 4.46 feature: None
            reproduces 4.46).

    Returns:
        DiverseBeamOutput with `sequences` [batch * num_return_sequences, prompt_len + generated]
        (prompt included, right-padded) and `sequence_scores` [batch * num_return_sequences].

    Example (Promptist's rollout setting):
        >>> out = diverse_beam_search(model, ids, mask, num_beams=16, num_beam_groups=16,
        ...                           diversity_penalty=1.0, max_new_tokens=40, num_return_sequences=16,
        ...                           eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    """
    # 1. check inputs
    _check_inputs(model, input_ids, attention_mask, num_beams, num_beam_groups, diversity_penalty,
                  max_new_tokens, num_return_sequences, length_penalty)

    # 2. sizes and state. Beams are laid out [batch, group, beam-in-group] and flattened to rows.
    device = input_ids.device
    batch_size, prompt_len = input_ids.shape
    group_size = num_beams // num_beam_groups
    max_length = prompt_len + max_new_tokens
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)

    # As 4.46: the first beam of each group starts at 0, the others at -1e9, so a group's beams diverge.
    beam_scores = torch.full((batch_size, num_beams), -1e9, dtype=torch.float, device=device)
    beam_scores[:, ::group_size] = 0.0
    row_offsets = torch.arange(batch_size, device=device).unsqueeze(1) * num_beams  # [B, 1]
    in_group = torch.arange(group_size, device=device)
    done = torch.zeros((batch_size, num_beam_groups), dtype=torch.bool, device=device)
    hypotheses = [[_Hypotheses(group_size) for _ in range(num_beam_groups)] for _ in range(batch_size)]
    n_hyps = torch.zeros((batch_size, num_beam_groups), dtype=torch.long, device=device)
    worst = torch.full((batch_size, num_beam_groups), 1e9, dtype=torch.float64, device=device)

    # 3. prefill: one forward per prompt (not per beam), then copy the cache to every beam.
    position_ids = attention_mask.cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    forward_kwargs = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        forward_kwargs["logits_to_keep"] = 1
    cache = make_beam_cache(model, max_new_tokens)  # preallocated rows: no torch.cat of the cache per step
    prefill_cache = {} if cache is None else {cache_keyword(model): cache}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **forward_kwargs, **prefill_cache)
    cache = _repeat_cache(output_cache(out), num_beams)
    next_logits = out.logits[:, -1, :].float().repeat_interleave(num_beams, dim=0)  # [B*NB, V]
    del out
    sequences = input_ids.repeat_interleave(num_beams, dim=0)  # [B*NB, T]
    beam_mask = attention_mask.repeat_interleave(num_beams, dim=0)
    next_position = attention_mask.sum(-1, keepdim=True).repeat_interleave(num_beams, dim=0)  # [B*NB, 1]
    identity = torch.arange(batch_size * num_beams, device=device)

    # 4. decoding loop
    for step in range(max_new_tokens):
        log_probs = torch.log_softmax(next_logits, dim=-1)
        if constraint is not None and constraint.active:
            log_probs = constraint(sequences[:, prompt_len:], log_probs)
        vocab_size = log_probs.shape[-1]
        log_probs = log_probs.view(batch_size, num_beam_groups, group_size, vocab_size)

        tokens = torch.zeros((batch_size, num_beams), dtype=torch.long, device=device)  # chosen this step
        source = torch.zeros((batch_size, num_beams), dtype=torch.long, device=device)  # parent beam
        token_counts = torch.zeros((batch_size, vocab_size), dtype=torch.long, device=device)
        eos_hit = torch.zeros((batch_size, num_beam_groups, group_size), dtype=torch.bool, device=device)
        eos_scores = torch.zeros((batch_size, num_beam_groups, group_size), dtype=torch.float, device=device)
        eos_source = torch.zeros((batch_size, num_beam_groups, group_size), dtype=torch.long, device=device)
        best_scores = torch.zeros((batch_size, num_beam_groups), dtype=torch.float, device=device)

        # 4a. groups choose in order; each sees the tokens earlier groups chose at this step
        for group in range(num_beam_groups):
            start, end = group * group_size, (group + 1) * group_size
            group_log_probs = log_probs[:, group]  # [B, GS, V]
            if group > 0 and diversity_penalty > 0.0:
                group_log_probs = group_log_probs - diversity_penalty * token_counts.unsqueeze(1)
            candidates = (group_log_probs + beam_scores[:, start:end, None]).view(batch_size, -1)
            top_scores, top_ids = torch.topk(candidates, 2 * group_size, dim=1, largest=True, sorted=True)
            top_beams = torch.div(top_ids, vocab_size, rounding_mode="floor")
            top_tokens = top_ids % vocab_size
            is_eos = top_tokens == eos_token_id

            # Running beams: the best group_size candidates that are not EOS, in rank order.
            keep = torch.argsort(is_eos.to(torch.int8), dim=1, stable=True)[:, :group_size]
            group_done = done[:, group].unsqueeze(1)  # a done group runs on with pad tokens and score 0
            beam_scores[:, start:end] = torch.where(group_done, 0.0, top_scores.gather(1, keep))
            tokens[:, start:end] = torch.where(group_done, pad_token_id, top_tokens.gather(1, keep))
            source[:, start:end] = start + torch.where(group_done, in_group, top_beams.gather(1, keep))
            token_counts.scatter_add_(1, tokens[:, start:end], torch.ones_like(tokens[:, start:end]))

            # Finished candidates: an EOS ranked within the top group_size.
            eos_hit[:, group] = is_eos[:, :group_size] & ~group_done
            eos_scores[:, group] = top_scores[:, :group_size]
            eos_source[:, group] = start + top_beams[:, :group_size]
            best_scores[:, group] = top_scores[:, 0]

        # 4b. store finished candidates (Python floats, in 4.46's order: prompt, group, rank)
        generated_len = step + 1
        length_divisor = float(generated_len) ** length_penalty
        if bool(eos_hit.any()):
            hits = eos_hit.nonzero().tolist()
            hit_scores = eos_scores[eos_hit].tolist()
            hit_rows = (row_offsets.unsqueeze(-1) + eos_source)[eos_hit].tolist()
            touched: dict[tuple[int, int], _Hypotheses] = {}
            for (b, g, _), score, row in zip(hits, hit_scores, hit_rows, strict=True):
                touched[b, g] = hypotheses[b][g]
                touched[b, g].add(sequences[row].clone(), score / length_divisor)
            at = torch.tensor(list(touched), dtype=torch.long, device=device).unbind(1)
            n_hyps[at] = torch.tensor([len(h.beams) for h in touched.values()], dtype=torch.long, device=device)
            worst[at] = torch.tensor([h.worst_score for h in touched.values()], dtype=torch.float64, device=device)

        # 4c. move beams to their parents, append the chosen tokens
        reorder = (row_offsets + source).view(-1)
        sequences = torch.cat([sequences.index_select(0, reorder), tokens.view(-1, 1)], dim=-1)

        # 4d. which groups are done (BeamHypotheses.is_done, evaluated at the new length)
        full = n_hyps >= group_size
        if early_stopping:
            newly_done = full
        else:
            newly_done = full & (worst >= best_scores.double() / length_divisor)
        done |= newly_done

        if step_callback is not None:
            step_callback(step + 1, max_new_tokens)
        if bool(done.all()) or step + 1 == max_new_tokens:
            break

        # 4e. one forward for the chosen tokens of all beams, on the cache reordered to their parents
        if not bool((reorder == identity).all()):  # 1-beam groups (PPO's rollouts) never move
            cache = _reorder_cache(cache, reorder)  # one index_select per layer, all groups at once
        beam_mask = torch.cat([beam_mask, beam_mask.new_ones((beam_mask.shape[0], 1))], dim=-1)
        out = model(input_ids=tokens.view(-1, 1), attention_mask=beam_mask, position_ids=next_position,
                    use_cache=True, **{cache_keyword(model): cache}, **forward_kwargs)
        cache = output_cache(out)
        next_logits = out.logits[:, -1, :].float()
        del out
        next_position = next_position + 1

    # 5. finalize: running beams of unfinished groups become candidates at the final length
    final_len = sequences.shape[1]
    length_divisor = float(final_len - prompt_len) ** length_penalty
    done_list = done.tolist()
    final_scores = beam_scores.tolist()
    for b in range(batch_size):
        for g in range(num_beam_groups):
            if done_list[b][g]:
                continue
            for j in range(g * group_size, (g + 1) * group_size):
                hypotheses[b][g].add(sequences[b * num_beams + j], final_scores[b][j] / length_divisor)

    # 6. per prompt: best num_return_sequences over all groups (4.46: stable sort, then pop from the end)
    best: list[torch.Tensor] = []
    best_scores_out: list[float] = []
    for b in range(batch_size):
        pool = [beam for hyps in hypotheses[b] for beam in hyps.beams]
        ranked = sorted(pool, key=lambda beam: beam[0])
        for _ in range(num_return_sequences):
            score, seq = ranked.pop()
            best.append(seq)
            best_scores_out.append(score)

    # 7. pad to a common width; append EOS where it fits (finished candidates are stored without it)
    lengths = [len(seq) for seq in best]
    width = min(max(lengths) + 1, max_length)
    out_sequences = torch.full((len(best), width), pad_token_id, dtype=input_ids.dtype, device=device)
    for i, seq in enumerate(best):
        out_sequences[i, : lengths[i]] = seq
        if lengths[i] < width:
            out_sequences[i, lengths[i]] = eos_token_id
    out_scores = torch.tensor(best_scores_out, dtype=torch.float32, device=device)
    return DiverseBeamOutput(sequences=out_sequences, sequence_scores=out_scores)
