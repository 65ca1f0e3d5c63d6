"""Reward scoring: tiny CLIPs through the real loaders, the real LAION heads, formulas, batching, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders_clip import TINY_ARCH, save_random_head
from conftest import FIXTURES

from promptist_core.aesthetic import (
    IMPROVED_AESTHETIC,
    LAION_V1_AESTHETIC,
    AestheticHead,
    head_from_state_dict,
    load_aesthetic_head,
)
from promptist_core.clip_models import _features, load_clip, preprocess
from promptist_core.rewards import (
    PRESETS,
    RewardPreset,
    RewardScorer,
    aesthetic_from_embeddings,
    pick_term,
    relevance_term,
)
from promptist_core.weights import WeightsNotFoundError, sha256_of

AESTHETIC = FIXTURES / "aesthetic"
needs_real_heads = pytest.mark.skipif(not (AESTHETIC / IMPROVED_AESTHETIC.filename).is_file(),
                                      reason="real aesthetic heads not in ../shared/fixtures/aesthetic")


def images(n: int, seed: int = 0, h: int = 40, w: int = 48) -> torch.Tensor:
    return torch.rand(n, h, w, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def open_clip_encoder(tiny_clip_models_dir):
    return load_clip("tiny-open-clip-hub", models_dir=tiny_clip_models_dir, device="cpu")


@pytest.fixture(scope="module")
def hf_encoder(tiny_clip_models_dir):
    return load_clip("tiny-hf-clip", models_dir=tiny_clip_models_dir, device="cpu")


@pytest.fixture(scope="module")
def pick_encoder(tiny_clip_models_dir):
    return load_clip("tiny-pick", models_dir=tiny_clip_models_dir, device="cpu")


@pytest.fixture(scope="module")
def tiny_head(tiny_clip_models_dir):
    return load_aesthetic_head("tiny-head.safetensors", models_dir=tiny_clip_models_dir)


@pytest.fixture(scope="module")
def scorer(open_clip_encoder, tiny_head, pick_encoder):
    return RewardScorer(open_clip_encoder, tiny_head, pick=pick_encoder, preset="promptist")


# --- loading -------------------------------------------------------------------------------------


def test_open_clip_weights_file_and_hub_folder_load_the_same_model(tiny_clip_models_dir, open_clip_encoder):
    from_file = load_clip(str(tiny_clip_models_dir / "tiny_open_clip.safetensors"), architecture=TINY_ARCH,
                          device="cpu")
    batch = images(2)
    assert from_file.backend == open_clip_encoder.backend == "open_clip"
    assert torch.allclose(from_file.encode_images(batch), open_clip_encoder.encode_images(batch))
    assert torch.allclose(from_file.encode_texts(["a cat"]), open_clip_encoder.encode_texts(["a cat"]))


def test_loading_an_open_clip_model_keeps_open_clips_random_init_note_out_of_the_log(tiny_clip_models_dir, caplog,
                                                                                     monkeypatch):
    import logging

    from promptist_core import clip_models

    monkeypatch.setattr(clip_models, "_CACHE", {})  # a real load, not the encoder another test loaded
    with caplog.at_level(logging.WARNING):
        load_clip(str(tiny_clip_models_dir / "tiny_open_clip.safetensors"), architecture=TINY_ARCH, device="cpu")
        logging.getLogger().warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "initialized randomly" in m] == [  # only the one logged after the load
        "No pretrained weights loaded for model 'x'. Model initialized randomly."]


def test_encoders_return_normalized_embeddings_of_the_projection_size(open_clip_encoder, hf_encoder):
    for encoder in (open_clip_encoder, hf_encoder):
        image_emb, text_emb = encoder.encode_images(images(3)), encoder.encode_texts(["a cat", "a dog"])
        assert image_emb.shape == (3, 32) and text_emb.shape == (2, 32)
        assert torch.allclose(image_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert torch.allclose(text_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert hf_encoder.backend == "transformers" and hf_encoder.image_size == 32


def test_transformers_features_accept_a_tensor_or_an_output_object():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    emb = torch.randn(2, 4)
    assert _features(emb) is emb  # transformers 4.x
    assert _features(BaseModelOutputWithPooling(pooler_output=emb)) is emb  # transformers 5


def test_preprocessing_matches_clips_pil_transform(open_clip_encoder):
    import open_clip
    from PIL import Image

    # A smooth picture (resampling filters differ most on pixel noise, which photos are not).
    y, x = torch.meshgrid(torch.linspace(0, 1, 45), torch.linspace(0, 1, 70), indexing="ij")
    pixels = torch.stack([x, y, 0.5 + 0.5 * torch.sin(6 * x + 3 * y)], dim=-1).unsqueeze(0)
    pixels = (pixels * 255).round() / 255
    ours = preprocess(pixels, size=32, mean=open_clip_encoder.mean, std=open_clip_encoder.std)
    pil = Image.fromarray((pixels[0].numpy() * 255).round().astype(np.uint8))
    transform = open_clip.image_transform(32, is_train=False, mean=open_clip_encoder.mean,
                                          std=open_clip_encoder.std)
    reference = transform(pil).unsqueeze(0)
    assert ours.shape == reference.shape == (1, 3, 32, 32)
    # Same resize/crop/normalize; PIL rounds to 8 bits and resamples slightly differently.
    assert (ours - reference).abs().mean() < 0.02


def test_transformers_clip_without_tokenizer_says_where_to_get_one(tmp_path):
    from builders_clip import build_tiny_transformers_clip

    build_tiny_transformers_clip(tmp_path / "no-tok", with_tokenizer=False)
    with pytest.raises(WeightsNotFoundError, match="no tokenizer"):
        load_clip(str(tmp_path / "no-tok"), device="cpu")


def test_default_clip_offline_names_the_files_and_the_folder(tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        load_clip(models_dir=tmp_path, device="cpu", allow_download=False)
    message = str(e.value)
    assert "open_clip_model.safetensors" in message and "open_clip_config.json" in message
    assert str(tmp_path / "vit_large_patch14_clip_224.openai") in message


def test_weights_file_without_architecture_is_refused(tiny_clip_models_dir):
    with pytest.raises(ValueError, match="architecture"):
        load_clip(str(tiny_clip_models_dir / "tiny_open_clip.safetensors"), device="cpu")


# --- aesthetic heads -----------------------------------------------------------------------------


@needs_real_heads
@pytest.mark.parametrize("name", ["improved", "laion-v1"])
def test_real_heads_score_the_ten_rating_embeddings_in_increasing_order(name):
    head = load_aesthetic_head(name, models_dir=AESTHETIC, allow_download=False)
    embeddings = torch.from_numpy(np.concatenate(
        [np.load(AESTHETIC / "vit_l_14_embeddings" / f"rating{i}.npy") for i in range(10)]))
    scores = aesthetic_from_embeddings(head, embeddings)
    assert head.kind == ("mlp" if name == "improved" else "linear")
    assert torch.all(scores[1:] > scores[:-1]), scores


@needs_real_heads
def test_pinned_sha256_match_the_published_files():
    assert sha256_of(AESTHETIC / IMPROVED_AESTHETIC.filename) == IMPROVED_AESTHETIC.sha256
    assert sha256_of(AESTHETIC / LAION_V1_AESTHETIC.filename) == LAION_V1_AESTHETIC.sha256


@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_head_saved_as_safetensors_or_pth_loads_to_the_same_scores(tmp_path, kind):
    a = load_aesthetic_head(str(save_random_head(tmp_path / "h.safetensors", kind=kind, embed_dim=768)))
    b = load_aesthetic_head(str(save_random_head(tmp_path / "h.pth", kind=kind, embed_dim=768)))
    emb = torch.randn(4, 768)
    assert a.kind == b.kind == kind
    assert torch.equal(aesthetic_from_embeddings(a, emb), aesthetic_from_embeddings(b, emb))


def test_head_input_is_l2_normalized_first():
    head = AestheticHead("linear", embed_dim=8)
    emb = torch.randn(3, 8)
    assert torch.allclose(aesthetic_from_embeddings(head, emb * 7.0), aesthetic_from_embeddings(head, emb))


def test_a_768_head_on_a_32_dim_clip_raises_a_clear_error(open_clip_encoder):
    with pytest.raises(ValueError, match="768-dim.*32-dim"):
        RewardScorer(open_clip_encoder, AestheticHead("mlp", embed_dim=768))
    with pytest.raises(ValueError, match="768-dim CLIP embeddings; got 32-dim"):
        aesthetic_from_embeddings(AestheticHead("mlp", embed_dim=768), torch.randn(2, 32))


def test_a_file_that_is_not_a_head_is_refused(tmp_path):
    torch.save({"foo": torch.zeros(3)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        load_aesthetic_head(str(tmp_path / "x.pth"))
    with pytest.raises(ValueError, match="not a LAION aesthetic head"):
        head_from_state_dict({"layers.0.weight": torch.zeros(2, 2)})


def test_missing_known_head_offline_says_which_file_goes_where(tmp_path):
    with pytest.raises(WeightsNotFoundError) as e:
        load_aesthetic_head("improved", models_dir=tmp_path, allow_download=False)
    assert str(tmp_path / IMPROVED_AESTHETIC.filename) in str(e.value)
    assert IMPROVED_AESTHETIC.url in str(e.value)


# --- formulas ------------------------------------------------------------------------------------


def test_relevance_and_pick_terms_match_hand_computed_values():
    cos = torch.tensor([0.30, 0.28, 0.25, 0.20, -0.1])
    assert torch.allclose(relevance_term(cos), torch.tensor([0.0, 0.0, -0.6, -1.6, -7.6]), atol=1e-5)
    # PAE clamps the cosine at 0 first: the penalty stops at -5.6.
    assert torch.allclose(relevance_term(cos, floor=0.0), torch.tensor([0.0, 0.0, -0.6, -1.6, -5.6]), atol=1e-5)
    assert torch.allclose(pick_term(torch.tensor([21.0, 18.0, 17.5, 10.0])),
                          torch.tensor([0.0, 0.0, -0.5, -8.0]))


def test_promptist_total_is_aesthetic_delta_plus_relevance(scorer, open_clip_encoder, tiny_head):
    batch, plain = images(3, seed=1), images(3, seed=2)
    terms = scorer.rewards(batch, "a cat riding a bike", baseline_images=plain)
    # Recompute by hand from the encoders and the head.
    img, txt = open_clip_encoder.encode_images(batch), open_clip_encoder.encode_texts(["a cat riding a bike"])
    cos = (img @ txt.T).squeeze(1)
    aes = tiny_head(img).float()
    aes_plain = tiny_head(open_clip_encoder.encode_images(plain)).float()
    expected = (aes - aes_plain) + torch.clamp(20 * cos - 5.6, max=0)
    assert torch.allclose(terms.clip_cosine, cos, atol=1e-5)
    assert torch.allclose(terms.aesthetic_baseline, aes_plain, atol=1e-5)
    assert torch.allclose(terms.total, expected, atol=1e-5)


def test_pae_total_adds_absolute_aesthetic_relevance_and_pick_term(scorer, pick_encoder):
    batch = images(2, seed=3)
    terms = scorer.rewards(batch, "a fox", preset="pae")
    pick = 100.0 * (pick_encoder.encode_images(batch) @ pick_encoder.encode_texts("a fox").T).squeeze(1)
    assert pick_encoder.logit_scale == pytest.approx(100.0, rel=1e-4)
    assert torch.allclose(terms.pick, pick, atol=1e-3)
    rel = torch.clamp(20 * terms.clip_cosine.clamp(min=0) - 5.6, max=0)
    expected = terms.aesthetic + rel + torch.clamp(pick - 18, max=0)
    assert terms.aesthetic_baseline is None
    assert torch.allclose(terms.total, expected, atol=1e-3)


def test_custom_weights_scale_each_term(scorer):
    batch = images(2, seed=4)
    base = scorer.rewards(batch, "a fox", preset="pae")
    custom = scorer.rewards(batch, "a fox", preset=PRESETS["pae"].with_weights(aesthetic=2.0, relevance=0.5,
                                                                               pick=0.0))
    expected = 2.0 * base.aesthetic + 0.5 * base.relevance_term
    assert torch.allclose(custom.total, expected, atol=1e-5)


def test_baseline_scores_broadcast_and_unpaired_baselines_are_averaged(scorer):
    batch = images(3, seed=6)
    a = scorer.rewards(batch, "a fox", baseline_aesthetic=1.5)
    assert torch.allclose(a.aesthetic_term, a.aesthetic - 1.5)
    plain = images(2, seed=7)
    b = scorer.rewards(batch, "a fox", baseline_images=plain)
    assert torch.allclose(b.aesthetic_baseline, scorer.aesthetic_scores(plain).mean().expand(3), atol=1e-6)


def test_relevance_is_measured_against_the_given_prompt_per_image(scorer, open_clip_encoder):
    batch = images(2, seed=8)
    terms = scorer.rewards(batch, ["a cat", "a ship"])
    txt = open_clip_encoder.encode_texts(["a cat", "a ship"])
    cos = (open_clip_encoder.encode_images(batch) * txt).sum(-1)
    assert torch.allclose(terms.clip_cosine, cos, atol=1e-5)


# --- batching and inputs -------------------------------------------------------------------------


def test_batched_scores_equal_one_by_one(open_clip_encoder, tiny_head, pick_encoder):
    batch = images(5, seed=9)
    batched = RewardScorer(open_clip_encoder, tiny_head, pick=pick_encoder, preset="pae", batch_size=8)
    single = RewardScorer(open_clip_encoder, tiny_head, pick=pick_encoder, preset="pae", batch_size=1)
    together = batched.rewards(batch, "a castle")
    one_by_one = [single.rewards(batch[i:i + 1], "a castle") for i in range(5)]
    for name in ("aesthetic", "clip_cosine", "pick", "total"):
        assert torch.allclose(getattr(together, name), torch.cat([getattr(t, name) for t in one_by_one]),
                              atol=1e-4), name


def test_pil_images_and_tensors_score_the_same(scorer):
    from PIL import Image

    batch = (images(2, seed=10) * 255).round() / 255
    pil = [Image.fromarray((img.numpy() * 255).round().astype(np.uint8)) for img in batch]
    a, b = scorer(batch, "a cat"), scorer(pil, "a cat")
    assert [s.total for s in a] == pytest.approx([s.total for s in b], abs=1e-5)


def test_images_of_different_sizes_in_one_list(scorer):
    mixed = [images(1, seed=11, h=40, w=40)[0], images(1, seed=12, h=64, w=32)[0]]
    scores = scorer(mixed, "a cat")
    alone = scorer(mixed[1], "a cat")
    assert [s.index for s in scores] == [0, 1]
    assert scores[1].total == pytest.approx(alone[0].total, abs=1e-5)


def test_text_embeddings_are_cached_per_prompt(scorer):
    emb = scorer.text_embeddings(["a bowl of fruit", "a bowl of fruit", "a robot"])
    assert torch.equal(emb[0], emb[1])
    cache = scorer._text_cache[id(scorer.clip)]
    assert "a bowl of fruit" in cache and "a robot" in cache


def test_score_result_carries_every_term(scorer):
    s = scorer(images(1), "a cat", preset="pae")[0]
    assert set(s.to_dict()) == {"index", "prompt", "aesthetic", "aesthetic_baseline", "aesthetic_term",
                                "clip_cosine", "relevance_term", "pick", "pick_term", "total"}
    assert s.prompt == "a cat" and s.index == 0


@pytest.mark.parametrize("bad, match", [
    ((torch.rand(2, 32, 32, 3) * 255).to(torch.uint8), "dtype torch.uint8"),
    (torch.rand(2, 3, 32, 32), r"shape \(2, 3, 32, 32\)"),
    (torch.rand(1, 8, 8, 3) * 2, "values in"),
    (torch.full((1, 8, 8, 3), float("nan")), "values in"),
    ([], "empty"),
    (None, "None"),
    (["not an image"], "str"),
])
def test_bad_images_raise_value_errors_that_say_what_is_wrong(scorer, bad, match):
    with pytest.raises(ValueError, match=match):
        scorer(bad, "a cat")


def test_bad_prompts_and_presets_raise_value_errors(scorer, open_clip_encoder, tiny_head):
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        scorer(images(3), ["a", "b"])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        scorer(images(1), "  ")
    with pytest.raises(ValueError, match="preset must be one of"):
        scorer(images(1), "a cat", preset="best")
    with pytest.raises(ValueError, match="no PickScore model"):
        RewardScorer(open_clip_encoder, tiny_head)(images(1), "a cat", preset="pae")
    with pytest.raises(ValueError, match="not both"):
        scorer(images(1), "a cat", baseline_images=images(1), baseline_aesthetic=1.0)


def test_presets_are_the_documented_formulas():
    assert PRESETS["promptist"] == RewardPreset("promptist", aesthetic_delta=True, pick_weight=0.0)
    pae = PRESETS["pae"]
    assert (pae.aesthetic_delta, pae.pick_weight, pae.relevance_scale, pae.relevance_offset, pae.pick_offset,
            pae.cosine_floor) == (False, 1.0, 20.0, 5.6, 18.0, 0.0)


def test_pae_preset_loads_pickscore_and_says_where_it_goes_when_missing(tiny_clip_models_dir):
    from promptist_core.rewards import load_scorer

    with pytest.raises(WeightsNotFoundError) as e:
        load_scorer("tiny-open-clip-hub", "tiny-head.safetensors", preset="pae", models_dir=tiny_clip_models_dir,
                     device="cpu", allow_download=False)
    assert str(tiny_clip_models_dir / "PickScore_v1") in str(e.value)
    scorer = load_scorer("tiny-open-clip-hub", "tiny-head.safetensors", pick_model="tiny-pick", preset="pae",
                         models_dir=tiny_clip_models_dir, device="cpu", allow_download=False)
    assert scorer.pick is not None and scorer.preset.name == "pae"
