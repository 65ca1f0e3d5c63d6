"""Promptist Reward Model Loader -> Promptist Score Images: score a batch, keep the best of N."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from promptist_core.aesthetic import KNOWN_AESTHETIC_HEADS, looks_like_head_file
from promptist_core.clip_models import DEFAULT_CLIP_MODEL, DEFAULT_PICKSCORE_MODEL
from promptist_core.devices import DEVICE_CHOICES, pick_dtype
from promptist_core.rewards import PRESETS, RewardPreset, RewardScorer, format_table, load_scorer

from .comfy_host import ManagedModel, load_device, managed, models_dirs
from .comfy_schema import comfy_node

REWARD_TYPE = "PROMPTIST_REWARD_MODEL"
NO_PICK = "none"
CUSTOM = "custom"


@dataclass
class LoadedRewardModel:
    """What travels on a PROMPTIST_REWARD_MODEL wire: the scorer and its memory-manager handles."""

    scorer: RewardScorer
    managed: list[ManagedModel]

    def load(self) -> None:
        for m in self.managed:
            m.load()


def _clip_folders() -> list[str]:
    """Sub-folders of models/promptist holding a CLIP: open_clip's Hub layout or a transformers CLIPModel."""
    names = []
    for d in models_dirs():
        if not d.is_dir():
            continue
        for folder in sorted(p for p in d.iterdir() if p.is_dir()):
            if (folder / "open_clip_config.json").is_file() or _is_transformers_clip(folder):
                names.append(folder.name)
    return list(dict.fromkeys(names))


def _is_transformers_clip(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


def _head_files() -> list[str]:
    names = []
    for d in models_dirs():
        if d.is_dir():
            names += sorted(p.name for p in d.iterdir() if p.is_file() and looks_like_head_file(p))
    return [n for n in dict.fromkeys(names) if n not in KNOWN_AESTHETIC_HEADS]


class RewardModelLoader:
    """Load CLIP ViT-L/14, a LAION aesthetic head and optionally PickScore."""

    NODE_ID = "PromptistRewardModelLoader"
    DISPLAY_NAME = "Promptist Reward Model Loader"
    DESCRIPTION = ("Loads the reward models: CLIP ViT-L/14 (relevance and the aesthetic head's input), a LAION "
                   "aesthetic head, and optionally PickScore. Files go in ComfyUI/models/promptist/ (known ones "
                   "are downloaded there once unless offline).")
    OUTPUTS = [(REWARD_TYPE, "reward_model", "For Promptist Score Images.")]

    @classmethod
    def inputs(cls):
        # A method, not a constant: the file lists are read again each time the UI asks.
        clips = _clip_folders()
        return [
            ("clip_model", list(dict.fromkeys([DEFAULT_CLIP_MODEL, "openai/clip-vit-large-patch14", *clips])),
             {"default": DEFAULT_CLIP_MODEL,
              "tooltip": "ViT-L-14/openai: OpenAI's ViT-L/14 via open_clip (files from "
                         "timm/vit_large_patch14_clip_224.openai). Or a CLIP folder in models/promptist."}),
            ("aesthetic_head", ["improved", "laion-v1", *_head_files()],
             {"default": "improved",
              "tooltip": "improved: sac+logos+ava1-l14-linearMSE.pth (MLP); laion-v1: sa_0_4_vit_l_14_linear.pth "
                         "(linear). Both need ViT-L/14 embeddings."}),
            ("pick_model", list(dict.fromkeys([NO_PICK, DEFAULT_PICKSCORE_MODEL, *clips])),
             {"default": NO_PICK, "tooltip": "PickScore's CLIP-H (needed by the pae preset), or none."}),
            ("device", list(DEVICE_CHOICES),
             {"default": "auto",
              "tooltip": "auto/gpu: ComfyUI's device, offloaded when VRAM is needed; cpu: stay on CPU."}),
        ]

    @staticmethod
    def run(clip_model: str = DEFAULT_CLIP_MODEL, aesthetic_head: str = "improved", pick_model: str = NO_PICK,
            device: str = "auto"):
        compute = load_device() if device != "cpu" else torch.device("cpu")
        dirs = models_dirs()
        # Load on the CPU in the compute dtype; ComfyUI's memory manager moves the models when used.
        dtype = pick_dtype(compute)
        scorer = load_scorer(clip_model, aesthetic_head, pick_model=None if pick_model == NO_PICK else pick_model,
                             models_dir=dirs, device="cpu", dtype=dtype)
        handles = [managed(scorer.clip.module, compute, "PromptistRewardCLIP")]
        if scorer.pick is not None:
            handles.append(managed(scorer.pick.module, compute, "PromptistPickScore"))
        return (LoadedRewardModel(scorer, handles),)


class ScoreImages:
    """Score a batch of images against the user's prompt; re-order it best first."""

    NODE_ID = "PromptistScoreImages"
    DISPLAY_NAME = "Promptist Score Images"
    DESCRIPTION = ("Scores each image: CLIP relevance to your plain prompt, aesthetics (minus the plain prompt's "
                   "images when given: Promptist's delta) and PickScore (pae). Outputs the mean reward, a table, "
                   "the batch sorted best first and the best image's index: keep the best of N.")
    INPUTS = [
        (REWARD_TYPE.lower(), REWARD_TYPE, {"tooltip": "From Promptist Reward Model Loader."}),
        ("images", "IMAGE", {"tooltip": "The images to score (e.g. made from the optimized prompt)."}),
        ("prompt", "STRING", {"multiline": True, "default": "a cat riding a bike",
                              "tooltip": "Your plain prompt: relevance is measured against it. One line for all "
                                         "images, or one line per image."}),
        ("preset", [*PRESETS, CUSTOM],
         {"default": "promptist",
          "tooltip": "promptist: aesthetic delta + relevance min(20*cos-5.6, 0). pae: aesthetics + relevance + "
                     "min(pick-18, 0), needs PickScore. custom: the weights below."}),
        ("aesthetic_weight", "FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05,
                                       "tooltip": "custom preset only: weight of the aesthetic term."}),
        ("relevance_weight", "FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05,
                                       "tooltip": "custom preset only: weight of the relevance term."}),
        ("pick_weight", "FLOAT", {"default": 0.0, "min": -100.0, "max": 100.0, "step": 0.05,
                                  "tooltip": "custom preset only: weight of min(pick - 18, 0)."}),
        ("plain_images", "IMAGE", {"optional": True,
                                   "tooltip": "Images of the plain prompt (same seeds): the aesthetic term becomes "
                                              "aes(image) - aes(plain image), as in Promptist."}),
    ]
    OUTPUTS = [("FLOAT", "mean_reward", "The mean total reward of the batch."),
               ("STRING", "scores", "One row per image (index in the input batch): total and its terms."),
               ("IMAGE", "images_best_first", "The batch sorted by total reward, best first."),
               ("INT", "best_index", "Index of the best image in the input batch.")]

    @staticmethod
    def validate(prompt: str | None = None) -> bool | str:
        # Only `prompt`: ComfyUI checks the other inputs (ranges, the preset combo) itself.
        if isinstance(prompt, str) and not prompt.strip():
            return "prompt is empty: relevance needs the prompt the images should show"
        return True

    @staticmethod
    def run(promptist_reward_model: LoadedRewardModel, images: torch.Tensor, prompt: str,
            preset: str = "promptist", aesthetic_weight: float = 1.0, relevance_weight: float = 1.0,
            pick_weight: float = 0.0, plain_images: torch.Tensor | None = None):
        lines = [line.strip() for line in prompt.splitlines() if line.strip()] or [prompt]
        chosen = (RewardPreset(CUSTOM, aesthetic_weight=aesthetic_weight, relevance_weight=relevance_weight,
                               pick_weight=pick_weight) if preset == CUSTOM else preset)
        promptist_reward_model.load()
        scores = promptist_reward_model.scorer(images, lines, baseline_images=plain_images, preset=chosen)
        order = sorted(range(len(scores)), key=lambda i: scores[i].total, reverse=True)
        table = format_table(scores)
        if plain_images is None and (preset == CUSTOM or PRESETS[preset].aesthetic_delta):
            table += "\n(no plain_images: the aesthetic term is the absolute score)"
        mean = sum(s.total for s in scores) / len(scores)
        best_first = images[torch.tensor(order, device=images.device)]
        return (float(mean), table, best_first, int(order[0]))


NODES = [comfy_node(RewardModelLoader), comfy_node(ScoreImages)]
