"""Promptist Evaluate: plain vs policies on the graph's MODEL/CLIP/VAE, the same seeds for every variant.

A thin adapter over `trainer.evaluate.evaluate`: the graph's models become a `ComfyGenerator`, the reward
model a `_HostScorer` (loaded by ComfyUI's memory manager, run under inference mode), the policies are
loaded like Promptist Model Loader loads them. Progress advances once per image; Cancel stops between
generator calls (ComfyUI's interrupt). Returns the grid (rows = prompts, columns = variants, each cell
labelled with its score) and the table.
"""

from __future__ import annotations

import numpy as np
import torch

from promptist_core.devices import pick_dtype
from promptist_core.optimizer import load_optimizer

from . import comfy_host
from .comfy_generator import SAMPLERS, SCHEDULERS, ComfyGenerator
from .comfy_host import load_device, managed, models_dirs
from .comfy_schema import comfy_node
from .optimize import MODEL_TYPE, LoadedOptimizer
from .rewards import REWARD_TYPE, LoadedRewardModel
from .train import _HostScorer

METRICS = ["total_promptist", "aesthetic", "clip_cosine", "relevance", "pick", "total_pae"]


def _progress(total: int):
    """callback(done, total) for evaluate: ComfyUI's bar by images, and its interrupt between calls."""
    bar = comfy_host.comfy_utils.ProgressBar(total) if comfy_host.comfy_utils is not None else None

    def callback(done: int, _total: int) -> None:
        if comfy_host.model_management is not None:
            comfy_host.model_management.throw_exception_if_processing_interrupted()
        if bar is not None:
            bar.update_absolute(done, total)

    return callback


def _variants(policies: str, promptist_model: LoadedOptimizer | None):
    from trainer.evaluate import Variant, parse_variant

    compute = load_device()
    variants = []
    if promptist_model is not None:
        promptist_model.managed.load()
        variants.append(Variant(promptist_model.optimizer.name or "promptist_model",
                                optimizer=promptist_model.optimizer))
    for line in policies.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        variant = parse_variant(line.strip())
        if variant.lora is not None:
            raise ValueError(f"{line.strip()}: apply a LoRA to the MODEL with a LoRA loader and evaluate that model")
        if variant.policy is not None:  # loaded like Promptist Model Loader: CPU, compute dtype, offloadable
            try:
                variant.optimizer = load_optimizer(variant.policy, models_dir=models_dirs(), device="cpu",
                                                   dtype=pick_dtype(compute))
            except Exception as e:
                from trainer.evaluate import VariantError

                raise VariantError(f"variant {variant.name!r} ({variant.policy}): {str(e).splitlines()[0]}") from None
            managed(variant.optimizer.model, compute, "PromptistPolicy").load()
        variants.append(variant)
    return variants


class Evaluate:
    """Does it help on my model? Plain vs policies, the same seeds, scored and shown as a grid."""

    NODE_ID = "PromptistEvaluate"
    DISPLAY_NAME = "Promptist Evaluate"
    DESCRIPTION = ("Draws every prompt as typed (plain) and as each policy rewrites it, with the same seeds for every "
                   "variant, on your MODEL/CLIP/VAE; scores each image (aesthetics, CLIP relevance, PickScore when "
                   "loaded, each preset's total) and compares: mean with 95% interval and the paired win rate vs "
                   "plain with its 95% Wilson interval over prompts. Outputs the grid and the table.")
    OUTPUT_NODE = True
    OUTPUTS = [("IMAGE", "grid", "Rows = prompts (first seed), columns = variants, each cell labelled with its score."),
               ("STRING", "table", "Per variant: mean [95% CI] of each score, win rate vs plain [95% CI].")]

    @classmethod
    def inputs(cls):
        return [
            ("model", "MODEL", {"tooltip": "The diffusion model to evaluate on."}),
            ("clip", "CLIP", {"tooltip": "Its text encoder (DF-Prompts are encoded per segment)."}),
            ("vae", "VAE", {"tooltip": "Its VAE."}),
            (REWARD_TYPE.lower(), REWARD_TYPE, {"tooltip": "From Promptist Reward Model Loader."}),
            ("prompts", "STRING", {"multiline": True, "default": "a cat riding a bike\na red horse on the grass\n"
                                                                 "a castle on a hill\na bowl of fruit",
                                   "tooltip": "Plain prompts, one per line."}),
            ("policies", "STRING", {"multiline": True, "default": "promptist-mini",
                                    "tooltip": "One variant per line: a policy name or folder in models/promptist, "
                                               "with options after commas, e.g. 'my-sft,mode=diverse' or "
                                               "'promptist-mini,mode=sample,seed=1,name=sampled'. plain is always "
                                               "included."}),
            ("seeds", "INT", {"default": 2, "min": 1, "max": 64,
                              "tooltip": "Seeds per prompt, shared by every variant (paired comparison)."}),
            ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                             "tooltip": "Seed of the image seeds: keep it to compare runs."}),
            ("sampler_name", SAMPLERS, {"default": "euler" if "euler" in SAMPLERS else SAMPLERS[0]}),
            ("scheduler", SCHEDULERS, {"default": "normal" if "normal" in SCHEDULERS else SCHEDULERS[0]}),
            ("steps", "INT", {"default": 20, "min": 1, "max": 10000}),
            ("cfg", "FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
            ("width", "INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            ("height", "INT", {"default": 512, "min": 64, "max": 4096, "step": 8}),
            ("metric", METRICS, {"default": "total_promptist",
                                 "tooltip": "The score on the grid and for the win rates (pick and total_pae need "
                                            "PickScore loaded)."}),
            ("baseline", "STRING", {"default": "", "optional": True,
                                    "tooltip": "Also compare every variant with this one (its name), e.g. "
                                               "promptist-mini."}),
            ("negative", "STRING", {"multiline": True, "default": "", "optional": True}),
            ("promptist_model", MODEL_TYPE, {"optional": True, "tooltip": "A loaded policy, as one more variant."}),
        ]

    @staticmethod
    def run(model, clip, vae, promptist_reward_model: LoadedRewardModel, prompts: str = "",
            policies: str = "promptist-mini", seeds: int = 2, seed: int = 0, sampler_name: str = "euler",
            scheduler: str = "normal", steps: int = 20, cfg: float = 7.5, width: int = 512, height: int = 512,
            metric: str = "total_promptist", baseline: str | None = "", negative: str | None = "",
            promptist_model: LoadedOptimizer | None = None):
        from trainer.evaluate import evaluate, format_table, make_grid

        # 1. check inputs; the variants are loaded and checked (by evaluate too) before any image
        lines = [line.strip() for line in prompts.splitlines() if line.strip()]
        if not lines:
            raise ValueError("prompts is empty: give plain prompts, one per line")
        variants = _variants(policies, promptist_model)
        generator = ComfyGenerator(model, clip, vae, sampler_name=sampler_name, scheduler=scheduler,
                                   negative=negative or "")
        total = len(lines) * seeds * (len(variants) + (0 if any(v.name == "plain" for v in variants) else 1))
        # 2. evaluate (images under inference mode, as ComfyUI runs its nodes)
        result = evaluate(lines, variants, generator, _HostScorer(promptist_reward_model), seeds, seed=seed,
                          steps=steps, guidance=cfg, size=(width, height), metric=metric,
                          baseline=(baseline or "").strip() or None, progress=_progress(total))
        grid = make_grid(result)
        image = torch.from_numpy(np.asarray(grid.convert("RGB"), dtype=np.float32) / 255.0)[None]
        return (image, format_table(result))


NODES = [comfy_node(Evaluate)]
