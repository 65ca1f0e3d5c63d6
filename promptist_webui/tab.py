"""The Promptist tab (Optimize, Train SFT, Train PPO, Train TPO, Evaluate) and the settings page: the webui's UI over the
functions of `optimize`, `score`, `train` and `evaluate`, bound to the webui's `shared` objects. Used only inside the
webui (the entry registers `on_ui_tabs` and `on_ui_settings`)."""

from __future__ import annotations

import functools
import html
from pathlib import Path

from promptist_core.aesthetic import DEFAULT_AESTHETIC_HEAD
from promptist_core.clip_models import DEFAULT_CLIP_MODEL
from promptist_core.dfprompt import DFPromptError
from promptist_core.optimizer import MODES
from promptist_core.rewards import PRESET_NAMES
from promptist_core.weights import DEFAULT_OPTIMIZER_MODEL

from .errors import PromptistError, as_user_error, dfprompt_message, shown_in_ui
from .evaluate import METRICS, PROMPT_SETS, default_out, evaluate_in_webui
from .host import (
    devices,
    ensure_temp_dir,
    expose_to_options_api,
    gr,
    models_dirs,
    shared,
    wrap_gradio_gpu_call,
)
from .infotext import TITLE
from .optimize import clean_rewrite, loaded_optimizer, sampler_steps, split_for_policy, unique
from .score import loaded_scorer
from .tpo import SOURCES as TPO_SOURCES
from .tpo import lora_dir, train_tpo_in_webui
from .train import TRAIN_BASE, WebuiGenerator, policy_names, train_ppo_in_webui, train_sft_in_webui
from .vram import KEEP_LABEL, KEEP_SETTING, releasing

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
    (KEEP_SETTING, False, KEEP_LABEL, ()),
)


def _optimize_for_tab(prompt: str, mode: str, candidates: int, seed: int):
    try:
        text, suffix = split_for_policy(prompt or "")
    except DFPromptError as e:  # shown as HTML by the webui's call wrapper: one line, place marked
        raise PromptistError(f"DF-Prompt error, {dfprompt_message(e)}", status_code=422) from e
    result = loaded_optimizer()(text, mode=mode, candidates=int(candidates), num_beams=max(8, int(candidates)),
                          seed=int(seed))[0]
    best = clean_rewrite(result.prompt) + suffix
    info = f"{result.clip_tokens} CLIP tokens" + "".join(f"; {n}" for n in result.notes)
    # The webui's call wrapper appends its timing HTML to the last output.
    return best, "\n".join(unique(clean_rewrite(c) for c in result.candidates)), f"<p>{html.escape(info)}</p>"

def _opts() -> dict:
    return shared.opts.data


def _button_call(func, extra_outputs: list, **release):
    """A button's function as the webui queues it: the user's own errors shown in the UI with one console line,
    and Promptist's models off the GPU when it ends (vram.releasing)."""
    return wrap_gradio_gpu_call(shown_in_ui(releasing(_opts, func, **release), extra_outputs),
                                extra_outputs=extra_outputs)

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

def _generator(sampler_name: str, negative: str, **options) -> WebuiGenerator:
    """The webui's txt2img with the loaded checkpoint as an image generator."""
    from modules import processing

    if not shared.sd_model:
        raise PromptistError("No Stable Diffusion checkpoint is loaded: choose one at the top of the page")
    checkpoint = getattr(getattr(shared.sd_model, "sd_checkpoint_info", None), "name_for_extra", "")
    return WebuiGenerator(processing, shared.state, sampler_name=sampler_name, negative=negative or "",
                          schedule_steps=lambda n: sampler_steps(sampler_name, n), checkpoint=checkpoint, **options)

def _scorer(preset: str):
    try:
        return loaded_scorer(preset)
    except Exception as e:
        raise as_user_error(e, "loading the scoring models (Settings → Promptist → Score)") from e

def _train_ppo(id_task, policy, prompts, prompts_file, save_name, iterations, batch_size, images_per_prompt,
               sampler_name, steps, cfg, width, height, negative, preset, lr, beta, trainable_top_blocks, seed,
               save_every, dfprompt=False):
    generator, scorer = _generator(sampler_name, negative), _scorer(preset)
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
    run.click(_button_call(_train_sft, [None]), _js="promptistStartTraining_sft",
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
    run.click(_button_call(_train_ppo, [None]), _js="promptistStartTraining_ppo",
              inputs=[task, policy, prompts, prompts_file, save_name, iterations, batch, images, sampler, steps,
                      cfg, width, height, negative, preset, lr, beta, top, seed, save_every, dfprompt],
              outputs=[curve, status])

def _train_tpo(id_task, source, prompts, folder, save_name, loss, steps, rank, beta, lr, batch_size, grad_accum,
               resolution, seed, save_every, negatives_per_caption, valid_fraction, sampler_name, image_steps, cfg):
    generator = _generator(sampler_name, "")
    return train_tpo_in_webui(shared.state, _loaded_model, generator, _train_root(),
                              lora_dir(shared.cmd_opts, shared.models_path), source=source, prompts=prompts,
                              folder=folder, save_name=save_name, loss=loss, steps=steps, rank=rank, beta=beta, lr=lr,
                              batch_size=batch_size, grad_accum=grad_accum, resolution=resolution, seed=seed,
                              save_every=save_every, negatives_per_caption=negatives_per_caption,
                              valid_fraction=valid_fraction, image_steps=image_steps, cfg=cfg, device=devices.device)

def _loaded_model():
    """The webui's model; Forge loads the selected checkpoint at the first job (before it: a placeholder)."""
    try:
        from modules import sd_models
    except ImportError:  # a webui without it (tests' fake webui)
        sd_models = None
    if hasattr(sd_models, "forge_model_reload"):
        sd_models.forge_model_reload()
    return shared.sd_model

def _tpo_section():
    from modules import sd_samplers

    samplers = [s.name for s in sd_samplers.visible_samplers()] or ["Euler a"]
    gr.HTML("<p>Trains a LoRA of the loaded checkpoint so that it follows captions (TPO: TDPO/TKTO on each "
            "image's caption against an edited caption that no longer fits it). The images are drawn once from "
            "your prompts by this checkpoint, or read from a folder of images with same-name .txt captions. "
            "Saves models/Lora/&lt;save name&gt;.safetensors: use it as &lt;lora:save name:1&gt;. The webui is "
            "busy while training; Interrupt saves a checkpoint; Train again with the same save name continues."
            "</p>")
    with gr.Row():
        with gr.Column():
            task = gr.Textbox(visible=False)
            source = gr.Radio(label="Images from", choices=list(TPO_SOURCES), value="prompts")
            prompts = gr.Textbox(label="Captions: prompts to draw, one per line (Images from: prompts)", lines=4,
                                 value="a red car on a street\na blue house in a field\ntwo cats on a sofa\n"
                                       "a dog left of a tree")
            folder = gr.Textbox(label="Image folder with same-name .txt captions: full path (Images from: folder)")
            save_name = gr.Textbox(label="Save name (models/Lora/<save name>.safetensors)", value="my-tpo")
            with gr.Row():
                loss = gr.Radio(label="Loss", choices=["tdpo", "tkto"], value="tdpo")
                steps = gr.Number(label="Steps", value=500, precision=0)
                rank = gr.Number(label="LoRA rank", value=8, precision=0)
            with gr.Row():
                lr = gr.Number(label="LoRA learning rate", value=1e-5)
                beta = gr.Number(label="Beta (0: tdpo 5000, tkto 1000)", value=0)
                resolution = gr.Number(label="Resolution (SD 1.x: 512, SDXL: 1024)", value=512, precision=0)
            with gr.Row():
                batch = gr.Number(label="Caption pairs per batch", value=4, precision=0)
                accum = gr.Number(label="Batches per step", value=4, precision=0)
                save_every = gr.Number(label="Save every (steps)", value=100, precision=0)
            with gr.Row():
                negatives = gr.Number(label="Edited captions per caption", value=2, precision=0)
                valid = gr.Number(label="Held-out share of captions", value=0.1)
                seed = gr.Number(label="Seed", value=0, precision=0)
            with gr.Row():
                sampler = gr.Dropdown(label="Sampler (drawing the images)", choices=samplers, value=samplers[0])
                image_steps = gr.Number(label="Sampling steps", value=20, precision=0)
                cfg = gr.Number(label="CFG scale", value=7.0)
            with gr.Row():
                run = gr.Button("Train TPO", variant="primary", elem_id="promptist_tpo_train")
                stop = gr.Button("Interrupt (saves a checkpoint)", elem_id="promptist_tpo_interrupt")
        curve, status = _train_outputs("tpo")
    stop.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
    run.click(_button_call(_train_tpo, [None]), _js="promptistStartTraining_tpo",
              inputs=[task, source, prompts, folder, save_name, loss, steps, rank, beta, lr, batch, accum,
                      resolution, seed, save_every, negatives, valid, sampler, image_steps, cfg],
              outputs=[curve, status])

def _evaluate(id_task, prompts, prompt_set, count, policies, seeds, seed, sampler_name, steps, cfg, width, height,
              negative, metric, baseline, out_folder):
    generator = _generator(sampler_name, negative, stop_on_interrupt=True)
    out = Path(out_folder).expanduser() if (out_folder or "").strip() else default_out(getattr(shared, "data_path", None))
    return evaluate_in_webui(shared.state, generator, _scorer("promptist"), out, prompts=prompts,
                             prompt_set=prompt_set, count=count, policies=policies, seeds=seeds, seed=seed,
                             steps=steps, cfg=cfg, width=width, height=height, metric=metric, baseline=baseline,
                             models_dir=models_dirs(shared.models_path), device=_train_device())

def _evaluate_section():
    from modules import sd_samplers

    samplers = [s.name for s in sd_samplers.visible_samplers()] or ["Euler a"]
    gr.HTML("<p>Does it help on my model? Draws every prompt as typed (plain) and as each policy rewrites it, "
            "with the same seeds for every variant, with the loaded checkpoint; scores each image with the models "
            "of Settings → Promptist → Score. The table gives each score's mean [95% interval] and the paired win "
            "rate vs plain. The webui is busy meanwhile; Interrupt stops between images and shows the prompts "
            "whose images were all drawn.</p>")
    with gr.Row():
        with gr.Column():
            task = gr.Textbox(visible=False)
            prompts = gr.Textbox(label="Plain prompts, one per line", lines=4,
                                 value="a cat riding a bike\na red horse on the grass\na castle on a hill\n"
                                       "a bowl of fruit")
            with gr.Row():
                prompt_set = gr.Dropdown(label="Prompts from (coco, diffusiondb: shipped held-out sets)",
                                         choices=list(PROMPT_SETS), value="typed")
                count = gr.Number(label="Prompts from the set", value=16, precision=0)
            policies = gr.Textbox(label="Policies, one per line: a name or folder, options after commas "
                                        "(my-ppo,mode=sample,seed=1,name=sampled); plain is always included",
                                  lines=3, value="promptist-mini")
            with gr.Row():
                seeds = gr.Number(label="Seeds per prompt", value=2, precision=0)
                seed = gr.Number(label="Seed", value=0, precision=0)
                sampler = gr.Dropdown(label="Sampler", choices=samplers, value=samplers[0])
            with gr.Row():
                steps = gr.Number(label="Sampling steps", value=20, precision=0)
                cfg = gr.Number(label="CFG scale", value=7.0)
                width = gr.Number(label="Width", value=512, precision=0)
                height = gr.Number(label="Height", value=512, precision=0)
            with gr.Row():
                metric = gr.Dropdown(label="Metric (grid, win rates; pick, total_pae need PickScore)",
                                     choices=list(METRICS), value="total_promptist")
                baseline = gr.Textbox(label="Baseline: also compare with this variant (its name)", value="")
            negative = gr.Textbox(label="Negative prompt for every image", value="")
            out_folder = gr.Textbox(label="Output folder (empty: outputs/promptist-eval/<time>)", value="")
            with gr.Row():
                run = gr.Button("Evaluate", variant="primary", elem_id="promptist_eval_run")
                stop = gr.Button("Interrupt", elem_id="promptist_eval_interrupt")
        with gr.Column():
            gr.HTML(elem_id="promptist_eval_progress")
            status = gr.HTML(elem_id="promptist_eval_output")
            grid = gr.Image(label="Grid: rows = prompts (first seed), columns = variants", type="pil",
                            interactive=False, elem_id="promptist_eval_grid")
            table = gr.Textbox(label="Table", lines=8, interactive=False, elem_id="promptist_eval_table")
    stop.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
    run.click(_button_call(_evaluate, [None, ""], policies_back=True), _js="promptistStartEvaluate",
              inputs=[task, prompts, prompt_set, count, policies, seeds, seed, sampler, steps, cfg, width, height,
                      negative, metric, baseline, out_folder], outputs=[grid, table, status])

def on_ui_tabs():
    from modules import infotext_utils

    ensure_temp_dir()

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
        with gr.Tab("Train TPO (LoRA)"):
            _tpo_section()
        with gr.Tab("Evaluate"):
            _evaluate_section()
        for tabname, button in buttons.items():
            infotext_utils.register_paste_params_button(
                infotext_utils.ParamBinding(paste_button=button, tabname=tabname, source_text_component=best))
        run.click(_button_call(_optimize_for_tab, ["", ""]),
                  inputs=[prompt, mode, candidates, seed], outputs=[best, all_candidates, info])
    return [(tab, TITLE, "promptist")]

def _policy_choices() -> dict:
    """The optimizer model's dropdown: policy folders (a trained run is listed after 🔄) and the current value.
    Only `choices`: the refresh button passes these to `gr.Dropdown.update`, which takes no more in gradio 3."""
    current = shared.opts.data.get("promptist_model") or DEFAULT_OPTIMIZER_MODEL
    return {"choices": policy_names(models_dirs(shared.models_path), (DEFAULT_OPTIMIZER_MODEL, current))}

def on_ui_settings():
    options = {}
    for key, default, label, choices in SETTINGS:
        component, args, extra = (gr.Radio, {"choices": list(choices)}, {}) if choices else (None, None, {})
        if key == "promptist_model":
            component = functools.partial(gr.Dropdown, allow_custom_value=True)  # a Hub id may be typed
            args, extra = _policy_choices, {"refresh": lambda: None}
        options[key] = shared.OptionInfo(default, label, component, args, section=SETTINGS_SECTION,
                                         category_id=SETTINGS_CATEGORY, **extra)
        shared.opts.add_option(key, options[key])
    expose_to_options_api(options)
