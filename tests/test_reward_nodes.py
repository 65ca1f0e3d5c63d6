"""The ComfyUI reward nodes, executed directly with tiny CLIPs (no ComfyUI needed)."""

from __future__ import annotations

import pytest
import torch
from comfy_validation import LINK, validate_node

from nodes.comfy_schema import v1_node, v3_validate_inputs
from nodes.rewards import RewardModelLoader, ScoreImages


@pytest.fixture
def comfy_models_dir(tiny_clip_models_dir, monkeypatch):
    # Without ComfyUI, nodes look in $PROMPTIST_MODELS_DIR (ComfyUI: models/promptist).
    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tiny_clip_models_dir))
    return tiny_clip_models_dir


@pytest.fixture
def reward_model(comfy_models_dir):
    (loaded,) = RewardModelLoader.run(clip_model="tiny-open-clip-hub", aesthetic_head="tiny-head.safetensors",
                                      pick_model="tiny-pick", device="cpu")
    return loaded


def batch(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 40, 40, 3, generator=torch.Generator().manual_seed(seed))


def test_loader_lists_clip_folders_and_head_files_from_the_models_folder(comfy_models_dir):
    inputs = v1_node(RewardModelLoader).INPUT_TYPES()["required"]
    clips, options = inputs["clip_model"]
    assert clips[0] == options["default"] == "ViT-L-14/openai"
    assert {"tiny-open-clip-hub", "tiny-hf-clip", "tiny-pick"} <= set(clips)
    # Head files only: the CLIP weights file beside them is not offered.
    assert inputs["aesthetic_head"][0] == ["improved", "laion-v1", "tiny-head.safetensors"]
    assert inputs["pick_model"][0][:2] == ["none", "yuvalkirstain/PickScore_v1"]


def test_score_node_schema():
    node = v1_node(ScoreImages)
    assert node.RETURN_TYPES == ("FLOAT", "STRING", "IMAGE", "INT")
    types = node.INPUT_TYPES()
    assert types["required"]["promptist_reward_model"] == ("PROMPTIST_REWARD_MODEL", {
        "tooltip": "From Promptist Reward Model Loader."})
    assert "plain_images" in types["optional"]
    assert types["required"]["preset"][0] == ["promptist", "pae", "custom"]


def test_score_node_sorts_the_batch_best_first_and_returns_the_best_index(reward_model):
    images = batch(4)
    mean, table, best_first, best = ScoreImages.run(reward_model, images, "a cat riding a bike", preset="pae")
    scores = reward_model.scorer(images, "a cat riding a bike", preset="pae")
    totals = [s.total for s in scores]
    order = sorted(range(4), key=lambda i: totals[i], reverse=True)
    assert best == order[0] == max(range(4), key=lambda i: totals[i])
    assert torch.equal(best_first, images[order])
    assert mean == pytest.approx(sum(totals) / 4, abs=1e-5)
    assert len(table.splitlines()) == 5 and "pick" in table.splitlines()[0]


def test_plain_images_make_the_aesthetic_term_a_delta(reward_model):
    images, plain = batch(2, seed=1), batch(2, seed=2)
    _, with_plain, _, _ = ScoreImages.run(reward_model, images, "a fox", plain_images=plain)
    _, without, _, _ = ScoreImages.run(reward_model, images, "a fox")
    expected = reward_model.scorer(images, "a fox", baseline_images=plain)
    assert f"{expected[0].total:8.3f}" in with_plain
    assert "absolute score" in without and "absolute score" not in with_plain


def test_custom_preset_uses_the_weight_inputs(reward_model):
    images = batch(2, seed=3)
    mean, *_ = ScoreImages.run(reward_model, images, "a fox", preset="custom", aesthetic_weight=0.0,
                               relevance_weight=1.0, pick_weight=0.0)
    rel = reward_model.scorer.rewards(images, "a fox").relevance_term
    assert mean == pytest.approx(float(rel.mean()), abs=1e-5)


def test_one_prompt_line_per_image(reward_model):
    images = batch(2, seed=4)
    ScoreImages.run(reward_model, images, "a fox\na ship")
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        ScoreImages.run(reward_model, images, "a\nb\nc")


def test_validate_rejects_an_empty_prompt():
    assert ScoreImages.validate(prompt="  ").startswith("prompt is empty")
    assert ScoreImages.validate(prompt="a cat") is True


@pytest.mark.parametrize("api", ["v1", "v3"])
def test_comfy_checks_the_weight_ranges_and_shows_an_empty_prompt_once(api):
    v3 = v3_validate_inputs(ScoreImages) if api == "v3" else None
    values = {"promptist_reward_model": LINK, "images": LINK, "prompt": " ", "preset": "custom",
              "aesthetic_weight": 1000.0, "relevance_weight": 1.0, "pick_weight": 0.0}
    errors = validate_node(v1_node(ScoreImages), values, v3_validate=v3)
    assert [name for name, _ in errors] == ["aesthetic_weight", "prompt"]
    assert "bigger than max of 100" in errors[0][1] and "prompt is empty" in errors[1][1]
    values.update(prompt="a cat", aesthetic_weight=1.0, preset="best")
    assert validate_node(v1_node(ScoreImages), values, v3_validate=v3) == [("preset", "Value not in list: preset: 'best'")]


def test_loader_reuses_loaded_models(comfy_models_dir):
    (a,) = RewardModelLoader.run(clip_model="tiny-hf-clip", aesthetic_head="tiny-head.safetensors", device="cpu")
    (b,) = RewardModelLoader.run(clip_model="tiny-hf-clip", aesthetic_head="tiny-head.safetensors", device="cpu")
    assert a.scorer.clip is b.scorer.clip and a.managed[0] is b.managed[0]
    assert a.scorer.pick is None
