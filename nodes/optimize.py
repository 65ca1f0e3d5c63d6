"""Promptist Model Loader -> Promptist Optimize Prompt: rewrite a prompt inside a ComfyUI graph."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from promptist_core.devices import DEVICE_CHOICES, pick_dtype
from promptist_core.dfprompt import to_plain
from promptist_core.dfprompt_policy import HEAD_CHOICES
from promptist_core.fingerprint import contents_fingerprint
from promptist_core.optimizer import MODES, PromptOptimizer, causal_lm_problem, load_optimizer
from promptist_core.weights import (
    DEFAULT_OPTIMIZER_MODEL,
    UnfinishedRunError,
    resolve,
    unfinished_run_checkpoint,
)

from .comfy_host import ManagedModel, list_model_folders, load_device, managed, models_dirs, step_progress
from .comfy_schema import comfy_node

MODEL_TYPE = "PROMPTIST_MODEL"
BATCH_SIZE = 16
OUTPUTS = ("dfprompt", "plain")  # a DF-Prompt policy's rewrite: with its blocks, or as plain text
RESUME_IN_COMFYUI = "queue the graph with its Train node (Promptist SFT or PPO Train) again with the same save name"
KEEP_PROMPT = {"policy default": None, "keep": True, "rewrite": False}


@dataclass
class LoadedOptimizer:
    """What travels on a PROMPTIST_MODEL wire: the policy and its memory-manager handle."""

    optimizer: PromptOptimizer
    managed: ManagedModel


class ModelLoader:
    """Load a Promptist policy (GPT-2) from models/promptist or the Hugging Face cache."""

    NODE_ID = "PromptistModelLoader"
    DISPLAY_NAME = "Promptist Model Loader"
    DESCRIPTION = ("Loads a prompt-optimizer policy: microsoft/Promptist (the paper's, downloaded once), "
                   "promptist-mini (bundled: small, offline, keeps your prompt and adds modifiers), or a model "
                   "folder (config.json, model.safetensors, tokenizer files) in ComfyUI/models/promptist/.")
    OUTPUTS = [(MODEL_TYPE, "promptist_model", "The loaded policy, for Promptist Optimize Prompt.")]

    @classmethod
    def inputs(cls):
        # A method, not a constant: the folder list is read again each time the UI asks.
        return [
            # Unfinished runs too (a Train node's save name, stopped before its first model): queued, they say
            # how to finish them or load their last checkpoint.
            ("model_name", list_model_folders(DEFAULT_OPTIMIZER_MODEL, lambda p: causal_lm_problem(p) is None
                                              or unfinished_run_checkpoint(p) is not None),
             {"default": DEFAULT_OPTIMIZER_MODEL,
              "tooltip": "microsoft/Promptist (from models/promptist/Promptist, the Hugging Face cache, or downloaded "
                         "once unless offline), promptist-mini (bundled with the pack, works offline), or a "
                         "causal-LM folder in models/promptist."}),
            ("device", list(DEVICE_CHOICES),
             {"default": "auto",
              "tooltip": "auto/gpu: ComfyUI's device, offloaded when VRAM is needed; cpu: stay on CPU."}),
        ]

    @staticmethod
    def fingerprint(model_name: str = DEFAULT_OPTIMIZER_MODEL, **inputs) -> str:
        """The model folder's contents: a folder retrained since the last run (by the PPO node of this graph, or
        from the command line) loads again, an unchanged one stays cached."""
        try:
            folder = resolve(model_name, models_dir=models_dirs(), allow_download=False)
        except (OSError, ValueError) as e:  # not there (yet): run, and let the loader say what is missing
            return f"{model_name}: {type(e).__name__}"
        return f"{folder.resolve()}:{contents_fingerprint(folder)}"

    @staticmethod
    def run(model_name: str, device: str = "auto"):
        compute = load_device() if device != "cpu" else torch.device("cpu")
        # Load on the CPU in the compute dtype; ComfyUI's memory manager moves it when it is used.
        try:
            optimizer = load_optimizer(model_name, models_dir=models_dirs(), device="cpu", dtype=pick_dtype(compute))
        except UnfinishedRunError as e:
            raise e.with_resume(RESUME_IN_COMFYUI) from None
        return (LoadedOptimizer(optimizer, managed(optimizer.model, compute, "PromptistPolicy")),)


class OptimizePrompt:
    """Rewrite a plain prompt into a Stable-Diffusion-friendly one."""

    NODE_ID = "PromptistOptimizePrompt"
    DISPLAY_NAME = "Promptist Optimize Prompt"
    DESCRIPTION = ("Rewrites the prompt with the Promptist policy (beam: the paper's recipe; diverse: distinct "
                   "candidates; sample: random, seeded). Outputs the best rewrite and all candidates.")
    INPUTS = [
        (MODEL_TYPE.lower(), MODEL_TYPE, {"tooltip": "From Promptist Model Loader."}),
        ("text", "STRING", {"multiline": True, "default": "a cat riding a bike",
                            "tooltip": "Your plain prompt. One rewrite per line if several lines."}),
        ("mode", list(MODES), {"default": "beam",
                               "tooltip": "beam: 8 beams, length penalty -1 (the paper). diverse: group beam "
                                          "search, one beam per group. sample: top-k/top-p with the seed."}),
        ("candidates", "INT", {"default": 1, "min": 1, "max": 16, "step": 1,
                               "tooltip": "How many rewrites to return, best first."}),
        # No "randomize after each run" control (the frontend adds one to any input named seed unless told
        # False): beam and diverse ignore the seed, and a changed seed would re-run this node and the graph.
        ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                         "tooltip": "sample mode only: the same seed gives the same rewrites; change it for "
                                    "new ones. beam and diverse ignore it."}),
        ("max_new_tokens", "INT", {"default": 75, "min": 1, "max": 256, "step": 1,
                                   "tooltip": "Longest rewrite, in GPT-2 tokens (the paper uses 75)."}),
        ("trim_to_clip", "BOOLEAN", {"default": False,
                                     "tooltip": "Cut the best rewrite at a comma to fit CLIP's 75-token window."}),
        # A DF-Prompt policy only (a folder with dfprompt_heads.safetensors); last and optional, so saved graphs
        # without them keep their widget values.
        ("head_choice", list(HEAD_CHOICES), {"default": "argmax", "optional": True,
                                             "tooltip": "DF-Prompt policy only: each modifier's weight and range "
                                                        "are the heads' most likely (argmax) or drawn from them "
                                                        "with the seed (sample)."}),
        ("output", list(OUTPUTS), {"default": "dfprompt", "optional": True,
                                   "tooltip": "DF-Prompt policy only. dfprompt: '[text:a-b:w]' blocks, for Promptist "
                                              "DF-Prompt Encode. plain: the same modifiers without weights and "
                                              "ranges, for CLIP Text Encode. A plain policy's rewrite is plain "
                                              "either way."}),
        ("keep_prompt", list(KEEP_PROMPT), {"default": "policy default", "optional": True,
                                            "tooltip": "keep: every rewrite starts with your prompt verbatim and the "
                                                       "policy only adds to it. rewrite: the policy may reword it "
                                                       "(microsoft/Promptist's recipe). policy default: keep for "
                                                       "promptist-mini, rewrite for microsoft/Promptist."}),
    ]
    OUTPUTS = [("STRING", "prompt", "The best rewrite (one per input line); a DF-Prompt policy's is a DF-Prompt "
                                    "(output: dfprompt), for Promptist DF-Prompt Encode."),
               ("STRING", "candidates", "All candidates, one per line, best first.")]

    @staticmethod
    def run(promptist_model: LoadedOptimizer, text: str, mode: str = "beam", candidates: int = 1, seed: int = 0,
            max_new_tokens: int = 75, trim_to_clip: bool = False, head_choice: str = "argmax",
            output: str = "dfprompt", keep_prompt: str = "policy default"):
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {', '.join(OUTPUTS)}; got {output!r}")
        if keep_prompt not in KEEP_PROMPT:
            raise ValueError(f"keep_prompt must be one of {', '.join(KEEP_PROMPT)}; got {keep_prompt!r}")
        prompts = [line for line in text.splitlines() if line.strip()] or [text]
        generate_calls = len(prompts) if mode == "sample" else math.ceil(len(prompts) / BATCH_SIZE)
        promptist_model.managed.load()
        results = promptist_model.optimizer(
            prompts, mode=mode, candidates=candidates, num_beams=max(8, candidates), seed=seed,
            max_new_tokens=max_new_tokens, trim_to_clip_window=trim_to_clip, batch_size=BATCH_SIZE,
            step_callback=step_progress(max_new_tokens * generate_calls), head_choice=head_choice,
            keep_prompt=KEEP_PROMPT[keep_prompt],
        )
        shown = to_plain if output == "plain" else str
        best = "\n".join(shown(r.prompt) if r.dfprompt else r.prompt for r in results)
        everything = "\n".join(shown(c) if r.dfprompt else c for r in results for c in r.candidates)
        return (best, everything)


NODES = [comfy_node(ModelLoader), comfy_node(OptimizePrompt)]
