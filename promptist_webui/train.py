"""Training in the webui (Train SFT / Train PPO in the Promptist tab) and the webui's txt2img as an image
generator.

Plain functions and classes over webui objects passed in (`state` is `shared.state`, `processing` is
`modules.processing`), so that tests run them on fakes; `tab` binds them to the real ones. The run's
rules (folder, files, kept prompts, the live curve) are `trainer.training_run`'s; this module is the glue.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

import torch

from promptist_core.dfprompt import has_dfprompt, parse, to_a1111
from trainer import training_run
from trainer.training_run import DF_PANELS, PPO_PANELS, SFT_PANELS, LiveCurve

from .errors import PromptistError, as_user_error

TRAIN_BASE = "openai-community/gpt2"


def user_errors(check, *args, **kwargs):
    """A training-run check's ValueError as the PromptistError the user sees (422: a bad input)."""
    try:
        return check(*args, **kwargs)
    except ValueError as e:
        raise PromptistError(str(e), status_code=422) from e


def run_folder(models_root: Path, save_name: str) -> Path:
    """`models_root/<save name>`: a new folder, or a training run to continue (trainer.training_run)."""
    return user_errors(training_run.run_folder, models_root, save_name, label="Save name")


def input_file(path: str, what: str) -> Path:
    """An existing file (absolute, or relative to the webui's working directory)."""
    return user_errors(training_run.input_file, path, what, search=[Path.cwd()])


def policy_names(dirs: list[Path], extra: tuple[str, ...] = ()) -> list[str]:
    """Policy folders (causal LMs) in the models folders, then `extra` names, then the policy bundled with
    promptist (usable with nothing copied or downloaded): for dropdowns."""
    from promptist_core.optimizer import causal_lm_problem
    from promptist_core.weights import BUNDLED_POLICY

    found = [d.name for base in dirs if base.is_dir() for d in sorted(base.iterdir())
             if d.is_dir() and causal_lm_problem(d) is None]
    return list(dict.fromkeys([*found, *extra, BUNDLED_POLICY]))


def render_prompt(prompt: str, schedule_steps: int) -> str:
    """A DF-Prompt rendered to the webui's prompt editing for `schedule_steps` (plain prompts unchanged)."""
    return to_a1111(parse(prompt, host_brackets=True), schedule_steps) if has_dfprompt(prompt) else prompt


class WebuiGenerator:
    """`ImageGenerator` over the webui's own txt2img (the loaded checkpoint, the user's sampler): one image
    per (prompt, seed).

    The jobs run without scripts (`p.scripts` stays None, as the Train tab's previews do): no always-on
    script of ours or of another extension rewrites the trainer's prompts. DF-Prompts are rendered to
    prompt editing here instead. An Interrupt while images are drawn leaves partial images: they are drawn
    again without the flag, `stop_requested` is set and the step callback then stops the run after this
    iteration's checkpoint; a second Interrupt during that redraw stops at once (StopTraining, no save).
    With `stop_on_interrupt` (the Evaluate section) an Interrupt raises StopTraining at once instead, and the
    partial images are dropped.
    """

    def __init__(self, processing, state, *, sampler_name: str, negative: str = "",
                 schedule_steps=lambda steps: steps, max_batch: int = 4, checkpoint: str = "",
                 stop_on_interrupt: bool = False):
        self.processing, self.state, self.stop_on_interrupt = processing, state, stop_on_interrupt
        self.sampler_name, self.negative, self.schedule_steps = sampler_name, negative, schedule_steps
        self.max_batch = max(1, int(max_batch))
        self.fingerprint = f"{checkpoint}:{sampler_name}:{negative}"
        self.stop_requested = False

    def build(self, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, size: tuple[int, int]):
        """The processing object of one batch (prompts already rendered)."""
        n = self.schedule_steps(steps)
        p = self.processing.StableDiffusionProcessingTxt2Img(
            prompt=[render_prompt(t, n) for t in prompts], negative_prompt=[self.negative] * len(prompts),
            seed=[int(s) for s in seeds], subseed=-1, subseed_strength=0, sampler_name=self.sampler_name,
            batch_size=len(prompts), n_iter=1, steps=steps, cfg_scale=guidance, width=size[0], height=size[1],
            do_not_save_samples=True, do_not_save_grid=True)
        p.scripts = None  # no always-on scripts: ours would optimize (rewrite) the trainer's prompts
        return p

    def generate(self, prompts, seeds, *, steps, guidance, size) -> torch.Tensor:
        images = []
        for start in range(0, len(prompts), self.max_batch):
            end = start + self.max_batch
            images += self._draw(list(prompts[start:end]), list(seeds[start:end]), steps, guidance, size)
        return torch.stack(images)

    def _interrupted(self) -> bool:
        return bool(self.state.interrupted or getattr(self.state, "stopping_generation", False))

    def _draw(self, prompts, seeds, steps, guidance, size) -> list[torch.Tensor]:
        from trainer.progress import StopTraining

        if self._interrupted():  # pressed between two batches
            if self.stop_on_interrupt:
                raise StopTraining("interrupted")
            self._clear_interrupt()
        progress = (self.state.job, self.state.job_no, self.state.job_count)  # process_images moves these
        try:
            processed = self.processing.process_images(self.build(prompts, seeds, steps=steps, guidance=guidance,
                                                                  size=size))
        finally:
            self.state.job, self.state.job_no, self.state.job_count = progress
        if self._interrupted():  # the sampler stopped early: these images are partial
            if self.stop_requested or self.stop_on_interrupt:
                raise StopTraining("interrupted again while this iteration's images were drawn")
            self._clear_interrupt()
            return self._draw(prompts, seeds, steps, guidance, size)
        if len(processed.images) != len(prompts):
            raise RuntimeError(f"the webui returned {len(processed.images)} images for {len(prompts)} prompts")
        return [to_tensor(image) for image in processed.images]

    def _clear_interrupt(self) -> None:
        self.stop_requested = True
        self.state.interrupted = False
        if hasattr(self.state, "stopping_generation"):
            self.state.stopping_generation = False
        print("[promptist] Interrupt: finishing this iteration's images, then saving a checkpoint", file=sys.stderr)


def to_tensor(image) -> torch.Tensor:
    """A PIL image -> [H, W, 3] float 0..1."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)


class WebuiProgress:
    """The trainers' step callback in the webui: `shared.state` job, progress and text, the live curve as
    the live preview, and Interrupt (or one remembered by the generator) raising StopTraining so that the
    trainer saves a checkpoint first."""

    def __init__(self, state, out: Path, panels: dict[str, tuple[str, ...]], title: str, generator=None,
                 clock=None):
        self.state, self.title, self.generator = state, title, generator
        self.curve = LiveCurve(out, panels, title, **({"clock": clock} if clock else {}))
        self.step = 0

    def image(self):
        return self.curve.image()

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        from trainer.progress import StopTraining

        self.step = step
        self.curve.add(step, metrics)
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "valid_loss", "reward", "kl")
                          if isinstance(metrics.get(k), float))
        self.state.job_count, self.state.job_no = total, step
        self.state.textinfo = f"Promptist {self.title}: {step}/{total}" + (f", {shown}" if shown else "")
        picture = self.curve.preview(step, total)
        if picture is not None:
            self.state.assign_current_image(picture)
        if self.state.interrupted or getattr(self.state, "stopping_generation", False):
            raise StopTraining(f"interrupted in the webui at {step}/{total}")
        if self.generator is not None and self.generator.stop_requested:
            raise StopTraining(f"interrupted in the webui at {step}/{total} (while its images were drawn)")


def _finished(kind: str, out: Path, progress: WebuiProgress, resumed: bool, stopped: bool, **numbers) -> tuple:
    """(curve image, HTML summary): what the Train buttons show when a run ends or stops."""
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in numbers.items()
                      if v is not None)
    if stopped:
        unit = "iteration" if kind == "PPO" else "step"
        text = (f"{kind} interrupted at {unit} {progress.step}. Its latest checkpoint is in {out / 'checkpoints'}; press Train again with "
                "the same save name to continue.")
    else:
        text = (f"{kind} {'resumed and finished' if resumed else 'finished'}: {shown}. Saved in {out}; choose "
                f"'{out.name}' in Settings → Promptist → Optimizer model (press 🔄 to list it).")
    return progress.image(), f"<p>{html.escape(text)}</p>"


def _training(doing: str):
    """Trainer errors (bad settings, files, models) as one PromptistError line for the UI."""
    from contextlib import contextmanager

    @contextmanager
    def scope():
        try:
            with torch.inference_mode(False), torch.enable_grad():  # the webui may run under no_grad
                yield
        except PromptistError:
            raise
        except (ValueError, FileNotFoundError, OSError) as e:
            raise as_user_error(e if str(e).strip() else ValueError(type(e).__name__), doing) from e

    return scope()


def train_sft_in_webui(state, models_root: Path, *, base: str, data_file: str, data_format: str = "auto",
                       save_name: str, steps: int, lr: float = 5e-5, batch_size: int = 16,
                       effective_batch_size: int = 256, seed: int = 0, save_every: int = 100,
                       device: str | torch.device = "auto", models_dir: list[Path] | None = None) -> tuple:
    """The Train SFT button: fine-tune `base` on pairs or a corpus into `models_root/<save name>`;
    pressing it again with the same save name continues the run. Returns (curve image, HTML)."""
    from promptist_core.optimizer import forget
    from trainer.checkpoint import list_checkpoints
    from trainer.policy.pairs import is_pairs_file
    from trainer.policy.sft import SFTConfig, train_sft
    from trainer.progress import StopTraining
    from trainer.runtime import local_runtime

    out = run_folder(models_root, save_name)
    data = input_file(data_file, "Pairs or corpus file")
    pairs = data_format == "pairs" or (data_format == "auto" and is_pairs_file(data))
    resume = bool(list_checkpoints(out))
    steps, batch_size, effective_batch_size, save_every = int(steps), int(batch_size), int(effective_batch_size), int(save_every)
    config = SFTConfig(pairs=str(data) if pairs else None, corpus=None if pairs else str(data), base=base or TRAIN_BASE,
                       out=str(out), max_steps=steps, batch_size=batch_size, effective_batch_size=effective_batch_size,
                       lr=float(lr), warmup_steps=min(100, steps // 10), seed=int(seed), save_every=save_every,
                       eval_every=save_every, device=str(device), tensorboard=False)
    progress = WebuiProgress(state, out, SFT_PANELS, "SFT")
    state.job, state.job_count, state.textinfo = "Promptist SFT", steps, "Promptist SFT: loading"
    stopped, result = False, None
    with _training("training (SFT)"):
        try:
            result = train_sft(config, resume=resume, callback=progress, runtime=local_runtime(device),
                               models_dir=models_dir or [Path(models_root)])
        except StopTraining:
            stopped = True
        finally:
            forget(out)  # the optimizer reloads the new weights
    if result is None:
        return _finished("SFT", out, progress, resume, stopped)
    return _finished("SFT", out, progress, resume, False, steps=result.steps, loss=result.train_loss,
                     valid_loss=result.valid_loss, selected=result.selected)


def prompts_file_for_run(prompts: str, prompts_file: str, out: Path, resume: bool) -> str:
    """The prompts file the run trains on: `prompts_file`, or the text kept in the run's folder."""
    return user_errors(training_run.run_prompts, prompts, prompts_file, out, resume=resume, search=[Path.cwd()],
                       labels=("Prompts", "Prompts file", "Save name"))


def train_ppo_in_webui(state, generator: WebuiGenerator, scorer, models_root: Path, *, policy: str, prompts: str = "",
                       prompts_file: str = "", save_name: str, iterations: int, batch_size: int = 4,
                       images_per_prompt: int = 2, steps: int = 20, cfg: float = 7.0, width: int = 512,
                       height: int = 512, preset: str = "promptist", lr: float = 5e-5, beta: float = 0.2,
                       trainable_top_blocks: int = 2, seed: int = 0, save_every: int = 10,
                       device: str | torch.device = "auto", models_dir: list[Path] | None = None,
                       dfprompt: bool = False) -> tuple:
    """The Train PPO button: improve `policy` against images the webui draws with the loaded checkpoint,
    scored by `scorer`; saved into `models_root/<save name>`, continued by pressing it again. `dfprompt`
    trains a DF-Prompt policy (weight and range heads; the images are drawn from its DF-Prompts, rendered
    to the webui's prompt editing)."""
    from promptist_core.optimizer import forget
    from trainer.checkpoint import list_checkpoints
    from trainer.policy.ppo import PPOConfig, train_ppo
    from trainer.policy.rewards import ImageReward
    from trainer.progress import StopTraining
    from trainer.runtime import local_runtime

    if not policy or not policy.strip():
        raise PromptistError("Policy is empty: choose the SFT policy to start from", status_code=422)
    out = run_folder(models_root, save_name)
    checkpoints = list_checkpoints(out)
    resume = bool(checkpoints)
    started_from = checkpoints[-1].state.get("config", {}).get("policy") if resume else None
    if started_from not in (None, policy.strip()):
        raise PromptistError(f"The run in {out} started from the policy {started_from!r}, not {policy.strip()!r}: "
                             "choose it again to continue that run, or another save name for a new run",
                             status_code=422)
    with _training("training (PPO)"):
        source = prompts_file_for_run(prompts, prompts_file, out, resume)
        config = PPOConfig(prompts=source, policy=policy.strip(), out=str(out), iterations=int(iterations),
                           batch_size=int(batch_size), lr=float(lr), beta=float(beta),
                           trainable_top_blocks=int(trainable_top_blocks), seed=int(seed), save_every=int(save_every),
                           sample_every=1, device=str(device), tensorboard=False, preset=preset,
                           images_per_prompt=int(images_per_prompt), image_steps=int(steps), guidance=float(cfg),
                           width=int(width), height=int(height), dfprompt=bool(dfprompt),
                           valid_every=0)  # held-out validation: the trainer CLI's (not wired to this host's progress)
        reward = ImageReward(generator, scorer, preset=preset, images_per_prompt=int(images_per_prompt),
                             steps=int(steps), guidance=float(cfg), size=(int(width), int(height)), seed=int(seed))
    progress = WebuiProgress(state, out, {**PPO_PANELS, **(DF_PANELS if dfprompt else {})}, "PPO", generator)
    state.job, state.job_count, state.textinfo = "Promptist PPO", int(iterations), "Promptist PPO: loading"
    stopped, result = False, None
    with _training("training (PPO)"):
        try:
            result = train_ppo(config, reward, resume=resume, callback=progress, runtime=local_runtime(device),
                               models_dir=models_dir or [Path(models_root)], baseline_cache=reward.cache)
        except StopTraining:
            stopped = True
        finally:
            forget(out)
    if result is None:
        return _finished("PPO", out, progress, resume, stopped)
    return _finished("PPO", out, progress, resume, False, iterations=result.iterations, reward=result.reward,
                     kl=result.kl)
