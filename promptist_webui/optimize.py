"""The always-visible "Promptist" script: optimize every prompt of the job, render DF-Prompt blocks.

Prompts holding DF-Prompt blocks (`[anime:0-1:1.5]`) are always rendered to the webui's own prompt editing
syntax (`render_dfprompt_processing`), with no option to turn it off: left alone, the webui would read such
a block as a broken prompt edit. The hooks are plain functions over the processing object `p`, so they
work without the webui (tests call them directly); the Script class exists only inside the webui.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from pathlib import Path

from promptist_core.dfprompt import has_dfprompt, parse, to_a1111
from promptist_core.fingerprint import contents_fingerprint
from promptist_core.optimizer import MODES, PromptOptimizer, load_optimizer
from promptist_core.weights import DEFAULT_OPTIMIZER_MODEL, choose_default_policy, local_folder_name

from .errors import CONTROL_CHARACTERS, check_dfprompts, guarded
from .host import IN_WEBUI, devices, gr, models_dirs, scripts, shared
from .infotext import EXTRA_NETWORK_TAG, INFOTEXT_DFPROMPT, INFOTEXT_MODE, INFOTEXT_ORIGINAL, TITLE
from .job_models import models_ready, plan
from .lora_check import warn_about_loras
from .vram import after_job, optimizer_modules, ready


def clean_rewrite(text: str) -> str:
    """Line breaks, tabs and control/format characters -> one space; runs of spaces -> one; none before ','."""
    text = CONTROL_CHARACTERS.sub(" ", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return re.sub(r" +,", ",", re.sub(r" {2,}", " ", text)).strip()


def unique(texts) -> list[str]:
    """Candidates once each, in order (different beams often decode to the same text)."""
    return list(dict.fromkeys(t for t in texts if t))


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


_DEFAULT_CHOICE: dict[tuple, str] = {}  # (models folders, Promptist folder's fingerprint) -> the policy chosen


def policy_name(settings: dict, models_dir=None) -> str:
    """The policy the settings name (the Settings page's "Optimizer model"). The setting's default,
    microsoft/Promptist, is the same choice as the CLI's default: Promptist where it is here or downloadable,
    else the bundled policy (said once in the console), so a fresh offline webui rewrites at once."""
    name = settings.get("promptist_model", DEFAULT_OPTIMIZER_MODEL) or DEFAULT_OPTIMIZER_MODEL
    if name != DEFAULT_OPTIMIZER_MODEL:
        return name
    dirs = [Path(d) for d in (models_dir if models_dir is not None else models_dirs(shared.models_path))]
    key = (tuple(dirs), *(contents_fingerprint(d / local_folder_name(DEFAULT_OPTIMIZER_MODEL)) for d in dirs))
    if key not in _DEFAULT_CHOICE:
        chosen, why = choose_default_policy(models_dir=dirs)
        if why:
            print(why, file=sys.stderr)
        _DEFAULT_CHOICE[key] = chosen
    return _DEFAULT_CHOICE[key]


def loaded_optimizer() -> PromptOptimizer:
    device = "cpu" if shared.opts.data.get("promptist_device", "gpu") == "cpu" else devices.device
    optimizer = load_optimizer(policy_name(shared.opts.data), models_dir=models_dirs(shared.models_path), device=device)
    ready(optimizer_modules(optimizer), device)  # parked in RAM after the last job
    return optimizer


def lora_dirs() -> list[Path]:
    """Where the webui keeps LoRAs: its --lora-dir (default models/Lora)."""
    configured = getattr(getattr(shared, "cmd_opts", None), "lora_dir", None)
    return [Path(configured)] if configured else [Path(shared.models_path) / "Lora"]


def check_loras(p) -> None:
    """Warn (and go on) when a prompt's LoRA of ours does not fit the loaded checkpoint (lora_check); a failing
    check is only logged: it must never cost the user the image."""
    try:
        warn_about_loras(p, shared.sd_model, lora_dirs())
    except Exception as e:
        print(f"*** Promptist: the LoRA check failed ({type(e).__name__}: {e})", file=sys.stderr)


def optimize_and_release(p, mode: str, trim: bool) -> None:
    """Optimize the job's prompts; the policy then leaves the GPU for the sampler (vram.after_job)."""
    optimizer = loaded_optimizer()
    try:
        optimize_processing(p, optimizer, mode=mode, trim=trim)
    finally:
        after_job(shared.opts.data, optimizer_modules(optimizer))


def sampler_steps(sampler_name: str | None, steps: int) -> int:
    """Steps as the webui's prompt schedule counts them: model calls (twice the steps for 2nd-order samplers)."""
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(sampler_name)
    return config.total_steps(steps) if config is not None else steps

if IN_WEBUI:

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

        def before_process(self, p, enabled=False, *args):
            if enabled:
                plan(p, optimize=True)  # checked with the scoring models before either runs (job_models)

        def process(self, p, enabled=False, mode="beam", trim=False, *args):
            # Three independent steps: a failure in one stops the job (stop_job) but never skips another,
            # so a DF block is rendered (or reported) even when the optimizer model cannot load.
            check_loras(p)
            if not guarded(p, "checking the DF-Prompts", lambda: check_dfprompts(p)):
                return  # optimizing and rendering would only fail on the same block again
            if enabled and models_ready(p, shared.opts.data, models_dirs(shared.models_path)):
                guarded(p, "optimizing the prompt", lambda: optimize_and_release(p, mode, trim))
            guarded(p, "rendering the DF-Prompts", lambda: render_dfprompt_processing(
                p, steps=sampler_steps(p.sampler_name, p.steps),
                hires_steps=sampler_steps(getattr(p, "hr_sampler_name", None) or p.sampler_name,
                                           getattr(p, "hr_second_pass_steps", 0) or p.steps),
                old_scheduling=bool(getattr(shared.opts, "use_old_scheduling", False))))
