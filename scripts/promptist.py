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

import html
import re
import sys
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
from promptist_core.dfprompt import has_dfprompt, parse, to_a1111  # noqa: E402
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
            wanted[(text, seed)] = optimizer(text, mode=mode, seed=seed, trim_to_clip_window=trim)[0].prompt
    elif wanted:
        texts = [text for text, _ in wanted]
        for key, result in zip(wanted, optimizer(texts, mode=mode, trim_to_clip_window=trim), strict=True):
            wanted[key] = result.prompt
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
            if enabled:
                optimize_processing(p, _optimizer(), mode=mode, trim=trim)
            render_dfprompt_processing(p, steps=_sampler_steps(p.sampler_name, p.steps),
                                       hires_steps=_sampler_steps(getattr(p, "hr_sampler_name", None)
                                                                  or p.sampler_name,
                                                                  getattr(p, "hr_second_pass_steps", 0) or p.steps),
                                       old_scheduling=bool(getattr(shared.opts, "use_old_scheduling", False)))

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

        def postprocess_batch_list(self, p, pp, enabled=False, best_of_n=False, preset="promptist", *args,
                                   **kwargs):
            if not (enabled or best_of_n):
                return
            score_processing(p, pp, _scorer(preset), preset=preset, best_of_n=best_of_n,
                             batch_number=kwargs.get("batch_number", 0))

    def _optimize_for_tab(prompt: str, mode: str, candidates: int, seed: int):
        text, suffix = split_for_policy(prompt or "")
        result = _optimizer()(text, mode=mode, candidates=int(candidates), num_beams=max(8, int(candidates)),
                              seed=int(seed))[0]
        best = result.prompt + suffix
        info = f"{result.clip_tokens} CLIP tokens" + "".join(f"; {n}" for n in result.notes)
        # The webui's call wrapper appends its timing HTML to the last output.
        return best, "\n".join(result.candidates), f"<p>{html.escape(info)}</p>"

    def on_ui_tabs():
        from modules import infotext_utils

        with gr.Blocks(analytics_enabled=False) as tab:
            with gr.Row():
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
            for tabname, button in buttons.items():
                infotext_utils.register_paste_params_button(
                    infotext_utils.ParamBinding(paste_button=button, tabname=tabname, source_text_component=best))
            run.click(wrap_gradio_gpu_call(_optimize_for_tab, extra_outputs=["", ""]),
                      inputs=[prompt, mode, candidates, seed], outputs=[best, all_candidates, info])
        return [(tab, TITLE, "promptist")]

    def on_ui_settings():
        section = ("promptist", TITLE)
        shared.opts.add_option("promptist_model", shared.OptionInfo(
            DEFAULT_OPTIMIZER_MODEL, "Optimizer model (Hugging Face id or folder in extensions/promptist/models)",
            section=section))
        shared.opts.add_option("promptist_device", shared.OptionInfo(
            "gpu", "Device for the optimizer", gr.Radio, {"choices": ["gpu", "cpu"]}, section=section))
        shared.opts.add_option("promptist_mode", shared.OptionInfo(
            "beam", "Default mode", gr.Radio, {"choices": list(MODES)}, section=section))
        shared.opts.add_option("promptist_score_clip", shared.OptionInfo(
            DEFAULT_CLIP_MODEL, "Score: CLIP model (ViT-L-14/openai, or a folder in extensions/promptist/models)",
            section=section))
        shared.opts.add_option("promptist_score_aesthetic", shared.OptionInfo(
            DEFAULT_AESTHETIC_HEAD, "Score: aesthetic head (improved, laion-v1, or a file in the models folder)",
            section=section))
        shared.opts.add_option("promptist_score_pick", shared.OptionInfo(
            "", "Score: PickScore model (empty: none; the pae reward uses yuvalkirstain/PickScore_v1)",
            section=section))
        shared.opts.add_option("promptist_score_device", shared.OptionInfo(
            "gpu", "Score: device", gr.Radio, {"choices": ["gpu", "cpu"]}, section=section))

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
