"""Corpus readers (every format and its errors) and SFT pair construction on real fixture prompts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

from trainer.policy.corpus import CorpusError, read_corpus
from trainer.policy.pairs import (
    command_rewriter,
    make_pairs,
    read_pairs,
    split_prompt,
    strip_weight_syntax,
    write_pairs,
)

DIFFUSIONDB = FIXTURES / "prompts" / "diffusiondb_imagereward.txt"
needs_fixtures = pytest.mark.skipif(not DIFFUSIONDB.is_file(), reason="shared fixtures are absent")


# --- readers ---------------------------------------------------------------------------------------

def test_txt_reader_normalises_whitespace_and_drops_empties_and_case_insensitive_duplicates(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat,  highly\tdetailed\n\n   \nA CAT, highly detailed\na dog\n", encoding="utf-8")
    corpus = read_corpus(f)
    assert corpus.prompts == ["a cat, highly detailed", "a dog"]
    assert corpus.dropped == {"empty": 2, "duplicate": 1}


def test_csv_and_tsv_readers_take_the_named_column(tmp_path):
    (tmp_path / "p.csv").write_text('id,prompt\n1,"a cat, fur"\n2,a dog\n', encoding="utf-8")
    (tmp_path / "p.tsv").write_text("text\tid\na cat, fur\t1\n", encoding="utf-8")
    assert read_corpus(tmp_path / "p.csv").prompts == ["a cat, fur", "a dog"]
    assert read_corpus(tmp_path / "p.tsv", column="text").prompts == ["a cat, fur"]


def test_jsonl_reader_takes_the_named_field(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a cat"}\n\n{"prompt": "a dog", "x": 1}\n', encoding="utf-8")
    assert read_corpus(f).prompts == ["a cat", "a dog"]


def test_parquet_reader_reads_a_diffusiondb_like_prompt_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image_name": ["a.png", "b.png"], "prompt": ["a cat, fur", None]}), tmp_path / "m.parquet")
    corpus = read_corpus(tmp_path / "m.parquet")
    assert corpus.prompts == ["a cat, fur"] and corpus.dropped == {"empty": 1}


def test_hf_dataset_file_is_found_in_the_hugging_face_cache_offline(tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "datasets--someone--prompts" / "snapshots" / ("a" * 40)
    (snapshot / "data").mkdir(parents=True)
    (snapshot / "data" / "train.txt").write_text("a cat, fur\n", encoding="utf-8")
    (tmp_path / "hub" / "datasets--someone--prompts" / "refs").mkdir()
    (tmp_path / "hub" / "datasets--someone--prompts" / "refs" / "main").write_text("a" * 40)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert read_corpus("hf-dataset:someone/prompts/data/train.txt").prompts == ["a cat, fur"]
    from promptist_core.weights import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError, match="downloads are disabled"):
        read_corpus("hf-dataset:someone/prompts/data/other.txt")


@pytest.mark.parametrize(("name", "content", "kwargs", "message"), [
    ("bad.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n', {}, r"bad.jsonl:2: invalid JSON"),
    ("field.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', {}, r"field.jsonl:2: no field 'prompt' \(fields: text\)"),
    ("type.jsonl", '{"prompt": 3}\n', {}, r"type.jsonl:1: 'prompt' is int, not text"),
    ("col.csv", "id,text\n1,a\n", {}, r"col.csv:1: no column 'prompt' \(columns: id, text\)"),
    ("row.csv", "id,prompt\n1,a\n2,b,c\n", {}, r"row.csv:3: 3 fields where the header has 2"),
    ("empty.csv", "", {}, r"empty.csv: the file is empty"),
    ("p.xlsx", "x", {}, r"unknown corpus format '.xlsx'"),
    ("blank.txt", "\n  \n", {}, r"blank.txt: no prompts left"),
    ("long.txt", "a\n" + "x" * 6000 + "\n", {}, r"long.txt:2: a prompt of 6000 characters"),
])
def test_a_bad_corpus_file_is_one_error_naming_file_line_and_problem(tmp_path, name, content, kwargs, message):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        read_corpus(tmp_path / name, **kwargs)


def test_non_utf8_bytes_are_reported_with_their_line(tmp_path):
    (tmp_path / "p.txt").write_bytes(b"a cat\na dog\ncaf\xe9 au lait\n")
    with pytest.raises(CorpusError, match=r"p.txt:3: not UTF-8"):
        read_corpus(tmp_path / "p.txt")


def test_missing_corpus_file_is_named(tmp_path):
    with pytest.raises(CorpusError, match="nope.txt: no such file"):
        read_corpus(tmp_path / "nope.txt")


def test_length_filter_and_blocklist_drop_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("cat\na red cat, fur\na nude figure, oil\nthe old castle on a hill, at night\n")
    (tmp_path / "block.txt").write_text("# terms\nNUDE\n")
    corpus = read_corpus(tmp_path / "p.txt", min_words=2, max_words=6, blocklist=tmp_path / "block.txt")
    assert corpus.prompts == ["a red cat, fur"]
    assert corpus.dropped == {"length": 2, "blocklist": 1}


@needs_fixtures
def test_real_fixture_corpus_reads_in_full():
    corpus = read_corpus(DIFFUSIONDB)
    assert corpus.read == len(DIFFUSIONDB.read_text(encoding="utf-8").splitlines())
    assert len(corpus.prompts) > 10_000


# --- splitting prompts -----------------------------------------------------------------------------

@pytest.mark.parametrize(("prompt", "main", "modifiers"), [
    # real DiffusionDB prompts from the fixtures
    ("tokyo alleyway, rainy day, by cory loftis, atey ghailan, makoto shinkai",
     "tokyo alleyway", ["rainy day", "by cory loftis", "atey ghailan", "makoto shinkai"]),
    ("arcade machine, in brawl stars style,", "arcade machine", ["in brawl stars style"]),
    ("technological micro chipset bracelet, extremely detailed cyberpunk (steampunk), small neon keyboard , "
     "realistic shaded,", "technological micro chipset bracelet",
     ["extremely detailed cyberpunk steampunk", "small neon keyboard", "realistic shaded"]),
    ("obama in red dead redemption 2", "obama in red dead redemption 2", []),
    # host weight syntax, DF blocks, extra networks
    ("a castle, (highly detailed:1.2), [anime:0-1:1.5], ((artstation))", "a castle",
     ["highly detailed", "anime", "artstation"]),
    ("<lora:style:0.8> a girl, [red:blue:0.5] hair, {masterpiece}, 8k, 8K", "a girl", ["blue hair", "masterpiece", "8k"]),
    (r"a \(cat\), by greg", "a (cat)", ["by greg"]),
])
def test_split_prompt_separates_main_content_from_modifiers(prompt, main, modifiers):
    assert split_prompt(prompt) == (main, modifiers)


def test_strip_weight_syntax_keeps_the_words_only():
    assert strip_weight_syntax("(masterpiece:1.3), [[blurry]], [a:b:10] embedding:bad, <hypernet:x:1>") == \
        "masterpiece, blurry, b"


@needs_fixtures
def test_pairs_from_the_real_corpus_split_by_target_and_keep_main_content():
    prompts = read_corpus(DIFFUSIONDB, limit=3000).prompts
    pairs, stats = make_pairs(prompts, seed=1, mcm_per_target=2, valid_fraction=0.1)
    assert stats["kinds"]["mc"] == stats["targets"] > 1500 and stats["kinds"]["mcm"] > 1000
    assert stats["skipped"]["no modifiers"] > 0
    by_split = {s: {p.target for p in pairs if p.split == s} for s in ("train", "valid")}
    assert not by_split["train"] & by_split["valid"]
    assert 0.05 < len(by_split["valid"]) / stats["targets"] < 0.15
    for p in pairs:
        main, mods = split_prompt(p.target)
        assert p.source.startswith(main)
        if p.kind == "mcm":
            src_main, src_mods = split_prompt(p.source)
            assert src_main == main and set(src_mods) < set(mods) and src_mods
    again, _ = make_pairs(prompts, seed=1, mcm_per_target=2, valid_fraction=0.1)
    assert again == pairs


def test_rewrite_command_adds_paraphrased_pairs(tmp_path):
    script = tmp_path / "upper.py"
    script.write_text("import sys\nfor line in sys.stdin:\n    print('paraphrase of ' + line.strip())\n")
    pairs, stats = make_pairs(["a cat, fur, 8k", "a dog, fur"], rewrite=command_rewriter(f"{sys.executable} {script}"),
                              valid_fraction=0)
    kinds = {(p.kind, p.source) for p in pairs}
    assert ("rmc", "paraphrase of a cat") in kinds
    assert ("rtp", "paraphrase of a dog, fur") in kinds
    assert stats["kinds"] == {"mc": 2, "mcm": 1, "rmc": 2, "rtp": 2}


def test_rewrite_command_that_fails_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="exited with 3"):
        make_pairs(["a cat, fur"], rewrite=command_rewriter(f"{sys.executable} -c 'import sys; sys.exit(3)'"))


def test_pairs_file_round_trips_and_bad_records_name_their_line(tmp_path):
    pairs, _ = make_pairs(["a cat, fur, 8k"], valid_fraction=0)
    path = write_pairs(tmp_path / "pairs.jsonl", pairs)
    assert read_pairs(path) == pairs
    path.write_text(json.dumps({"source": "a", "target": "a, b"}) + "\n" + json.dumps({"source": "", "target": "x"}))
    with pytest.raises(CorpusError, match="pairs.jsonl:2: 'source' and 'target' must both be non-empty"):
        read_pairs(path)


def test_pairs_cli_writes_jsonl_and_prints_statistics(tmp_path, capsys):
    from trainer.cli import main

    corpus = tmp_path / "c.txt"
    corpus.write_text("a cat, fur, 8k\na dog\na castle, golden hour\n")
    assert main(["pairs", "--corpus", str(corpus), "--out", str(tmp_path / "p.jsonl"), "--valid-fraction", "0"]) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats["pairs"] == 3 and stats["skipped"] == {"no modifiers": 1}
    records = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert set(records[0]) == {"source", "target", "kind", "split"}


def test_pairs_cli_bad_corpus_exits_2_with_one_line(tmp_path, capsys):
    from trainer.cli import main

    (tmp_path / "c.jsonl").write_text("{oops\n")
    assert main(["pairs", "--corpus", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "p.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "c.jsonl:1: invalid JSON" in err
    assert not Path(tmp_path / "p.jsonl").exists()
