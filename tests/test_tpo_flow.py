"""TPO on a flow-matching model: a tiny SD3 transformer learns which colour a caption names.

The task of test_tpo.py in SD3's latent space (16 channels): "red" latents have channel 0 = +1, "blue" -1;
the negative is the colour-swapped caption; objects "car" and "boat" are held out. The base model is the
tiny SD3Transformer2DModel trained briefly as a flow model (x_t = (1 - sigma) x_0 + sigma eps, target
eps - x_0, sigmas with the scheduler's shift 3) with captions whose colour word is random. The losses
compare velocities, the model's own prediction space.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders_flow import LATENT_CHANNELS, build_tiny_sd3_pipeline, build_tiny_sd3_transformer
from builders_sd import build_clip_tokenizer

from trainer.progress import StopTraining
from trainer.tpo.denoiser import Denoiser, DiffusersFlowDenoiser, denoiser_from_pipeline, flow_sigmas
from trainer.tpo.lora import TRANSFORMER_PREFIX, load_kohya_lora
from trainer.tpo.train import CaptionPair, LatentPairs, TPOConfig, evaluate_pairs, pair_terms, train_tpo

OBJECTS = ("square", "circle", "triangle", "star", "house", "tree", "car", "boat")
HELD_OUT = ("car", "boat")
COLOURS = {"red": 1.0, "blue": -1.0}
SIZE = 8
T5_TOKENS = 4  # no T5: the pipeline pads with this many zero tokens (256 by default)
T_RANGE = (500, 999)  # sigma 0.75 .. 1 with shift 3: the colour is not yet readable from x_t


def colour_pairs(per_colour: int = 3, held_out_per_colour: int = 4, seed: int = 0) -> LatentPairs:
    g = torch.Generator().manual_seed(seed)
    latents, train, valid = [], [], []
    for obj in OBJECTS:
        for colour, sign in COLOURS.items():
            other = next(c for c in COLOURS if c != colour)
            z = torch.randn(held_out_per_colour if obj in HELD_OUT else per_colour, LATENT_CHANNELS, SIZE, SIZE,
                            generator=g) * 0.3
            z[:, 0] += sign
            for row in z:
                latents.append(row)
                pair = CaptionPair(len(latents) - 1, f"a {colour} {obj}", f"a {other} {obj}", "attribute")
                (valid if obj in HELD_OUT else train).append(pair)
    return LatentPairs(torch.stack(latents), train, valid)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3-tokenizer")
    tokenizer = build_clip_tokenizer(folder)
    tokenizer.model_max_length = 12  # short captions keep the test fast
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def base_state(tokenizer_dir):
    """The base model: the tiny SD3 transformer trained 80 steps as a flow model (timesteps 400-999) with
    colour-blind captions."""
    pipe = build_tiny_sd3_pipeline(tokenizer_dir)
    transformer = pipe.transformer
    captions = [f"a {c} {o}" for c in COLOURS for o in OBJECTS]
    with torch.no_grad():
        hidden, _, pooled, _ = pipe.encode_prompt(captions, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=T5_TOKENS)
    sigmas = flow_sigmas(1000, 3.0)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(80):
        signs = torch.randint(0, 2, (32,), generator=g) * 2.0 - 1
        x0 = torch.randn(32, LATENT_CHANNELS, SIZE, SIZE, generator=g) * 0.3
        x0[:, 0] += signs.view(-1, 1, 1)
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(400, 1000, (32,), generator=g)
        which = torch.randint(0, len(captions), (32,), generator=g)  # the colour word says nothing
        sigma = sigmas[t].view(-1, 1, 1, 1)
        out = transformer(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=sigmas[t] * 1000,
                          encoder_hidden_states=hidden[which], pooled_projections=pooled[which]).sample
        loss = (out - (noise - x0)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in transformer.state_dict().items()}


def make_denoiser(tokenizer_dir, base_state, rank: int = 4) -> DiffusersFlowDenoiser:
    transformer = build_tiny_sd3_transformer()
    transformer.load_state_dict(base_state)
    return denoiser_from_pipeline(build_tiny_sd3_pipeline(tokenizer_dir, transformer=transformer), rank=rank,
                                  max_sequence_length=T5_TOKENS)


def tpo_config(tmp_path: Path, **overrides) -> TPOConfig:
    settings = {"out": str(tmp_path / "colour.safetensors"), "lr": 1e-2, "warmup_steps": 0, "batch_size": 12,
                "grad_accum": 1, "max_steps": 40, "timestep_min": T_RANGE[0], "timestep_max": T_RANGE[1],
                "eval_every": 20, "save_every": 0, "log_every": 10, "tensorboard": False, "rank": 4,
                "lora_precision": "fp32", "beta": 1000.0}
    return TPOConfig(**{**settings, **overrides})


def fresh_accuracy(denoiser, data: LatentPairs, seeds=(101, 202, 303)) -> float:
    """Held-out implicit accuracy on noise and timesteps never seen in training."""
    scores = [evaluate_pairs(denoiser, data.latents, data.valid, seed=s, t_range=T_RANGE)["valid_accuracy"]
              for s in seeds]
    return sum(scores) / len(scores)


def test_flow_noising_and_target_are_the_velocity_of_the_interpolation(tokenizer_dir, base_state):
    denoiser = make_denoiser(tokenizer_dir, base_state)
    assert isinstance(denoiser, Denoiser)
    # the scheduler's own sigmas (diffusers orders them from pure noise down), shift 3
    assert torch.allclose(flow_sigmas(1000, 3.0), denoiser.scheduler.sigmas[:1000].flip(0).float(), atol=1e-6)
    x0, noise, t = torch.randn(2, LATENT_CHANNELS, SIZE, SIZE), torch.randn(2, LATENT_CHANNELS, SIZE, SIZE), \
        torch.tensor([0, 999])
    noisy = denoiser.add_noise(x0, noise, t)
    sigma = flow_sigmas(1000, 3.0)[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, (1 - sigma) * x0 + sigma * noise) and torch.allclose(noisy[1], noise[1])
    assert torch.equal(denoiser.target(x0, noise, t), noise - x0)
    cond = denoiser.encode_text(["a red car", "a blue boat"])
    with torch.no_grad():  # predict is the transformer's raw output (the velocity) at timestep sigma * 1000
        raw = denoiser.unet(hidden_states=noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=cond.hidden,
                            pooled_projections=cond.pooled).sample
        assert torch.allclose(denoiser.predict(noisy, t, cond), raw)
    terms = pair_terms(denoiser, x0, noise, t, ["a red car"] * 2, ["a blue car"] * 2)
    with torch.no_grad():
        expected = (denoiser.predict(noisy, t, denoiser.encode_text(["a red car"] * 2)) - (noise - x0)).pow(2)
    assert torch.allclose(terms.model_w, expected.mean(dim=(1, 2, 3)), atol=1e-6)


@pytest.fixture(scope="module")
def tdpo_run(tmp_path_factory, tokenizer_dir, base_state):
    denoiser, data = make_denoiser(tokenizer_dir, base_state), colour_pairs()
    before = fresh_accuracy(denoiser, data)
    result = train_tpo(tpo_config(tmp_path_factory.mktemp("flow-tdpo")), denoiser, data)
    return denoiser, data, result, before


def test_tdpo_on_a_flow_model_raises_held_out_implicit_accuracy(tdpo_run):
    denoiser, data, result, before = tdpo_run
    assert before == 0.5  # a fresh LoRA ties every pair
    after = fresh_accuracy(denoiser, data)
    assert after >= 0.85, (after, [round(h["valid_accuracy"], 3) for h in result.history if "valid_accuracy" in h])


def test_saved_flow_lora_has_transformer_names_and_reproduces_the_outputs(tdpo_run, base_state):
    denoiser, data, result, _ = tdpo_run
    from safetensors import safe_open

    with safe_open(str(result.lora), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(TRANSFORMER_PREFIX + "transformer_blocks_") for k in keys)
    assert meta["ss_base_model_version"] == "sd3"
    x, t = data.latents[:3], torch.tensor([500, 700, 999])
    cond = denoiser.encode_text(["a red car", "a blue boat", "a red star"])
    with torch.no_grad():
        expected = denoiser.predict(x, t, cond)
    fresh = build_tiny_sd3_transformer()
    fresh.load_state_dict(base_state)
    assert len(load_kohya_lora(fresh, result.lora, prefix=TRANSFORMER_PREFIX)) == len(denoiser.loras)
    sigma = flow_sigmas(1000, 3.0)[t]
    with torch.no_grad():
        got = fresh(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=cond.hidden,
                    pooled_projections=cond.pooled).sample
    assert torch.allclose(got, expected, atol=1e-4)


def test_stopped_and_resumed_flow_run_equals_the_straight_run(tmp_path, tokenizer_dir, base_state):
    data = colour_pairs()

    def run(folder: Path, **kw):
        denoiser = make_denoiser(tokenizer_dir, base_state, rank=2)
        return denoiser, train_tpo(tpo_config(folder, max_steps=4, eval_every=2, save_every=2, batch_size=4,
                                              grad_accum=2, warmup_steps=2), denoiser, data, **kw)

    straight, straight_result = run(tmp_path / "a")

    def stop_at_2(step, total, metrics):
        if step == 2:
            raise StopTraining("test")

    with pytest.raises(StopTraining):
        run(tmp_path / "b", callback=stop_at_2)
    resumed, resumed_result = run(tmp_path / "b", resume=True)
    assert [h["step"] for h in resumed_result.history] == [3, 4]
    for a, b in zip(straight.trainable_parameters(), resumed.trainable_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert resumed_result.history[-1]["loss"] == pytest.approx(straight_result.history[-1]["loss"], abs=1e-6)


def test_a_model_type_tpo_does_not_cover_is_refused_in_one_line_naming_it(tokenizer_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    pipe = build_tiny_sd3_pipeline(tokenizer_dir)
    pipe.transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                              attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                              pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    with pytest.raises(NotImplementedError) as e:
        denoiser_from_pipeline(pipe)
    assert "FluxTransformer2DModel" in str(e.value) and "\n" not in str(e.value)
    pipe = build_tiny_sd3_pipeline(tokenizer_dir)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(NotImplementedError, match="use_dynamic_shifting"):
        denoiser_from_pipeline(pipe)
