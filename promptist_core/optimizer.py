"""Promptist prompt optimizer: a GPT-2 policy rewrites a plain prompt into a model-preferred one.

The reference recipe (Hao et al., "Optimizing Prompts for Text-to-Image Generation", NeurIPS 2023,
`microsoft/Promptist`) is the default, argument for argument: input `x.strip() + " Rephrase:"`,
8 beams, 75 new tokens, length_penalty -1.0, greedy beams, the top beam. On top of it: batches,
several candidates per prompt, diverse (group) beam search, seeded sampling, and CLIP's 77-token
guard. Example (runs on any GPT-2 folder):

    >>> from promptist_core.optimizer import load_optimizer
    >>> optimizer = load_optimizer("microsoft/Promptist")          # or a local folder
    >>> optimizer("a cat riding a bike")[0].prompt
    'a cat riding a bike, highly detailed, digital painting, artstation, sharp focus, ...'
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .beam_search import beam_search, fast_beam_search_supported
from .clip_tokens import CLIP_PROMPT_TOKENS, count_clip_tokens, trim_to_clip
from .decoding_constraints import ConstraintProcessor, WrittenTokenConstraint, comma_token_ids
from .devices import pick_device, pick_dtype
from .fingerprint import contents_fingerprint
from .policy_folder import DecodingDefaults, read_decoding_defaults
from .quiet import no_progress_bars
from .weights import choose_default_policy, load_tokenizer, reading_weights, resolve, resolve_tokenizer

logger = logging.getLogger(__name__)

REPHRASE_SUFFIX = " Rephrase:"
MODES = ("beam", "diverse", "sample")
# A prompt longer than this many characters is refused outright (it is not a prompt any more).
MAX_PROMPT_CHARS = 20_000
# Upper bounds for the sizes a user can type: beyond them a call would run for hours or exhaust memory
# (sequences per generate call = batch_size x num_beams). Each is far above any useful setting.
MAX_CANDIDATES = 64
MAX_BEAMS = 64
MAX_NEW_TOKENS = 512
MAX_BATCH_SIZE = 256
MAX_SEED = 2**64 - 1  # torch.manual_seed's range
MAX_NGRAM = 16
MAX_MIN_MODIFIERS = 16

StepCallback = Callable[[int, int], None]


class PromptError(ValueError):
    """A prompt the optimizer cannot work with (empty, not text, absurdly long)."""


@dataclass
class OptimizedPrompt:
    """The rewrite of one input prompt."""

    source: str  # the user's prompt, stripped
    prompt: str  # the best candidate (after the optional CLIP trim)
    candidates: list[str]  # best first
    clip_tokens: int  # CLIP tokens of `prompt` (the window holds 75)
    trimmed: bool = False  # `prompt` was cut to fit CLIP's window
    input_truncated: bool = False  # the input exceeded the policy's context and was cut
    notes: list[str] = field(default_factory=list)
    dfprompt: bool = False  # `prompt` and `candidates` are DF-Prompts (a DF-Prompt policy wrote them)

    def to_dict(self) -> dict:
        return {"prompt": self.source, "optimized": self.prompt, "candidates": self.candidates,
                "clip_tokens": self.clip_tokens, "trimmed": self.trimmed,
                "input_truncated": self.input_truncated}


def _which(i: int, count: int) -> str:
    return "the prompt" if count == 1 else f"prompt {i + 1}"


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """Validate and strip prompts; raises PromptError naming the bad one."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise PromptError("no prompt given: pass a prompt string or a list of prompts")
    cleaned = []
    for i, p in enumerate(prompts):
        where = _which(i, len(prompts))
        if not isinstance(p, str):
            raise PromptError(f"{where} must be text, got {type(p).__name__}")
        if not p.strip():
            raise PromptError(f"{where} is empty: type a few words to optimize, e.g. 'a cat riding a bike'")
        if len(p) > MAX_PROMPT_CHARS:
            raise PromptError(f"{where} is {len(p)} characters long; the limit is {MAX_PROMPT_CHARS}")
        cleaned.append(p.strip())
    return cleaned


class _StepHook:
    """A logits processor that changes nothing: called once per generated token, it reports progress
    and lets the caller interrupt by raising. (A LogitsProcessor has the same signature in
    transformers 4.x and 5.x; stopping criteria do not.)"""

    def __init__(self, callback: StepCallback, total: int):
        self.callback, self.total, self.step = callback, total, 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.step += 1
        self.callback(self.step, self.total)
        return scores


class PromptOptimizer:
    """A causal LM + tokenizer that rewrite prompts. Build with `load_optimizer` (cached)."""

    def __init__(self, model, tokenizer, name: str = "", dfprompt_heads=None, *,
                 decoding: DecodingDefaults | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        # A DF-Prompt policy's weight and range heads (dfprompt_policy.DFHeads): results are then DF-Prompts.
        self.dfprompt_heads = dfprompt_heads.eval() if dfprompt_heads is not None else None
        # The reference recipe: GPT-2 has no pad token; pad with eos, on the left, for generation.
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        self.eos_token_id = tokenizer.eos_token_id
        config = model.config
        self.context_length = int(getattr(config, "n_positions", None) or config.max_position_embeddings)
        # KV cache for beam search: "beam" = beam_cache.BeamSearchCache (one copy per step, same numbers;
        # falls back to the default where unsupported), None or "dynamic" = transformers' default,
        # "static" = transformers' preallocated cache (slower on CPU).
        self.cache_implementation: str | None = "beam"
        # The policy's own decoding (its promptist.json): what a call's unset decoding options mean.
        self.decoding = decoding or DecodingDefaults()
        # One generate at a time per model: HF generate is not re-entrant on a shared cache.
        self._lock = threading.Lock()

    @functools.cached_property
    def comma_ids(self) -> frozenset[int]:
        """The policy's tokens holding a comma (what `min_modifiers` counts)."""
        return comma_token_ids(self.tokenizer)

    @property
    def is_dfprompt(self) -> bool:
        return self.dfprompt_heads is not None

    @property
    def device(self) -> torch.device:
        # Read at call time: a host's memory manager may have moved the model.
        return next(self.model.parameters()).device

    def __call__(
        self,
        prompts: str | Sequence[str],
        *,
        mode: str = "beam",
        candidates: int = 1,
        num_beams: int = 8,
        max_new_tokens: int = 75,
        length_penalty: float | None = None,
        num_beam_groups: int | None = None,
        diversity_penalty: float = 1.0,
        temperature: float = 1.0,
        top_k: int = 50,
        top_p: float = 1.0,
        seed: int | None = None,
        batch_size: int = 16,
        trim_to_clip_window: bool | None = None,
        step_callback: StepCallback | None = None,
        head_choice: str = "argmax",
        keep_prompt: bool | None = None,
        no_repeat_ngram_size: int | None = None,
        min_modifiers: int | None = None,
    ) -> list[OptimizedPrompt]:
        """Rewrite each prompt; returns one OptimizedPrompt per input, in input order.

        Args:
            mode: `beam` (the reference recipe), `diverse` (group beam search: `num_beam_groups`
                groups, `diversity_penalty` against tokens earlier groups chose at the same step),
                or `sample` (temperature / top_k / top_p; `seed` makes it reproducible per prompt).
            candidates: how many rewrites to return per prompt, best first (<= num_beams for beams).
            num_beams, max_new_tokens, length_penalty: the reference recipe's 8, 75 and -1.0 (length_penalty
                None: the policy's default, -1.0 unless its folder says otherwise).
            batch_size: prompts per generate call (beam modes); results equal one-at-a-time.
            trim_to_clip_window: cut `prompt` at a comma so it fits CLIP's 75 prompt tokens (None: the
                policy's default, off unless its folder says otherwise).
            step_callback: called as (step, max_new_tokens) after every generated token; raise
                from it to interrupt (ComfyUI's interrupt, a progress bar).
            head_choice: a DF-Prompt policy's weight and range per modifier: `argmax` (the default: the
                heads' most likely class, reproducible) or `sample` (drawn from the heads, with `seed`).
                Results are then DF-Prompts: the prompt verbatim, then the modifiers (`[text:a-b:w]`
                unless weight 1.0 over 0-1); render them with `dfprompt.to_text` for a host without DF.
            keep_prompt: True forces the rewrite to start with the prompt verbatim (the policy writes only
                what follows it: "don't change my subject"); None takes the policy's default (`decoding`;
                the bundled policy keeps, microsoft/Promptist, the reference, does not).
            no_repeat_ngram_size: > 0 bans repeating any n-gram of the written tokens (no modifier loops);
                None takes the policy's default, 0 bans nothing (the reference).
            min_modifiers: the rewrite does not end before it holds this many modifiers (commas the policy
                wrote, plus the kept prompt's own); None: the policy's default, 0: no rule (the reference).
        """
        # 1. check inputs
        sources = check_prompts(prompts)
        if head_choice not in ("argmax", "sample"):
            raise ValueError(f"head_choice must be argmax or sample; got {head_choice!r}")
        self._check_options(mode, candidates, num_beams, max_new_tokens, num_beam_groups, diversity_penalty,
                            temperature, top_k, top_p, batch_size, seed, no_repeat_ngram_size, min_modifiers)
        keep = self.decoding.keep_prompt if keep_prompt is None else bool(keep_prompt)
        if length_penalty is None:
            length_penalty = self.decoding.length_penalty
        ngram = self.decoding.no_repeat_ngram_size if no_repeat_ngram_size is None else no_repeat_ngram_size
        least = self.decoding.min_modifiers if min_modifiers is None else min_modifiers
        if trim_to_clip_window is None:
            trim_to_clip_window = self.decoding.trim_to_clip
        # A kept prompt's forced comma opens the first modifier: the policy then writes the other separators.
        commas = max(least - 1, 0) if keep else least
        constraint = WrittenTokenConstraint(ngram, commas, self.eos_token_id, self.comma_ids if commas else frozenset())

        # 2. tokenize: "x Rephrase:" (then " x" when the prompt is kept: the policy writes what follows);
        #    max_new_tokens must fit the policy's context; cut an over-long prompt
        encoded, truncated = zip(*(self._encode(s, max_new_tokens, _which(i, len(sources)))
                                   for i, s in enumerate(sources)), strict=True)
        queries = [self._keep(ids, s, max_new_tokens) if keep else ids for ids, s in zip(encoded, sources, strict=True)]

        # 3. generate, in batches of similar length (less padding), or per prompt when sampling
        texts: list[list[str]] = [[] for _ in sources]
        if mode == "sample":
            groups = [[i] for i in range(len(sources))]
        else:
            order = sorted(range(len(sources)), key=lambda i: len(queries[i]))
            groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        with self._lock, torch.inference_mode():
            for group in groups:
                outputs = self._generate(
                    [queries[i] for i in group], mode=mode, candidates=candidates, num_beams=num_beams,
                    max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                    num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty,
                    temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, step_callback=step_callback,
                    constraint=constraint,
                )
                for i, out in zip(group, outputs, strict=True):
                    texts[i] = [join_kept(sources[i], o) for o in out] if queries[i] is not encoded[i] else out

        # 4. strip the input prefix (decode only new tokens), never return an empty rewrite; a DF-Prompt
        #    policy's heads then choose each modifier's weight and range
        results = []
        for i, (source, cands, cut) in enumerate(zip(sources, texts, truncated, strict=True)):
            notes = []
            if not any(cands):
                notes.append("the model produced no rewrite; the prompt is returned unchanged")
            cands = [c if c else source for c in cands]
            if self.dfprompt_heads is not None:
                with self._lock, torch.inference_mode():
                    cands = [self._dfprompt(source, encoded[i], c, head_choice, seed, k) for k, c in enumerate(cands)]
            if cut:
                notes.append(f"the prompt was longer than the model's context and was cut to "
                             f"{self.context_length - max_new_tokens} tokens")
            # 5. CLIP length guard
            best = cands[0]
            tokens = count_clip_tokens(best)
            trimmed = False
            if tokens > CLIP_PROMPT_TOKENS:
                if trim_to_clip_window:
                    best, trimmed = trim_to_clip(best), True
                    notes.append(f"trimmed from {tokens} to {count_clip_tokens(best)} CLIP tokens")
                    tokens = count_clip_tokens(best)
                else:
                    notes.append(f"{tokens} CLIP tokens: more than the {CLIP_PROMPT_TOKENS} that fit one "
                                 "CLIP window; the host will split it into chunks")
            results.append(OptimizedPrompt(source, best, cands, tokens, trimmed, cut, notes, self.is_dfprompt))
        return results

    def _dfprompt(self, source: str, prompt_ids: list[int], rewrite: str, how: str, seed: int | None,
                  index: int) -> str:
        """`rewrite` as a DF-Prompt: one forward pass over prompt + rewrite + eos, the heads read where each
        modifier closes (the hidden state that emits its comma or the eos), as in training."""
        from .dfprompt_policy import choose, compose, split_response

        response = self._tokenize(" " + rewrite)[: self.context_length - len(prompt_ids) - 1] + [self.eos_token_id]
        pieces = split_response(source, response, self.tokenizer)
        ends = [p.end for p in pieces if p.end is not None]
        if not ends:
            return compose(source, pieces, {}, self.dfprompt_heads.weights, self.dfprompt_heads.ranges)
        ids = torch.tensor([prompt_ids + response], device=self.device)
        hidden = self.model.base_model(input_ids=ids, use_cache=False)[0][0]
        w_logits, r_logits = self.dfprompt_heads(hidden[[len(prompt_ids) - 1 + e for e in ends]])
        generator = None
        if how == "sample":
            generator = torch.Generator().manual_seed(((seed if seed is not None else torch.seed()) + index) % 2**63)
        w, r = choose(w_logits, r_logits, how, generator)
        choices = dict(zip(ends, zip(w.tolist(), r.tolist(), strict=True), strict=True))
        return compose(source, pieces, choices, self.dfprompt_heads.weights, self.dfprompt_heads.ranges)

    def optimize(self, prompt: str, **kwargs) -> str:
        """One prompt in, the best rewrite out."""
        return self(prompt, **kwargs)[0].prompt

    def max_new_tokens_for(self, prompt: str) -> int:
        """The largest `max_new_tokens` this policy's context leaves for `prompt` (" Rephrase:" included).

        A prompt longer than half the context may be cut to half of it, so it never limits the
        new tokens to less than half the context."""
        return self._new_token_limit(len(self._tokenize(prompt.strip() + REPHRASE_SUFFIX)))

    def _new_token_limit(self, input_tokens: int) -> int:
        return min(MAX_NEW_TOKENS, self.context_length - min(input_tokens, self.context_length // 2))

    @staticmethod
    def _check_options(mode, candidates, num_beams, max_new_tokens, num_beam_groups, diversity_penalty,
                       temperature, top_k, top_p, batch_size, seed=None, no_repeat_ngram_size=None,
                       min_modifiers=None) -> None:
        """Every size and option a user can type, checked before any model work (None: the policy's default)."""
        if no_repeat_ngram_size is not None and (not isinstance(no_repeat_ngram_size, int)
                                                 or not 0 <= no_repeat_ngram_size <= MAX_NGRAM):
            raise ValueError(f"no_repeat_ngram_size must be between 0 and {MAX_NGRAM}; got {no_repeat_ngram_size!r}")
        if min_modifiers is not None and (not isinstance(min_modifiers, int)
                                          or not 0 <= min_modifiers <= MAX_MIN_MODIFIERS):
            raise ValueError(f"min_modifiers must be between 0 and {MAX_MIN_MODIFIERS}; got {min_modifiers!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        if not 1 <= candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be between 1 and {MAX_CANDIDATES}; got {candidates}")
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}; got {max_new_tokens}")
        if not 1 <= batch_size <= MAX_BATCH_SIZE:
            raise ValueError(f"batch_size must be between 1 and {MAX_BATCH_SIZE}; got {batch_size}")
        if mode != "sample" and not 1 <= num_beams <= MAX_BEAMS:
            raise ValueError(f"num_beams must be between 1 and {MAX_BEAMS}; got {num_beams}")
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be between 0 and 2**64-1; got {seed}")
        if mode != "sample" and candidates > num_beams:
            raise ValueError(f"candidates ({candidates}) cannot exceed num_beams ({num_beams}) in {mode} mode")
        if mode == "diverse":
            groups = num_beam_groups or num_beams
            if groups < 2 or num_beams % groups:
                raise ValueError(f"diverse mode needs num_beams ({num_beams}) divisible by num_beam_groups "
                                 f"({groups}), with at least 2 groups")
            if diversity_penalty < 0:
                raise ValueError(f"diversity_penalty must be >= 0; got {diversity_penalty}")
        if mode == "sample":
            if temperature <= 0:
                raise ValueError(f"temperature must be > 0; got {temperature}")
            if top_k < 0 or not 0 < top_p <= 1:
                raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1; got top_k={top_k}, top_p={top_p}")

    def _tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode(self, source: str, max_new_tokens: int, where: str = "the prompt") -> tuple[list[int], bool]:
        ids = self._tokenize(source + REPHRASE_SUFFIX)
        limit = self._new_token_limit(len(ids))
        if max_new_tokens > limit:
            # Past the context the position embeddings run out: a raw IndexError deep in generate.
            raise PromptError(
                f"max_new_tokens={max_new_tokens} does not fit the policy's context of {self.context_length} "
                f"tokens: {where} needs {min(len(ids), self.context_length // 2)} of them (with ' Rephrase:'), "
                f"so the largest max_new_tokens allowed for it is {limit}")
        room = self.context_length - max_new_tokens
        if len(ids) <= room:
            return ids, False
        # Keep the beginning of the prompt and always end with " Rephrase:".
        suffix = self._tokenize(REPHRASE_SUFFIX)
        body = self._tokenize(source)
        logger.warning("prompt of %d tokens is longer than the optimizer's context (%d for the input); "
                       "it is truncated", len(ids), room)
        return body[: max(room - len(suffix), 1)] + suffix, True

    def _keep(self, ids: list[int], source: str, max_new_tokens: int) -> list[int]:
        """The query with the prompt forced as the start of the rewrite: "x Rephrase:" + " x" (x without a
        closing full stop, then a comma: `forced_start`). When both do
        not fit the context the prompt's first copy is cut (the forced copy is what the user reads); a
        prompt too long even for that is not forced (returned as is: `ids` itself)."""
        forced = self._tokenize(forced_start(source))
        room = self.context_length - max_new_tokens
        if len(ids) + len(forced) <= room:
            return ids + forced
        suffix = self._tokenize(REPHRASE_SUFFIX)
        head = room - len(forced) - len(suffix)
        if head < 1:
            return ids
        return self._tokenize(source)[:head] + suffix + forced

    def _cache_kwargs(self, max_new_tokens: int) -> dict:
        """The `generate` arguments that pick the KV cache for beam search (see `cache_implementation`)."""
        if self.cache_implementation in (None, "dynamic"):
            return {}
        if self.cache_implementation == "beam":
            from .beam_cache import cache_keyword, make_beam_cache

            cache = make_beam_cache(self.model, max_new_tokens)
            return {} if cache is None else {cache_keyword(self.model): cache}
        return {"cache_implementation": self.cache_implementation}

    def _generate(self, batch: list[list[int]], *, mode, candidates, num_beams, max_new_tokens, length_penalty,
                  num_beam_groups, diversity_penalty, temperature, top_k, top_p, seed,
                  step_callback, constraint: WrittenTokenConstraint | None = None) -> list[list[str]]:
        # Left padding with eos as pad, exactly what the tokenizer does in the reference.
        padded = self.tokenizer.pad({"input_ids": batch}, padding=True, return_tensors="pt")
        input_ids = padded["input_ids"].to(self.device)
        attention_mask = padded["attention_mask"].to(self.device)
        common = dict(max_new_tokens=max_new_tokens, eos_token_id=self.eos_token_id,
                      pad_token_id=self.eos_token_id)
        hooks = None
        constrained = constraint is not None and constraint.active
        if step_callback is not None or constrained:
            from transformers import LogitsProcessorList

            hooks = LogitsProcessorList(
                ([ConstraintProcessor(constraint, input_ids.shape[1])] if constrained else [])
                + ([_StepHook(step_callback, max_new_tokens)] if step_callback is not None else []))

        if mode == "beam" and self.cache_implementation == "beam" and fast_beam_search_supported(self.model):
            sequences = beam_search(
                self.model, input_ids, attention_mask, num_beams=num_beams, num_return_sequences=candidates,
                length_penalty=length_penalty, step_callback=step_callback,
                constraint=constraint, **common,
            )
        elif mode == "beam":
            sequences = self.model.generate(
                input_ids, attention_mask=attention_mask, do_sample=False, num_beams=num_beams,
                num_return_sequences=candidates, length_penalty=length_penalty,
                logits_processor=hooks, **common, **self._cache_kwargs(max_new_tokens),
            )
        elif mode == "diverse":
            from .diverse_beam import diverse_beam_search

            sequences = diverse_beam_search(
                self.model, input_ids, attention_mask, num_beams=num_beams,
                num_beam_groups=num_beam_groups or num_beams, diversity_penalty=diversity_penalty,
                num_return_sequences=candidates, length_penalty=length_penalty,
                step_callback=step_callback, constraint=constraint, **common,
            ).sequences
        else:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed if seed is not None else torch.seed())
                sequences = self.model.generate(
                    input_ids, attention_mask=attention_mask, do_sample=True, num_beams=1,
                    num_return_sequences=candidates, temperature=temperature, top_k=top_k, top_p=top_p,
                    logits_processor=hooks, **common,
                )
        new_tokens = sequences[:, input_ids.shape[1]:]
        decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        decoded = [d.strip() for d in decoded]
        per_prompt = len(decoded) // len(batch)
        return [decoded[i * per_prompt:(i + 1) * per_prompt] for i in range(len(batch))]


def forced_start(source: str) -> str:
    """What keeping the prompt forces as the start of the rewrite (after " Rephrase:"): the prompt without a
    closing full stop, then a comma, so the policy's first word opens a modifier instead of going on with
    the sentence or stopping."""
    return " " + (source.rstrip(" .;:!?,") or source) + ","


def join_kept(source: str, written: str) -> str:
    """The kept prompt and the modifiers the policy wrote after it, as one rewrite; a modifier written twice
    is kept once, empty ones are dropped."""
    kept = forced_start(source)[1:-1]
    seen, items = set(), []
    for item in written.split(","):
        key = " ".join(item.lower().split())
        if key and key not in seen:
            seen.add(key)
            items.append(item.strip())
    return ", ".join([kept, *items])


_CACHE: dict[tuple, PromptOptimizer] = {}
_CACHE_LOCK = threading.Lock()


def load_optimizer(
    name: str | None = None,
    *,
    models_dir: Path | str | Sequence[Path | str] | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    allow_download: bool | None = None,
) -> PromptOptimizer:
    """Resolve `name` to files (weights.resolve), load the policy once, and reuse it across calls. No name:
    microsoft/Promptist where it can be had, else the bundled policy, said in one warning line."""
    if name is None:
        name, note = choose_default_policy(models_dir=models_dir, allow_download=allow_download)
        if note:
            logger.warning(note)
    folder = resolve(name, models_dir=models_dir, allow_download=allow_download)
    problem = causal_lm_problem(folder)
    if problem:
        raise ValueError(problem)
    tokenizer_folder = resolve_tokenizer(folder, name, models_dir=models_dir, allow_download=allow_download)
    target = pick_device(device)
    torch_dtype = pick_dtype(target, dtype)
    where = (str(folder.resolve()), str(tokenizer_folder.resolve()), str(target), torch_dtype)
    # The folders' contents too: a folder retrained in place since it was loaded is loaded again.
    key = (*where, contents_fingerprint(folder), contents_fingerprint(tokenizer_folder))
    with _CACHE_LOCK:
        if key not in _CACHE:
            for stale in [k for k in _CACHE if k[:4] == where]:  # the same folder, as it was before
                del _CACHE[stale]
            _CACHE[key] = _load(folder, tokenizer_folder, target, torch_dtype, name)
        return _CACHE[key]


def causal_lm_problem(folder: Path) -> str | None:
    """Why `folder` cannot be a policy, in one line, or None. AutoModelForCausalLM takes only the model
    types of transformers' causal-LM mapping; for any other folder (a CLIP, PickScore) it raises a page
    listing every model type it knows. Hosts also use this to list policy folders only."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{folder} has no config.json: not a transformers model folder"
    except (OSError, ValueError) as e:
        return f"{Path(folder) / 'config.json'} cannot be read: {e}"
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type") if isinstance(config, dict) else None
    architectures = (config.get("architectures") if isinstance(config, dict) else None) or []
    heads = ("CausalLM", "LMHead", "ConditionalGeneration")
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
            not architectures or any(h in a for a in architectures for h in heads)):
        return None
    found = f"model_type {model_type!r}" + (f", architectures {', '.join(map(str, architectures))}"
                                            if architectures else "")
    return (f"{folder} is not a causal language model ({found}): a prompt optimizer policy is a GPT-2-style "
            "causal LM folder such as microsoft/Promptist")


def _load(folder: Path, tokenizer_folder: Path, device: torch.device, dtype: torch.dtype,
          name: str) -> PromptOptimizer:
    from transformers import AutoModelForCausalLM

    logger.info("loading prompt optimizer %s from %s (%s, %s)", name, folder, device, dtype)
    # transformers loads safetensors, or .bin with torch.load(weights_only=True): no arbitrary unpickling.
    with no_progress_bars(), reading_weights(folder):  # no per-load bar in a host's log; a broken file named
        model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=None)
    model.to(device=device, dtype=dtype)
    tokenizer = load_tokenizer(tokenizer_folder)
    from .dfprompt_policy import load_heads

    heads = load_heads(folder)  # a DF-Prompt policy when the folder holds weight and range heads
    if heads is not None:
        heads.to(device=device, dtype=dtype)
    return PromptOptimizer(model, tokenizer, name=name, dfprompt_heads=heads, decoding=read_decoding_defaults(folder))


def forget(folder: Path | str) -> None:
    """Drop the cached optimizers loaded from `folder`: a trainer has just rewritten its weights."""
    target = str(Path(folder).resolve())
    with _CACHE_LOCK:
        for key in [k for k in _CACHE if k[0] == target]:
            del _CACHE[key]


def cached_optimizers() -> list[tuple[torch.device, PromptOptimizer]]:
    """The loaded optimizers with the device each was loaded for (hosts move their models off the GPU
    between jobs, and back)."""
    with _CACHE_LOCK:
        return [(torch.device(key[2]), optimizer) for key, optimizer in _CACHE.items()]


def clear_cache() -> None:
    """Forget every loaded optimizer (hosts call this to free memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
