"""AUTOMATIC1111 / Forge extension: a "Promptist" tab and two always-visible options.

- "Promptist": optimize every prompt of the job. Prompts holding DF-Prompt blocks (`[anime:0-1:1.5]`)
  are always rendered to the webui's own prompt editing syntax (`render_dfprompt_processing`), with no
  option to turn it off: left alone, the webui would read such a block as a broken prompt edit.
- "Promptist score": score every generated image (CLIP relevance to the user's prompt, LAION
  aesthetics, optionally PickScore) into its infotext; "best of N" keeps the best image of a batch.

A1111 executes this file by path and registers every Script class in it. The processing hooks
(`optimize_processing`, `render_dfprompt_processing`, `score_processing`) are plain functions over the
processing object `p`, so they work without the webui (tests call them directly); the webui classes
and callbacks are defined only when `modules` (the webui) is importable.
"""

from __future__ import annotations

import functools
import html
import re
import sys
import unicodedata
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parents[1]


def _import_core() -> None:
    """Import our top-level packages from this extension's folder (and claim `trainer` for ours)."""
    sys.path.insert(0, str(EXTENSION_ROOT))
    try:
        import promptist_core
        import trainer  # noqa: F401

        promptist_core.check_own_packages(EXTENSION_ROOT)
    finally:
        sys.path.remove(str(EXTENSION_ROOT))


_import_core()

import torch  # noqa: E402

from promptist_core.aesthetic import DEFAULT_AESTHETIC_HEAD  # noqa: E402
from promptist_core.clip_models import DEFAULT_CLIP_MODEL  # noqa: E402
from promptist_core.dfprompt import DFPromptError, has_dfprompt, parse, to_a1111  # noqa: E402
from promptist_core.optimizer import MODES, PromptOptimizer, load_optimizer  # noqa: E402
from promptist_core.rewards import PRESET_NAMES, ImageScore, RewardScorer, load_scorer  # noqa: E402
from promptist_core.weights import DEFAULT_OPTIMIZER_MODEL  # noqa: E402

TITLE = "Promptist"
SCORE_TITLE = "Promptist score"
# LoRA / hypernetwork / extra-network tags pass through untouched: the policy never saw them (nor DF blocks).
EXTRA_NETWORK_TAG = re.compile(r"<[^<>]+>")
INFOTEXT_ORIGINAL = "Promptist original"
INFOTEXT_MODE = "Promptist mode"
INFOTEXT_DFPROMPT = "DF-Prompt"


class PromptistError(RuntimeError):
    """An error the user must see. The webui shows it as `PromptistError: ...` in the UI's info box and
    returns it from the API (`errors` field; HTTP `status_code`: 422 for a bad prompt, else 500)."""

    def __init__(self, message: str, status_code: int = 500):
        super().__init__(message)
        self.status_code = status_code  # read by the webui's API error handler (vars(e)['status_code'])


# The webui runs every script hook inside `try: ... except Exception: errors.report(...)`
# (modules/scripts.py, A1111 1.10 and Forge alike): an exception raised in `process` only reaches the
# console and the job goes on without us. The methods below are what `process_images_inner` calls next
# *outside* those wrappers: `p.init` right after the scripts' `process`, `p.save_samples` right after
# `postprocess_batch_list`. Replacing them on this job's `p` makes the webui raise our error itself,
# which stops the job and shows the error the webui's own way (UI info box, API error response).
BEFORE_SAMPLING = ("init", "setup_conds", "sample")
AFTER_SAMPLING = ("save_samples",)
_PENDING = "_promptist_errors"


def stop_job(p, error: PromptistError, at: tuple[str, ...] = BEFORE_SAMPLING) -> None:
    """Make the webui stop this job with `error` at its next call of one of `p`'s methods `at`."""
    errors = getattr(p, _PENDING, None)
    if errors is None:
        errors = []
        setattr(p, _PENDING, errors)
    errors.append(error)

    def raise_pending(*args, **kwargs):
        first = errors[0]
        message = "\n".join(str(e) for e in errors)
        raise PromptistError(message, status_code=first.status_code)

    for name in at:
        setattr(p, name, raise_pending)


def as_user_error(error: Exception, doing: str) -> PromptistError:
    """One message a user can act on: what failed, then the error's own text (which names files or columns)."""
    if isinstance(error, PromptistError):
        return error
    detail = str(error).strip() or type(error).__name__
    status = 422 if isinstance(error, ValueError) else 500  # a bad prompt or option; else files or models
    return PromptistError(f"Promptist: {doing}: {detail}", status_code=status)


def guarded(p, doing: str, run, at: tuple[str, ...] = BEFORE_SAMPLING) -> bool:
    """Run `run()`; on an error, log it and stop the job with it (stop_job). True when it ran."""
    try:
        run()
        return True
    except Exception as e:  # everything reaches the user; nothing is swallowed
        error = as_user_error(e, doing)
        print(f"*** {error}", file=sys.stderr)
        stop_job(p, error, at)
        return False


PROMPT_LISTS = {"all_prompts": "prompt", "all_negative_prompts": "negative prompt",
                "all_hr_prompts": "hires prompt", "all_hr_negative_prompts": "hires negative prompt"}


def check_dfprompts(p) -> None:
    """Parse every DF-Prompt of the job; a bad one raises PromptistError naming the prompt and the column."""
    for name, label in PROMPT_LISTS.items():
        for i, text in enumerate(getattr(p, name, None) or []):
            if not (isinstance(text, str) and has_dfprompt(text)):
                continue
            try:
                parse(text, host_brackets=True)
            except DFPromptError as e:
                which = f"{label} of image {i + 1}" if len(set(getattr(p, name))) > 1 else label
                raise PromptistError(f"DF-Prompt error in the {which}, {dfprompt_message(e)}", status_code=422) from e


def dfprompt_message(error: DFPromptError) -> str:
    """'column 21: expected ...: "a red horse, [anime:▶1-0.5:1.5]"': a DFPromptError on one line."""
    return f"column {error.column}: {error.expected}: {mark_column(error.text, error.column)}"


def mark_column(text: str, column: int, context: int = 30) -> str:
    """'a red horse, [anime:1-0.5:1.5]', 21 -> '"a red horse, [anime:▶1-0.5:1.5]"': the place on one line.

    The webui shows an error as HTML, where DFPromptError's caret line (a second line of spaces and `^`)
    collapses to a lone `^` after the prompt; a marker inside the text survives HTML, JSON and the console.
    """
    i = column - 1
    start, end = max(0, i - context), min(len(text), i + context)
    before = ("…" if start > 0 else "") + text[start:i]
    after = text[i:end] + ("…" if end < len(text) else "")
    return _CONTROL.sub(" ", f'"{before}▶{after}"')


# Rewrites go into prompts and the infotext (one line per key): no newlines or control characters.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def clean_rewrite(text: str) -> str:
    """Line breaks, tabs and control/format characters -> one space; runs of spaces -> one; none before ','."""
    text = _CONTROL.sub(" ", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return re.sub(r" +,", ",", re.sub(r" {2,}", " ", text)).strip()


def unique(texts) -> list[str]:
    """Candidates once each, in order (different beams often decode to the same text)."""
    return list(dict.fromkeys(t for t in texts if t))


def restore_original_prompt(params: dict) -> None:
    """PNG Info / "Send to": put the user's own prompt back, so Generate reproduces the image.

    The infotext's Prompt is the rewrite (and DF blocks rendered to prompt editing); with "Optimize"
    ticked again from `Promptist mode`, the rewrite itself would be rewritten.
    """
    for key in (INFOTEXT_ORIGINAL, INFOTEXT_DFPROMPT):
        if isinstance(params.get(key), str) and params[key].strip():
            params["Prompt"] = params[key]
            return


def split_for_policy(prompt: str) -> tuple[str, str]:
    """Separate what the policy should rewrite from what it never saw and must keep as written.

    ('a cat, [anime:0-1:1.5] <lora:x:1>') -> ('a cat', ', [anime:0-1:1.5] <lora:x:1>'): the plain
    text, and a suffix (DF-Prompt blocks, extra-network tags) to append to its rewrite.
    """
    tags = " ".join(EXTRA_NETWORK_TAG.findall(prompt))
    text = EXTRA_NETWORK_TAG.sub(" ", prompt)
    blocks = ""
    if has_dfprompt(text):
        parsed = parse(text, host_brackets=True)
        blocks = ", ".join(m.format() for m in parsed.modifiers)
        text = "".join(part for part in parsed.parts if isinstance(part, str))
    text = re.sub(r"\s*,(\s*,)+", ",", re.sub(r"\s{2,}", " ", text)).strip(" ,")
    suffix = (", " + blocks if blocks else "") + (" " + tags if tags else "")
    return text, suffix


def optimize_prompts(optimizer: PromptOptimizer, prompts: list[str], *, mode: str = "beam",
                     seeds: list[int] | None = None, trim: bool = False) -> list[str]:
    """Rewrite each prompt once per distinct (prompt, seed); DF blocks and extra-network tags are kept."""
    seeds = seeds if (seeds is not None and mode == "sample") else [None] * len(prompts)
    wanted = {}
    for prompt, seed in zip(prompts, seeds, strict=True):
        text, _ = split_for_policy(prompt)
        if text and (text, seed) not in wanted:
            wanted[(text, seed)] = None
    if mode == "sample":  # each image's own seed
        for text, seed in wanted:
            result = optimizer(text, mode=mode, seed=seed, trim_to_clip_window=trim)[0]
            wanted[(text, seed)] = clean_rewrite(result.prompt) or text
    elif wanted:
        texts = [text for text, _ in wanted]
        for key, result in zip(wanted, optimizer(texts, mode=mode, trim_to_clip_window=trim), strict=True):
            wanted[key] = clean_rewrite(result.prompt) or key[0]
    rewritten = []
    for prompt, seed in zip(prompts, seeds, strict=True):
        text, suffix = split_for_policy(prompt)
        rewritten.append(wanted[(text, seed)] + suffix if text else prompt)
    return rewritten


def optimize_processing(p, optimizer: PromptOptimizer, *, mode: str = "beam", trim: bool = False) -> None:
    """Rewrite `p.all_prompts` in place (hires prompts that followed them too) and record the originals.

    Called from the script's `process`, after the webui has expanded styles and seeds.
    """
    originals = list(p.all_prompts)
    seeds = list(getattr(p, "all_seeds", None) or [0] * len(originals))
    rewritten = optimize_prompts(optimizer, originals, mode=mode, seeds=seeds, trim=trim)
    p.all_prompts = rewritten
    hr = getattr(p, "all_hr_prompts", None)
    if hr and len(hr) == len(originals):
        p.all_hr_prompts = [new if old_hr == old else old_hr for old_hr, old, new in zip(hr, originals, rewritten,
                                                                                          strict=True)]
    if getattr(p, "main_prompt", None) == originals[0]:
        p.main_prompt = rewritten[0]
    p.prompt = rewritten[0] if isinstance(p.prompt, str) else rewritten
    # A list: one value per image of the job, as the webui's infotext expects.
    p.extra_generation_params[INFOTEXT_ORIGINAL] = originals
    p.extra_generation_params[INFOTEXT_MODE] = mode


def render_dfprompt_processing(p, *, steps: int | None = None, hires_steps: int | None = None,
                               old_scheduling: bool = False) -> bool:
    """Render DF-Prompt blocks in the job's prompts to native prompt editing, so the webui schedules them.

    Called from the script's `process` (after the optimizer, if it ran). Integer steps make the webui's
    schedule equal PAE's (see `promptist_core.dfprompt.to_a1111`).

    Args:
        p: the webui's processing object (`all_prompts`, `all_negative_prompts`, hires `all_hr_*`).
        steps: the first pass's sampling steps as the webui counts them (`p.steps`, doubled for
            second-order samplers); default `p.steps`.
        hires_steps: the hires pass's steps (default `p.hr_second_pass_steps or p.steps`).
        old_scheduling: the webui's "use old prompt editing timelines" option: hires steps are then not
            counted after the first pass.
    Returns True when some prompt held DF blocks. A block that does not parse raises ValueError (the
    job stops with the column and what was expected).
    """
    steps = steps or p.steps
    hires_steps = hires_steps or getattr(p, "hr_second_pass_steps", 0) or p.steps
    offset = None if old_scheduling else steps
    lists = {
        "all_prompts": (steps, None), "all_negative_prompts": (steps, None),
        "all_hr_prompts": (hires_steps, offset), "all_hr_negative_prompts": (hires_steps, offset),
    }
    originals = list(p.all_prompts)
    changed = False
    for name, (n, first_pass) in lists.items():
        texts = getattr(p, name, None)
        if not texts or not any(has_dfprompt(t) for t in texts):
            continue
        # The webui's own prompt editing beside DF blocks stays the webui's (host_brackets).
        setattr(p, name, [to_a1111(parse(t, host_brackets=True), n, first_pass_steps=first_pass)
                          if has_dfprompt(t) else t for t in texts])
        changed = True
    if changed:
        if getattr(p, "main_prompt", None) == originals[0]:
            p.main_prompt = p.all_prompts[0]
        if any(has_dfprompt(t) for t in originals):
            p.extra_generation_params[INFOTEXT_DFPROMPT] = originals  # the webui writes the rendered prompt
    return changed


INFOTEXT_SCORE = "Promptist score"
INFOTEXT_TERMS = "Promptist score terms"
INFOTEXT_PRESET = "Promptist score preset"
INFOTEXT_BEST_OF = "Promptist best of"
# A1111 emphasis syntax means nothing to CLIP's text encoder (nor do extra-network tags).
EMPHASIS_WEIGHT = re.compile(r":\s*-?\d+(?:\.\d+)?\s*(?=[)\]])")


def plain_text(prompt: str) -> str:
    """'(a cat:1.2) <lora:x:1>' -> 'a cat': the words CLIP should compare the image with (approximate)."""
    text = EXTRA_NETWORK_TAG.sub(" ", prompt)
    text = EMPHASIS_WEIGHT.sub("", text)
    text = re.sub(r"[()\[\]]", "", text)
    return re.sub(r"\s{2,}", " ", text).strip(" ,") or prompt.strip()


def reference_prompts(p, count: int, batch_number: int = 0) -> list[str]:
    """The user's prompts for this batch: the originals if Promptist rewrote them, else p.prompts."""
    originals = (getattr(p, "extra_generation_params", None) or {}).get(INFOTEXT_ORIGINAL)
    start = batch_number * int(getattr(p, "batch_size", count) or count)
    if isinstance(originals, list) and len(originals) >= start + count:
        prompts = originals[start:start + count]
    else:
        prompts = list(p.prompts)[:count]
    return [plain_text(t) for t in prompts]


def batch_to_images(images) -> torch.Tensor:
    """The webui's list of [C, H, W] tensors in 0..1 -> one [B, H, W, C] batch."""
    return torch.stack([img.detach().float() for img in images]).permute(0, 2, 3, 1)


def score_processing(p, pp, scorer: RewardScorer, *, preset: str = "promptist", best_of_n: bool = False,
                     batch_number: int = 0) -> list[ImageScore]:
    """Score the batch in `pp.images`, write the scores into the infotext, and keep the best if asked.

    Called from the script's `postprocess_batch_list`, where `p.prompts` etc. hold this batch's values.
    With `best_of_n`, `pp.images`, `p.prompts`, `p.negative_prompts`, `p.seeds` and `p.subseeds` are cut to
    the best image, as the webui requires of a script that changes the batch size.
    """
    # 1. score against the user's prompts (no plain-prompt images here: absolute aesthetics)
    count = len(pp.images)
    if count == 0:
        return []
    scores = scorer(batch_to_images(pp.images), reference_prompts(p, count, batch_number), preset=preset)

    # 2. infotext: lists hold one value per image of this batch (the webui indexes them by position)
    params = p.extra_generation_params
    params[INFOTEXT_SCORE] = [f"{s.total:.3f}" for s in scores]
    params[INFOTEXT_TERMS] = [_terms(s) for s in scores]
    params[INFOTEXT_PRESET] = preset

    # 3. best of N: keep the best image and everything the webui pairs with it
    if best_of_n and count > 1:
        best = max(range(count), key=lambda i: scores[i].total)
        pp.images = [pp.images[best]]
        for name in ("prompts", "negative_prompts", "seeds", "subseeds"):
            values = getattr(p, name, None)
            if isinstance(values, list) and len(values) == count:
                setattr(p, name, [values[best]])
        params[INFOTEXT_SCORE] = [params[INFOTEXT_SCORE][best]]
        params[INFOTEXT_TERMS] = [params[INFOTEXT_TERMS][best]]
        params[INFOTEXT_BEST_OF] = f"{best + 1}/{count}"
    return scores


def _terms(s: ImageScore) -> str:
    parts = [f"aes {s.aesthetic:.3f}", f"cos {s.clip_cosine:.4f}", f"rel {s.relevance_term:.3f}"]
    if s.pick is not None:
        parts.append(f"pick {s.pick:.2f}")
    return "; ".join(parts)


def models_dirs(webui_models_path: str | None = None) -> list[Path]:
    """`extensions/<this>/models`, then the webui's `models/promptist`."""
    dirs = [EXTENSION_ROOT / "models"]
    if webui_models_path:
        dirs.append(Path(webui_models_path) / "promptist")
    return dirs


# --- Training in the webui (Train SFT / Train PPO in the Promptist tab) ---------------------------
# Plain functions and classes over webui objects passed in (`state` is `shared.state`, `processing` is
# `modules.processing`), so that tests run them on fakes; the tab below binds them to the real ones.

TRAIN_BASE = "openai-community/gpt2"
PREVIEW_EVERY_S = 1.0  # the live curve is redrawn at most this often (and at the last step)
SFT_PANELS = {"loss": ("loss", "valid_loss")}
PPO_PANELS = {"reward": ("reward", "reward_aes", "reward_rel", "reward_pick"), "KL": ("kl",)}
DF_PANELS = {"mean weight": ("mean_weight",), "head KL": ("kl_weight", "kl_range")}  # a DF-Prompt policy's heads


def save_name_problem(name: str) -> str | None:
    """Why `name` cannot be a folder name in models/promptist, or None."""
    from trainer.checkpoint import save_name_problem as problem

    return problem(name, "Save name")


def run_folder(models_root: Path, save_name: str) -> Path:
    """`models_root/<save name>`: a new folder, or a training run to continue (never a model folder that is
    not a run: training would overwrite it)."""
    from promptist_core.optimizer import causal_lm_problem

    problem = save_name_problem(save_name)
    if problem:
        raise PromptistError(problem, status_code=422)
    folder = Path(models_root) / save_name
    if folder.exists() and not (folder / "checkpoints").is_dir() and causal_lm_problem(folder) is None:
        raise PromptistError(f"{folder} holds a model that is not a training run; choose another save name "
                             "(training would overwrite it)", status_code=422)
    return folder


def input_file(path: str, what: str) -> Path:
    """An existing file (absolute, or relative to the webui's working directory)."""
    if not path or not path.strip():
        raise PromptistError(f"{what} is empty: give a file path", status_code=422)
    file = Path(path.strip()).expanduser()
    if not file.is_file():
        raise PromptistError(f"{what}: no such file {str(file.resolve())!r}", status_code=422)
    return file.resolve()


def policy_names(dirs: list[Path], extra: tuple[str, ...] = ()) -> list[str]:
    """Policy folders (causal LMs) in the models folders, then `extra` names: for dropdowns."""
    from promptist_core.optimizer import causal_lm_problem

    found = [d.name for base in dirs if base.is_dir() for d in sorted(base.iterdir())
             if d.is_dir() and causal_lm_problem(d) is None]
    return list(dict.fromkeys([*found, *extra]))


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
    """

    def __init__(self, processing, state, *, sampler_name: str, negative: str = "",
                 schedule_steps=lambda steps: steps, max_batch: int = 4, checkpoint: str = ""):
        self.processing, self.state = processing, state
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
            self._clear_interrupt()
        progress = (self.state.job, self.state.job_no, self.state.job_count)  # process_images moves these
        try:
            processed = self.processing.process_images(self.build(prompts, seeds, steps=steps, guidance=guidance,
                                                                  size=size))
        finally:
            self.state.job, self.state.job_no, self.state.job_count = progress
        if self._interrupted():  # the sampler stopped early: these images are partial
            if self.stop_requested:
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
        import time

        self.state, self.out, self.panels, self.title, self.generator = state, out, panels, title, generator
        self.clock = clock or time.monotonic
        self.series: dict[str, list[tuple[int, float]]] | None = None
        self.last_preview: float | None = None
        self.step = 0

    def _history(self, before: int) -> dict[str, list[tuple[int, float]]]:
        """The resumed part of the curve: train_log.csv rows before the first step of this run."""
        from trainer.training_log import logged_series

        return logged_series(self.out, [k for keys in self.panels.values() for k in keys], before)

    def image(self):
        from trainer.training_log import plot_curves

        series = self.series or self._history(1 << 62)
        return plot_curves({name: {k: series.get(k, []) for k in keys} for name, keys in self.panels.items()},
                           self.title)

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        from trainer.progress import StopTraining

        if self.series is None:
            self.series = self._history(step)
        self.step = step
        for k, v in metrics.items():
            if k in self.series and isinstance(v, (int, float)) and v == v:
                self.series[k].append((step, float(v)))
        shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("loss", "valid_loss", "reward", "kl")
                          if isinstance(metrics.get(k), float))
        self.state.job_count, self.state.job_no = total, step
        self.state.textinfo = f"Promptist {self.title}: {step}/{total}" + (f", {shown}" if shown else "")
        now = self.clock()
        if step >= total or self.last_preview is None or now - self.last_preview >= PREVIEW_EVERY_S:
            self.state.assign_current_image(self.image())
            self.last_preview = now
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
    """The prompts file the run trains on: `prompts_file`, or the text kept in the run's folder (so that a
    resumed run reads the same prompts)."""
    if prompts_file and prompts_file.strip():
        return str(input_file(prompts_file, "Prompts file"))
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    if not lines:
        raise PromptistError("Prompts are empty: give plain prompts, one per line, or a prompts file", status_code=422)
    text = "\n".join(lines) + "\n"
    path = out / "prompts.txt"
    if resume and path.is_file() and path.read_text(encoding="utf-8") != text:
        raise PromptistError(f"The prompts differ from those of the run in {out} being continued; restore them or "
                             "choose another save name for a new run", status_code=422)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return str(path)


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
                           width=int(width), height=int(height), dfprompt=bool(dfprompt))
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


# Settings: a "Promptist" page under the webui's "Stable Diffusion" category (not "Uncategorized").
SETTINGS_SECTION = ("promptist", TITLE)
SETTINGS_CATEGORY = "sd"
_FOLDERS = "a folder in models/promptist or extensions/promptist/models"
SETTINGS = (  # key, default, label, radio choices
    ("promptist_model", DEFAULT_OPTIMIZER_MODEL, f"Optimizer model (Hugging Face id, or {_FOLDERS})", ()),
    ("promptist_device", "gpu", "Device for the optimizer", ("gpu", "cpu")),
    ("promptist_mode", "beam", "Default mode", tuple(MODES)),
    ("promptist_score_clip", DEFAULT_CLIP_MODEL, f"Score: CLIP model (ViT-L-14/openai, or {_FOLDERS})", ()),
    ("promptist_score_aesthetic", DEFAULT_AESTHETIC_HEAD,
     "Score: aesthetic head (improved, laion-v1, or a file in models/promptist or extensions/promptist/models)", ()),
    ("promptist_score_pick", "", "Score: PickScore model (empty: none; the pae reward uses "
     "yuvalkirstain/PickScore_v1)", ()),
    ("promptist_score_device", "gpu", "Score: device", ("gpu", "cpu")),
)


try:
    import gradio as gr
    from modules import devices, script_callbacks, scripts, shared
    from modules.call_queue import wrap_gradio_gpu_call
except ImportError:  # not inside the webui (tests, headless)
    scripts = None


if scripts is not None:

    def _optimizer() -> PromptOptimizer:
        device = "cpu" if shared.opts.data.get("promptist_device", "gpu") == "cpu" else devices.device
        name = shared.opts.data.get("promptist_model", DEFAULT_OPTIMIZER_MODEL) or DEFAULT_OPTIMIZER_MODEL
        return load_optimizer(name, models_dir=models_dirs(shared.models_path), device=device)

    def _sampler_steps(sampler_name: str | None, steps: int) -> int:
        """Steps as the webui's prompt schedule counts them: model calls (twice the steps for 2nd-order samplers)."""
        from modules import sd_samplers

        config = sd_samplers.find_sampler_config(sampler_name)
        return config.total_steps(steps) if config is not None else steps

    class PromptistScript(scripts.Script):
        def title(self):
            return TITLE

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            with gr.Accordion(TITLE, open=False):
                enabled = gr.Checkbox(label="Optimize prompt", value=False,
                                      elem_id=self.elem_id("promptist_enabled"))
                mode = gr.Dropdown(label="Mode", choices=list(MODES),
                                   value=shared.opts.data.get("promptist_mode", "beam"),
                                   elem_id=self.elem_id("promptist_mode"))
                trim = gr.Checkbox(label="Trim to CLIP's 75 tokens", value=False,
                                   elem_id=self.elem_id("promptist_trim"))
            self.infotext_fields = [(mode, INFOTEXT_MODE),
                                    (enabled, lambda params: INFOTEXT_MODE in params)]
            return [enabled, mode, trim]

        def process(self, p, enabled=False, mode="beam", trim=False, *args):
            # Three independent steps: a failure in one stops the job (stop_job) but never skips another,
            # so a DF block is rendered (or reported) even when the optimizer model cannot load.
            if not guarded(p, "checking the DF-Prompts", lambda: check_dfprompts(p)):
                return  # optimizing and rendering would only fail on the same block again
            if enabled:
                guarded(p, "optimizing the prompt",
                        lambda: optimize_processing(p, _optimizer(), mode=mode, trim=trim))
            guarded(p, "rendering the DF-Prompts", lambda: render_dfprompt_processing(
                p, steps=_sampler_steps(p.sampler_name, p.steps),
                hires_steps=_sampler_steps(getattr(p, "hr_sampler_name", None) or p.sampler_name,
                                           getattr(p, "hr_second_pass_steps", 0) or p.steps),
                old_scheduling=bool(getattr(shared.opts, "use_old_scheduling", False))))

    def _scorer(preset: str) -> RewardScorer:
        opts = shared.opts.data
        device = "cpu" if opts.get("promptist_score_device", "gpu") == "cpu" else devices.device
        pick = opts.get("promptist_score_pick", "") or None
        return load_scorer(opts.get("promptist_score_clip", DEFAULT_CLIP_MODEL) or DEFAULT_CLIP_MODEL,
                           opts.get("promptist_score_aesthetic", DEFAULT_AESTHETIC_HEAD) or DEFAULT_AESTHETIC_HEAD,
                           pick_model=pick, preset=preset, models_dir=models_dirs(shared.models_path), device=device)

    class PromptistScoreScript(scripts.Script):
        def title(self):
            return SCORE_TITLE

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            with gr.Accordion(SCORE_TITLE, open=False):
                enabled = gr.Checkbox(label="Score images (scores go into the infotext)", value=False,
                                      elem_id=self.elem_id("promptist_score_enabled"))
                best_of_n = gr.Checkbox(label="Best of N: keep the best image of each batch", value=False,
                                        elem_id=self.elem_id("promptist_score_best_of_n"))
                preset = gr.Dropdown(label="Reward", choices=list(PRESET_NAMES), value="promptist",
                                     elem_id=self.elem_id("promptist_score_preset"))
            self.infotext_fields = [(preset, INFOTEXT_PRESET),
                                    (enabled, lambda params: INFOTEXT_PRESET in params),
                                    (best_of_n, lambda params: INFOTEXT_BEST_OF in params)]
            return [enabled, best_of_n, preset]

        def process(self, p, enabled=False, best_of_n=False, preset="promptist", *args):
            # Load the models before sampling: a missing model stops the job before any image is made.
            if enabled or best_of_n:
                guarded(p, "loading the scoring models", lambda: setattr(p, "_promptist_scorer", _scorer(preset)))

        def postprocess_batch_list(self, p, pp, enabled=False, best_of_n=False, preset="promptist", *args,
                                   **kwargs):
            scorer = getattr(p, "_promptist_scorer", None)
            if not (enabled or best_of_n) or scorer is None:
                return
            guarded(p, "scoring the images", lambda: score_processing(
                p, pp, scorer, preset=preset, best_of_n=best_of_n, batch_number=kwargs.get("batch_number", 0)),
                at=AFTER_SAMPLING)

    def _optimize_for_tab(prompt: str, mode: str, candidates: int, seed: int):
        try:
            text, suffix = split_for_policy(prompt or "")
        except DFPromptError as e:  # shown as HTML by the webui's call wrapper: one line, place marked
            raise PromptistError(f"DF-Prompt error, {dfprompt_message(e)}", status_code=422) from e
        result = _optimizer()(text, mode=mode, candidates=int(candidates), num_beams=max(8, int(candidates)),
                              seed=int(seed))[0]
        best = clean_rewrite(result.prompt) + suffix
        info = f"{result.clip_tokens} CLIP tokens" + "".join(f"; {n}" for n in result.notes)
        # The webui's call wrapper appends its timing HTML to the last output.
        return best, "\n".join(unique(clean_rewrite(c) for c in result.candidates)), f"<p>{html.escape(info)}</p>"

    def _train_device():
        return "cpu" if shared.opts.data.get("promptist_device", "gpu") == "cpu" else devices.device

    def _train_root() -> Path:
        return Path(shared.models_path) / "promptist"

    def _train_sft(id_task, base, data_file, data_format, save_name, steps, lr, batch_size, effective_batch_size,
                   seed, save_every):
        return train_sft_in_webui(shared.state, _train_root(), base=base, data_file=data_file,
                                  data_format=data_format, save_name=save_name, steps=steps, lr=lr,
                                  batch_size=batch_size, effective_batch_size=effective_batch_size, seed=seed,
                                  save_every=save_every, device=_train_device(),
                                  models_dir=models_dirs(shared.models_path))

    def _train_ppo(id_task, policy, prompts, prompts_file, save_name, iterations, batch_size, images_per_prompt,
                   sampler_name, steps, cfg, width, height, negative, preset, lr, beta, trainable_top_blocks, seed,
                   save_every, dfprompt=False):
        from modules import processing

        if not shared.sd_model:
            raise PromptistError("No Stable Diffusion checkpoint is loaded: choose one at the top of the page")
        checkpoint = getattr(getattr(shared.sd_model, "sd_checkpoint_info", None), "name_for_extra", "")
        generator = WebuiGenerator(processing, shared.state, sampler_name=sampler_name, negative=negative or "",
                                   schedule_steps=lambda n: _sampler_steps(sampler_name, n), checkpoint=checkpoint)
        try:
            scorer = _scorer(preset)
        except Exception as e:
            raise as_user_error(e, "loading the scoring models (Settings → Promptist → Score)") from e
        return train_ppo_in_webui(shared.state, generator, scorer, _train_root(), policy=policy, prompts=prompts,
                                  prompts_file=prompts_file, save_name=save_name, iterations=iterations,
                                  batch_size=batch_size, images_per_prompt=images_per_prompt, steps=steps, cfg=cfg,
                                  width=width, height=height, preset=preset, lr=lr, beta=beta,
                                  trainable_top_blocks=trainable_top_blocks, seed=seed, save_every=save_every,
                                  device=_train_device(), models_dir=models_dirs(shared.models_path), dfprompt=dfprompt)

    def _train_outputs(kind: str):
        """The curve (the live preview shows over it while training) and the progress/result text."""
        with gr.Column():
            gr.HTML(elem_id=f"promptist_{kind}_progress")
            status = gr.HTML(elem_id=f"promptist_{kind}_output")
            curve = gr.Image(label="Curves", type="pil", interactive=False, elem_id=f"promptist_{kind}_curve")
        return curve, status

    def _sft_section():
        policies = policy_names(models_dirs(shared.models_path), (TRAIN_BASE, DEFAULT_OPTIMIZER_MODEL))
        gr.HTML("<p>Fine-tunes a GPT-2 policy on (plain, engineered) prompt pairs (Promptist stage 1). The webui is "
                "busy while training (txt2img waits). Interrupt saves a checkpoint; Train again with the same save "
                "name continues.</p>")
        with gr.Row():
            with gr.Column():
                task = gr.Textbox(visible=False)
                base = gr.Dropdown(label="Base policy (a folder in models/promptist, or a Hub id)", choices=policies,
                                   value=TRAIN_BASE, allow_custom_value=True)
                data_file = gr.Textbox(label="Pairs (.jsonl from `python -m trainer pairs`) or corpus file (.txt, "
                                             ".csv, .jsonl, .parquet): full path", placeholder="/path/to/pairs.jsonl")
                data_format = gr.Radio(label="File holds", choices=["auto", "pairs", "corpus"], value="auto")
                save_name = gr.Textbox(label="Save name (models/promptist/<save name>)", value="my-promptist")
                with gr.Row():
                    steps = gr.Number(label="Steps (paper: 15000)", value=1000, precision=0)
                    lr = gr.Number(label="Learning rate", value=5e-5)
                    seed = gr.Number(label="Seed", value=0, precision=0)
                with gr.Row():
                    batch = gr.Number(label="Batch size", value=16, precision=0)
                    effective = gr.Number(label="Effective batch (paper: 256)", value=256, precision=0)
                    save_every = gr.Number(label="Save every (steps)", value=100, precision=0)
                with gr.Row():
                    run = gr.Button("Train SFT", variant="primary", elem_id="promptist_sft_train")
                    stop = gr.Button("Interrupt (saves a checkpoint)", elem_id="promptist_sft_interrupt")
            curve, status = _train_outputs("sft")
        stop.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])  # as the built-in Train tab
        run.click(wrap_gradio_gpu_call(_train_sft, extra_outputs=[None]), _js="promptistStartTraining_sft",
                  inputs=[task, base, data_file, data_format, save_name, steps, lr, batch, effective, seed,
                          save_every], outputs=[curve, status])

    def _ppo_section():
        from modules import sd_samplers

        samplers = [s.name for s in sd_samplers.visible_samplers()] or ["Euler a"]
        policies = policy_names(models_dirs(shared.models_path), (DEFAULT_OPTIMIZER_MODEL,))
        gr.HTML("<p>Improves a policy by reinforcement learning against images drawn with the loaded checkpoint and "
                "scored with the models of Settings → Promptist (Promptist stage 2). The webui is busy while training. "
                "Interrupt finishes the iteration's images, saves and stops; Train again with the same save name "
                "continues.</p>")
        with gr.Row():
            with gr.Column():
                task = gr.Textbox(visible=False)
                policy = gr.Dropdown(label="Policy to start from (an SFT policy)", choices=policies,
                                     value=DEFAULT_OPTIMIZER_MODEL, allow_custom_value=True)
                prompts = gr.Textbox(label="Plain prompts, one per line", lines=4,
                                     value="a cat riding a bike\na red horse on the grass\na castle on a hill\n"
                                           "a bowl of fruit")
                prompts_file = gr.Textbox(label="Or a prompts file (.txt, .csv, .jsonl, .parquet): full path")
                save_name = gr.Textbox(label="Save name (models/promptist/<save name>)", value="my-promptist-ppo")
                with gr.Row():
                    iterations = gr.Number(label="Iterations", value=100, precision=0)
                    batch = gr.Number(label="Prompts per iteration", value=4, precision=0)
                    images = gr.Number(label="Images per prompt", value=2, precision=0)
                with gr.Row():
                    sampler = gr.Dropdown(label="Sampler", choices=samplers, value=samplers[0])
                    steps = gr.Number(label="Sampling steps", value=20, precision=0)
                    cfg = gr.Number(label="CFG scale", value=7.0)
                with gr.Row():
                    width = gr.Number(label="Width", value=512, precision=0)
                    height = gr.Number(label="Height", value=512, precision=0)
                    preset = gr.Dropdown(label="Reward", choices=list(PRESET_NAMES), value="promptist")
                negative = gr.Textbox(label="Negative prompt for every image", value="")
                with gr.Row():
                    lr = gr.Number(label="Learning rate", value=5e-5)
                    beta = gr.Number(label="KL beta (higher: stay nearer the start)", value=0.2)
                    top = gr.Number(label="Trainable top blocks (0: all)", value=2, precision=0)
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0)
                    save_every = gr.Number(label="Save every (iterations)", value=10, precision=0)
                dfprompt = gr.Checkbox(label="DF-Prompt policy: also learn each modifier's weight and time range "
                                             "(PAE, whose reward is pae; start from an SFT policy with DF-Prompt "
                                             "heads)",
                                       value=False, elem_id="promptist_ppo_dfprompt")
                with gr.Row():
                    run = gr.Button("Train PPO", variant="primary", elem_id="promptist_ppo_train")
                    stop = gr.Button("Interrupt (saves a checkpoint)", elem_id="promptist_ppo_interrupt")
            curve, status = _train_outputs("ppo")
        stop.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])  # as the built-in Train tab
        run.click(wrap_gradio_gpu_call(_train_ppo, extra_outputs=[None]), _js="promptistStartTraining_ppo",
                  inputs=[task, policy, prompts, prompts_file, save_name, iterations, batch, images, sampler, steps,
                          cfg, width, height, negative, preset, lr, beta, top, seed, save_every, dfprompt],
                  outputs=[curve, status])

    def on_ui_tabs():
        from modules import infotext_utils

        with gr.Blocks(analytics_enabled=False) as tab, gr.Tabs():
            with gr.Tab("Optimize"), gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", lines=3, placeholder="a cat riding a bike")
                    with gr.Row():
                        mode = gr.Dropdown(label="Mode", choices=list(MODES), value="beam")
                        candidates = gr.Slider(label="Candidates", minimum=1, maximum=16, step=1, value=4)
                        seed = gr.Number(label="Seed (sample mode)", value=0, precision=0)
                    run = gr.Button("Optimize", variant="primary")
                with gr.Column():
                    best = gr.Textbox(label="Optimized prompt", lines=3, interactive=True)
                    info = gr.HTML()
                    all_candidates = gr.Textbox(label="Candidates (best first)", lines=6, interactive=False)
                    buttons = infotext_utils.create_buttons(["txt2img", "img2img"])
            with gr.Tab("Train SFT"):
                _sft_section()
            with gr.Tab("Train PPO"):
                _ppo_section()
            for tabname, button in buttons.items():
                infotext_utils.register_paste_params_button(
                    infotext_utils.ParamBinding(paste_button=button, tabname=tabname, source_text_component=best))
            run.click(wrap_gradio_gpu_call(_optimize_for_tab, extra_outputs=["", ""]),
                      inputs=[prompt, mode, candidates, seed], outputs=[best, all_candidates, info])
        return [(tab, TITLE, "promptist")]

    def _policy_choices() -> dict:
        """The optimizer model's dropdown: policy folders (a trained run is listed after 🔄) and the current value.
        Only `choices`: the refresh button passes these to `gr.Dropdown.update`, which takes no more in gradio 3."""
        current = shared.opts.data.get("promptist_model") or DEFAULT_OPTIMIZER_MODEL
        return {"choices": policy_names(models_dirs(shared.models_path), (DEFAULT_OPTIMIZER_MODEL, current))}

    def on_ui_settings():
        for key, default, label, choices in SETTINGS:
            component, args, extra = (gr.Radio, {"choices": list(choices)}, {}) if choices else (None, None, {})
            if key == "promptist_model":
                component = functools.partial(gr.Dropdown, allow_custom_value=True)  # a Hub id may be typed
                args, extra = _policy_choices, {"refresh": lambda: None}
            shared.opts.add_option(key, shared.OptionInfo(default, label, component, args, section=SETTINGS_SECTION,
                                                          category_id=SETTINGS_CATEGORY, **extra))

    def on_infotext_pasted(infotext: str, params: dict) -> None:
        restore_original_prompt(params)

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
    script_callbacks.on_infotext_pasted(on_infotext_pasted)
