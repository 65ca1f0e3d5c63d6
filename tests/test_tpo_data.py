"""TPO pair data: the folder format and its reader, the caption editors, the three sources, tpo-eval."""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES
from PIL import Image

from trainer.policy.corpus import CorpusError
from trainer.tpo.caption_edits import (
    ATTRIBUTES,
    CONTEXT,
    MOTION,
    NUMBERS,
    OBJECTS,
    SPATIAL,
    RulesEditor,
    article_for,
    edit_caption,
    editor_from_spec,
    plural,
)
from trainer.tpo.data import (
    EDIT_TYPES,
    PAIRS_FILE,
    Negative,
    TPOItem,
    caption_key,
    read_tpo_data,
    write_tpo_data,
)


def _png(path: Path, colour=(200, 30, 30), size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


# --- the reader ---------------------------------------------------------------------------------

def test_written_data_reads_back_with_images_relative_to_the_folder(tmp_path):
    inside = _png(tmp_path / "data" / "images" / "a.png")
    outside = _png(tmp_path / "elsewhere" / "b.png")
    items = [TPOItem("a", inside, "a red apple", (Negative("a green apple", "attribute"),), "train"),
             TPOItem("b", outside, "a dog left of a cat", (Negative("a dog right of a cat", "spatial"),
                                                             Negative("a dog left of a horse", "content")), "valid")]
    write_tpo_data(tmp_path / "data", items, {"source": "test"})
    lines = [json.loads(x) for x in (tmp_path / "data" / PAIRS_FILE).read_text().splitlines()]
    assert lines[0]["image"] == "images/a.png"
    assert Path(lines[1]["image"]).is_absolute()
    assert read_tpo_data(tmp_path / "data") == [
        TPOItem("a", inside.resolve(), "a red apple", (Negative("a green apple", "attribute"),), "train"),
        TPOItem("b", outside.resolve(), "a dog left of a cat", (Negative("a dog right of a cat", "spatial"),
                                                              Negative("a dog left of a horse", "content")), "valid")]


@pytest.mark.parametrize("record, message", [
    ({"image": "x.png", "negatives": [{"text": "b", "type": "content"}]}, "'caption' must be non-empty text"),
    ({"image": "x.png", "caption": "  ", "negatives": [{"text": "b"}]}, "'caption' must be non-empty text"),
    ({"image": "missing.png", "caption": "a", "negatives": [{"text": "b"}]}, "image 'missing.png' not found"),
    ({"image": "x.png", "caption": "a cat", "negatives": []}, "'negatives' must be a non-empty list"),
    ({"image": "x.png", "caption": "a cat", "negatives": [{"text": "a dog", "type": "colour"}]},
     "negative 1 has type 'colour'"),
    ({"image": "x.png", "caption": "a cat", "negatives": [{"text": "A  cat."}]}, "negative 1 is the caption itself"),
    ({"image": "x.png", "caption": "a cat", "negatives": [{"text": "a dog"}], "split": "test"},
     "'split' must be one of train, valid"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, record, message):
    _png(tmp_path / "x.png")
    good = {"id": "0", "image": "x.png", "caption": "a cat", "negatives": [{"text": "a dog", "type": "content"}]}
    (tmp_path / PAIRS_FILE).write_text(json.dumps(good) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(CorpusError) as e:
        read_tpo_data(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / PAIRS_FILE}:3: {message}")


def test_reader_errors_for_invalid_json_repeated_ids_and_a_missing_file(tmp_path):
    with pytest.raises(CorpusError, match="no TPO data file"):
        read_tpo_data(tmp_path)
    _png(tmp_path / "x.png")
    good = json.dumps({"id": "7", "image": "x.png", "caption": "a cat", "negatives": [{"text": "a dog"}]})
    (tmp_path / PAIRS_FILE).write_text(good + "\n{oops\n")
    with pytest.raises(CorpusError, match=r":2: invalid JSON"):
        read_tpo_data(tmp_path)
    (tmp_path / PAIRS_FILE).write_text(good + "\n" + good + "\n")
    with pytest.raises(CorpusError, match=r":2: id '7' repeats line 1"):
        read_tpo_data(tmp_path)
    (tmp_path / PAIRS_FILE).write_text("\n")
    with pytest.raises(CorpusError, match="holds no items"):
        read_tpo_data(tmp_path / PAIRS_FILE)


# --- the rules editor on real captions ------------------------------------------------------------

COCO = FIXTURES / "prompts" / "coco_captions_val2017.txt"
DIFFUSIONDB = FIXTURES / "prompts" / "diffusiondb_imagereward.txt"
needs_captions = pytest.mark.skipif(not COCO.is_file() or not DIFFUSIONDB.is_file(),
                                    reason="real captions not in ../shared/fixtures/prompts")


def _sample(path: Path, n: int, seed: int) -> list[str]:
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    return random.Random(seed).sample(lines, n)


def _changed_words(caption: str, negative: str) -> tuple[set[str], set[str]]:
    """Words (lowercase) the edit took out and put in."""
    a = Counter(re.findall(r"[\w'-]+", caption.lower()))
    b = Counter(re.findall(r"[\w'-]+", negative.lower()))
    return set(a - b), set(b - a)


def _vocabulary(*tables) -> set[str]:
    words = set()
    for table in tables:
        for item in table:
            for w in (item if isinstance(item, tuple) else (item,)):
                words.update(w.split())
                words.update(plural(w).split())
    return words


CONTENT_WORDS = _vocabulary(*OBJECTS.values(), NUMBERS) | {"a", "an", "one", "pair", "couple", "few", "several",
                                                           "many", "and", "with"}
ATTRIBUTE_WORDS = _vocabulary(*(g for groups in ATTRIBUTES.values() for g in groups)) | {"style"}
ATTRIBUTE_WORDS |= {"young", "old", "tall", "bald", "blond", "bearded", "smiling", "crying"}
SPATIAL_WORDS = _vocabulary(*SPATIAL, *MOTION) | {"on", "under", "in", "the", "of", "its", "far", "from", "top",
                                                  "left", "corner", "background", "side", "hanging", "ceiling",
                                                  "everything", "else", "floating", "air", "seen", "viewed",
                                                  "reflected", "a", "mirror", "lying", "upside"}
CONTEXT_WORDS = _vocabulary(*(g for groups in CONTEXT.values() for g in groups)) | {
    "at", "in", "the", "on", "a", "underwater", "outer", "space", "lights", "neon", "under"}
TYPE_WORDS = {"content": CONTENT_WORDS, "attribute": ATTRIBUTE_WORDS, "spatial": SPATIAL_WORDS,
              "context": CONTEXT_WORDS}


@needs_captions
@pytest.mark.parametrize("corpus, least", [(COCO, 0.9), (DIFFUSIONDB, 0.85)])
@pytest.mark.parametrize("kind", EDIT_TYPES)
def test_each_edit_type_changes_most_real_captions_with_words_of_its_type(corpus, least, kind):
    captions = _sample(corpus, 300, seed=1)
    of_type = 0
    for caption in captions:
        negative = edit_caption(caption, kind, seed=0)
        if negative is None:
            continue
        assert caption_key(negative) != caption_key(caption)
        removed, added = _changed_words(caption, negative)
        changed = removed | added
        if kind == "content":  # an object or a count changed (removing "with a lamp" may take an adjective along)
            of_type += bool(changed & (CONTENT_WORDS - {"a", "an", "and", "with"}) or any(w.isdigit() for w in changed))
        # the other kinds touch only words of their own kind (a, an: articles fixed before them; is/are: agreement)
        elif changed and changed <= TYPE_WORDS[kind] | {"a", "an", "is", "are", "have", "has"}:
            of_type += 1
    assert of_type / len(captions) >= least, f"{kind}: {of_type}/{len(captions)}"


@needs_captions
def test_rules_negatives_are_deterministic_per_seed_one_type_each_and_never_the_caption():
    captions = _sample(COCO, 200, seed=2)
    first = RulesEditor(seed=3)(captions, 3)
    assert first == RulesEditor(seed=3)(captions, 3)
    assert RulesEditor(seed=3)(list(reversed(captions)), 3) == list(reversed(first))  # per caption, not per batch
    assert first != RulesEditor(seed=4)(captions, 3)
    types = Counter()
    for caption, negatives in zip(captions, first, strict=True):
        assert len(negatives) == 3
        assert len({n.type for n in negatives}) == 3
        assert len({caption_key(n.text) for n in negatives} | {caption_key(caption)}) == 4
        types.update(n.type for n in negatives)
    assert min(types[k] for k in EDIT_TYPES) >= 0.15 * sum(types.values())


def test_rules_edits_keep_case_and_fix_articles():
    assert edit_caption("The cat is left of the Dog", "spatial") == "The cat is right of the Dog"
    assert edit_caption("Two Cats IN FRONT OF a house", "spatial") == "Two Cats BEHIND a house"
    assert edit_caption("A Woman's hat", "spatial", seed=1) == "A Woman's hat, " + edit_caption(
        "A Woman's hat", "spatial", seed=1).split(", ")[-1]  # no "woman upside down's hat"
    outs = {edit_caption(c, k, seed=s) for c in ("An apple on a table", "A dog next to an orange umbrella.")
            for k in EDIT_TYPES for s in range(10)}
    assert len(outs) > 30
    for out in outs:
        assert not re.search(r"\ba [aeiou]|\ban [bcdfgjklmnpqrstvwxz]", out, re.IGNORECASE), out
        assert out[0].isupper()


def test_rules_swaps_keep_singular_and_plural():
    outs = {edit_caption("three dogs and a horse", "content", seed=s) for s in range(30)}
    for out in outs:
        assert not re.search(r"\b(?:three|two|four|five)\s+(?:dog|horse|cat|cow)\b(?!s)", out), out
    assert plural("knife") == "knives" and plural("hot dog") == "hot dogs" and plural("bus") == "buses"
    assert article_for("umbrella") == "an" and article_for("unicorn") == "a" and article_for("hour") == "an"


def test_hook_editors_reject_the_caption_and_repeats_and_read_typed_lines(tmp_path):
    script = tmp_path / "negate.py"
    script.write_text("import sys\n"
                      "for i, line in enumerate(sys.stdin):\n"
                      "    t = line.rstrip('\\n')\n"
                      "    print(t.upper() + '!' if i % 2 else 'spatial\\t' + t.replace('left', 'right'))\n")
    editor = editor_from_spec(f"command:{sys.executable} {script}")
    out = editor(["a cat left of a dog", "a red car"], 2)
    assert out == [[Negative("a cat right of a dog", "spatial")], [Negative("a red car", "other")][:0]]
    assert editor.dropped["negative equals the caption"] == 3
    with pytest.raises(ValueError, match="--editor must be rules"):
        editor_from_spec("gpt:x")


# --- the three sources, through the command ---------------------------------------------------------

def _truncated_png(path: Path) -> Path:
    _png(path, size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def _run(args: list[str], capsys) -> tuple[int, dict | str]:
    from trainer.cli import main

    code = main(args)
    captured = capsys.readouterr()
    return code, (json.loads(captured.out.strip().splitlines()[-1]) if code == 0 else captured.err.strip())


def test_image_folder_source_skips_broken_images_and_missing_or_empty_captions(tmp_path, capsys):
    images = tmp_path / "set"
    _png(images / "apple.png")
    (images / "apple.txt").write_text("A red apple on a wooden table.\n")
    _png(images / "10_dogs" / "dogs.jpg".replace(".jpg", ".png"))
    (images / "10_dogs" / "dogs.txt").write_text("two dogs sitting next to a cat")
    Image.new("RGB", (16, 16)).save(images / "cat.webp")
    (images / "cat.txt").write_text("a cat in the snow")
    _truncated_png(images / "broken.png")
    (images / "broken.txt").write_text("a horse")
    _png(images / "uncaptioned.jpeg")
    _png(images / "blank.png")
    (images / "blank.txt").write_text("  \n")
    (images / "notes.md").write_text("not an image")
    out = tmp_path / "data"
    code, stats = _run(["tpo-data", "--images", str(images), "--out", str(out), "--negatives-per-caption", "3",
                        "--valid-fraction", "0.5", "--seed", "1"], capsys)
    assert code == 0
    assert stats["read"] == 6 and stats["items"] == 3 and stats["negatives"] == 9
    assert stats["skipped_reasons"] == {"unreadable image": 1, "no caption file": 1, "empty caption": 1}
    items = read_tpo_data(out)
    assert [i.id for i in items] == ["apple", "cat", "10_dogs/dogs"]
    assert items[0].image == (images / "apple.png").resolve() and items[0].caption == "A red apple on a wooden table."
    assert all(len({n.type for n in i.negatives}) == 3 for i in items)
    summary = json.loads((out / "tpo_data.json").read_text())
    assert summary["editor"] == "rules" and summary["seed"] == 1 and summary["source"]["kind"] == "images"
    assert {s["item"]: s["reason"] for s in summary["skipped"]["items"]} == {
        "broken.png": "unreadable image", "uncaptioned.jpeg": "no caption file", "blank.png": "empty caption"}
    # the same command writes the same data; the split follows the caption, not the position
    first = (out / PAIRS_FILE).read_text()
    assert _run(["tpo-data", "--images", str(images), "--out", str(out), "--negatives-per-caption", "3",
                 "--valid-fraction", "0.5", "--seed", "1"], capsys)[0] == 0
    assert (out / PAIRS_FILE).read_text() == first
    assert {i.split for i in items} == {"train", "valid"}


def test_jsonl_source_resolves_images_against_its_folder_and_skips_bad_lines(tmp_path, capsys):
    _png(tmp_path / "pics" / "a.png")
    _truncated_png(tmp_path / "pics" / "b.png")
    _png(tmp_path / "pics" / "c.png")
    lines = [{"image": "pics/a.png", "caption": "a black cat on a chair"},
             {"image": "pics/b.png", "caption": "a broken picture"},
             {"image": "pics/c.png"},
             {"image": str((tmp_path / "pics" / "c.png").resolve()), "caption": "a bus in the city", "id": "bus"},
             {"image": "pics/missing.png", "caption": "nothing"}]
    (tmp_path / "set.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    code, stats = _run(["tpo-data", "--jsonl", str(tmp_path / "set.jsonl"), "--out", str(tmp_path / "data")], capsys)
    assert code == 0 and stats["items"] == 2
    assert stats["skipped_reasons"] == {"unreadable image": 1, "no caption": 1, "image not found": 1}
    items = read_tpo_data(tmp_path / "data")
    assert [(i.id, i.image.name) for i in items] == [("line1", "a.png"), ("bus", "c.png")]
    # a line that is not an item at all is one error naming it
    (tmp_path / "bad.jsonl").write_text(json.dumps(lines[0]) + "\n" + json.dumps({"caption": "x"}) + "\n")
    code, err = _run(["tpo-data", "--jsonl", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "d2")], capsys)
    assert code == 2 and "bad.jsonl:2: 'image' must be an image path" in err and "\n" not in err


def test_nothing_usable_is_one_error_and_writes_nothing(tmp_path, capsys):
    _truncated_png(tmp_path / "set" / "a.png")
    (tmp_path / "set" / "a.txt").write_text("a cat")
    _png(tmp_path / "set" / "b.png")
    code, err = _run(["tpo-data", "--images", str(tmp_path / "set"), "--out", str(tmp_path / "data")], capsys)
    assert code == 2 and "\n" not in err
    assert "no usable image with a caption (2 read; skipped: 1 unreadable image, 1 no caption file)" in err
    assert not (tmp_path / "data").exists()
    code, err = _run(["tpo-data", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "data")], capsys)
    assert code == 2 and "--prompts needs --sd MODEL" in err


def test_prompts_source_draws_each_image_once_with_the_users_model(tmp_path, tiny_sd_dir, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red car on a street\n(a blue house:1.2) at night\na red car on a street\n")
    out = tmp_path / "data"
    args = ["tpo-data", "--prompts", str(prompts), "--sd", str(tiny_sd_dir), "--out", str(out), "--steps", "2",
            "--width", "64", "--height", "64", "--device", "cpu", "--seed", "5"]
    code, stats = _run(args, capsys)
    assert code == 0 and stats["items"] == 2
    items = read_tpo_data(out)
    assert [i.caption for i in items] == ["a red car on a street", "a blue house at night"]
    assert [i.image.parent for i in items] == [(out / "images").resolve()] * 2
    assert [i.image.name[:8] for i in items] == ["p000000-", "p000001-"]
    assert json.loads((out / PAIRS_FILE).read_text().splitlines()[0])["image"] == f"images/{items[0].image.name}"
    with Image.open(items[0].image) as image:
        assert image.size == (64, 64)
    pixels = [items[0].image.read_bytes(), items[1].image.read_bytes()]
    assert pixels[0] != pixels[1]
    summary = json.loads((out / "tpo_data.json").read_text())
    assert summary["source"]["drawn"] == 2 and summary["source"]["seed"] == 5
    # run again: the images are reused, not drawn again, and stay the same
    code, _ = _run(args, capsys)
    summary = json.loads((out / "tpo_data.json").read_text())
    assert code == 0 and summary["source"]["drawn"] == 0 and summary["source"]["reused"] == 2
    assert [i.image.read_bytes() for i in read_tpo_data(out)] == pixels
    # the same seed draws the same image in a fresh folder
    code, _ = _run([*args[:6], str(tmp_path / "again"), *args[7:]], capsys)
    assert (tmp_path / "again" / "images" / items[0].image.name).read_bytes() == pixels[0]
    # an edited prompt file: the changed prompt is drawn anew, the unchanged one reused
    prompts.write_text("a red car on a street\na green house at night\n")
    code, _ = _run(args, capsys)
    summary = json.loads((out / "tpo_data.json").read_text())
    assert code == 0 and summary["source"]["drawn"] == 1 and summary["source"]["reused"] == 1
    assert read_tpo_data(out)[1].caption == "a green house at night"


def test_clip_filter_keeps_only_negatives_ranked_below_the_caption(tmp_path, tiny_clip_models_dir):
    from promptist_core.clip_models import load_clip
    from promptist_core.rewards import clip_cosine
    from trainer.tpo.data import clip_ranked

    clip = load_clip("tiny-hf-clip", models_dir=tiny_clip_models_dir, device="cpu")
    items = []
    for i, colour in enumerate([(250, 10, 10), (10, 250, 10), (10, 10, 250), (200, 200, 20)]):
        image = _png(tmp_path / f"{i}.png", colour, size=(32, 32))
        items.append(TPOItem(str(i), image, "a red square", (Negative("a green square", "attribute"),
                                                              Negative("a red circle", "content"),
                                                              Negative("a square on the left", "spatial")), "train"))
    kept, dropped = clip_ranked(items, clip)
    expected_kept = 0
    for item in items:
        emb = clip.encode_images([Image.open(item.image).convert("RGB")])
        texts = clip.encode_texts([item.caption, *(n.text for n in item.negatives)])
        cos = clip_cosine(emb.expand(len(texts), -1), texts)
        wanted = [n for n, c in zip(item.negatives, cos[1:], strict=True) if c < cos[0]]
        got = next((k.negatives for k in kept if k.id == item.id), ())
        assert list(got) == wanted
        expected_kept += len(wanted)
    assert dropped == 12 - expected_kept and 0 < dropped < 12


# --- tpo-eval on the tiny pipeline and the tiny scorer -----------------------------------------------

def _kohya_lora(tiny_sd_dir: Path, path: Path, *, scale: float) -> Path:
    """A LoRA for the tiny UNet: zero (scale 0: the base model exactly) or random."""
    from builders_sd import load_tiny_sd

    from trainer.tpo.lora import attach_lora, save_kohya_lora

    unet = load_tiny_sd(tiny_sd_dir).unet
    loras = attach_lora(unet, rank=2, alpha=2)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for lora in loras.values():
            lora.up.weight.copy_(torch.randn(lora.up.weight.shape, generator=generator) * scale)
    return save_kohya_lora(path, loras, dtype=torch.float32)


def test_tpo_eval_compares_base_and_lora_images_of_shared_seeds(tmp_path, tiny_sd_dir, tiny_clip_models_dir, capsys):
    from promptist_core.generators import load_diffusers_generator
    from promptist_core.rewards import load_scorer
    from trainer.tpo.evaluate import evaluation_seeds

    prompts = tmp_path / "held_out.txt"
    prompts.write_text("a red car on a street\na cat on a couch\na house at night\n")
    common = ["tpo-eval", "--sd", str(tiny_sd_dir), "--prompts", str(prompts), "--n", "2", "--images-per-prompt",
              "2", "--seed", "3", "--steps", "2", "--size", "64", "--clip-model", "tiny-open-clip-hub",
              "--aesthetic-head", "tiny-head.safetensors", "--pick-model", "tiny-pick", "--models-dir",
              str(tiny_clip_models_dir), "--device", "cpu"]
    # a zero LoRA is the base model: every pair identical, every comparison a tie
    zero = _kohya_lora(tiny_sd_dir, tmp_path / "zero.safetensors", scale=0.0)
    code, report = _run([*common, "--lora", str(zero)], capsys)
    assert code == 0 and report["pairs"] == 4 and report["identical_pairs"] == 4
    assert report["pickscore"]["ties"] == 4 and report["pickscore"]["win_rate"] == 0.5
    assert report["aesthetic"]["win_rate"] == 0.5
    assert report["clip_relevance"]["base_mean"] == report["clip_relevance"]["lora_mean"]
    # a real LoRA changes every image; the base side is still the plain model's images for the same seeds
    lora = _kohya_lora(tiny_sd_dir, tmp_path / "lora.safetensors", scale=3.0)
    code, report = _run([*common, "--lora", str(lora), "--out", str(tmp_path / "eval.json"),
                         "--save-images", str(tmp_path / "pairs")], capsys)
    assert code == 0 and report["identical_pairs"] == 0
    assert json.loads((tmp_path / "eval.json").read_text()) == report
    assert len(list((tmp_path / "pairs").glob("*_lora.png"))) == 4
    texts, seeds = evaluation_seeds(["a red car on a street", "a cat on a couch"], 2, 3)
    plain = load_diffusers_generator(str(tiny_sd_dir), device="cpu")
    images = plain.generate(texts, seeds, steps=2, guidance=7.5, size=(64, 64))
    scorer = load_scorer("tiny-open-clip-hub", "tiny-head.safetensors", pick_model="tiny-pick",
                         models_dir=tiny_clip_models_dir, device="cpu")
    terms = scorer.rewards(images, texts)
    assert report["clip_relevance"]["base_mean"] == pytest.approx(float(terms.clip_cosine.mean()), abs=1e-5)
    assert report["pickscore"]["base_mean"] == pytest.approx(float(terms.pick.mean()), abs=1e-4)
    assert report["aesthetic"]["base_mean"] == pytest.approx(float(terms.aesthetic.mean()), abs=1e-5)
    pick = report["pickscore"]
    assert pick["wins"] + pick["ties"] + pick["losses"] == 4
    assert pick["win_rate"] == (pick["wins"] + pick["ties"] / 2) / 4


def test_tpo_eval_errors_are_one_line_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    (tmp_path / "lora.safetensors").write_bytes(b"")
    base = ["tpo-eval", "--sd", str(tmp_path / "no-model"), "--prompts", str(tmp_path / "p.txt"), "--device", "cpu"]
    code, err = _run([*base, "--lora", str(tmp_path / "none.safetensors")], capsys)
    assert code == 2 and "none.safetensors: no such LoRA file" in err and "\n" not in err
    code, err = _run([*base, "--lora", str(tmp_path / "lora.safetensors"), "--size", "big"], capsys)
    assert code == 2 and "--size must be WIDTH or WIDTHxHEIGHT" in err and "\n" not in err
    code, err = _run([*base, "--lora", str(tmp_path / "lora.safetensors"), "--prompts", str(tmp_path)], capsys)
    assert code == 2 and "no TPO data file" in err


def test_llm_editor_asks_a_local_lm_for_each_edit_type(tiny_promptist_dir):
    from trainer.tpo.caption_edits import LLM_INSTRUCTION, kinds_for

    # the tiny LM has 128 positions: a short instruction here (the default one is checked below)
    editor = editor_from_spec(f"llm:{tiny_promptist_dir / 'tiny-promptist'}", seed=0, instruction="Edit:")
    captions = ["a cat riding a bike", "a castle on a hill", "a fox in the snow"]
    out = editor(captions, 2)
    assert len(out) == 3
    kept = sum(len(n) for n in out)
    assert kept >= 3 and kept + sum(editor.dropped.values()) == 6  # every answer kept or counted as dropped
    for caption, negatives in zip(captions, out, strict=True):
        assert {n.type for n in negatives} <= set(kinds_for(caption, 2, 0))  # the kind each answer was asked for
        assert all(caption_key(n.text) != caption_key(caption) and "\n" not in n.text for n in negatives)
    assert all(kind in LLM_INSTRUCTION for kind in EDIT_TYPES)


def test_clip_filter_through_the_command(tmp_path, tiny_clip_models_dir, capsys):
    _png(tmp_path / "set" / "a.png", (250, 10, 10), size=(32, 32))
    (tmp_path / "set" / "a.txt").write_text("a red square on a table at night")
    _png(tmp_path / "set" / "b.png", (10, 10, 250), size=(32, 32))
    (tmp_path / "set" / "b.txt").write_text("a blue circle next to a dog")
    base = ["tpo-data", "--images", str(tmp_path / "set"), "--negatives-per-caption", "4"]
    code, plain = _run([*base, "--out", str(tmp_path / "plain")], capsys)
    code, filtered = _run([*base, "--out", str(tmp_path / "filtered"), "--clip-filter", "tiny-hf-clip",
                           "--models-dir", str(tiny_clip_models_dir), "--device", "cpu"], capsys)
    assert code == 0 and plain["negatives"] == 8
    summary = json.loads((tmp_path / "filtered" / "tpo_data.json").read_text())
    assert summary["clip_filter"] == "tiny-hf-clip"
    assert filtered["negatives"] == 8 - summary["dropped_negatives"]["ranked wrong by CLIP"]
