"""The evaluation measures: a policy that writes a word the reward head likes wins with an interval above 50%,
identical variants tie, a broken variant is one error before any image, and the outputs exist and parse.
Tiny models only: the tiny SD, the tiny open_clip, tiny GPT-2 policies (see builders_eval.py)."""

from __future__ import annotations

import csv
import html
import json
import math
import shutil
import sys

import pytest
from builders_eval import WordColourGenerator, build_word_policy, head_that_likes
from PIL import Image

from trainer.evaluate import (
    PLAIN,
    Variant,
    VariantError,
    evaluate,
    format_table,
    make_grid,
    mean_ci,
    paired_win_rate,
    parse_variant,
    wilson,
    write_outputs,
)

PROMPTS = ["a cat on a couch", "a red car on a street", "a house at night", "a bowl of fruit", "a ship at sea",
           "a fox in the snow", "a castle on a hill", "portrait of an old man"]


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_models_dir):
    from promptist_core.clip_models import load_clip

    return load_clip("tiny-open-clip-hub", models_dir=tiny_clip_models_dir, device="cpu")


@pytest.fixture(scope="module")
def word_policy(tmp_path_factory):
    return build_word_policy(tmp_path_factory.mktemp("word-policy") / "vivid-policy", "vivid")


@pytest.fixture(scope="module")
def red_liking_scorer(tiny_clip):
    """CLIP relevance + a head along the CLIP direction from plain to red-tinted images (fitted on seeds the
    evaluation does not use)."""
    from promptist_core.rewards import RewardScorer

    generator = WordColourGenerator()
    seeds = list(range(1000, 1008))
    red = generator.generate(["x vivid"] * 8, seeds, steps=1, guidance=0, size=(32, 32))
    grey = generator.generate(["x"] * 8, seeds, steps=1, guidance=0, size=(32, 32))
    return RewardScorer(tiny_clip, head_that_likes(tiny_clip, red, grey))


def test_a_policy_that_writes_a_word_the_head_likes_beats_plain_with_an_interval_above_half(word_policy,
                                                                                           red_liking_scorer):
    vivid = Variant("vivid", str(word_policy), {"mode": "sample", "top_k": 1, "seed": 0, "keep_prompt": True,
                                               "no_repeat_ngram_size": 1})
    result = evaluate(PROMPTS, [vivid], WordColourGenerator(), red_liking_scorer, seeds=2, steps=1, size=(32, 32),
                      metric="aesthetic")
    assert result.variants == [PLAIN, "vivid"]
    assert result.rewrites["vivid"] == [f"{p}, vivid" for p in PROMPTS]
    win = result.summary("vivid").win_vs_plain["aesthetic"]
    assert win.wins == 16 and win.prompts == 8
    assert win.low > 0.5  # Wilson over 8 prompts, all won: [0.68, 1]
    delta = result.summary("vivid").delta_vs_plain["aesthetic"]
    assert delta.low > 0
    # plain against itself is no evidence either way
    assert result.summary(PLAIN).win_vs_plain["aesthetic"].win_rate == 0.5


@pytest.fixture(scope="module")
def tiny_sd_result(tiny_sd_dir, tiny_promptist_dir, tiny_clip_models_dir):
    """plain vs the tiny policy vs the same policy under another name, on the tiny SD with PickScore."""
    from promptist_core.generators import load_diffusers_generator
    from promptist_core.rewards import load_scorer

    generator = load_diffusers_generator(str(tiny_sd_dir), device="cpu")
    scorer = load_scorer("tiny-open-clip-hub", "tiny-head.safetensors", pick_model="tiny-pick",
                         models_dir=tiny_clip_models_dir, device="cpu")
    variants = [parse_variant("tiny-promptist,max_new_tokens=12"),
                parse_variant("tiny-promptist,max_new_tokens=12,name=again")]
    calls = []

    def progress(done, total):
        calls.append((done, total))

    result = evaluate(PROMPTS[:3], variants, generator, scorer, seeds=2, seed=3, steps=2, size=(64, 64),
                      baseline=variants[0].name, models_dir=tiny_promptist_dir, progress=progress)
    return result, calls


def test_two_identical_variants_tie_on_every_pair_of_the_tiny_sd(tiny_sd_result):
    result, _ = tiny_sd_result
    first, again = result.variants[1], "again"
    assert result.rewrites[first] == result.rewrites[again]
    for metric in result.metrics:
        win = result.summary(again).win_vs_baseline[metric]
        assert (win.ties, win.win_rate) == (6, 0.5) and win.low < 0.5 < win.high
    mine = [r for r in result.records if r.variant == first]
    theirs = [r for r in result.records if r.variant == again]
    assert [r.image_sha256 for r in mine] == [r.image_sha256 for r in theirs]
    # every image has every term; PickScore and the pae preset because a PickScore model is loaded
    assert set(result.metrics) == {"aesthetic", "clip_cosine", "relevance", "pick", "total_promptist", "total_pae"}
    assert all(set(r.scores) == set(result.metrics) for r in result.records)
    # plain's Promptist total has no aesthetic gain over itself
    assert all(r.scores["total_promptist"] == pytest.approx(r.scores["relevance"])
               for r in result.records if r.variant == PLAIN)


def test_progress_counts_every_image_and_variants_of_one_prompt_and_seed_share_a_call(tiny_sd_result):
    result, calls = tiny_sd_result
    assert calls[-1] == (18, 18) and calls[0] == (0, 18)
    # the generator batches 8: two (prompt, seed)s of 3 variants per call
    assert sorted({d for d, _ in calls}) == [0, 6, 12, 18]


def test_outputs_exist_and_parse(tiny_sd_result, tmp_path):
    result, _ = tiny_sd_result
    paths = write_outputs(result, tmp_path / "eval")
    with paths["results.csv"].open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 3 and {r["variant"] for r in rows} == set(result.variants)
    assert all(math.isfinite(float(r["total_pae"])) for r in rows)
    summary = json.loads(paths["summary.json"].read_text())
    assert [v["name"] for v in summary["variants"]] == result.variants
    assert "Wilson" in summary["intervals"]["win_rate"] and summary["settings"]["seeds_per_prompt"] == 2
    with Image.open(paths["grid.png"]) as grid:
        assert grid.size[0] == 3 * 192 and grid.size[1] > 3 * 192
    page = paths["report.html"].read_text()
    assert page.count("data:image/png;base64,") == 1 + 3 * 3  # the grid + each kept image
    for fetch in ('src="http', "href=", "<script", "<link", "url("):  # nothing to fetch: opens offline
        assert fetch not in page
    assert html.escape(result.rewrites[result.variants[1]][0]) in page
    table = format_table(result)
    assert table.splitlines()[0].startswith("variant") and "again" in table and "Wilson" in table


@pytest.mark.parametrize("broken", ["missing", "malformed-df"])
def test_a_broken_variant_is_one_error_naming_it_before_any_image(broken, tmp_path, tiny_dfprompt_dir,
                                                                 tiny_promptist_dir, red_liking_scorer):
    if broken == "missing":
        spec, expect = str(tmp_path / "no-such-policy"), "no-such-policy"
    else:
        folder = tmp_path / "bad-df"
        shutil.copytree(tiny_dfprompt_dir / "tiny-dfprompt", folder)
        (folder / "promptist_dfprompt.json").write_text('{"format": 99}')
        spec, expect = str(folder), "format 99"
    generator = WordColourGenerator()
    with pytest.raises(VariantError) as error:
        evaluate(PROMPTS[:2], ["tiny-promptist", f"{spec},name=broken"], generator, red_liking_scorer,
                 steps=1, size=(32, 32), models_dir=tiny_promptist_dir)
    message = str(error.value)
    assert "'broken'" in message and expect in message and "\n" not in message
    assert generator.calls == []


def test_variant_specs_and_their_mistakes():
    v = parse_variant("runs/sft,mode=diverse,keep_prompt=true,seed=3,name=sft")
    assert (v.name, v.policy, v.options) == ("sft", "runs/sft", {"mode": "diverse", "keep_prompt": True, "seed": 3})
    assert parse_variant("plain,lora=tpo.safetensors,name=tpo").lora == "tpo.safetensors"
    assert parse_variant("promptist-mini").policy == "promptist-mini"
    for bad, says in [("x,colour=red", "unknown option 'colour'"), ("x,seed=abc", "seed must be int"),
                      ("x,mode", "not key=value")]:
        with pytest.raises(VariantError, match=says):
            parse_variant(bad)
    with pytest.raises(VariantError, match="given twice"):
        evaluate(["a cat"], ["a", "a"], WordColourGenerator(), None)
    with pytest.raises(VariantError, match="baseline 'zzz'"):
        evaluate(["a cat"], ["a"], WordColourGenerator(), None, baseline="zzz")


def test_intervals_are_wilson_over_prompts_and_t_over_prompt_means():
    low, high = wilson(8, 8)
    assert low == pytest.approx(0.6756, abs=1e-3) and high == 1.0
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-3)
    # 2 seeds per prompt: 4 prompts are 4 trials, not 8
    win = paired_win_rate([1, 1, 1, 1, 1, 1, 1, 1], [0] * 8, [0, 0, 1, 1, 2, 2, 3, 3])
    assert (win.win_rate, win.prompts) == (1.0, 4) and (win.low, win.high) == pytest.approx(wilson(4, 4))
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.high - ci.mean == pytest.approx(4.303 * 1 / math.sqrt(3), rel=1e-4)


def test_grid_has_a_row_per_prompt_and_a_column_per_variant(word_policy, red_liking_scorer):
    result = evaluate(PROMPTS[:2], [Variant("vivid", str(word_policy), {"mode": "sample", "top_k": 1, "seed": 0,
                                                                         "keep_prompt": True,
                                                                         "no_repeat_ngram_size": 1})],
                      WordColourGenerator(), red_liking_scorer, seeds=1, steps=1, size=(32, 32))
    grid = make_grid(result, cell=64)
    assert grid.size == (2 * 64, 18 + 2 * (64 + 16))
    red_cell = grid.getpixel((64 + 32, 18 + 32))
    grey_cell = grid.getpixel((32, 18 + 32))
    assert red_cell[0] > grey_cell[0]  # the vivid column is the red one


def test_cli_writes_the_table_the_grid_and_the_report(tmp_path, tiny_sd_dir, tiny_promptist_dir,
                                                      tiny_clip_models_dir, capsys):
    from trainer.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red car on a street\na cat on a couch\n")
    code = main(["evaluate", "--sd", str(tiny_sd_dir), "--prompts", str(prompts), "--n", "2", "--seeds", "1",
                 "--variant", "tiny-promptist,max_new_tokens=8", "--variant",
                 "tiny-promptist,mode=sample,seed=1,max_new_tokens=8,name=sampled", "--baseline", "sampled",
                 "--steps", "2", "--size", "64", "--clip-model", "tiny-open-clip-hub", "--aesthetic-head",
                 "tiny-head.safetensors", "--models-dir", str(tiny_clip_models_dir), "--models-dir",
                 str(tiny_promptist_dir), "--device", "cpu", "--out", str(tmp_path / "out"), "--save-images"])
    out = capsys.readouterr().out
    assert code == 0 and "win vs sampled" in out and "sampled" in out
    files = json.loads(out.strip().splitlines()[-1])
    assert all((tmp_path / "out" / name).is_file() for name in files)
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 2 * 3


def test_cli_errors_are_one_line(tmp_path, capsys):
    from trainer.cli import main

    code = main(["evaluate", "--sd", str(tmp_path / "none"), "--variant", "x,colour=red", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "unknown option 'colour'" in err and "\n" not in err
    assert sys.modules.get("trainer.evaluate") is not None
