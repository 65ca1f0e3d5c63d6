"""TPO pair data: images with their caption (the winner c_w) and edited captions (the losers c_l).

TPO (TDPO/TKTO) needs no second image: for an image x with a good caption c, an edited caption that no
longer describes x is the losing text. `python -m trainer tpo-data` writes a data folder:

- `tpo_pairs.jsonl`, one item per line:
  `{"id", "image", "caption", "negatives": [{"text", "type"}], "split"}`; `image` is relative to the
  folder or absolute, `type` is one of content, attribute, spatial, context (or `other` for an
  editor that does not say), `split` is train or valid;
- `tpo_data.json`, the summary: source, editor, seed, counts, skipped items with reasons.

`read_tpo_data(folder)` is what the trainers read; a bad line is one `CorpusError` naming file:line.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .corpus import CorpusError, jsonl_objects, normalize_prompt

PAIRS_FILE = "tpo_pairs.jsonl"
SUMMARY_FILE = "tpo_data.json"
EDIT_TYPES = ("content", "attribute", "spatial", "context")
NEGATIVE_TYPES = (*EDIT_TYPES, "other")
SPLITS = ("train", "valid")


@dataclass(frozen=True)
class Negative:
    """An edited caption that no longer matches the image, and the kind of edit that made it."""

    text: str
    type: str = "other"


@dataclass(frozen=True)
class TPOItem:
    """One image, its caption and its negatives; `image` is an absolute path."""

    id: str
    image: Path
    caption: str
    negatives: tuple[Negative, ...]
    split: str = "train"

    def to_record(self, folder: Path) -> dict:
        """The JSONL record, with the image path relative to `folder` when it lies inside it."""
        try:
            image = self.image.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            image = str(self.image.resolve())
        return {"id": self.id, "image": image, "caption": self.caption,
                "negatives": [{"text": n.text, "type": n.type} for n in self.negatives], "split": self.split}


def pairs_file(folder: Path | str) -> Path:
    """The JSONL of a data folder (a path to the JSONL itself is accepted too)."""
    path = Path(folder).expanduser()
    return path if path.suffix.lower() == ".jsonl" else path / PAIRS_FILE


def read_tpo_data(folder: Path | str, *, check_images: bool = True) -> list[TPOItem]:
    """Every item of a TPO data folder (written by `python -m trainer tpo-data`), in file order.

    Raises `CorpusError` (file:line) for a missing file, invalid JSON, a missing or empty field, an
    unknown edit type or split, a repeated id, or (with `check_images`) an image that is not there.
    """
    path = pairs_file(folder)
    if not path.is_file():
        hint = "" if path.parent.is_dir() else "; build one with: python -m trainer tpo-data ... --out FOLDER"
        raise CorpusError(path, f"no TPO data file{hint}")
    base = path.parent
    items: list[TPOItem] = []
    seen: dict[str, int] = {}
    for line, record in jsonl_objects(path, "'image', 'caption' and 'negatives'"):
        items.append(_item(path, base, line, record, seen, check_images))
    if not items:
        raise CorpusError(path, "the TPO data file holds no items")
    return items


def _item(path: Path, base: Path, line: int, record: dict, seen: dict[str, int], check_images: bool) -> TPOItem:
    def fail(problem: str) -> CorpusError:
        return CorpusError(path, problem, line)

    for key in ("image", "caption"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise fail(f"'{key}' must be non-empty text (fields: {', '.join(record) or 'none'})")
    caption = normalize_prompt(record["caption"])
    image = Path(record["image"]).expanduser()
    image = image if image.is_absolute() else base / image
    if check_images and not image.is_file():
        raise fail(f"image {record['image']!r} not found (looked at {image})")
    raw_negatives = record.get("negatives")
    if not isinstance(raw_negatives, list) or not raw_negatives:
        raise fail("'negatives' must be a non-empty list of {\"text\", \"type\"}")
    negatives = []
    for n, raw in enumerate(raw_negatives, 1):
        if isinstance(raw, str):
            raw = {"text": raw}
        if not isinstance(raw, dict) or not isinstance(raw.get("text"), str) or not raw["text"].strip():
            raise fail(f"negative {n} must be {{\"text\": non-empty text, \"type\": ...}}")
        kind = raw.get("type", "other")
        if kind not in NEGATIVE_TYPES:
            raise fail(f"negative {n} has type {kind!r}; use one of {', '.join(NEGATIVE_TYPES)}")
        text = normalize_prompt(raw["text"])
        if same_caption(text, caption):
            raise fail(f"negative {n} is the caption itself ({text!r})")
        negatives.append(Negative(text, kind))
    split = record.get("split", "train")
    if split not in SPLITS:
        raise fail(f"'split' must be one of {', '.join(SPLITS)}; got {split!r}")
    item_id = str(record.get("id", line))
    if item_id in seen:
        raise fail(f"id {item_id!r} repeats line {seen[item_id]}")
    seen[item_id] = line
    return TPOItem(item_id, image.resolve(), caption, tuple(negatives), split)


def caption_key(text: str) -> str:
    """A caption without case, punctuation or extra whitespace: two captions with the same key say the same."""
    kept = "".join(ch if ch.isalnum() else " " for ch in text.lower())
    return " ".join(kept.split())


def same_caption(a: str, b: str) -> bool:
    return caption_key(a) == caption_key(b)


def write_tpo_data(folder: Path | str, items: Sequence[TPOItem], summary: dict) -> Path:
    """Write `tpo_pairs.jsonl` and `tpo_data.json` into `folder`, each atomically; returns the JSONL path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(item.to_record(folder), ensure_ascii=False) + "\n" for item in items)
    _write_atomic(folder / PAIRS_FILE, lines)
    _write_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return folder / PAIRS_FILE


def read_summary(folder: Path | str) -> dict:
    """`tpo_data.json` of a data folder ({} when absent)."""
    path = Path(folder) / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CorpusError(path, f"invalid JSON ({e})") from None


def _write_atomic(path: Path, text: str) -> None:
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
