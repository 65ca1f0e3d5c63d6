"""AUTOMATIC1111 / Forge extension: a "Promptist" tab and an always-visible "Optimize prompt" option.

A1111 executes this file by path. The processing hooks (`optimize_processing`) are plain functions
over the processing object `p`, so they work without the webui (tests call them directly); the
webui classes and callbacks are defined only when `modules` (the webui) is importable.
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

from promptist_core.optimizer import MODES, PromptOptimizer, load_optimizer  # noqa: E402
from promptist_core.weights import DEFAULT_OPTIMIZER_MODEL  # noqa: E402

TITLE = "Promptist"
# LoRA / hypernetwork / extra-network tags pass through untouched: the policy never saw them.
EXTRA_NETWORK_TAG = re.compile(r"<[^<>]+>")
INFOTEXT_ORIGINAL = "Promptist original"
INFOTEXT_MODE = "Promptist mode"


def split_extra_networks(prompt: str) -> tuple[str, str]:
    """('a cat <lora:x:1>') -> ('a cat', '<lora:x:1>'): text for the policy, tags to re-append."""
    tags = " ".join(EXTRA_NETWORK_TAG.findall(prompt))
    text = re.sub(r"\s{2,}", " ", EXTRA_NETWORK_TAG.sub(" ", prompt)).strip(" ,")
    return text, tags


def optimize_prompts(optimizer: PromptOptimizer, prompts: list[str], *, mode: str = "beam",
                     seeds: list[int] | None = None, trim: bool = False) -> list[str]:
    """Rewrite each prompt once per distinct (prompt, seed); extra-network tags are kept as they were."""
    seeds = seeds if (seeds is not None and mode == "sample") else [None] * len(prompts)
    wanted = {}
    for prompt, seed in zip(prompts, seeds, strict=True):
        text, _ = split_extra_networks(prompt)
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
        text, tags = split_extra_networks(prompt)
        rewritten.append(" ".join(s for s in (wanted[(text, seed)], tags) if s) if text else prompt)
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
            if not enabled:
                return
            optimize_processing(p, _optimizer(), mode=mode, trim=trim)

    def _optimize_for_tab(prompt: str, mode: str, candidates: int, seed: int):
        text, tags = split_extra_networks(prompt or "")
        result = _optimizer()(text, mode=mode, candidates=int(candidates), num_beams=max(8, int(candidates)),
                              seed=int(seed))[0]
        best = " ".join(s for s in (result.prompt, tags) if s)
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

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_ui_settings(on_ui_settings)
