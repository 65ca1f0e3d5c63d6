"""(plain prompt, engineered prompt) pairs for SFT, built from a corpus of engineered prompts.

Promptist's stage 1 trains on pairs whose source is what a user would type and whose target is a
human-engineered prompt. Sources per target, as in the paper: the main content only (`mc`), the main
content plus a random shuffled subset of its modifiers (`mcm`), and, through an optional rewrite hook,
the main content rephrased (`rmc`) and the whole prompt rephrased (`rtp`). The split into train and
validation is by target, so no target is in both.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import shlex
import subprocess
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from promptist_core.policy_folder import write_text_atomic

from .corpus import CorpusError, jsonl_objects, normalize_prompt

KINDS = ("mc", "mcm", "rmc", "rtp")
SPLITS = ("train", "valid")

# A LoRA / hypernetwork / embedding tag (`<lora:name:0.8>`), ComfyUI's `embedding:name`.
_EXTRA_NETWORK = re.compile(r"<[^<>]*>|\bembedding:[^\s,]+")
_NUMBER = r"\s*-?(?:\d+(?:\.\d*)?|\.\d+)\s*"
# A DF-Prompt block `[text:a-b:w]`: its text is a modifier of its own.
_DF_BLOCK = re.compile(rf"\[([^\[\]:]*):{_NUMBER}-{_NUMBER}:{_NUMBER}\]")
# A1111 prompt editing `[from:to:when]`, `[from::when]`, `[:to:when]`: keep what is drawn at the end.
_PROMPT_EDIT = re.compile(rf"\[([^\[\]:]*):([^\[\]:]*):{_NUMBER}\]")
# A1111 alternation `[a|b]`: keep the first.
_ALTERNATION = re.compile(r"\[([^\[\]|]*)\|[^\[\]]*\]")
# Attention weights `(text:1.2)` (A1111 and ComfyUI), and bare emphasis (), [], {} (NovelAI).
_WEIGHTED = re.compile(rf"\(([^()]*):{_NUMBER}\)")
_EMPHASIS = re.compile(r"\(([^()]*)\)|\[([^\[\]]*)\]|\{([^{}]*)\}")
_COMMAS = re.compile(r"\s*,(?:\s*,)*\s*")
_SEPARATORS = re.compile(r"\s*(?:,|\bBREAK\b|\|)\s*")


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    kind: str
    split: str = "train"


def strip_weight_syntax(prompt: str) -> str:
    """The plain text of a prompt written for A1111 or ComfyUI: weights, emphasis, prompt editing,
    DF blocks and extra-network tags removed (a DF block's text stays, as its own comma item)."""
    text = prompt.replace("\\(", "\0lp").replace("\\)", "\0rp").replace("\\[", "\0lb").replace("\\]", "\0rb")
    text = _EXTRA_NETWORK.sub(" ", text)
    text = _DF_BLOCK.sub(r", \1,", text)
    while True:  # innermost first, until nothing changes
        new = _PROMPT_EDIT.sub(lambda m: m.group(2) or m.group(1), text)
        new = _ALTERNATION.sub(r"\1", new)
        new = _WEIGHTED.sub(r"\1", new)
        new = _EMPHASIS.sub(lambda m: next(g for g in m.groups() if g is not None), new)
        if new == text:
            break
        text = new
    text = text.replace("\0lp", "(").replace("\0rp", ")").replace("\0lb", "[").replace("\0rb", "]")
    return _COMMAS.sub(", ", normalize_prompt(text)).strip(" ,")


def split_prompt(prompt: str) -> tuple[str, list[str]]:
    """Split an engineered prompt into its main content and its modifiers.

    'a castle, (highly detailed:1.2), [anime:0-1:1.5], artstation' -> ('a castle', ['highly detailed',
    'anime', 'artstation']). The main content is the first comma item (PAE splits the same way);
    modifiers are the other items, in order, without empties and case-insensitive repeats.
    """
    items = [normalize_prompt(item).strip(" .;") for item in _SEPARATORS.split(strip_weight_syntax(prompt))]
    items = [item for item in items if item]
    if not items:
        return "", []
    main, seen, modifiers = items[0], {items[0].lower()}, []
    for item in items[1:]:
        if item.lower() not in seen:
            seen.add(item.lower())
            modifiers.append(item)
    return main, modifiers


def join_prompt(main: str, modifiers: Sequence[str]) -> str:
    return ", ".join([main, *modifiers])


def split_of(target: str, seed: int, valid_fraction: float) -> str:
    """'valid' for a stable `valid_fraction` of targets (by hash, not by position), else 'train'."""
    digest = hashlib.sha256(f"{seed}\0{target.lower()}".encode()).digest()
    return "valid" if int.from_bytes(digest[:8], "big") / 2**64 < valid_fraction else "train"


RewriteHook = Callable[[list[str]], list[str]]


def make_pairs(
    prompts: Sequence[str],
    *,
    seed: int = 0,
    mcm_per_target: int = 1,
    valid_fraction: float = 0.02,
    rewrite: RewriteHook | None = None,
) -> tuple[list[Pair], dict]:
    """Pairs for every prompt that has modifiers, and statistics (counts per kind, split, skipped)."""
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1); got {valid_fraction}")
    if not 0 <= mcm_per_target <= 16:
        raise ValueError(f"mcm_per_target must be between 0 and 16; got {mcm_per_target}")
    rng = random.Random(seed)
    pairs: list[Pair] = []
    skipped = Counter()
    targets: dict[str, str] = {}  # target (lowercase) -> main content, for the rewrite hook
    for prompt in prompts:
        main, modifiers = split_prompt(prompt)
        if not main:
            skipped["empty"] += 1
            continue
        if not modifiers:
            skipped["no modifiers"] += 1
            continue
        target = join_prompt(main, modifiers)
        if target.lower() in targets:
            skipped["duplicate target"] += 1
            continue
        targets[target.lower()] = main
        split = split_of(target, seed, valid_fraction)
        sources = {main.lower()}
        pairs.append(Pair(main, target, "mc", split))
        for _ in range(mcm_per_target if len(modifiers) >= 2 else 0):
            subset = rng.sample(modifiers, rng.randint(1, len(modifiers) - 1))
            source = join_prompt(main, subset)
            if source.lower() not in sources:
                sources.add(source.lower())
                pairs.append(Pair(source, target, "mcm", split))
    if rewrite is not None:
        pairs += _rewritten_pairs(pairs, rewrite, skipped)
    stats = {
        "pairs": len(pairs),
        "targets": len(targets),
        "kinds": dict(Counter(p.kind for p in pairs)),
        "splits": dict(Counter(p.split for p in pairs)),
        "skipped": dict(skipped),
    }
    return pairs, stats


def _rewritten_pairs(pairs: list[Pair], rewrite: RewriteHook, skipped: Counter) -> list[Pair]:
    base = [p for p in pairs if p.kind == "mc"]
    inputs = [p.source for p in base] + [p.target for p in base]
    outputs = rewrite(inputs)
    if len(outputs) != len(inputs):
        raise ValueError(f"the rewrite hook returned {len(outputs)} lines for {len(inputs)} inputs")
    new = []
    for i, (text, out) in enumerate(zip(inputs, outputs, strict=True)):
        pair = base[i % len(base)]
        out = normalize_prompt(out)
        if not out or out.lower() == text.lower() or out.lower() == pair.target.lower():
            skipped["rewrite unchanged"] += 1
            continue
        new.append(Pair(out, pair.target, "rmc" if i < len(base) else "rtp", pair.split))
    return new


# --- rewrite hooks -------------------------------------------------------------------------------

DEFAULT_INSTRUCTION = ("Rephrase the following image description in plain everyday words, "
                       "keeping its meaning. Answer with the new description only.")


def command_rewriter(command: str, *, timeout: float = 600.0) -> RewriteHook:
    """An external program: one text per line on stdin, one rewrite per line on stdout."""
    argv = shlex.split(command)
    if not argv:
        raise ValueError("the rewrite command is empty")

    def run(texts: list[str]) -> list[str]:
        try:
            done = subprocess.run(argv, input="\n".join(texts) + "\n", capture_output=True, text=True,
                                  timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ValueError(f"the rewrite command {argv[0]!r} failed: {e}") from None
        if done.returncode != 0:
            raise ValueError(f"the rewrite command {argv[0]!r} exited with {done.returncode}: "
                             f"{done.stderr.strip().splitlines()[-1:] or ''}")
        return done.stdout.splitlines()

    return run


def llm_rewriter(model: str, *, instruction: str = DEFAULT_INSTRUCTION, max_new_tokens: int = 60,
                 batch_size: int = 16, device: str = "auto") -> RewriteHook:
    """A local causal LM folder (through the weights resolver): instruction, input, greedy answer."""
    import torch
    from transformers import AutoModelForCausalLM

    from promptist_core.devices import pick_device
    from promptist_core.weights import load_tokenizer, resolve

    folder = resolve(model)
    target = pick_device(device)
    lm = AutoModelForCausalLM.from_pretrained(str(folder)).to(target).eval()
    tokenizer = load_tokenizer(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"

    @torch.inference_mode()
    def run(texts: list[str]) -> list[str]:
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = [f"{instruction}\nInput: {t}\nOutput:" for t in texts[start:start + batch_size]]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(target)
            ids = lm.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                              pad_token_id=tokenizer.pad_token_id)
            for text in tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True):
                out.append(text.strip().split("\n", 1)[0])
        return out

    return run


def rewriter_from_spec(spec: str, *, instruction: str | None = None) -> RewriteHook:
    """`llm:<model folder or id>` or `command:<program and arguments>`."""
    kind, _, value = spec.partition(":")
    if kind == "llm" and value.strip():
        return llm_rewriter(value.strip(), instruction=instruction or DEFAULT_INSTRUCTION)
    if kind == "command" and value.strip():
        return command_rewriter(value.strip())
    raise ValueError(f"--rewrite must be llm:<model folder> or command:<program>; got {spec!r}")


# --- files ---------------------------------------------------------------------------------------

def write_pairs(path: Path | str, pairs: Sequence[Pair]) -> Path:
    """JSONL, one `{"source", "target", "kind", "split"}` per line, written atomically."""
    path = Path(path)
    return write_text_atomic(path, "".join(json.dumps(asdict(p), ensure_ascii=False) + "\n" for p in pairs))


def is_pairs_file(path: Path) -> bool:
    """A JSONL whose first record has `source` and `target` (what `python -m trainer pairs` writes), as
    opposed to a corpus of prompts: how the hosts' train forms tell the two apart."""
    if path.suffix.lower() != ".jsonl":
        return False
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    record = json.loads(line)
                except ValueError:
                    return False
                return isinstance(record, dict) and "source" in record and "target" in record
    return False


def read_pairs(path: Path | str, *, seed: int = 0, valid_fraction: float = 0.02) -> list[Pair]:
    """Pairs from JSONL (`source` and `target` required); records without a `split` are split by target."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(path, "no such pairs file")
    pairs = []
    for i, record in jsonl_objects(path, "'source' and 'target'"):
        values = [record.get(k) for k in ("source", "target")]
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise CorpusError(path, "'source' and 'target' must both be non-empty text", i)
        source, target = (normalize_prompt(v) for v in values)
        split = record.get("split") or split_of(target, seed, valid_fraction)
        if split not in SPLITS:
            raise CorpusError(path, f"'split' must be one of {', '.join(SPLITS)}; got {split!r}", i)
        pairs.append(Pair(source, target, str(record.get("kind", "pair")), split))
    if not pairs:
        raise CorpusError(path, "the pairs file holds no pairs")
    return pairs
