"""Write a causal-LM policy folder that loads in transformers 4.30 (A1111 1.10's pin) and 5.x alike.

Every trainer saves its policy through `save_policy_folder`. Left to itself, transformers 5 writes a
tokenizer that A1111 cannot read: `tokenizer_class: TokenizersBackend` (unknown to 4.30), a
`tokenizer.json` whose BPE merges are pairs (tokenizers 0.13 wants "a b" strings), and no
`vocab.json` / `merges.txt`. Here the folder gets all three in the form both versions read, and it is
written atomically: a reader (or a crash) never sees half a folder.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

# What transformers 4.30 maps a byte-level BPE (GPT-2 style) tokenizer to; 5.x reads it too.
GPT2_TOKENIZER_CLASS = "GPT2Tokenizer"
# Keys transformers 5 writes into tokenizer_config.json that are loading state, not tokenizer settings.
_STALE_TOKENIZER_KEYS = ("backend", "is_local", "local_files_only", "auto_map")


# A policy's own decoding defaults (what the optimizer does when a call leaves them unset).
DECODING_FILE = "promptist.json"


@dataclass(frozen=True)
class DecodingDefaults:
    """keep_prompt: the rewrite starts with the user's prompt verbatim (the policy writes what follows).
    no_repeat_ngram_size: > 0 bans repeating an n-gram of the written tokens.
    length_penalty: beam scores are sum_logprobs / length ** length_penalty (-1.0 favours short rewrites).
    min_modifiers: the rewrite does not end before it wrote this many commas.
    trim_to_clip: the best rewrite is cut at a comma to fit CLIP's 75 prompt tokens.
    The defaults are the reference recipe (microsoft/Promptist); a folder's `promptist.json`
    ({"decoding": {...}}) sets its own."""

    keep_prompt: bool = False
    no_repeat_ngram_size: int = 0
    length_penalty: float = -1.0
    min_modifiers: int = 0
    trim_to_clip: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def read_decoding_defaults(folder: Path | str) -> DecodingDefaults:
    """The folder's `promptist.json` decoding defaults; the reference's when it has none. A broken file is
    an error naming it (a silently different decoding would be worse)."""
    path = Path(folder) / DECODING_FILE
    if not path.is_file():
        return DecodingDefaults()
    try:
        data = json.loads(path.read_text(encoding="utf-8")).get("decoding", {})
        keep, ngram = data.get("keep_prompt", False), data.get("no_repeat_ngram_size", 0)
        penalty = data.get("length_penalty", -1.0)
        least, trim = data.get("min_modifiers", 0), data.get("trim_to_clip", False)
        counts_ok = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (ngram, least))
        if not isinstance(keep, bool) or not isinstance(trim, bool) or not counts_ok or \
                not isinstance(penalty, (int, float)) or isinstance(penalty, bool) or not math.isfinite(penalty):
            raise ValueError("keep_prompt and trim_to_clip must be true/false, no_repeat_ngram_size and "
                             "min_modifiers integers >= 0 and length_penalty a finite number")
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{path} cannot be read ({e}); fix or delete it") from None
    return DecodingDefaults(keep, ngram, float(penalty), least, trim)


def write_decoding_defaults(folder: Path | str, decoding: DecodingDefaults) -> Path:
    """`folder/promptist.json` holding `decoding` (what `read_decoding_defaults` reads back)."""
    path = Path(folder) / DECODING_FILE
    path.write_text(json.dumps({"decoding": decoding.to_dict()}, indent=2) + "\n", encoding="utf-8")
    return path


def save_policy_folder(model, tokenizer, folder: Path | str, *, dfprompt_heads=None,
                       decoding: DecodingDefaults | None = None) -> Path:
    """Save `model` + `tokenizer` as a policy folder for `promptist_core.optimizer.load_optimizer`.

    Writes config.json, model.safetensors, generation_config.json (if the model has one) and the
    tokenizer files (tokenizer.json, vocab.json + merges.txt, tokenizer_config.json with a class
    transformers 4.30 knows), a DF-Prompt policy's heads when given (`dfprompt_policy.save_heads`), and
    the policy's decoding defaults when they are not the reference's (`promptist.json`).
    An existing folder is replaced only once the new one is complete.
    Returns the folder.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        _save_model(model, tmp)
        tokenizer.save_pretrained(str(tmp))
        _make_tokenizer_portable(tokenizer, tmp)
        if dfprompt_heads is not None:
            from .dfprompt_policy import save_heads

            save_heads(dfprompt_heads, tmp)
        if decoding is not None and decoding != DecodingDefaults():
            write_decoding_defaults(tmp, decoding)
        fsync_tree(tmp)
        _replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _save_model(model, out: Path) -> None:
    kwargs = {}
    if "safe_serialization" in inspect.signature(model.save_pretrained).parameters:
        kwargs["safe_serialization"] = True  # 4.x defaults to pickled .bin; 5.x always writes safetensors
    model.save_pretrained(str(out), **kwargs)
    if not (out / "model.safetensors").is_file():
        raise OSError(f"saving the policy wrote no model.safetensors in {out} (sharded or .bin weights "
                      "are not a policy folder)")


def _make_tokenizer_portable(tokenizer, out: Path) -> None:
    """vocab.json + merges.txt, an old-style tokenizer.json and a 4.30-known tokenizer_class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        backend.model.save(str(out))  # vocab.json + merges.txt, readable by every version
        _legacy_tokenizer_json(out / "tokenizer.json")
        byte_level = "ByteLevel" in json.dumps(json.loads(backend.to_str()).get("pre_tokenizer"))
    else:  # a slow tokenizer wrote its own vocab files
        byte_level = (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    if not ((out / "vocab.json").is_file() and (out / "merges.txt").is_file()):
        raise ValueError(f"{type(tokenizer).__name__} is not a BPE tokenizer with vocab.json + merges.txt: "
                         "a policy folder needs one that transformers 4.30 can read")
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    for key in _STALE_TOKENIZER_KEYS:
        config.pop(key, None)
    if byte_level:
        config["tokenizer_class"] = GPT2_TOKENIZER_CLASS
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _legacy_tokenizer_json(path: Path) -> None:
    """BPE merges as "a b" strings (what tokenizers 0.13 reads; current versions read both forms)."""
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    merges = model.get("merges")
    if not merges or isinstance(merges[0], str):
        return
    if any(" " in a or " " in b for a, b in merges):  # not expressible as strings: drop, vocab + merges remain
        path.unlink()
        return
    model["merges"] = [f"{a} {b}" for a, b in merges]
    model.pop("ignore_merges", None)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` so that a reader (or a crash) sees the old file or the whole new one:
    a temporary file beside it, fsynced, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable enough
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_folder(new: Path, folder: Path) -> None:
    """Rename `new` to `folder`; an existing `folder` is moved aside first and restored on failure."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
        old.rmdir()
        os.replace(folder, old)
    try:
        os.replace(new, folder)
    except BaseException:
        if old is not None:
            os.replace(old, folder)
        raise
    fsync_dir(folder.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
