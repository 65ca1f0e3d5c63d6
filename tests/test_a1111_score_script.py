"""The A1111 "Promptist score" option's hook, on p-like processing and batch objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from promptist_core.aesthetic import load_aesthetic_head
from promptist_core.clip_models import load_clip
from promptist_core.rewards import RewardScorer


@pytest.fixture(scope="module")
def script(a1111_script):
    return a1111_script


@pytest.fixture(scope="module")
def scorer(tiny_clip_models_dir):
    clip = load_clip("tiny-open-clip-hub", models_dir=tiny_clip_models_dir, device="cpu")
    pick = load_clip("tiny-pick", models_dir=tiny_clip_models_dir, device="cpu")
    head = load_aesthetic_head("tiny-head.safetensors", models_dir=tiny_clip_models_dir)
    return RewardScorer(clip, head, pick=pick)


def processing(prompts, batch_size=None, **extra):
    """What modules.processing sets before postprocess_batch_list: this batch's prompts, seeds, ..."""
    n = len(prompts)
    return SimpleNamespace(prompts=list(prompts), negative_prompts=["ugly"] * n, seeds=list(range(10, 10 + n)),
                           subseeds=list(range(20, 20 + n)), batch_size=batch_size or n,
                           extra_generation_params=dict(extra))


def webui_batch(n, seed=0):
    """The webui's batch: a list of [C, H, W] tensors in 0..1."""
    return SimpleNamespace(images=list(torch.rand(n, 3, 40, 40, generator=torch.Generator().manual_seed(seed))))


def test_script_loads_without_the_webui(script):
    assert script.host.scripts is None and not hasattr(script, "PromptistScoreScript")


def test_scores_go_into_the_infotext_one_per_image(script, scorer):
    p, pp = processing(["a cat"] * 3), webui_batch(3)
    scores = script.score.score_processing(p, pp, scorer, preset="promptist")
    params = p.extra_generation_params
    assert params["Promptist score"] == [f"{s.total:.3f}" for s in scores]
    assert len(params["Promptist score terms"]) == 3 and params["Promptist score preset"] == "promptist"
    assert len(pp.images) == 3 and "Promptist best of" not in params


def test_best_of_n_keeps_the_best_image_and_its_seed(script, scorer):
    p, pp = processing(["a cat"] * 4), webui_batch(4, seed=1)
    images = list(pp.images)
    scores = script.score.score_processing(p, pp, scorer, preset="pae", best_of_n=True)
    best = max(range(4), key=lambda i: scores[i].total)
    assert len(pp.images) == 1 and torch.equal(pp.images[0], images[best])
    assert p.seeds == [10 + best] and p.subseeds == [20 + best]
    assert p.prompts == ["a cat"] and p.negative_prompts == ["ugly"]
    assert p.extra_generation_params["Promptist score"] == [f"{scores[best].total:.3f}"]
    assert p.extra_generation_params["Promptist best of"] == f"{best + 1}/4"


def test_relevance_uses_the_users_original_prompt_when_promptist_rewrote_it(script, scorer):
    # Second batch of a job whose prompts the optimize script rewrote.
    originals = ["a ship", "a ship", "a (red:1.3) fox <lora:style:0.8>", "a (red:1.3) fox <lora:style:0.8>"]
    p = processing(["fox, highly detailed"] * 2, batch_size=2, **{"Promptist original": originals})
    assert script.score.reference_prompts(p, 2, batch_number=1) == ["a red fox", "a red fox"]
    pp = webui_batch(2, seed=2)
    scores = script.score.score_processing(p, pp, scorer, batch_number=1)
    assert [s.prompt for s in scores] == ["a red fox", "a red fox"]


def test_plain_text_strips_webui_syntax(script):
    assert script.score.plain_text("((masterpiece)), a [cat:dog:0.5] <lora:x:1>") == "masterpiece, a cat:dog"
    assert script.score.plain_text("(a cat:1.2), sunset") == "a cat, sunset"
