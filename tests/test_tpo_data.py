"""TPO pair data: the folder format and its reader, the caption editors, the three sources, tpo-eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from trainer.corpus import CorpusError
from trainer.tpo_data import PAIRS_FILE, Negative, TPOItem, read_tpo_data, write_tpo_data


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
