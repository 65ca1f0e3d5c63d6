"""Promptist SFT Train and Promptist PPO Train: the headless trainers, run inside a ComfyUI graph.

Both run the trainer under `torch.inference_mode(False)` (ComfyUI executes every prompt in inference
mode, and its tensors cannot be trained), with fresh trainable copies of the policy that stay out of
ComfyUI's offloader (an offload mid-training would move the weights but not the optimizer state);
they make room for them with `free_memory` instead. The progress bar shows the live curve as its
preview. Cancel stops at the end of the current step, a checkpoint is saved, and queueing again with
the same save name continues from it. The run is saved in models/promptist/<save name>, a model
folder the loader lists at once.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from promptist_core.devices import DEVICE_CHOICES, pick_dtype
from promptist_core.optimizer import PromptOptimizer, causal_lm_problem, forget
from promptist_core.rewards import PRESETS

from . import comfy_host
from .comfy_generator import SAMPLERS, SCHEDULERS, ComfyGenerator
from .comfy_host import ManagedModel, list_model_folders, load_device, models_dirs
from .comfy_schema import comfy_node
from .optimize import MODEL_TYPE, LoadedOptimizer
from .rewards import REWARD_TYPE, LoadedRewardModel

logger = logging.getLogger("promptist")

SFT_BASE = "openai-community/gpt2"
ACTIVATION_RESERVE = 1 << 30  # bytes kept free for activations beside the learner's weights and Adam state

SAVE_NAME_TOOLTIP = ("The run's folder in models/promptist/. Queue again with the same name to continue it (after "
                     "Cancel, or with more steps); the loader lists it as soon as it is saved.")


# --- helpers: names, files, memory ---------------------------------------------------------------

def save_name_problem(name: str | None) -> str | None:
    """Why `name` cannot be a folder name in models/promptist, or None."""
    if name is None:  # linked input: checked when the node runs
        return None
    from trainer.training_run import save_name_problem as problem

    return problem(name, "save_name")


def run_folder(save_name: str) -> Path:
    """models/promptist/<save name> (the first models folder ComfyUI knows for promptist)."""
    from trainer.training_run import run_folder as folder

    return folder(models_dirs()[0], save_name, label="save_name")


def input_search() -> list[Path]:
    """Where a relative input file is looked for: ComfyUI's input folder, then the working directory."""
    folders = [Path(comfy_host.folder_paths.get_input_directory())] if comfy_host.folder_paths is not None else []
    return [*folders, Path.cwd()]


def input_file(path: str, what: str) -> Path:
    """An existing file: absolute, or relative to ComfyUI's input folder (or the working directory)."""
    from trainer.training_run import input_file as find

    return find(path, what, search=input_search())


def training_device(device: str) -> torch.device:
    return load_device() if device != "cpu" else torch.device("cpu")


def parameter_count(folder: Path) -> int:
    """Parameters in a model folder, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                total += int(np.prod(f.get_slice(key).get_shape()))
    return total or sum(f.stat().st_size // 4 for f in folder.glob("*.bin"))


def make_room(bytes_needed: int, device: torch.device) -> None:
    """Ask ComfyUI to unload models until `bytes_needed` are free on `device` (no-op on the CPU)."""
    mm = comfy_host.model_management
    if mm is not None and device.type != "cpu":
        mm.free_memory(bytes_needed, device)


def release_memory() -> None:
    if comfy_host.model_management is not None:
        comfy_host.model_management.soft_empty_cache()


def _policy_folder(name: str) -> Path:
    from promptist_core.weights import resolve

    return resolve(name, models_dir=models_dirs())


def stopped_message(e: Exception) -> str:
    """The trainer's stop, with ComfyUI's way to continue it (not the command line's `--resume`)."""
    stopped_at, checkpoints = getattr(e, "stopped_at", None), getattr(e, "checkpoints", None)
    if stopped_at is None:  # stopped without a save (a second Cancel): the trainer's own words
        return str(e)
    return (f"stopped at {stopped_at}, checkpoint saved in {checkpoints}; to continue, queue the graph again with "
            "the same save name")


def _interrupted(e: Exception) -> Exception:
    """What the node raises after a Cancel was saved: ComfyUI's own interrupt (outside ComfyUI: `e`)."""
    mm = comfy_host.model_management
    return mm.InterruptProcessingException() if mm is not None else e


# --- progress, preview, Cancel --------------------------------------------------------------------

class TrainingProgress:
    """The trainers' step callback in ComfyUI: progress bar with the live curve as its preview; Cancel
    (ComfyUI's interrupt, or one caught during image generation) raises StopTraining, so the trainer
    saves a checkpoint first."""

    def __init__(self, out: Path, panels: dict[str, tuple[str, ...]], title: str, generator=None):
        from trainer.training_run import LiveCurve

        self.curve, self.generator = LiveCurve(out, panels, title), generator
        self.bar = None

    def _check_cancel(self) -> None:
        from trainer.progress import StopTraining

        if self.generator is not None and self.generator.cancel_requested:
            raise StopTraining("cancelled in ComfyUI (during image generation)")
        mm = comfy_host.model_management
        if mm is not None:
            try:
                mm.throw_exception_if_processing_interrupted()
            except mm.InterruptProcessingException:
                raise StopTraining("cancelled in ComfyUI") from None

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        from trainer.progress import StopTraining

        if self.bar is None and comfy_host.comfy_utils is not None:
            self.bar = comfy_host.comfy_utils.ProgressBar(total)
        self.curve.add(step, metrics)
        self._check_cancel()
        if self.bar is None:
            return
        picture = self.curve.preview(step, total)
        mm = comfy_host.model_management
        try:  # ComfyUI's progress hook raises the interrupt itself
            self.bar.update_absolute(step, total, None if picture is None else ("PNG", picture, None))
        except Exception as e:
            if mm is not None and isinstance(e, mm.InterruptProcessingException):
                raise StopTraining("cancelled in ComfyUI") from None
            raise


def curves_tensor(out: Path, progress: TrainingProgress):
    """curves.png of the run (written at every checkpoint) as a ComfyUI IMAGE [1, H, W, 3]."""
    from PIL import Image

    path = out / "curves.png"
    if path.is_file():
        with Image.open(path) as im:
            picture = im.convert("RGB")
    else:
        picture = progress.curve.image()
    return torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None]


def trained_model(out: Path, device: str) -> LoadedOptimizer:
    """The saved policy as a PROMPTIST_MODEL, loaded the way the loader node loads it (fresh: the run
    may have rewritten a folder the optimizer cache holds)."""
    from transformers import AutoModelForCausalLM

    from promptist_core.dfprompt_policy import load_heads
    from promptist_core.policy_folder import read_decoding_defaults
    from promptist_core.weights import load_tokenizer

    forget(out)
    compute = training_device(device)
    model = AutoModelForCausalLM.from_pretrained(str(out)).to("cpu", pick_dtype(compute))
    optimizer = PromptOptimizer(model, load_tokenizer(out), name=out.name, dfprompt_heads=load_heads(out),
                                decoding=read_decoding_defaults(out))  # the policy's promptist.json, as a loader reads it
    return LoadedOptimizer(optimizer, ManagedModel(model, compute, "PromptistPolicy"))


def _summary(kind: str, out: Path, resumed: bool, **numbers) -> str:
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()
                      if v is not None)
    return f"{kind} {'resumed' if resumed else 'trained'} -> {out}: {shown}"


# --- SFT ------------------------------------------------------------------------------------------

class SFTTrain:
    """Fine-tune a prompt policy on (plain, engineered) pairs: Promptist stage 1."""

    NODE_ID = "PromptistSFTTrain"
    DISPLAY_NAME = "Promptist SFT Train"
    DESCRIPTION = ("Fine-tunes a GPT-2 policy to rewrite plain prompts into engineered ones (Promptist stage 1). "
                   "Saves models/promptist/<save_name>; Cancel saves a checkpoint and queueing again with the same "
                   "save name continues. Runs on every queue (never cached).")
    ALWAYS_RUN = True
    OUTPUTS = [(MODEL_TYPE, "promptist_model", "The trained policy (what the loader loads from save_name)."),
               ("IMAGE", "curves", "Training and validation loss."),
               ("STRING", "summary", "Steps, losses and the output folder.")]

    @classmethod
    def inputs(cls):
        return [
            ("data_file", "STRING", {"default": "pairs.jsonl",
                                     "tooltip": "Pairs (.jsonl with source and target, from `python -m trainer "
                                                "pairs`) or a corpus of engineered prompts (.txt one per line, .csv, "
                                                ".jsonl, .parquet) to make pairs from. Absolute, or in ComfyUI/input."}),
            ("data_format", ["auto", "pairs", "corpus"],
             {"default": "auto", "tooltip": "auto: pairs when a .jsonl has source and target, else a corpus."}),
            ("base", list(dict.fromkeys([*list_model_folders(SFT_BASE, lambda p: causal_lm_problem(p) is None),
                                         "microsoft/Promptist"])),
             {"default": SFT_BASE,
              "tooltip": "Model to start from: GPT-2 (paper), a folder in models/promptist, or microsoft/Promptist. "
                         "A connected promptist_model wins."}),
            ("save_name", "STRING", {"default": "my-promptist", "tooltip": SAVE_NAME_TOOLTIP}),
            ("steps", "INT", {"default": 1000, "min": 1, "max": 1_000_000,
                              "tooltip": "Optimizer steps in all (paper: 15000). Raise it and queue again to train on."}),
            ("lr", "FLOAT", {"default": 5e-5, "min": 1e-7, "max": 1e-2, "step": 1e-6, "round": False,
                             "tooltip": "Peak AdamW learning rate (paper: 5e-5), linear warmup and decay."}),
            ("batch_size", "INT", {"default": 16, "min": 1, "max": 4096,
                                   "tooltip": "Pairs per forward pass (lower it when memory is short)."}),
            ("effective_batch_size", "INT", {"default": 256, "min": 1, "max": 1 << 20,
                                             "tooltip": "Pairs per optimizer step (paper: 256), by gradient "
                                                        "accumulation; a multiple of batch_size."}),
            ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                             "tooltip": "Data order, split and dropout. Keep it to continue a run."}),
            ("save_every", "INT", {"default": 100, "min": 1, "max": 1_000_000,
                                   "tooltip": "Checkpoint and validation loss every this many steps."}),
            ("device", list(DEVICE_CHOICES), {"default": "auto", "tooltip": "auto/gpu: ComfyUI's device; cpu."}),
            ("promptist_model", MODEL_TYPE, {"optional": True,
                                             "tooltip": "Start from this loaded policy instead of base (a fresh "
                                                        "copy is trained; the loaded one is not changed)."}),
        ]

    @staticmethod
    def validate(save_name: str | None = None):
        return save_name_problem(save_name) or True

    @staticmethod
    def run(data_file: str, data_format: str = "auto", base: str = SFT_BASE, save_name: str = "my-promptist",
            steps: int = 1000, lr: float = 5e-5, batch_size: int = 16, effective_batch_size: int = 256,
            seed: int = 0, save_every: int = 100, device: str = "auto",
            promptist_model: LoadedOptimizer | None = None):
        from trainer.checkpoint import list_checkpoints
        from trainer.policy.pairs import is_pairs_file
        from trainer.policy.sft import SFTConfig, train_sft
        from trainer.progress import StopTraining
        from trainer.runtime import local_runtime
        from trainer.training_run import SFT_PANELS

        # 1. check inputs
        out = run_folder(save_name)
        data = input_file(data_file, "data_file")
        pairs = data_format == "pairs" or (data_format == "auto" and is_pairs_file(data))
        name = promptist_model.optimizer.name if promptist_model is not None else base
        resume = bool(list_checkpoints(out))
        compute = training_device(device)
        config = SFTConfig(pairs=str(data) if pairs else None, corpus=None if pairs else str(data), base=name,
                           out=str(out), max_steps=steps, batch_size=batch_size,
                           effective_batch_size=effective_batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                           seed=seed, save_every=save_every, eval_every=save_every, device=str(compute),
                           tensorboard=False)
        # 2. memory for the learner: weights, gradients, two Adam moments
        make_room(16 * parameter_count(_policy_folder(name)) + ACTIVATION_RESERVE, compute)
        # 3. train outside inference mode; the trainer loads its own trainable copy
        progress = TrainingProgress(out, SFT_PANELS, "SFT")
        try:
            with torch.inference_mode(False):
                result = train_sft(config, resume=resume, callback=progress, runtime=local_runtime(compute),
                                   models_dir=models_dirs())
        except StopTraining as e:
            logger.info("[promptist] %s", stopped_message(e))
            raise _interrupted(e) from None
        finally:
            release_memory()
        summary = _summary("SFT", out, resume, steps=result.steps, train_loss=result.train_loss,
                           valid_loss=result.valid_loss, selected=result.selected)
        return (trained_model(out, device), curves_tensor(out, progress), summary)


# --- PPO ------------------------------------------------------------------------------------------

class _FinishImagesOnCancel:
    """The generator, with Cancel deferred: an interrupt while the images of an iteration are drawn
    (CLIP encoding checks it) is remembered and the images are drawn again, so the iteration ends,
    its checkpoint is saved and then the run stops. A second Cancel stops at once, without a save."""

    def __init__(self, generator: ComfyGenerator):
        self.generator = generator
        self.fingerprint = generator.fingerprint
        self.cancel_requested = False

    def generate(self, prompts, seeds, **kwargs):
        mm = comfy_host.model_management
        while True:
            try:
                return self.generator.generate(prompts, seeds, **kwargs)
            except Exception as e:
                if mm is None or not isinstance(e, mm.InterruptProcessingException) or self.cancel_requested:
                    raise
                logger.info("[promptist] Cancel: finishing this iteration's images, then saving a checkpoint")
                self.cancel_requested = True


class _HostScorer:
    """The reward models of the graph, loaded by ComfyUI's memory manager before each use and run
    under inference mode like every ComfyUI model; results come back as ordinary tensors."""

    def __init__(self, reward_model: LoadedRewardModel):
        self.reward_model = reward_model

    def aesthetic_scores(self, images):
        self.reward_model.load()
        with torch.inference_mode():
            scores = self.reward_model.scorer.aesthetic_scores(images)
        return scores.clone()

    def rewards(self, images, prompts, **kwargs):
        self.reward_model.load()
        with torch.inference_mode():
            terms = self.reward_model.scorer.rewards(images, prompts, **kwargs)
        return replace(terms, **{f.name: getattr(terms, f.name).clone() for f in fields(terms)
                                 if isinstance(getattr(terms, f.name), torch.Tensor)})


def prompts_source(prompts: str, prompts_file: str, out: Path, resume: bool) -> str:
    """The prompts file the run trains on: `prompts_file`, or the text kept in the run's folder."""
    from trainer.training_run import run_prompts

    return run_prompts(prompts, prompts_file, out, resume=resume, search=input_search(),
                       labels=("prompts", "prompts_file", "save_name"))


class PPOTrain:
    """Improve a policy with image rewards from the loaded checkpoint: Promptist stage 2."""

    NODE_ID = "PromptistPPOTrain"
    DISPLAY_NAME = "Promptist PPO Train"
    DESCRIPTION = ("Trains the policy with PPO (Promptist stage 2): it rewrites each prompt, draws images of the rewrite "
                   "and of the plain prompt with the same seeds on your MODEL/CLIP/VAE, scores them with the reward "
                   "model and learns, staying near its start (KL penalty beta). Saves models/promptist/<save_name>; "
                   "Cancel finishes the iteration's images, saves and stops; queue again with the same save name to "
                   "continue. Runs on every queue.")
    ALWAYS_RUN = True
    OUTPUTS = [(MODEL_TYPE, "promptist_model", "The trained policy (what the loader loads from save_name)."),
               ("IMAGE", "curves", "Reward (and its parts) and KL to the starting policy per iteration."),
               ("STRING", "summary", "Iterations, last reward and KL, and the output folder.")]

    @classmethod
    def inputs(cls):
        return [
            ("promptist_model", MODEL_TYPE, {"tooltip": "The policy to start from and stay near (an SFT policy; "
                                                        "a fresh copy is trained)."}),
            ("model", "MODEL", {"tooltip": "The diffusion model the rewards' images are drawn with."}),
            ("clip", "CLIP", {"tooltip": "Its text encoder (DF-Prompts are encoded per segment)."}),
            ("vae", "VAE", {"tooltip": "Its VAE."}),
            (REWARD_TYPE.lower(), REWARD_TYPE, {"tooltip": "From Promptist Reward Model Loader."}),
            ("prompts", "STRING", {"multiline": True, "default": "a cat riding a bike\na red horse on the grass\n"
                                                                 "a castle on a hill\na bowl of fruit",
                                   "tooltip": "Plain prompts to train on, one per line (at least batch_size)."}),
            ("prompts_file", "STRING", {"default": "",
                                        "tooltip": "Or a file of plain prompts (.txt one per line, .csv, .jsonl, "
                                                   ".parquet), absolute or in ComfyUI/input; wins over prompts."}),
            ("save_name", "STRING", {"default": "my-promptist-ppo", "tooltip": SAVE_NAME_TOOLTIP}),
            ("iterations", "INT", {"default": 100, "min": 1, "max": 1_000_000,
                                   "tooltip": "PPO iterations in all (a batch of rewrites, their images, 4 epochs "
                                              "each). Raise it and queue again to train on."}),
            ("batch_size", "INT", {"default": 4, "min": 1, "max": 1024,
                                   "tooltip": "Prompts per iteration (reference: 256 over 32 GPUs)."}),
            ("images_per_prompt", "INT", {"default": 2, "min": 1, "max": 16,
                                          "tooltip": "Images per rewrite, and per plain prompt with the same seeds "
                                                     "(the plain ones are drawn once and cached)."}),
            ("sampler_name", SAMPLERS, {"default": "euler" if "euler" in SAMPLERS else SAMPLERS[0],
                                        "tooltip": "KSampler's sampler for the reward images."}),
            ("scheduler", SCHEDULERS, {"default": "normal" if "normal" in SCHEDULERS else SCHEDULERS[0],
                                       "tooltip": "KSampler's scheduler."}),
            ("steps", "INT", {"default": 20, "min": 1, "max": 10000, "tooltip": "Sampling steps per image."}),
            ("cfg", "FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance."}),
            ("width", "INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            ("height", "INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            ("preset", list(PRESETS), {"default": "promptist",
                                       "tooltip": "promptist: aesthetic gain over the plain prompt + relevance. "
                                                  "pae: aesthetics + relevance + PickScore (load PickScore)."}),
            ("lr", "FLOAT", {"default": 5e-5, "min": 1e-7, "max": 1e-2, "step": 1e-6, "round": False,
                             "tooltip": "AdamW learning rate (reference: 5e-5)."}),
            ("beta", "FLOAT", {"default": 0.2, "min": 0.0, "max": 10.0, "step": 0.01,
                               "tooltip": "KL penalty toward the starting policy (reference: 0.2): higher keeps "
                                          "rewrites closer to it."}),
            ("trainable_top_blocks", "INT", {"default": 2, "min": 0, "max": 256,
                                             "tooltip": "Train the top N transformer blocks (reference: 2); "
                                                        "0 = all."}),
            ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                             "tooltip": "Prompt order, rollouts and image seeds. Keep it to continue a run."}),
            ("save_every", "INT", {"default": 10, "min": 1, "max": 1_000_000,
                                   "tooltip": "Checkpoint every this many iterations (also on Cancel and at the end)."}),
            ("negative", "STRING", {"multiline": True, "default": "", "optional": True,
                                    "tooltip": "Negative prompt for every image."}),
            ("dfprompt", "BOOLEAN", {"default": False, "optional": True,
                                     "tooltip": "Train a DF-Prompt policy (PAE stage 2): at each modifier's end its "
                                                "weight and range heads pick a weight (0.5-1.5) and a time range too, "
                                                "and the images are drawn from that DF-Prompt. Start from a policy "
                                                "with heads (SFT with dfprompt heads) or new ones are made; the pae "
                                                "preset is PAE's reward. Keep it as it was to continue a run."}),
        ]

    @staticmethod
    def validate(save_name: str | None = None):
        return save_name_problem(save_name) or True

    @staticmethod
    def run(promptist_model: LoadedOptimizer, model, clip, vae, promptist_reward_model: LoadedRewardModel,
            prompts: str = "", prompts_file: str = "", save_name: str = "my-promptist-ppo", iterations: int = 100,
            batch_size: int = 4, images_per_prompt: int = 2, sampler_name: str = "euler", scheduler: str = "normal",
            steps: int = 20, cfg: float = 7.5, width: int = 512, height: int = 512, preset: str = "promptist",
            lr: float = 5e-5, beta: float = 0.2, trainable_top_blocks: int = 2, seed: int = 0, save_every: int = 10,
            negative: str | None = "", dfprompt: bool = False):
        from trainer.checkpoint import list_checkpoints
        from trainer.policy.ppo import PPOConfig, train_ppo
        from trainer.policy.rewards import ImageReward
        from trainer.progress import StopTraining
        from trainer.runtime import local_runtime
        from trainer.training_run import DF_PANELS, PPO_PANELS

        # 1. check inputs; the prompts (text is kept in the run's folder)
        out = run_folder(save_name)
        resume = bool(list_checkpoints(out))
        source = prompts_source(prompts, prompts_file, out, resume)
        name = promptist_model.optimizer.name
        compute = load_device()
        config = PPOConfig(prompts=source, policy=name, out=str(out), iterations=iterations, batch_size=batch_size,
                           lr=lr, beta=beta, trainable_top_blocks=trainable_top_blocks, seed=seed,
                           save_every=save_every, sample_every=1, device=str(compute), tensorboard=False,
                           preset=preset, images_per_prompt=images_per_prompt, image_steps=steps, guidance=cfg,
                           width=width, height=height, dfprompt=bool(dfprompt),
                           valid_every=0)  # held-out validation: the trainer CLI's (not wired to this host's progress)
        # 2. the reward: images from the graph's models, scored by the reward model
        generator = _FinishImagesOnCancel(ComfyGenerator(model, clip, vae, sampler_name=sampler_name,
                                                         scheduler=scheduler, negative=negative or ""))
        reward = ImageReward(generator, _HostScorer(promptist_reward_model), preset=preset,
                             images_per_prompt=images_per_prompt, steps=steps, guidance=cfg, size=(width, height),
                             seed=seed)
        # 3. memory for the learner (policy, value model, reference, Adam state) before each update
        learner_bytes = 24 * parameter_count(_policy_folder(name)) + ACTIVATION_RESERVE

        def reward_then_make_room(plains, rewrites):
            scored = reward(plains, rewrites)
            make_room(learner_bytes, compute)
            return scored

        make_room(learner_bytes, compute)
        # 4. train outside inference mode
        progress = TrainingProgress(out, {**PPO_PANELS, **(DF_PANELS if dfprompt else {})}, "PPO", generator)
        try:
            with torch.inference_mode(False):
                result = train_ppo(config, reward_then_make_room, resume=resume, callback=progress,
                                   runtime=local_runtime(compute), models_dir=models_dirs(),
                                   baseline_cache=reward.cache)
        except StopTraining as e:
            logger.info("[promptist] %s", stopped_message(e))
            raise _interrupted(e) from None
        finally:
            release_memory()
        summary = _summary("PPO", out, resume, iterations=result.iterations, reward=result.reward, kl=result.kl)
        return (trained_model(out, "auto"), curves_tensor(out, progress), summary)


NODES = [comfy_node(SFTTrain), comfy_node(PPOTrain)]
