"""TPO (TDPO/TKTO) learns: a tiny SD UNet, in latent space, learns which colour a caption names.

The task (TRAINERS.md §5.5): "red" latents have channel 0 = +1 plus noise, "blue" ones -1; captions are
"a red square", "a blue car", ...; each negative is the colour-swapped caption. The base model is the tiny
UNet briefly trained as a denoiser on these latents with captions whose colour word is random, so it
denoises but has not learned what the colour words mean (as a real model that ignores an attribute).
Objects "car" and "boat" are held out: their pairs are never trained on. The noise schedule is SD's own
(scaled linear, 0.00085-0.012).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from builders_sd import build_clip_tokenizer, build_tiny_clip_text_model, build_tiny_unet

from trainer.cli import main
from trainer.progress import StopTraining
from trainer.tpo.denoiser import Denoiser, DiffusersDenoiser
from trainer.tpo.lora import load_kohya_lora
from trainer.tpo.train import (
    CaptionPair,
    LatentPairs,
    TPOConfig,
    evaluate_pairs,
    pair_terms,
    tdpo_loss,
    tkto_loss,
    train_tpo,
)

SD_SCHEDULE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
OBJECTS = ("square", "circle", "triangle", "star", "house", "tree", "car", "boat")
HELD_OUT = ("car", "boat")
COLOURS = {"red": 1.0, "blue": -1.0}
SIZE = 8  # latents are [4, 8, 8]
T_RANGE = (500, 999)  # where the colour is not yet readable from x_t, so the caption carries it
BASE_T_MIN = 400  # the base model is trained where TPO works on it


# --- the task ------------------------------------------------------------------------------------

def colour_latents(sign: float, n: int, g: torch.Generator) -> torch.Tensor:
    z = torch.randn(n, 4, SIZE, SIZE, generator=g) * 0.3
    z[:, 0] += sign
    return z


def colour_pairs(per_colour: int = 3, held_out_per_colour: int = 4, seed: int = 0) -> LatentPairs:
    """Latents with their caption and the colour-swapped caption; held-out objects go to `valid`."""
    g = torch.Generator().manual_seed(seed)
    latents, train, valid = [], [], []
    for obj in OBJECTS:
        for colour, sign in COLOURS.items():
            other = next(c for c in COLOURS if c != colour)
            count = held_out_per_colour if obj in HELD_OUT else per_colour
            for z in colour_latents(sign, count, g):
                latents.append(z)
                pair = CaptionPair(len(latents) - 1, f"a {colour} {obj}", f"a {other} {obj}", "attribute")
                (valid if obj in HELD_OUT else train).append(pair)
    return LatentPairs(torch.stack(latents), train, valid)


@pytest.fixture(scope="module")
def text_parts(tmp_path_factory):
    tokenizer = build_clip_tokenizer(tmp_path_factory.mktemp("tpo-tokenizer"))
    tokenizer.model_max_length = 12  # short captions; 12 tokens instead of 77 keeps the test fast
    return tokenizer, build_tiny_clip_text_model()


@pytest.fixture(scope="module")
def base_state(text_parts):
    """The base model: the tiny UNet trained 80 steps as a denoiser (timesteps 400-999) with colour-blind
    captions."""
    from diffusers import DDPMScheduler

    tokenizer, text_encoder = text_parts
    schedule = DDPMScheduler(**SD_SCHEDULE)
    unet = build_tiny_unet(channels=(8, 16))
    captions = [f"a {c} {o}" for c in COLOURS for o in OBJECTS]
    with torch.no_grad():
        ids = tokenizer(captions, padding="max_length", max_length=12, truncation=True, return_tensors="pt").input_ids
        states = text_encoder(ids)[0]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(80):
        signs = torch.randint(0, 2, (32,), generator=g) * 2.0 - 1
        x0 = torch.randn(32, 4, SIZE, SIZE, generator=g) * 0.3
        x0[:, 0] += signs.view(-1, 1, 1)
        noise, t = torch.randn(x0.shape, generator=g), torch.randint(BASE_T_MIN, 1000, (32,), generator=g)
        cond = states[torch.randint(0, len(captions), (32,), generator=g)]  # the colour word says nothing
        loss = (unet(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=cond).sample - noise).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.clone() for k, v in unet.state_dict().items()}


def make_denoiser(text_parts, base_state, rank: int = 4) -> DiffusersDenoiser:
    from diffusers import DDPMScheduler

    tokenizer, text_encoder = text_parts
    unet = build_tiny_unet(channels=(8, 16))
    unet.load_state_dict(base_state)
    return DiffusersDenoiser(unet, DDPMScheduler(**SD_SCHEDULE), text_encoder, tokenizer, rank=rank)


def tpo_config(tmp_path: Path, **overrides) -> TPOConfig:
    settings = {"out": str(tmp_path / "colour.safetensors"), "lr": 6e-3, "warmup_steps": 0, "batch_size": 12,
                "grad_accum": 1, "max_steps": 60, "timestep_min": T_RANGE[0], "timestep_max": T_RANGE[1],
                "eval_every": 15, "save_every": 0, "log_every": 10, "tensorboard": False, "rank": 4,
                "lora_precision": "fp32", "beta": 100.0}
    return TPOConfig(**{**settings, **overrides})


def fresh_accuracy(denoiser, data: LatentPairs, pairs, seeds=(101, 202, 303, 404, 505)) -> float:
    """Implicit accuracy on noise and timesteps never seen in training (five draws per pair)."""
    scores = [evaluate_pairs(denoiser, data.latents, pairs, seed=s, t_range=T_RANGE)["valid_accuracy"] for s in seeds]
    return sum(scores) / len(scores)


@pytest.fixture(scope="module")
def tdpo_run(tmp_path_factory, text_parts, base_state):
    tmp = tmp_path_factory.mktemp("tdpo")
    denoiser, data = make_denoiser(text_parts, base_state), colour_pairs()
    before = fresh_accuracy(denoiser, data, data.valid)
    result = train_tpo(tpo_config(tmp), denoiser, data)
    return denoiser, data, result, before


# --- losses --------------------------------------------------------------------------------------

def test_losses_match_their_formulas():
    d_w, d_l = torch.tensor([0.01, -0.02]), torch.tensor([0.03, 0.05])
    expected = -torch.nn.functional.logsigmoid(-2500 * (d_w - d_l))
    assert torch.allclose(tdpo_loss(d_w, d_l, 5000), expected)  # Salesforce beta 5000 = diffusers 2500
    clipped = -torch.nn.functional.logsigmoid(-2500 * (d_w - torch.tensor([0.03, 0.04])))
    assert torch.allclose(tdpo_loss(d_w, d_l, 5000, negative_clip=0.04), clipped)
    g_w, g_l = -d_w, -d_l
    z0 = torch.cat([g_w, g_l]).mean().clamp(min=0)
    kto = (1 - torch.sigmoid(1000 * (g_w - z0))) + (1 - torch.sigmoid(-1000 * (g_l - z0)))
    assert torch.allclose(tkto_loss(d_w, d_l, 1000), kto)
    # past the clip the negative term gives no gradient
    d_l = torch.tensor([0.05], requires_grad=True)
    tdpo_loss(torch.tensor([0.0]), d_l, 5000, negative_clip=0.04).sum().backward()
    assert d_l.grad.item() == 0


def test_reference_is_the_same_unet_with_the_lora_off_in_one_batched_forward(text_parts, base_state):
    denoiser = make_denoiser(text_parts, base_state)
    assert isinstance(denoiser, Denoiser)
    calls = []
    denoiser.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    data = colour_pairs()
    x0, noise = data.latents[:3], torch.randn(3, 4, SIZE, SIZE)
    terms = pair_terms(denoiser, x0, noise, torch.tensor([600, 700, 800]), ["a red x"] * 3, ["a blue x"] * 3)
    assert calls == [6, 6]  # policy [c_w; c_l] then reference [c_w; c_l]
    assert torch.equal(terms.model_w, terms.ref_w) and torch.equal(terms.model_l, terms.ref_l)  # zero-init LoRA


# --- learning ------------------------------------------------------------------------------------

def test_tdpo_raises_held_out_implicit_accuracy_to_90_percent(tdpo_run):
    denoiser, data, result, before = tdpo_run
    assert before == 0.5  # a fresh LoRA changes nothing: every pair ties
    after = fresh_accuracy(denoiser, data, data.valid)
    assert after >= 0.9, (after, [round(h.get("valid_accuracy", -1), 3) for h in result.history if "valid_accuracy" in h])
    assert result.valid_accuracy is not None and result.history[-1]["step"] == 60
    log = (result.run_dir / "train_log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,accuracy,d_chosen,d_rejected,model_mse,ref_mse")
    assert (result.run_dir / "curves.png").is_file()


def ddim_channel0(denoiser, caption: str, seeds=range(6), steps: int = 6) -> float:
    """Mean channel 0 of few-step DDIM samples (no guidance) for `caption`, one per seed."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(steps)
    x = torch.cat([torch.randn(1, 4, SIZE, SIZE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    cond = denoiser.encode_text([caption] * len(x))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = denoiser.predict(x, t.repeat(len(x)), cond)
            x = scheduler.step(eps, t, x).prev_sample
    return x[:, 0].mean().item()


def test_tuned_samples_take_the_named_colour_where_the_base_does_not(tdpo_run):
    denoiser = tdpo_run[0]
    for obj in HELD_OUT:
        tuned = ddim_channel0(denoiser, f"a red {obj}") - ddim_channel0(denoiser, f"a blue {obj}")
        with denoiser.adapters(False):
            base = ddim_channel0(denoiser, f"a red {obj}") - ddim_channel0(denoiser, f"a blue {obj}")
        assert abs(base) < 0.1, base
        assert tuned > 0.3, (obj, tuned, base)


def test_saved_lora_reproduces_the_trained_outputs_in_a_fresh_unet(tdpo_run, text_parts, base_state):
    denoiser, data, result, _ = tdpo_run
    meta = json.loads(json.dumps(_metadata(result.lora)))
    assert meta["ss_network_dim"] == "4" and meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == "60"
    assert json.loads(meta["promptist_config"])["loss"] == "tdpo"
    from trainer.tpo.lora_layout import UNetLayout

    assert UNetLayout.from_json(meta["promptist_unet_layout"]) == UNetLayout.from_diffusers_config(denoiser.unet.config)
    x = data.latents[:4]
    t = torch.tensor([500, 600, 800, 999])
    cond = denoiser.encode_text(["a red car", "a blue boat", "a red star", "a blue tree"])
    with torch.no_grad():
        expected = denoiser.predict(x, t, cond)

    fresh = build_tiny_unet(channels=(8, 16))
    fresh.load_state_dict(base_state)
    loaded = load_kohya_lora(fresh, result.lora)
    for path, lora in denoiser.loras.items():  # an fp32 file holds the trained weights exactly
        assert torch.equal(loaded[path].down.weight, lora.down.weight) and torch.equal(loaded[path].up.weight, lora.up.weight)
    with torch.no_grad():
        assert torch.allclose(fresh(x, t, encoder_hidden_states=cond.hidden).sample, expected, atol=1e-4)


def test_diffusers_loader_reproduces_the_trained_outputs(tdpo_run, text_parts, base_state, tmp_path):
    pytest.importorskip("peft")
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    denoiser, data, result, _ = tdpo_run
    tokenizer, text_encoder = text_parts
    unet = build_tiny_unet(channels=(8, 16))
    unet.load_state_dict(base_state)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(result.lora.parent), weight_name=result.lora.name)
    x, t = data.latents[:2], torch.tensor([600, 900])
    cond = denoiser.encode_text(["a red car", "a blue boat"])
    with torch.no_grad():
        expected = denoiser.predict(x, t, cond)
        got = pipe.unet(x, t, encoder_hidden_states=cond.hidden).sample
    assert (got - expected).abs().max() < 1e-4
    pipe.unload_lora_weights()


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_negative_clip_holds_the_wrong_captions_error_near_it_while_the_right_ones_falls(
        tmp_path, text_parts, base_state, tdpo_run):
    clip, late = 0.002, slice(30, None)
    denoiser, data = make_denoiser(text_parts, base_state), colour_pairs()
    clipped = train_tpo(tpo_config(tmp_path, negative_clip=clip), denoiser, data).history
    unclipped = tdpo_run[2].history  # the same run without the clip

    def mean(history, key):
        values = [h[key] for h in history[late]]
        return sum(values) / len(values)

    # Without the clip both errors rise (the known Diffusion-DPO failure). With it, D(c_l) is held near the
    # clip (per batch it overshoots: the LoRA's weights are shared by both captions) and D(c_w) goes below
    # the base model's.
    assert mean(unclipped, "d_rejected") > 3 * mean(clipped, "d_rejected")
    assert mean(clipped, "d_chosen") < 0 < mean(unclipped, "d_chosen")
    held_out = evaluate_pairs(denoiser, data.latents, data.valid, seed=7, t_range=T_RANGE)
    assert held_out["valid_d_rejected"] <= clip + 0.005 and held_out["valid_d_chosen"] < 0, held_out
    assert fresh_accuracy(denoiser, data, data.valid) >= 0.8


def test_tkto_reaches_the_same_held_out_accuracy(tmp_path, text_parts, base_state):
    denoiser, data = make_denoiser(text_parts, base_state), colour_pairs()
    train_tpo(tpo_config(tmp_path, loss="tkto"), denoiser, data)
    assert fresh_accuracy(denoiser, data, data.valid) >= 0.9


# --- exact resume --------------------------------------------------------------------------------

def test_stopped_and_resumed_run_equals_the_straight_run(tmp_path, text_parts, base_state):
    data = colour_pairs()

    def run(folder: Path, **kw):
        denoiser = make_denoiser(text_parts, base_state, rank=2)
        return denoiser, train_tpo(tpo_config(folder, max_steps=6, eval_every=3, save_every=2, batch_size=4,
                                              grad_accum=2, warmup_steps=2), denoiser, data, **kw)

    straight, straight_result = run(tmp_path / "a")

    def stop_at_3(step, total, metrics):
        if step == 3:
            raise StopTraining("test")

    with pytest.raises(StopTraining):
        run(tmp_path / "b", callback=stop_at_3)
    resumed, resumed_result = run(tmp_path / "b", resume=True)
    assert [h["step"] for h in resumed_result.history] == [4, 5, 6]
    for a, b in zip(straight.trainable_parameters(), resumed.trainable_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
    assert resumed_result.history[-1]["loss"] == pytest.approx(straight_result.history[-1]["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="already holds a run"):
        run(tmp_path / "b")


# --- the command line on a real pipeline folder and image files ----------------------------------

def write_image_data(folder: Path) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    lines = []
    for i, (colour, rgb) in enumerate((("red", (220, 30, 30)), ("blue", (30, 30, 220))) * 2):
        Image.new("RGB", (80, 64), rgb).save(folder / f"{i}.png")
        other = "blue" if colour == "red" else "red"
        lines.append({"id": f"img{i}", "image": f"{i}.png", "caption": f"a {colour} square",
                      "negatives": [{"text": f"a {other} square", "type": "attribute"}],
                      "split": "valid" if i == 3 else "train"})
    (folder / "tpo_pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_cli_trains_a_lora_from_images_and_resumes(tmp_path, tiny_sd_dir, capsys):
    data = write_image_data(tmp_path / "data")
    out = tmp_path / "loras" / "tiny_tpo.safetensors"
    args = ["tpo", "--data", str(data), "--sd", str(tiny_sd_dir), "--out", str(out), "--resolution", "64",
            "--batch-size", "2", "--grad-accum", "1", "--device", "cpu", "--no-progress", "--tensorboard", "false",
            "--save-every", "1", "--rank", "2"]
    assert main([*args, "--max-steps", "2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["steps"] == 2 and Path(report["out"]) == out and out.is_file()
    cache = list((data / "latents").glob("*-64.safetensors"))
    assert len(cache) == 1  # the VAE ran once, its latents are cached
    cached_at = cache[0].stat().st_mtime_ns
    assert (data / "runs" / "tiny_tpo" / "checkpoints").is_dir() and list((tmp_path / "loras").iterdir()) == [out]
    assert main([*args, "--max-steps", "3", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 3
    assert cache[0].stat().st_mtime_ns == cached_at  # the resumed run read the cache, the VAE did not run

    from builders_sd import load_tiny_sd

    pipe = load_tiny_sd(tiny_sd_dir)
    assert len(load_kohya_lora(pipe.unet, out)) == 32  # 4 transformer blocks x 2 attentions x (q, k, v, out)


def test_cli_bad_input_is_one_line_and_exit_code(tmp_path, tiny_sd_dir, capsys):
    assert main(["tpo", "--data", str(tmp_path / "nothing"), "--sd", str(tiny_sd_dir), "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "tpo-data" in capsys.readouterr().err
    data = write_image_data(tmp_path / "data")
    assert main(["tpo", "--data", str(data), "--sd", str(tmp_path / "no-model"), "--out",
                 str(tmp_path / "x.safetensors"), "--device", "cpu"]) == 3
    assert main(["tpo", "--data", str(data), "--sd", str(tiny_sd_dir), "--out", str(tmp_path / "x.ckpt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 2 and ".safetensors" in err[-1]
    (data / "1.png").write_bytes(b"not a png")
    assert main(["tpo", "--data", str(data), "--sd", str(tiny_sd_dir), "--out", str(tmp_path / "x.safetensors"),
                 "--device", "cpu", "--resolution", "64", "--no-progress"]) == 2
    assert "1.png: cannot read this image" in capsys.readouterr().err
    assert main(["tpo", "--print-config", "--loss", "tkto"]) == 0
    assert 'loss = "tkto"' in capsys.readouterr().out


def test_sdxl_denoiser_conditions_on_pooled_text_and_time_ids_and_trains(tiny_sd_dir, tmp_path):
    from builders_sd import build_tiny_sdxl

    pipe = build_tiny_sdxl(tiny_sd_dir / "tokenizer")
    denoiser = DiffusersDenoiser.from_pipeline(pipe, rank=2)
    cond = denoiser.encode_text(["a red square", "a blue square"])
    assert cond.pooled is not None and cond.hidden.shape[-1] == pipe.unet.config.cross_attention_dim
    latents = denoiser.encode_images(torch.rand(2, 32, 32, 3))
    t = torch.tensor([100, 900])
    eps = denoiser.predict(denoiser.add_noise(latents, torch.randn_like(latents), t), t, cond)
    assert eps.shape == latents.shape
    assert denoiser.base_metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    data = LatentPairs(latents, [CaptionPair(0, "a red square", "a blue square"),
                                 CaptionPair(1, "a blue square", "a red square")], [])
    result = train_tpo(tpo_config(tmp_path, max_steps=2, batch_size=2, lr=1e-2), denoiser, data)
    assert result.steps == 2 and any(p.abs().sum() > 0 for p in denoiser.trainable_parameters()[1::2])


def test_diffusers_float32_cast_note_stays_out_of_the_trainers_output():
    """diffusers prints "modules ... should be kept in float32: []" on every `model.to(dtype)`; its single-file
    loader casts each component so, and the SDXL VAE's float32 encode casts twice per batch."""
    import logging

    from diffusers import AutoencoderKL

    from promptist_core.quiet import no_fp32_cast_note

    said = []

    class Recorder(logging.Handler):  # what diffusers' own stderr handler would print
        def emit(self, record):
            said.append(record.getMessage())

    emitter = logging.getLogger("diffusers.models.modeling_utils")
    recorder, level = Recorder(), emitter.level
    emitter.setLevel(logging.WARNING)  # whatever verbosity an earlier test left diffusers at
    emitter.addHandler(recorder)
    try:
        vae = AutoencoderKL(block_out_channels=[4], in_channels=3, out_channels=3, latent_channels=4,
                            norm_num_groups=2, down_block_types=["DownEncoderBlock2D"],
                            up_block_types=["UpDecoderBlock2D"])
        vae.to(torch.float32)
        assert any("should be kept in float32" in m for m in said)  # what the trainers printed before
        said.clear()
        with no_fp32_cast_note():
            vae.to(torch.float32)
            vae.to(torch.float64)
        assert not any("kept in float32" in m for m in said)
        vae.to(torch.float32)
        assert any("should be kept in float32" in m for m in said)  # diffusers' logger as it was after the block
    finally:
        emitter.removeHandler(recorder)
        emitter.setLevel(level)
