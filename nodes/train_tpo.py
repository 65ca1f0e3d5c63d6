"""Promptist TPO Train (LoRA): TDPO / TKTO on the graph's own MODEL, CLIP and VAE.

The node turns what the user has (an IMAGE batch with captions, an image folder with same-name .txt
captions, or prompts the graph's model draws once) into a TPO data folder inside the run folder
(models/promptist/<save name>/data, the format of `python -m trainer tpo-data`), with negatives from
the rules editor or given by hand. It then runs the headless `train_tpo` through `ComfyDenoiser` (a
clone of MODEL carrying the LoRA as weight wrappers) under `torch.inference_mode(False)`, and writes
the LoRA into ComfyUI's `loras` folder under kohya diffusers-style names, so LoraLoader, A1111 and
diffusers load it. Cancel saves a checkpoint; queueing again with the same save name continues.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from . import comfy_host
from .comfy_denoiser import ComfyDenoiser, check_supported
from .comfy_generator import SAMPLERS, SCHEDULERS, ComfyGenerator
from .comfy_host import load_device, models_dirs
from .comfy_schema import comfy_node
from .train import (
    TrainingProgress,
    _interrupted,
    _summary,
    curves_tensor,
    release_memory,
    run_folder,
    save_name_problem,
    stopped_message,
)

logger = logging.getLogger("promptist")

SOURCES = ("images + captions", "folder", "prompts")
DATA_FOLDER = "data"
NEGATIVES_SEPARATOR = "|"


def loras_dir() -> Path:
    """ComfyUI's first `loras` folder (what LoraLoader lists); outside ComfyUI, models/loras."""
    if comfy_host.folder_paths is not None:
        return Path(comfy_host.folder_paths.get_folder_paths("loras")[0])
    return models_dirs()[0].parent / "loras"


def caption_lines(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def folder_input(path: str) -> Path:
    """An image folder: absolute, or relative to ComfyUI's input folder."""
    if not path or not path.strip():
        raise ValueError("folder is empty: give an image folder with same-name .txt captions")
    given = Path(path.strip()).expanduser()
    candidates = [given]
    if not given.is_absolute() and comfy_host.folder_paths is not None:
        candidates.insert(0, Path(comfy_host.folder_paths.get_input_directory()) / given)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    raise ValueError(f"folder: no such folder {path!r} (looked at {', '.join(str(c) for c in candidates)})")


def gather_image_batch(images: torch.Tensor | None, captions: list[str], images_dir: Path):
    """The IMAGE batch saved as PNGs (named by their content, so changed images are new items), one
    caption per image (or one for all)."""
    from PIL import Image

    from trainer.tpo.data import Captioned, Gathered

    if images is None:
        raise ValueError("source is 'images + captions' but no images are connected (an IMAGE batch)")
    if not captions:
        raise ValueError("captions is empty: give one caption per image, one per line")
    if len(captions) not in (1, images.shape[0]):
        raise ValueError(f"{images.shape[0]} images but {len(captions)} captions: give one caption per image, one "
                         "per line (or a single caption for all)")
    captions = captions * images.shape[0] if len(captions) == 1 else captions
    images_dir.mkdir(parents=True, exist_ok=True)
    gathered = Gathered([], [], {"kind": "comfy images", "count": int(images.shape[0])})
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        array = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        key = hashlib.sha256(array.tobytes()).hexdigest()[:12]
        path = images_dir / f"img{i:05d}-{key}.png"
        if not path.is_file():
            Image.fromarray(array).save(path)
        gathered.items.append(Captioned(f"img{i:05d}-{key}", path.resolve(), caption))
    return gathered.done()


class GivenNegatives:
    """The caption-edit editor interface over negatives typed by hand: line i holds those of caption i,
    separated by `|`."""

    def __init__(self, captions: list[str], lines: list[str]):
        from trainer.tpo.data import Negative

        if len(lines) != len(captions):
            raise ValueError(f"{len(captions)} captions but {len(lines)} lines of negatives: give one line per "
                             f"caption (several negatives on a line separated by '{NEGATIVES_SEPARATOR}'), or leave "
                             "negatives empty for the rules editor")
        self.by_caption = {}
        for caption, line in zip(captions, lines, strict=True):
            self.by_caption[caption] = [Negative(t.strip(), "other") for t in line.split(NEGATIVES_SEPARATOR)
                                        if t.strip()]

    def __call__(self, captions, count: int):
        from trainer.tpo.data import same_caption

        return [[n for n in self.by_caption.get(c, []) if not same_caption(n.text, c)] for c in captions]


def build_data(folder: Path, gathered, editor, *, editor_name: str, negatives_per_caption: int, seed: int,
               valid_fraction: float, resume: bool) -> int:
    """Write the TPO data folder (trainer.tpo.data.build_run_data); returns the item count."""
    from trainer.tpo.data import build_run_data

    return build_run_data(folder, gathered, editor, editor_name=editor_name,
                          negatives_per_caption=negatives_per_caption, seed=seed, valid_fraction=valid_fraction,
                          resume=resume, label="save_name")


def model_with_lora(model, path: Path):
    """MODEL with the saved LoRA file applied by ComfyUI's own LoRA loading (what LoraLoaderModelOnly does):
    the output is exactly what users get from the file, and samples at ComfyUI's normal speed (the
    training clone's per-forward weight wrappers made sampling several times slower)."""
    import comfy.sd
    import comfy.utils

    return comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True), 1.0,
                                         0.0)[0]


class TPOTrain:
    """Align the graph's diffusion model with its captions by TDPO / TKTO; outputs the model with the LoRA."""

    NODE_ID = "PromptistTPOTrain"
    DISPLAY_NAME = "Promptist TPO Train (LoRA)"
    DESCRIPTION = ("Trains a LoRA of your MODEL so that it follows captions (TPO: TDPO/TKTO on each image's caption "
                   "against an edited caption that no longer fits it). Images come with captions, from a folder of "
                   "image + same-name .txt, or are drawn once from prompts by this model. Saves "
                   "models/loras/<save_name>.safetensors (LoraLoader, A1111, diffusers); Cancel saves a "
                   "checkpoint and queueing again with the same save name continues. Runs on every queue.")
    ALWAYS_RUN = True
    OUTPUTS = [("MODEL", "model", "MODEL with the trained LoRA applied."),
               ("STRING", "lora_name", "The LoRA file in models/loras (what LoraLoader lists)."),
               ("IMAGE", "curves", "Loss and implicit accuracy (training and held-out)."),
               ("STRING", "summary", "Steps, loss, accuracies and the files written.")]

    @classmethod
    def inputs(cls):
        return [
            ("model", "MODEL", {"tooltip": "The diffusion model to train a LoRA for (SD 1.x, 2.x, SDXL, SD3). A clone "
                                           "is trained; the input MODEL is not changed."}),
            ("clip", "CLIP", {"tooltip": "Its text encoder (captions are encoded once)."}),
            ("vae", "VAE", {"tooltip": "Its VAE (images are encoded once; latents cached in the run folder)."}),
            ("source", list(SOURCES), {"default": SOURCES[0],
                                       "tooltip": "images + captions: the IMAGE batch, one caption per line. "
                                                  "folder: image + same-name .txt files. prompts: the captions "
                                                  "are prompts; this model draws one image per prompt, once."}),
            ("captions", "STRING", {"multiline": True, "default": "",
                                    "tooltip": "One caption per image (images + captions), or one prompt per line "
                                               "(prompts)."}),
            ("save_name", "STRING", {"default": "my-tpo",
                                     "tooltip": "The LoRA is models/loras/<save_name>.safetensors; the run "
                                                "(checkpoints, data, curves) is models/promptist/<save_name>. Queue "
                                                "again with the same name to continue."}),
            ("loss", ["tdpo", "tkto"], {"default": "tdpo",
                                        "tooltip": "tdpo: Diffusion-DPO on the caption pair. tkto: Diffusion-KTO."}),
            ("steps", "INT", {"default": 500, "min": 1, "max": 1_000_000, "tooltip": "Optimizer steps in all."}),
            ("rank", "INT", {"default": 8, "min": 1, "max": 256, "tooltip": "LoRA rank (alpha = rank)."}),
            ("beta", "FLOAT", {"default": 0.0, "min": 0.0, "max": 1e6, "step": 10.0, "round": False,
                               "tooltip": "Preference strength; 0 = default (tdpo 5000, Salesforce Diffusion-DPO's "
                                          "convention = diffusers' beta_dpo 2500; tkto 1000)."}),
            ("learning_rate", "FLOAT", {"default": 1e-5, "min": 1e-8, "max": 1e-2, "step": 1e-6, "round": False,
                                        "tooltip": "AdamW learning rate of the LoRA."}),
            ("batch_size", "INT", {"default": 4, "min": 1, "max": 256, "tooltip": "Caption pairs per forward pass."}),
            ("grad_accum", "INT", {"default": 4, "min": 1, "max": 1024, "tooltip": "Forward passes per step."}),
            ("resolution", "INT", {"default": 512, "min": 64, "max": 4096, "step": 8,
                                   "tooltip": "Images are resized and centre-cropped to this square (SD 1.x: 512, "
                                              "SDXL: 1024)."}),
            ("seed", "INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "control_after_generate": False,
                             "tooltip": "Negatives, split, pair order, noise. Keep it to continue a run."}),
            ("save_every", "INT", {"default": 100, "min": 1, "max": 1_000_000,
                                   "tooltip": "Checkpoint and held-out accuracy every this many steps."}),
            ("negatives_per_caption", "INT", {"default": 2, "min": 1, "max": 16,
                                              "tooltip": "Edited captions per caption from the rules editor."}),
            ("valid_fraction", "FLOAT", {"default": 0.1, "min": 0.0, "max": 0.9, "step": 0.01,
                                         "tooltip": "Share of captions held out for the held-out implicit accuracy."}),
            ("images", "IMAGE", {"optional": True, "tooltip": "The images (source: images + captions)."}),
            ("folder", "STRING", {"default": "", "optional": True,
                                  "tooltip": "Image folder with same-name .txt captions (source: folder), absolute "
                                             "or in ComfyUI/input (as LoadImageTextSetFromFolder reads)."}),
            ("negatives", "STRING", {"multiline": True, "default": "", "optional": True,
                                     "tooltip": "Optional negatives by hand: one line per caption, several separated "
                                                "by '|'. Empty: the rules editor edits colours, counts, positions, "
                                                "objects and settings."}),
            ("sampler_name", SAMPLERS, {"default": "euler" if "euler" in SAMPLERS else SAMPLERS[0], "optional": True,
                                        "tooltip": "source prompts: sampler of the drawn images."}),
            ("scheduler", SCHEDULERS, {"default": "normal" if "normal" in SCHEDULERS else SCHEDULERS[0],
                                       "optional": True, "tooltip": "source prompts: scheduler."}),
            ("image_steps", "INT", {"default": 25, "min": 1, "max": 1000, "optional": True,
                                    "tooltip": "source prompts: sampling steps per image."}),
            ("cfg", "FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01, "optional": True,
                              "tooltip": "source prompts: classifier-free guidance."}),
        ]

    @staticmethod
    def validate(save_name: str | None = None):
        return save_name_problem(save_name) or True

    @staticmethod
    def run(model, clip, vae, source: str = SOURCES[0], captions: str = "", save_name: str = "my-tpo",
            loss: str = "tdpo", steps: int = 500, rank: int = 8, beta: float = 0.0, learning_rate: float = 1e-5,
            batch_size: int = 4, grad_accum: int = 4, resolution: int = 512, seed: int = 0, save_every: int = 100,
            negatives_per_caption: int = 2, valid_fraction: float = 0.1, images=None, folder: str | None = "",
            negatives: str | None = "", sampler_name: str = "euler", scheduler: str = "normal",
            image_steps: int = 25, cfg: float = 7.5):
        from trainer.checkpoint import list_checkpoints, seeded
        from trainer.progress import StopTraining
        from trainer.runtime import local_runtime
        from trainer.tpo.caption_edits import editor_from_spec
        from trainer.tpo.data import gather_folder, gather_prompts
        from trainer.tpo.train import TPOConfig, load_latent_pairs, short_run_notes, train_tpo
        from trainer.training_run import TPO_PANELS

        # 1. the run folder, the LoRA file, the data (images drawn under ComfyUI's inference mode)
        if source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
        check_supported(model)  # a model type TPO does not cover is refused before anything is drawn
        out = run_folder(save_name)
        lora_path = loras_dir() / f"{save_name}.safetensors"
        resume = bool(list_checkpoints(out))
        data = out / DATA_FOLDER
        lines = caption_lines(captions)
        if source == "images + captions":
            gathered = gather_image_batch(images, lines, data / "images")
        elif source == "folder":
            gathered = gather_folder(folder_input(folder or ""))
        else:
            if not lines:
                raise ValueError("captions is empty: give the prompts to draw, one per line")
            generator = ComfyGenerator(model, clip, vae, sampler_name=sampler_name, scheduler=scheduler)
            gathered = gather_prompts(lines, generator, data / "images", seed=seed, steps=image_steps, guidance=cfg,
                                      size=(resolution, resolution),
                                      source={"kind": "prompts", "sd": generator.fingerprint})
        given = caption_lines(negatives or "")
        if given and source == "folder":
            raise ValueError("negatives by hand follow the captions input line by line; with source 'folder' leave "
                             "negatives empty (the rules editor makes them)")
        editor = GivenNegatives(lines, given) if given else editor_from_spec("rules", seed=seed)
        count = build_data(data, gathered, editor, editor_name="given" if given else "rules",
                           negatives_per_caption=negatives_per_caption, seed=seed, valid_fraction=valid_fraction,
                           resume=resume)
        compute = load_device()
        config = TPOConfig(data=str(data), out=str(lora_path), run_dir=str(out), loss=loss, beta=beta or None,
                           rank=rank, lr=learning_rate, warmup_steps=min(100, steps // 10), batch_size=batch_size,
                           grad_accum=grad_accum, max_steps=steps, resolution=resolution, seed=seed,
                           eval_every=save_every, save_every=save_every, log_every=1, device=str(compute),
                           tensorboard=False)
        notes = short_run_notes(config, settings=("learning_rate", "steps", "grad_accum"))  # a short run's limits
        for note in notes:
            logger.warning("[promptist] TPO: %s", note)
        # 2. train a clone of MODEL outside inference mode (tensors made in it could not be trained)
        progress = TrainingProgress(out, TPO_PANELS, f"TPO ({loss})")
        try:
            with torch.inference_mode(False):
                with seeded(seed):  # the new LoRA's init: the same seed gives the same run
                    denoiser = ComfyDenoiser(model, clip, vae, rank=rank, device=compute)
                pairs = load_latent_pairs(data, denoiser, resolution=resolution, batch_size=batch_size)
                denoiser.encode_captions([t for p in pairs.train + pairs.valid for t in (p.chosen, p.rejected)])
                denoiser.load()
                result = train_tpo(config, denoiser, pairs, callback=progress, resume=resume,
                                   runtime=local_runtime(compute, config.precision))
        except StopTraining as e:
            logger.info("[promptist] %s", stopped_message(e))
            raise _interrupted(e) from None
        finally:
            release_memory()
        summary = _summary("TPO", out, resume, steps=result.steps, items=count, loss=result.loss,
                           accuracy=result.accuracy, valid_accuracy=result.valid_accuracy, lora=str(lora_path))
        summary = "\n".join([summary, *(f"note: {note}" for note in notes)])
        return (model_with_lora(model, lora_path), lora_path.name, curves_tensor(out, progress), summary)


NODES = [comfy_node(TPOTrain)]
