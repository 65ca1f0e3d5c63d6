"""Promptist SFT Train / PPO Train and the ComfyUI image generator, run the way ComfyUI runs them:
inside `torch.inference_mode()`, with ComfyUI's progress bar, interrupt and sampling functions replaced
by small fakes that behave like a125cd8's (the hook raises the interrupt; prepare_noise seeds the CPU
generator; sample receives conditioning lists). No ComfyUI needed."""

from __future__ import annotations

import json
import logging
import math
import sys
import types

import pytest
import torch
from builders_lm import build_tiny_gpt2_base
from comfy_validation import validate_node
from conftest import MODIFIERS, prompt_pairs
from PIL import Image
from safetensors.torch import load_file

from nodes import comfy_host
from nodes.comfy_generator import ComfyGenerator
from nodes.comfy_schema import v1_node
from nodes.optimize import ModelLoader, OptimizePrompt
from nodes.rewards import RewardModelLoader
from nodes.train import PPOTrain, SFTTrain, TrainingProgress
from promptist_core.cli import main as cli_main
from promptist_core.dfprompt import comfy_percent
from promptist_core.weights import UnfinishedRunError
from trainer.checkpoint import list_checkpoints


class Interrupt(Exception):
    """Stands for comfy.model_management.InterruptProcessingException."""


class FakeComfy:
    """comfy.model_management, comfy.utils.ProgressBar, comfy.sample and comfy.model_patcher, as far as
    the nodes use them. `cancel_at` presses Cancel when the bar reaches that value."""

    def __init__(self):
        self.interrupted = False
        self.cancel_at: int | None = None
        self.updates: list[tuple[int, int, object]] = []
        self.samples: list[dict] = []
        self.loaded: list = []
        fake = self

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current = total, 0

            def update(self, value):
                self.update_absolute(self.current + value)

            def update_absolute(self, value, total=None, preview=None):
                self.current = value
                fake.updates.append((value, total, preview))
                if value == fake.cancel_at:
                    fake.interrupted = True
                fake.throw_exception_if_processing_interrupted()  # what ComfyUI's progress hook does

        self.mm = types.SimpleNamespace(
            InterruptProcessingException=Interrupt,
            throw_exception_if_processing_interrupted=self.throw_exception_if_processing_interrupted,
            processing_interrupted=lambda: self.interrupted,
            free_memory=lambda *a, **k: None, soft_empty_cache=lambda *a, **k: None,
            load_models_gpu=lambda models, **k: self.loaded.extend(models),
            get_torch_device=lambda: torch.device("cpu"), text_encoder_offload_device=lambda: torch.device("cpu"),
            intermediate_device=lambda: torch.device("cpu"),
        )
        self.utils = types.SimpleNamespace(ProgressBar=ProgressBar)
        self.sample = types.SimpleNamespace(prepare_noise=self.prepare_noise, sample=self.sample_fn,
                                            fix_empty_latent_channels=lambda model, latent: latent)
        self.patcher = types.SimpleNamespace(ModelPatcher=lambda model, load_device, offload_device: ("patcher", model))

    def throw_exception_if_processing_interrupted(self):
        if self.interrupted:
            self.interrupted = False
            raise Interrupt()

    @staticmethod
    def prepare_noise(latent, seed, noise_inds=None):
        generator = torch.manual_seed(seed)
        return torch.randn(latent.size(), dtype=latent.dtype, generator=generator, device="cpu")

    def sample_fn(self, model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                  denoise=1.0, disable_pbar=False, seed=None, **kwargs):
        """Red latents for conditioning that mentions red, blue otherwise; the noise shows through a little."""
        assert torch.is_inference_mode_enabled()
        self.samples.append({"noise": noise.clone(), "steps": steps, "cfg": cfg, "sampler": sampler_name,
                             "scheduler": scheduler, "positive": positive, "negative": negative, "seed": seed})
        red = any("red" in c[1]["text"].replace(",", " ").split() for c in positive)
        colour = torch.tensor([0.9, 0.1, 0.1] if red else [0.1, 0.1, 0.9]).view(1, 3, 1, 1)
        return colour + 0.01 * noise[:, :3]


class FakeCLIP:
    """comfy.sd.CLIP's interface: tokenize, encode_from_tokens_scheduled (checks inference mode)."""

    def tokenize(self, text):
        return text

    def encode_from_tokens_scheduled(self, tokens, add_dict=None, **kwargs):
        assert torch.is_inference_mode_enabled()
        return [[torch.zeros(1, 77, 8), {"text": tokens, **(add_dict or {})}]]


class FakeVAE:
    def decode(self, samples):  # [B, 3, h, w] latents -> [B, 8h, 8w, 3] images
        return samples.repeat_interleave(8, 2).repeat_interleave(8, 3).permute(0, 2, 3, 1)


class FakeModel:
    def __init__(self):
        self.model = torch.nn.Linear(2, 2)
        self.patches = {}


@pytest.fixture
def comfy(monkeypatch):
    fake = FakeComfy()
    package = types.ModuleType("comfy")
    package.sample, package.model_management, package.model_patcher, package.utils = (
        fake.sample, fake.mm, fake.patcher, fake.utils)
    for name, module in {"comfy": package, "comfy.sample": fake.sample, "comfy.model_management": fake.mm,
                         "comfy.model_patcher": fake.patcher, "comfy.utils": fake.utils}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(comfy_host, "model_management", fake.mm)
    monkeypatch.setattr(comfy_host, "comfy_utils", fake.utils)
    monkeypatch.setattr(comfy_host, "_MANAGED", {})
    return fake


@pytest.fixture
def models_dir(tmp_path, tiny_promptist_dir, tiny_clip_models_dir, monkeypatch):
    """ComfyUI's models/promptist: the tiny policy, the tiny CLIPs and head, an untrained tiny GPT-2."""
    folder = tmp_path / "models"
    folder.mkdir()
    for source in [*tiny_promptist_dir.iterdir(), *tiny_clip_models_dir.iterdir()]:
        (folder / source.name).symlink_to(source)
    build_tiny_gpt2_base(folder / "tiny-base", [y for _, y in prompt_pairs(200)] + [x for x, _ in prompt_pairs(200)],
                         n_positions=64)
    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(folder))
    return folder


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"source": x, "target": y}) for x, y in prompt_pairs(200)) + "\n")
    return path


def sft(pairs_file, **overrides):
    settings = dict(data_file=str(pairs_file), data_format="auto", base="tiny-base", save_name="my-sft", steps=150,
                    lr=3e-3, batch_size=16, effective_batch_size=16, seed=0, save_every=50, device="cpu")
    settings.update(overrides)
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        return v1_node(SFTTrain)().run(**settings)


# --- SFT -----------------------------------------------------------------------------------------

def test_sft_node_trains_a_policy_that_optimizes_and_the_loader_lists_it(models_dir, pairs_file, comfy):
    model, curves, summary = sft(pairs_file)
    out = models_dir / "my-sft"
    assert (out / "model.safetensors").is_file() and list_checkpoints(out)[-1].step == 150
    assert "SFT trained" in summary and str(out) in summary
    # the loss fell; the curve came back as an IMAGE and was the bar's preview
    rows = (out / "train_log.csv").read_text().splitlines()
    losses = [float(r.split(",")[1]) for r in rows[1:] if r.split(",")[1]]
    assert losses[-1] < losses[0] / 2, losses
    assert curves.shape[0] == 1 and curves.shape[-1] == 3 and curves.dtype == torch.float32
    value, total, preview = comfy.updates[-1]
    assert (value, total) == (150, 150) and preview[0] == "PNG" and isinstance(preview[1], Image.Image)
    # the returned policy writes modifiers (greedy), and is the saved folder's, which the loader lists
    greedy = model.optimizer("a cat riding a bike", num_beams=1, max_new_tokens=20)[0].prompt
    assert any(m in greedy for m in MODIFIERS), greedy
    assert "my-sft" in v1_node(ModelLoader).INPUT_TYPES()["required"]["model_name"][0]
    (loaded,) = ModelLoader.run(model_name="my-sft", device="cpu")
    assert OptimizePrompt.run(promptist_model=loaded, text="a fox in the snow", candidates=3, max_new_tokens=20) == \
        OptimizePrompt.run(promptist_model=model, text="a fox in the snow", candidates=3, max_new_tokens=20)


def test_cancel_saves_a_checkpoint_and_queueing_again_resumes_to_the_same_weights(models_dir, pairs_file, comfy):
    settings = dict(steps=6, batch_size=8, effective_batch_size=8, save_every=100)
    sft(pairs_file, save_name="whole", **settings)

    comfy.cancel_at = 3
    with pytest.raises(Interrupt):
        sft(pairs_file, save_name="stopped", **settings)
    assert [c.step for c in list_checkpoints(models_dir / "stopped")] == [3]
    comfy.cancel_at, comfy.updates = None, []
    _, _, summary = sft(pairs_file, save_name="stopped", **settings)
    assert [u[0] for u in comfy.updates] == [4, 5, 6] and "SFT resumed" in summary

    whole = load_file(str(models_dir / "whole" / "model.safetensors"))
    resumed = load_file(str(models_dir / "stopped" / "model.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_a_corpus_file_in_comfys_input_folder_makes_the_pairs(models_dir, tmp_path, comfy, monkeypatch):
    inputs = tmp_path / "input"
    inputs.mkdir()
    (inputs / "prompts.txt").write_text("\n".join(y for _, y in prompt_pairs(200)) + "\n")
    monkeypatch.setattr(comfy_host, "folder_paths", types.SimpleNamespace(
        get_input_directory=lambda: str(inputs), folder_names_and_paths={"promptist": None},
        get_folder_paths=lambda key: [str(models_dir)]))
    _, _, summary = sft(None, data_file="prompts.txt", steps=2, batch_size=8, effective_batch_size=8)
    config = list_checkpoints(models_dir / "my-sft")[-1].state["config"]
    assert config["corpus"] == str(inputs / "prompts.txt") and config["pairs"] is None


def test_bad_inputs_are_named(models_dir, pairs_file, comfy):
    with pytest.raises(ValueError, match="no such file 'missing.jsonl'"):
        sft(pairs_file, data_file="missing.jsonl")
    with pytest.raises(ValueError, match="holds a model that is not a training run"):
        sft(pairs_file, save_name="tiny-promptist")  # would overwrite the policy folder
    with pytest.raises(ValueError, match="plain folder name"):
        sft(pairs_file, save_name="../elsewhere")
    errors = validate_node(v1_node(SFTTrain), {"save_name": "a/b", "steps": 0})
    assert [name for name, _ in errors] == ["steps", "save_name"]
    assert validate_node(v1_node(PPOTrain), {"save_name": " "}) == [
        ("save_name", "save_name - save_name is empty: give the run a folder name, e.g. my-promptist")]


def test_training_nodes_run_on_every_queue():
    for spec in (SFTTrain, PPOTrain):
        node = v1_node(spec)
        assert node.NOT_IDEMPOTENT is True and math.isnan(node.IS_CHANGED(save_name="x"))
        assert node.RETURN_TYPES == ("PROMPTIST_MODEL", "IMAGE", "STRING")


# --- the image generator -------------------------------------------------------------------------

def test_generator_draws_one_image_per_prompt_and_seed_under_inference_mode(comfy):
    generator = ComfyGenerator(FakeModel(), FakeCLIP(), FakeVAE(), sampler_name="dpmpp_2m", scheduler="karras",
                               negative="blurry")
    with torch.inference_mode(False):  # where the trainer calls it from
        images = generator.generate(["a red cat", "a red cat", "a dog"], [7, 8, 7], steps=4, guidance=5.0,
                                    size=(64, 48))
    assert images.shape == (3, 48, 64, 3) and not images.is_inference()
    assert 0 <= images.min() and images.max() <= 1
    assert images[0, 0, 0, 0] > 0.5 and images[2, 0, 0, 2] > 0.5  # red cat, blue dog
    first, second = comfy.samples  # the two images of one prompt are one batch
    assert first["noise"].shape == (2, 4, 6, 8) and second["noise"].shape == (1, 4, 6, 8)
    assert torch.equal(first["noise"][1], FakeComfy.prepare_noise(torch.zeros(1, 4, 6, 8), 8)[0])
    assert torch.equal(second["noise"][0], first["noise"][0])  # seed 7 for both prompts: paired noise
    assert (first["steps"], first["cfg"], first["sampler"], first["scheduler"]) == (4, 5.0, "dpmpp_2m", "karras")
    assert first["negative"][0][1]["text"] == "blurry"
    again = generator.generate(["a dog"], [7], steps=4, guidance=5.0, size=(64, 48))
    assert torch.equal(again[0], images[2])


def test_generator_gives_a_dfprompt_one_conditioning_entry_per_segment(comfy):
    generator = ComfyGenerator(FakeModel(), FakeCLIP(), FakeVAE())
    generator.generate(["a horse, [anime:0-1:1.5], [detailed:0.5-1:1.25]", "a [broken horse"], [1, 1], steps=4,
                       guidance=7.0, size=(64, 64))
    dfprompt, broken = comfy.samples
    assert [(c[1]["text"], c[1].get("start_percent"), c[1].get("end_percent")) for c in dfprompt["positive"]] == [
        ("a horse, (anime:1.5), (detailed:1.25)", 0.0, comfy_percent(2, 4)),  # steps 0-1 of 4
        ("a horse, (anime:1.5)", comfy_percent(2, 4), 1.0)]  # a removed block takes its ", " along
    assert [c[1] for c in broken["positive"]] == [{"text": "a [broken horse"}]  # not a DF-Prompt: plain text


def test_generator_fingerprint_names_the_checkpoint_and_sampler():
    model = FakeModel()
    a = ComfyGenerator(model, FakeCLIP(), FakeVAE()).fingerprint
    assert ComfyGenerator(model, FakeCLIP(), FakeVAE()).fingerprint == a
    assert ComfyGenerator(model, FakeCLIP(), FakeVAE(), scheduler="karras").fingerprint != a
    assert ComfyGenerator(FakeModel(), FakeCLIP(), FakeVAE()).fingerprint != a


# --- PPO -----------------------------------------------------------------------------------------

def ppo(**overrides):
    (policy,) = ModelLoader.run(model_name="tiny-promptist", device="cpu")
    (reward_model,) = RewardModelLoader.run(clip_model="tiny-open-clip-hub", aesthetic_head="tiny-head.safetensors",
                                            device="cpu")
    settings = dict(promptist_model=policy, model=FakeModel(), clip=FakeCLIP(), vae=FakeVAE(),
                    promptist_reward_model=reward_model, prompts="a cat\na red horse\n\na castle\n",
                    save_name="my-ppo", iterations=2, batch_size=2, images_per_prompt=2, sampler_name="euler",
                    scheduler="normal", steps=2, cfg=7.0, width=64, height=64, preset="promptist", lr=1e-4,
                    beta=0.2, trainable_top_blocks=1, seed=0, save_every=1, negative="")
    settings.update(overrides)
    with torch.inference_mode():
        return v1_node(PPOTrain)().run(**settings)


def test_ppo_node_trains_on_the_graphs_models_and_saves_a_policy(models_dir, comfy):
    model, curves, summary = ppo()
    updates = list(comfy.updates)
    out = models_dir / "my-ppo"
    assert [c.step for c in list_checkpoints(out)] == [1, 2] and (out / "model.safetensors").is_file()
    assert "PPO trained" in summary and curves.shape[0] == 1
    assert (out / "prompts.txt").read_text() == "a cat\na red horse\na castle\n"
    assert OptimizePrompt.run(promptist_model=model, text="a cat", max_new_tokens=10)[0]
    # images came from comfy.sample: each plain prompt once (then cached), each rewrite with its seeds
    texts = [s["positive"][0][1]["text"] for s in comfy.samples]
    assert sorted(t for t in texts if t in ("a cat", "a red horse", "a castle")) == ["a castle", "a cat", "a red horse"]
    assert len(list_checkpoints(out)[-1].state["baseline_cache"]) == 6  # 3 prompts x 2 seeds
    by_seed = {}
    for sample in comfy.samples:
        assert torch.equal(by_seed.setdefault(sample["seed"], sample["noise"]), sample["noise"])
    # 3 plain prompts once each (then cached) + 2 rewrites in each of 2 full batches; they share their seeds
    assert len(comfy.samples) == 7 and len(by_seed) == 3
    assert [u[0] for u in updates] == [1, 2] and updates[-1][2][0] == "PNG"
    assert any(m == ("patcher", m[1]) for m in comfy.loaded)  # the reward CLIP went through the memory manager


def test_ppo_node_with_dfprompt_trains_heads_and_draws_each_rewrites_dfprompt_segments(models_dir, comfy):
    from promptist_core import dfprompt
    from promptist_core.dfprompt_policy import HEADS_FILE, load_heads

    model, curves, summary = ppo(dfprompt=True, save_name="my-df")
    out = models_dir / "my-df"
    assert "PPO trained" in summary and (out / HEADS_FILE).is_file() and load_heads(out) is not None
    assert list_checkpoints(out)[-1].state["config"]["dfprompt"] is True
    assert model.optimizer.is_dfprompt  # the node's output is the DF-Prompt policy
    text = OptimizePrompt.run(promptist_model=model, text="a cat", mode="diverse", max_new_tokens=20)[0]
    assert text.startswith("a cat") and dfprompt.format_prompt(text) == text
    # what the images were drawn from: each rewrite's DF-Prompt, one conditioning entry per segment
    rewrites = [json.loads(line)["rewrite"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert any(dfprompt.parse(r).modifiers for r in rewrites), rewrites  # new heads: near uniform, blocks
    positives = [[c[1]["text"] for c in s["positive"]] for s in comfy.samples]
    for rewrite in rewrites:
        segments = [s.weighted_text("comfy") for s in dfprompt.schedule(rewrite, 2)]
        assert segments in positives, (rewrite, positives)
    assert any(len(p) == 2 for p in positives)  # a range 0-0.5 or 0.5-1 block: the text switches mid-sampling
    rows = (out / "train_log.csv").read_text().splitlines()
    assert "mean_weight" in rows[0] and len(rows) == 3


def test_cancel_says_to_queue_again_with_the_same_save_name_not_the_command_lines_resume(models_dir, pairs_file,
                                                                                         comfy, caplog):
    comfy.cancel_at = 2
    with caplog.at_level(logging.INFO, logger="promptist"), pytest.raises(Interrupt):
        sft(pairs_file, save_name="cancelled", steps=4, batch_size=8, effective_batch_size=8, save_every=100)
    (said,) = [r.getMessage() for r in caplog.records if "stopped at" in r.getMessage()]
    assert said == (f"[promptist] stopped at step 2, checkpoint saved in {models_dir / 'cancelled' / 'checkpoints'}; "
                    "to continue, queue the graph again with the same save name")


def test_an_unfinished_runs_folder_in_the_loader_says_how_to_finish_it_or_load_its_last_checkpoint(
        models_dir, pairs_file, comfy, capsys):
    comfy.cancel_at = 2
    with pytest.raises(Interrupt):
        sft(pairs_file, save_name="halfway", steps=4, batch_size=8, effective_batch_size=8, save_every=100)
    comfy.cancel_at = None
    last = models_dir / "halfway" / "checkpoints" / "step-0000002"
    assert not (models_dir / "halfway" / "config.json").exists() and last.is_dir()

    assert "halfway" in ModelLoader.inputs()[0][1]  # listed, so it can be queued and say what it is
    with pytest.raises(UnfinishedRunError) as raised:
        ModelLoader.run(model_name="halfway", device="cpu")
    said = str(raised.value)  # before: "WeightsNotFoundError ... Put the model files (config.json ...) in: ..."
    assert "is an unfinished training run" in said and "the last at step 2" in said
    assert "queue the graph with its Train node (Promptist SFT or PPO Train) again with the same save name" in said
    assert "--resume" not in said and "Put the model files" not in said and said.endswith(str(last))
    (loaded,) = ModelLoader.run(model_name=str(last), device="cpu")  # the checkpoint it names loads as it is
    assert OptimizePrompt.run(promptist_model=loaded, text="a fox", candidates=1, max_new_tokens=5)

    # The command line, through the same resolver, gives its own way to continue.
    assert cli_main(["optimize", "a fox", "--model", "halfway", "--models-dir", str(models_dir), "--offline"]) == 3
    err = capsys.readouterr().err
    assert "is an unfinished training run" in err
    assert f"run `python -m trainer sft --out {models_dir / 'halfway'} --resume`" in err and str(last) in err


def test_cancel_during_ppo_images_finishes_the_iteration_saves_and_resumes(models_dir, comfy):
    # Cancel pressed while the first iteration's images are drawn: CLIP encoding raises the interrupt.
    clip = FakeCLIP()
    encode = clip.encode_from_tokens_scheduled
    calls = []

    def encode_then_cancel(tokens, **kwargs):
        calls.append(tokens)
        if len(calls) == 3:
            comfy.interrupted = True
            comfy.throw_exception_if_processing_interrupted()
        return encode(tokens, **kwargs)

    clip.encode_from_tokens_scheduled = encode_then_cancel
    with pytest.raises(Interrupt):
        ppo(clip=clip, iterations=3, save_every=10)
    assert [c.step for c in list_checkpoints(models_dir / "my-ppo")] == [1]
    comfy.updates = []
    _, _, summary = ppo(iterations=3, save_every=10)
    assert "PPO resumed" in summary and [u[0] for u in comfy.updates] == [2, 3]
    with pytest.raises(ValueError, match="prompts differ"):
        ppo(prompts="other prompts\nand more", iterations=4)


def test_ppo_node_names_bad_prompts(models_dir, comfy):
    with pytest.raises(ValueError, match="prompts is empty"):
        ppo(prompts="  \n\n")
    with pytest.raises(ValueError, match="prompts_file: no such file"):
        ppo(prompts_file="nope.txt")
    with pytest.raises(ValueError, match="fewer than one batch"):
        ppo(prompts="just one", save_name="one")


def test_progress_reads_the_resumed_part_of_the_curve_from_the_log(tmp_path):
    (tmp_path / "train_log.csv").write_text("step,loss,valid_loss\n1,3.0,\n2,2.5,2.7\n3,2.0,\n")
    progress = TrainingProgress(tmp_path, {"loss": ("loss", "valid_loss")}, "SFT")
    progress(3, 5, {"loss": 1.9})
    assert progress.curve.series == {"loss": [(1, 3.0), (2, 2.5), (3, 1.9)], "valid_loss": [(2, 2.7)]}


def test_a_trained_model_on_the_output_wire_decodes_as_its_folder_says(tiny_promptist_dir, tmp_path):
    """Seen in the real ComfyUI: SFT Train's output model (from promptist-mini) ignored its promptist.json and
    rewrote the prompt; the loader of the same folder kept it."""
    import json
    import shutil

    from nodes.train import trained_model
    from promptist_core.policy_folder import DecodingDefaults

    folder = tmp_path / "my-sft"
    shutil.copytree(tiny_promptist_dir / "tiny-promptist", folder)
    (folder / "promptist.json").write_text(json.dumps({"decoding": {"keep_prompt": True, "min_modifiers": 2}}))
    loaded = trained_model(folder, "cpu")
    assert loaded.optimizer.decoding == DecodingDefaults(keep_prompt=True, min_modifiers=2)
    assert loaded.optimizer("a castle on a hill", max_new_tokens=20)[0].prompt.startswith("a castle on a hill, ")
