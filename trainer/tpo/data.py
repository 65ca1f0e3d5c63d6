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

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from promptist_core.policy_folder import write_text_atomic

from ..policy.corpus import CorpusError, jsonl_objects, normalize_prompt

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
    write_text_atomic(folder / PAIRS_FILE, lines)
    write_text_atomic(folder / SUMMARY_FILE, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
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


# --- building a data folder from what users have -----------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what ComfyUI's LoadImageTextSetFromFolderNode reads
MAX_LISTED_SKIPS = 200  # skipped items named one by one in tpo_data.json; the rest are only counted


@dataclass(frozen=True)
class Captioned:
    """An image and its caption, before any negative exists."""

    id: str
    image: Path
    caption: str


@dataclass
class Gathered:
    """What a source yielded: the usable items and, for every other one, why not."""

    items: list[Captioned]
    skipped: list[dict]
    source: dict
    read: int = 0  # items the source held, usable or not

    def done(self) -> Gathered:
        self.read = len(self.items) + len(self.skipped)
        return self

    def skip(self, item: str, reason: str, detail: str = "") -> None:
        self.skipped.append({"item": item, "reason": reason, **({"detail": detail} if detail else {})})


def image_problem(path: Path) -> tuple[str, str] | None:
    """Why an image file cannot be used, as (reason, detail); None when PIL decodes it completely."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # decodes every byte: a truncated file fails here, not at training time
    except FileNotFoundError:
        return "image not found", str(path)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        return "unreadable image", f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def gather_folder(folder: Path | str) -> Gathered:
    """Images with same-name `.txt` captions, the kohya / ComfyUI folder convention: the folder's own
    images and those of its subfolders one level down (kohya's `10_name` repeat folders; the repeat
    count is not applied, every image is one item)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise CorpusError(folder, "no such image folder" if not folder.exists() else "not a folder")
    gathered = Gathered([], [], {"kind": "images", "path": str(folder)})
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files += sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CorpusError(folder, f"no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its subfolders")
    for path in files:
        name = path.relative_to(folder).as_posix()
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            gathered.skip(name, "no caption file", caption_file.name)
            continue
        try:
            caption = normalize_prompt(caption_file.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError) as e:
            gathered.skip(name, "unreadable caption file", f"{caption_file.name}: {type(e).__name__}")
            continue
        if not caption:
            gathered.skip(name, "empty caption")
            continue
        problem = image_problem(path)
        if problem:
            gathered.skip(name, *problem)
            continue
        gathered.items.append(Captioned(Path(name).with_suffix("").as_posix(), path.resolve(), caption))
    return gathered.done()


def gather_jsonl(path: Path | str, *, image_field: str = "image", caption_field: str = "caption") -> Gathered:
    """`{image, caption}` lines; relative image paths are relative to the JSONL's folder. A line that
    is not a JSON object with an image is an error; a missing/empty caption or a bad image is skipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusError(path, "no such JSONL file" if not path.exists() else "not a file")
    gathered = Gathered([], [], {"kind": "jsonl", "path": str(path)})
    seen: set[str] = set()
    for line, record in jsonl_objects(path, f"'{image_field}' and '{caption_field}'"):
        where = f"{path.name}:{line}"
        image = record.get(image_field)
        if not isinstance(image, str) or not image.strip():
            raise CorpusError(path, f"'{image_field}' must be an image path (fields: {', '.join(record) or 'none'})",
                              line)
        caption = record.get(caption_field)
        if caption is None:
            gathered.skip(where, "no caption", f"no '{caption_field}' field")
            continue
        if not isinstance(caption, str):
            raise CorpusError(path, f"'{caption_field}' is {type(caption).__name__}, not text", line)
        caption = normalize_prompt(caption)
        if not caption:
            gathered.skip(where, "empty caption")
            continue
        file = Path(image).expanduser()
        file = file if file.is_absolute() else path.parent / file
        problem = image_problem(file)
        if problem:
            gathered.skip(where, *problem)
            continue
        item_id = str(record.get("id", f"line{line}"))
        if item_id in seen:
            raise CorpusError(path, f"id {item_id!r} given twice", line)
        seen.add(item_id)
        gathered.items.append(Captioned(item_id, file.resolve(), caption))
    return gathered.done()


def gather_prompts(prompts: Sequence[str], generator, images_dir: Path, *, seed: int = 0, steps: int = 25,
                   guidance: float = 7.5, size: tuple[int, int] = (512, 512), batch_size: int = 4,
                   source: dict | None = None, progress=None) -> Gathered:
    """One image per prompt drawn by the user's model (an `ImageGenerator`), saved as PNG under
    `images_dir`, seeded by (prompt, seed). Images already there from an earlier run are kept, so an
    interrupted build continues where it stopped and the model draws every image once. A file's name
    holds a hash of what drew it (model, prompt, seed, steps, guidance, size): an edited prompt file or
    other settings never reuse an image of something else."""
    import torch
    from PIL import Image

    from ..policy.pairs import strip_weight_syntax
    from ..policy.rewards import image_seed

    images_dir.mkdir(parents=True, exist_ok=True)
    gathered = Gathered([], [], dict(source or {"kind": "prompts"}))
    todo: list[tuple[Captioned, int]] = []
    for i, prompt in enumerate(prompts):
        caption = strip_weight_syntax(prompt)  # the text the image shows, without (weights:1.2)
        if not caption:
            gathered.skip(f"prompt {i + 1}", "empty caption")
            continue
        drawn_by = f"{(source or {}).get('sd', '')}\0{caption}\0{seed}\0{steps}\0{guidance:g}\0{size[0]}x{size[1]}"
        key = hashlib.sha256(drawn_by.encode()).hexdigest()[:12]
        item = Captioned(f"p{i:06d}", (images_dir / f"p{i:06d}-{key}.png").resolve(), caption)
        gathered.items.append(item)
        if not item.image.is_file() or image_problem(item.image):
            todo.append((item, image_seed(caption, 0, seed)))
    for start in range(0, len(todo), batch_size):
        batch = todo[start:start + batch_size]
        pixels = generator.generate([c.caption for c, _ in batch], [s for _, s in batch], steps=steps,
                                    guidance=guidance, size=size)
        for (item, _), image in zip(batch, pixels, strict=True):
            array = (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
            tmp = item.image.with_suffix(".tmp.png")
            Image.fromarray(array).save(tmp)
            os.replace(tmp, item.image)
        if progress is not None:
            progress(min(start + batch_size, len(todo)), len(todo))
    gathered.source.update(drawn=len(todo), reused=len(gathered.items) - len(todo), steps=steps, guidance=guidance,
                           size=list(size), seed=seed)
    return gathered.done()


def clip_ranked(items: Sequence[TPOItem], clip, *, batch_size: int = 16) -> tuple[list[TPOItem], int]:
    """Keep the negatives our CLIP ranks below the caption for the item's image (cos(x, c_w) > cos(x, c_l));
    items left with none are dropped. Returns (items kept, negatives dropped)."""
    from PIL import Image

    from promptist_core.rewards import clip_cosine

    kept, dropped = [], 0
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = []
        for item in chunk:
            with Image.open(item.image) as image:
                images.append(image.convert("RGB"))
        image_emb = clip.encode_images(images)
        for item, emb in zip(chunk, image_emb, strict=True):
            texts = [item.caption, *(n.text for n in item.negatives)]
            cos = clip_cosine(emb.unsqueeze(0).expand(len(texts), -1), clip.encode_texts(texts).to(emb.device))
            negatives = tuple(n for n, c in zip(item.negatives, cos[1:].tolist(), strict=True) if c < float(cos[0]))
            dropped += len(item.negatives) - len(negatives)
            if negatives:
                kept.append(TPOItem(item.id, item.image, item.caption, negatives, item.split))
    return kept, dropped


def build_tpo_items(gathered: Gathered, editor, *, negatives_per_caption: int = 2, seed: int = 0,
                    valid_fraction: float = 0.05) -> list[TPOItem]:
    """Negatives from `editor` for every gathered caption, and the split by caption hash (an item
    whose caption has no usable negative is skipped, with its reason)."""
    from ..policy.pairs import split_of

    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1); got {valid_fraction}")
    if not 1 <= negatives_per_caption <= 16:
        raise ValueError(f"negatives per caption must be between 1 and 16; got {negatives_per_caption}")
    captions = [c.caption for c in gathered.items]
    negatives = editor(captions, negatives_per_caption)
    items = []
    for captioned, found in zip(gathered.items, negatives, strict=True):
        if not found:
            gathered.skip(captioned.id, "no negative", "the editor made no negative that differs from the caption")
            continue
        items.append(TPOItem(captioned.id, captioned.image, captioned.caption, tuple(found),
                             split_of(captioned.caption, seed, valid_fraction)))
    return items


def data_summary(gathered: Gathered, items: Sequence[TPOItem], *, editor: str, seed: int, negatives_per_caption: int,
                 valid_fraction: float, dropped_negatives: dict, clip_filter: str | None = None) -> dict:
    """What `tpo_data.json` says: where the data came from, how it was made, counts, what was skipped."""
    from collections import Counter

    reasons = Counter(s["reason"] for s in gathered.skipped)
    return {
        "format": 1,
        "source": gathered.source,
        "editor": editor,
        "seed": seed,
        "negatives_per_caption": negatives_per_caption,
        "valid_fraction": valid_fraction,
        "clip_filter": clip_filter,
        "counts": {
            "read": gathered.read,
            "items": len(items),
            "splits": dict(Counter(i.split for i in items)),
            "negatives": sum(len(i.negatives) for i in items),
            "negative_types": dict(Counter(n.type for i in items for n in i.negatives)),
            "skipped": len(gathered.skipped),
        },
        "skipped": {"reasons": dict(reasons), "items": gathered.skipped[:MAX_LISTED_SKIPS]},
        "dropped_negatives": dict(dropped_negatives),
    }


def build_run_data(folder: Path, gathered: Gathered, editor, *, editor_name: str, negatives_per_caption: int,
                   seed: int, valid_fraction: float, resume: bool, label: str = "save name") -> int:
    """Write a training run's TPO data folder (the hosts' TPO Train: ComfyUI's node, the webui's tab); a
    continued run must get the very same pairs, else ValueError naming `label`. Returns the item count."""
    from ..training_run import differs_from_run

    items = build_tpo_items(gathered, editor, negatives_per_caption=negatives_per_caption, seed=seed,
                            valid_fraction=valid_fraction)
    if not items:
        reasons = ", ".join(sorted({s["reason"] for s in gathered.skipped})) or "no captions"
        raise ValueError(f"no usable image with a caption and a negative ({reasons})")
    if resume and pairs_file(folder).is_file():
        before = [(i.id, i.caption, i.negatives, i.split) for i in read_tpo_data(folder, check_images=False)]
        if before != [(i.id, i.caption, i.negatives, i.split) for i in items]:
            raise ValueError(differs_from_run("images, captions or negatives", Path(folder).parent, label))
        return len(items)
    write_tpo_data(folder, items, data_summary(gathered, items, editor=editor_name, seed=seed,
                                               negatives_per_caption=negatives_per_caption,
                                               valid_fraction=valid_fraction, dropped_negatives={}))
    return len(items)
