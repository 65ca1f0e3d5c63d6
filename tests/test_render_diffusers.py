"""The diffusers DF-Prompt renderer on a tiny SD pipeline: what the UNet receives at each step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from promptist_core.dfprompt import schedule
from promptist_core.generators import DiffusersGenerator, ImageGenerator
from promptist_core.render_diffusers import encode_segment, generate_dfprompt

PROMPT = "a red horse, [anime:0-1:1.5], [detailed:0.5-1:1.25], [sharp:0-0.5:0.75]"
SIZE = {"height": 64, "width": 64}


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    from builders_sd import load_tiny_sd

    return load_tiny_sd(tiny_sd_dir)


class UNetRecorder:
    """Records the `encoder_hidden_states` the UNet receives, call by call (one call per step)."""

    def __init__(self, unet):
        self.calls: list[torch.Tensor] = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append(kwargs["encoder_hidden_states"])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def plain_ids_encoding(pipe, text_chunks):
    """The unweighted encoding of the chunk-wise token ids (what the weights are applied to)."""
    from promptist_core.render_diffusers import _encode_ids, _token_ids

    ids, weights = _token_ids(pipe.tokenizer, text_chunks)
    return _encode_ids(pipe, [ids], "cpu", None).embeds, torch.tensor(weights)


def test_unet_receives_each_segments_embeddings_at_its_scheduled_steps(pipe):
    n = 6
    with UNetRecorder(pipe.unet) as rec:
        generate_dfprompt(pipe, PROMPT, num_inference_steps=n, generator=torch.Generator().manual_seed(0),
                          output_type="latent", **SIZE)
    assert len(rec.calls) == n
    segments = schedule(PROMPT, n)
    assert [(s.first_step, s.last_step) for s in segments] == [(0, 2), (3, 5)]
    negative = pipe.encode_prompt("", "cpu", 1, True)[1]
    for seg in segments:
        expected = encode_segment(pipe, seg)
        for i in range(seg.first_step, seg.last_step + 1):
            hidden = rec.calls[i]
            assert hidden.shape == (2, 77, 32)  # CFG: [negative; positive]
            assert torch.equal(hidden[:1], negative)
            assert torch.equal(hidden[1:], expected.embeds)
            assert hidden is rec.calls[seg.first_step]  # switched by reference, not rebuilt per step
    assert not torch.equal(rec.calls[2][1], rec.calls[3][1])


def test_inactive_modifiers_are_removed_from_the_text_not_weighted_to_zero(pipe):
    first, second = schedule(PROMPT, 6)
    assert first.text == "a red horse, anime, detailed" and second.text == "a red horse, anime, sharp"
    with_all = encode_segment(pipe, schedule("a red horse, [anime:0-1:1.5], [sharp:0-1:0.75]", 6)[0])
    assert torch.equal(encode_segment(pipe, second).embeds, with_all.embeds)


def test_a1111_weights_multiply_tokens_and_keep_the_mean(pipe):
    seg = schedule("a red horse, [anime:0-1:1.5]", 4)[0]
    z = encode_segment(pipe, seg, weight_mode="a1111").embeds
    z0, w = plain_ids_encoding(pipe, seg.chunks)
    assert torch.allclose(z.mean(), z0.mean(), atol=1e-6)
    ratio = z / z0
    anime = int(torch.nonzero(w == 1.5)[0])
    scale = ratio[0, 1].mean()  # a weight-1 token: only the mean rescale
    assert torch.allclose(ratio[0, 1], scale.expand(32), rtol=1e-4)
    assert torch.allclose(ratio[0, anime], (1.5 * scale).expand(32), rtol=1e-4)


def test_comfy_weights_scale_the_distance_from_the_empty_prompt(pipe):
    from promptist_core.render_diffusers import _encode_ids, _token_ids

    seg = schedule("a red horse, [anime:0-1:1.5]", 4)[0]
    z = encode_segment(pipe, seg, weight_mode="comfy").embeds
    z0, w = plain_ids_encoding(pipe, seg.chunks)
    empty = _encode_ids(pipe, [_token_ids(pipe.tokenizer, [])[0]], "cpu", None).embeds
    anime = int(torch.nonzero(w == 1.5)[0])
    assert torch.allclose(z[0, anime] - empty[0, anime], 1.5 * (z0[0, anime] - empty[0, anime]), atol=1e-5)
    keep = w == 1.0
    assert torch.equal(z[0, keep], z0[0, keep])


@pytest.mark.parametrize("negative", [None, "blurry, ugly"])
def test_a_plain_prompt_gives_bit_identical_images_to_the_pipelines_own_path(pipe, negative):
    kwargs = {"num_inference_steps": 3, "guidance_scale": 6.0, "negative_prompt": negative, "output_type": "np",
              **SIZE}
    ours = generate_dfprompt(pipe, "a cat riding a bike", generator=torch.Generator().manual_seed(7), **kwargs)
    theirs = pipe("a cat riding a bike", generator=torch.Generator().manual_seed(7), **kwargs)
    assert np.array_equal(ours.images, theirs.images)


def test_batches_with_negative_prompts_switch_each_image_on_its_own_schedule(pipe):
    prompts = ["a cat, [fluffy:0.5-1:1.5]", "a dog, [wet:0-0.5:0.5]"]
    n = 4
    with UNetRecorder(pipe.unet) as rec:
        generate_dfprompt(pipe, prompts, negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
                          num_inference_steps=n, weight_mode="comfy", output_type="latent",
                          generator=[torch.Generator().manual_seed(s) for s in range(4)], **SIZE)
    negatives = [pipe.encode_prompt("", "cpu", 1, True, negative_prompt=t)[1] for t in ("blurry", "dark")]
    for i, hidden in enumerate(rec.calls):
        assert hidden.shape == (8, 77, 32)
        for image in range(4):
            k = image // 2
            seg = next(s for s in schedule(prompts[k], n) if s.first_step <= i <= s.last_step)
            assert torch.equal(hidden[image], negatives[k][0])
            assert torch.equal(hidden[4 + image], encode_segment(pipe, seg, weight_mode="comfy").embeds[0])
    assert torch.equal(rec.calls[1][4], rec.calls[0][4]) and not torch.equal(rec.calls[2][4], rec.calls[1][4])


def test_bad_arguments_are_refused_before_anything_runs(pipe):
    with pytest.raises(ValueError, match="weight_mode must be one of a1111, comfy, got 'compel'"):
        generate_dfprompt(pipe, "a cat", weight_mode="compel")
    with pytest.raises(ValueError, match="prompt 1: column 11: expected a range like 0.5-1"):
        generate_dfprompt(pipe, ["a cat", "a dog, [x:y:1]"])
    with pytest.raises(ValueError, match="prompt_embeds cannot be combined"):
        generate_dfprompt(pipe, "a cat", prompt_embeds=torch.zeros(1, 77, 32))


def test_step_counts_and_image_sizes_are_bounded_before_anything_runs(pipe):
    from promptist_core.generators import check_generate_args

    with pytest.raises(ValueError, match="num_steps must be at most 10000"):
        generate_dfprompt(pipe, "a cat", num_inference_steps=10_001)
    with pytest.raises(ValueError, match="steps must be an integer between 1 and 10000, got 1000000000"):
        check_generate_args(["a cat"], [1], 10**9, 5.0, (64, 64))
    with pytest.raises(ValueError, match="multiples of 8 up to 8192, got \\(65536, 64\\)"):
        check_generate_args(["a cat"], [1], 2, 5.0, (65536, 64))
    check_generate_args(["a cat"], [1], 10_000, 5.0, (8192, 64))


def test_diffusers_generator_draws_one_seeded_image_per_prompt(pipe):
    gen = DiffusersGenerator(pipe, batch_size=2)
    assert isinstance(gen, ImageGenerator)
    prompts = ["a cat", "a dog, [wet:0-0.5:1.5]", "a cat"]
    images = gen.generate(prompts, [1, 2, 1], steps=2, guidance=5.0, size=(64, 48))
    assert images.shape == (3, 48, 64, 3) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.allclose(images[0], images[2], atol=1e-5)  # same prompt and seed, different batches
    alone = pipe("a cat", num_inference_steps=2, guidance_scale=5.0, height=48, width=64, output_type="pt",
                 generator=torch.Generator().manual_seed(1)).images
    assert torch.allclose(images[0], alone[0].permute(1, 2, 0), atol=1e-5)
    with pytest.raises(ValueError, match="one seed per prompt"):
        gen.generate(prompts, [1], steps=2, guidance=5.0, size=(64, 64))


@pytest.fixture(scope="module")
def sdxl(tiny_sd_dir):
    from builders_sd import build_tiny_sdxl

    return build_tiny_sdxl(tiny_sd_dir / "tokenizer")


def test_sdxl_switches_hidden_states_and_pooled_embeddings_at_the_scheduled_steps(sdxl):
    n = 4
    pooled_seen = []
    hook = sdxl.unet.register_forward_pre_hook(
        lambda m, a, kw: pooled_seen.append(kw["added_cond_kwargs"]["text_embeds"]), with_kwargs=True)
    try:
        with UNetRecorder(sdxl.unet) as rec:
            generate_dfprompt(sdxl, PROMPT, num_inference_steps=n, output_type="latent",
                              generator=torch.Generator().manual_seed(0), **SIZE)
    finally:
        hook.remove()
    assert len(rec.calls) == n
    for seg in schedule(PROMPT, n):
        expected = encode_segment(sdxl, seg)
        for i in range(seg.first_step, seg.last_step + 1):
            assert rec.calls[i].shape == (2, 77, 64)
            assert torch.equal(rec.calls[i][1:], expected.embeds)
            assert torch.equal(pooled_seen[i][1:], expected.pooled)
    assert not torch.equal(rec.calls[1][1], rec.calls[2][1])


def test_sdxl_plain_prompt_gives_bit_identical_images(sdxl):
    kwargs = {"num_inference_steps": 2, "guidance_scale": 5.0, "output_type": "np", **SIZE}
    ours = generate_dfprompt(sdxl, "a cat", generator=torch.Generator().manual_seed(3), **kwargs)
    theirs = sdxl("a cat", generator=torch.Generator().manual_seed(3), **kwargs)
    assert np.array_equal(ours.images, theirs.images)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_weighted_path_encodes_token_ids_exactly_as_the_pipeline_does(which, request):
    """With all weights 1 the chunk-wise path must reproduce encode_prompt, so only the weights differ."""
    from promptist_core.render_diffusers import _encode_ids, _encode_plain, _token_ids

    p = request.getfixturevalue("pipe" if which == "sd" else "sdxl")
    chunks = (("a red horse, ", 1.0), ("anime", 1.0))
    tokenizers = [p.tokenizer] + ([p.tokenizer_2] if which == "sdxl" else [])
    ours = _encode_ids(p, [_token_ids(t, chunks)[0] for t in tokenizers], "cpu", None)
    theirs = _encode_plain(p, "a red horse, anime", "cpu", None)
    assert torch.equal(ours.embeds, theirs.embeds)
    if which == "sdxl":
        assert torch.equal(ours.pooled, theirs.pooled)
