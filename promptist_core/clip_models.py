"""CLIP behind one small interface: `encode_images` (image tensors or PIL) and `encode_texts`.

Two backends load the same kinds of weights users have:
- open_clip: an architecture name + weights file, or a folder in open_clip's Hub layout
  (`open_clip_config.json` + `open_clip_model.safetensors`). The default, OpenAI's ViT-L/14,
  comes from `timm/vit_large_patch14_clip_224.openai` and needs quick-GELU.
- transformers: a `CLIPModel` folder (config.json + weights + tokenizer + preprocessor_config.json),
  e.g. `openai/clip-vit-large-patch14` or PickScore's CLIP-H.

Preprocessing is one path for both, done in torch on the whole batch, on the model's device:
resize the shortest side (bicubic, antialiased), center crop, normalize with the model's mean/std.
Images are float tensors [B, H, W, C] in 0..1 (ComfyUI's IMAGE layout) or PIL images.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .devices import pick_device, pick_dtype
from .quiet import no_progress_bars, no_random_init_note
from .weights import (
    KNOWN_HUB_MODELS,
    WeightsNotFoundError,
    _folder_has,
    _is_meant_as_path,
    load_tokenizer,
    reading_weights,
    resolve,
)

logger = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_CONTEXT = 77
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
OPEN_CLIP_FILES = (("open_clip_config.json",), ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))
TOKENIZER_FILES = (("tokenizer.json", "vocab.json"),)


@dataclass(frozen=True)
class OpenClipWeights:
    """A CLIP published in open_clip's Hub layout, with the architecture its weights need."""

    hub_id: str
    architecture: str
    quick_gelu: bool = False


DEFAULT_CLIP_MODEL = "ViT-L-14/openai"
KNOWN_OPEN_CLIP: dict[str, OpenClipWeights] = {
    # OpenAI trained with QuickGELU; open_clip's plain ViT-L-14 config uses nn.GELU.
    "ViT-L-14/openai": OpenClipWeights("timm/vit_large_patch14_clip_224.openai", "ViT-L-14-quickgelu", True),
}
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"


# ---------------------------------------------------------------------------------------------
# Images in, pixels out
# ---------------------------------------------------------------------------------------------


def _pil_to_tensor(image) -> torch.Tensor:
    import numpy as np

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array)


def image_batches(images) -> list[torch.Tensor]:
    """Validate images and group them into float [B, H, W, 3] batches of equal size, in input order.

    Accepts a tensor [B, H, W, C] or [H, W, C] in 0..1 (C = 1, 3 or 4; alpha is dropped), a PIL image,
    or a list of those. Raises ValueError naming the bad image.
    """
    if images is None:
        raise ValueError("images is None: pass a float tensor [B, H, W, C] in 0..1 or PIL images")
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise ValueError("no images given: the batch is empty")
    tensors: list[torch.Tensor] = []
    for i, item in enumerate(items):
        where = "images" if len(items) == 1 else f"image {i + 1}"
        if hasattr(item, "convert") and hasattr(item, "size"):  # a PIL image
            tensors.append(_pil_to_tensor(item).unsqueeze(0))
            continue
        if not isinstance(item, torch.Tensor):
            raise ValueError(f"{where} is a {type(item).__name__}; expected a torch tensor [B, H, W, C] or a PIL image")
        t = item.unsqueeze(0) if item.ndim == 3 else item
        if t.ndim != 4 or t.shape[-1] not in (1, 3, 4) or min(t.shape) == 0:
            raise ValueError(f"{where} has shape {tuple(item.shape)}; expected [B, H, W, C] with C = 3 "
                             "(ComfyUI's IMAGE layout: channels last)")
        if not t.is_floating_point():
            raise ValueError(f"{where} has dtype {t.dtype}; expected floats in 0..1 (divide 8-bit images by 255)")
        lo, hi = float(t.min()), float(t.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # also catches NaN
            raise ValueError(f"{where} has values in [{lo:.3g}, {hi:.3g}]; expected 0..1")
        t = t[..., :3] if t.shape[-1] == 4 else (t.expand(*t.shape[:-1], 3) if t.shape[-1] == 1 else t)
        tensors.append(t)
    batches: list[torch.Tensor] = []
    run: list[torch.Tensor] = []
    for t in tensors:
        if run and t.shape[1:3] != run[0].shape[1:3]:
            batches.append(torch.cat(run))
            run = []
        run.append(t)
    batches.append(torch.cat(run) if len(run) > 1 else run[0])
    return batches


def preprocess(images: torch.Tensor, *, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[B, H, W, 3] in 0..1 -> [B, 3, size, size] normalized: CLIP's resize + center crop, in torch."""
    x = images.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    # 1. resize the shortest side to `size` (bicubic, antialiased, like PIL), keep the aspect ratio
    # (torchvision's arithmetic: the long side is truncated, not rounded)
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL clamps to 0..255
    # 2. center crop (torchvision's rounding)
    top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
    x = x[..., top:top + size, left:left + size]
    # 3. normalize
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


# ---------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------


class ClipEncoder:
    """A CLIP model: L2-normalized image and text embeddings, and its logit scale.

    Build with `load_clip` (cached). `module` is the torch module a host may move between devices;
    the device is read at call time.
    """

    backend = "base"

    def __init__(self, module: torch.nn.Module, tokenizer, *, image_size: int, mean: Sequence[float],
                 std: Sequence[float], embed_dim: int, name: str = ""):
        self.module = module.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.embed_dim = int(embed_dim)
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale): CLIP's temperature, e.g. ~100 for OpenAI's models (PickScore uses it)."""
        return float(self.module.logit_scale.detach().float().exp())

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """[B, H, W, 3] in 0..1 -> the model's input, on its device and dtype."""
        x = preprocess(images.to(self.device), size=self.image_size, mean=self.mean, std=self.std)
        return x.to(self.dtype)

    @torch.no_grad()  # not inference_mode: trainers may use the results in autograd code
    def encode_images(self, images, *, batch_size: int = 8) -> torch.Tensor:
        """L2-normalized image embeddings (N, D), float32, on the model's device."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        out = []
        for batch in image_batches(images):
            for i in range(0, batch.shape[0], batch_size):
                features = self._image_features(self.pixels(batch[i:i + batch_size]))
                out.append(F.normalize(features.float(), dim=-1))
        return torch.cat(out)

    @torch.no_grad()  # not inference_mode: trainers may use the results in autograd code
    def encode_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """L2-normalized text embeddings (N, D), float32; texts longer than 77 tokens are truncated."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be a non-empty list of strings; got {texts!r:.80}")
        return F.normalize(self._text_features(texts).float(), dim=-1)

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text_features(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError


class OpenClipEncoder(ClipEncoder):
    backend = "open_clip"

    def _image_features(self, pixels):
        return self.module.encode_image(pixels)

    def _text_features(self, texts):
        return self.module.encode_text(self.tokenizer(texts).to(self.device))


def _features(output) -> torch.Tensor:
    """transformers 4.x returns the projected embedding; 5.x an output object with it in pooler_output."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClipEncoder(ClipEncoder):
    backend = "transformers"

    def _image_features(self, pixels):
        return _features(self.module.get_image_features(pixel_values=pixels))

    def _text_features(self, texts):
        max_length = min(CLIP_CONTEXT, int(self.module.config.text_config.max_position_embeddings))
        tokens = self.tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        return _features(self.module.get_text_features(input_ids=tokens["input_ids"],
                                                       attention_mask=tokens["attention_mask"]))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_CACHE: dict[tuple, ClipEncoder] = {}
_CACHE_LOCK = threading.Lock()


def cached_encoders() -> list[ClipEncoder]:
    """The loaded CLIPs (hosts move them off the GPU between jobs)."""
    with _CACHE_LOCK:
        return list(_CACHE.values())


def load_clip(
    name: str = DEFAULT_CLIP_MODEL,
    *,
    architecture: str | None = None,
    tokenizer_name: str | None = None,
    models_dir: Path | str | Sequence[Path | str] | None = None,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    allow_download: bool | None = None,
) -> ClipEncoder:
    """Load a CLIP once and reuse it.

    Args:
        name: `ViT-L-14/openai` (the default: OpenAI's ViT-L/14 via open_clip), a folder in open_clip's
            Hub layout or a transformers `CLIPModel` folder (a path, a folder under `models_dir`, or a
            Hub id), or a single open_clip weights file (.safetensors/.bin/.pt) with `architecture`.
        architecture: open_clip model name for a single weights file, e.g. `ViT-L-14-quickgelu`.
        tokenizer_name: where a transformers folder without tokenizer files gets them (a folder or Hub
            id); known models (PickScore) know theirs.
        models_dir: the host's models folder(s), searched before the Hugging Face cache.
        device, dtype: `auto` = GPU when present; fp32 on CPU.
        allow_download: None = allowed unless PROMPTIST_OFFLINE / HF_HUB_OFFLINE is set.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"CLIP model name is empty; use {DEFAULT_CLIP_MODEL!r}, a folder or a weights file")
    name = name.strip()
    target = pick_device(device)
    torch_dtype = pick_dtype(target, dtype)

    # 1. find the files
    kind, path, arch = find_clip(name, architecture=architecture, models_dir=models_dir, allow_download=allow_download)
    known = KNOWN_OPEN_CLIP.get(name)
    quick_gelu = known.quick_gelu if known else False

    # 2. load once per (files, device, dtype)
    key = (kind, str(Path(path).resolve()), arch, quick_gelu, tokenizer_name, str(target), torch_dtype)
    with _CACHE_LOCK:
        if key not in _CACHE:
            logger.info("loading CLIP %s from %s (%s, %s)", name, path, target, torch_dtype)
            if kind == "transformers":
                tok_folder = _tokenizer_folder(path, name, tokenizer_name, models_dir, allow_download)
                with reading_weights(path):
                    encoder = _load_transformers(path, tok_folder, name)
            else:
                with reading_weights(path):
                    encoder = _load_open_clip(path, arch, quick_gelu, name)
            encoder.module.to(device=target, dtype=torch_dtype)
            _CACHE[key] = encoder
        return _CACHE[key]


def find_clip(name: str, *, architecture: str | None = None, models_dir=None,
              allow_download: bool | None = None, with_tokenizer: bool = False) -> tuple[str, Path, str | None]:
    """Where a CLIP's files are, without loading them: (kind, path, architecture); WeightsNotFoundError names
    what is missing. `with_tokenizer`: also find a transformers CLIP's tokenizer (a job's check before it
    starts, promptist_core.model_needs); load_clip finds it when it loads."""
    name = name.strip()
    known = KNOWN_OPEN_CLIP.get(name)
    if known is not None:
        return "open_clip_dir", _resolve_known(known, models_dir, allow_download), None
    if Path(name).suffix in WEIGHT_SUFFIXES:
        path = _resolve_weights_file(name, models_dir)
        if not architecture:
            raise ValueError(f"CLIP weights file {name} needs architecture= (an open_clip model name such as "
                             "'ViT-L-14-quickgelu' for OpenAI's ViT-L/14)")
        return "open_clip_file", path, architecture
    path = resolve(name, models_dir=models_dir, allow_download=allow_download,
                   required=KNOWN_HUB_MODELS[name].required if name in KNOWN_HUB_MODELS
                   else (("config.json", "open_clip_config.json"),))
    if (path / "open_clip_config.json").is_file():
        return "open_clip_dir", path, None
    if with_tokenizer:
        _tokenizer_folder(path, name, None, models_dir, allow_download)
    return "transformers", path, None


def _resolve_known(known: OpenClipWeights, models_dir, allow_download) -> Path:
    try:
        return resolve(known.hub_id, models_dir=models_dir, allow_download=allow_download, required=OPEN_CLIP_FILES)
    except WeightsNotFoundError as e:
        raise e.carried_over(
            f"{e}\nOnly open_clip_config.json and open_clip_model.safetensors (or open_clip_pytorch_model.bin) "
            f"from https://huggingface.co/{known.hub_id} are needed; open_clip bundles the tokenizer."
        ) from None


def _resolve_weights_file(name: str, models_dir) -> Path:
    from .weights import resolve_file

    path = Path(name).expanduser()
    if _is_meant_as_path(name) and not path.is_file():
        raise WeightsNotFoundError(f"CLIP weights file {path} does not exist.")
    return resolve_file(name, models_dir=models_dir, allow_download=False)


def _tokenizer_folder(folder: Path, name: str, tokenizer_name, models_dir, allow_download) -> Path:
    if tokenizer_name is None and _folder_has(folder, TOKENIZER_FILES):
        return folder
    fallback = tokenizer_name or (KNOWN_HUB_MODELS[name].tokenizer_repo_id if name in KNOWN_HUB_MODELS else None)
    if fallback is None:
        raise WeightsNotFoundError(
            f"CLIP folder {folder} has no tokenizer (tokenizer.json or vocab.json + merges.txt). Copy the "
            "tokenizer files of the model into it, or pass tokenizer_name."
        )
    required = KNOWN_HUB_MODELS[fallback].required if fallback in KNOWN_HUB_MODELS else TOKENIZER_FILES
    return resolve(fallback, models_dir=models_dir, allow_download=allow_download, required=required)


def _load_open_clip(path: Path, architecture: str | None, quick_gelu: bool, name: str) -> OpenClipEncoder:
    """Build the architecture with open_clip and load the weights ourselves.

    Works alike on open_clip 2.20 (A1111 1.10's pin: no `weights_only`, no `local-dir:` scheme, no
    safetensors in its checkpoint loader) and current versions; the weights are read as safetensors or
    with `torch.load(weights_only=True)` whatever open_clip would do.
    """
    import open_clip

    preprocess = {}
    if architecture is None:  # a folder in open_clip's Hub layout
        config = json.loads((path / "open_clip_config.json").read_text(encoding="utf-8"))
        architecture = _register_open_clip_config(open_clip, config["model_cfg"])
        preprocess = config.get("preprocess_cfg") or {}
        path = next(path / f for f in OPEN_CLIP_FILES[1] if (path / f).is_file())
    elif architecture not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {architecture!r}; e.g. ViT-L-14-quickgelu, ViT-B-32")
    with no_random_init_note():  # built without weights on purpose: the strict load below fills them
        model = open_clip.create_model(architecture, force_quick_gelu=quick_gelu, **_no_download_kwargs(open_clip))
    load_open_clip_weights(model, path)
    model.eval()
    tokenizer = open_clip.get_tokenizer(architecture)
    cfg = preprocess or getattr(model.visual, "preprocess_cfg", {}) or {}
    size = cfg.get("size", model.visual.image_size)
    size = size[0] if isinstance(size, (tuple, list)) else size
    return OpenClipEncoder(model, tokenizer, image_size=size, mean=cfg.get("mean", OPENAI_MEAN),
                           std=cfg.get("std", OPENAI_STD), embed_dim=model.text_projection.shape[-1]
                           if hasattr(model, "text_projection") and model.text_projection is not None
                           else model.visual.output_dim, name=name)


def _no_download_kwargs(open_clip) -> dict:
    """Never fetch a Hugging Face text tower's weights when building (2.20: pretrained_hf; 3.x: pretrained_text)."""
    import inspect

    params = inspect.signature(open_clip.create_model).parameters
    return {k: False for k in ("pretrained_hf", "pretrained_text") if k in params}


_CONFIG_DIR = None  # kept for the process: open_clip re-reads every registered folder on each registration


def _register_open_clip_config(open_clip, model_cfg: dict) -> str:
    """Register a Hub folder's model config under a name of its own (`add_model_config` exists in 2.20 too)."""
    import hashlib
    import tempfile

    global _CONFIG_DIR
    text = json.dumps(model_cfg, sort_keys=True)
    arch = "promptist-local-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    if arch not in open_clip.list_models():
        if _CONFIG_DIR is None:
            _CONFIG_DIR = tempfile.TemporaryDirectory(prefix="promptist-open-clip-")
        (Path(_CONFIG_DIR.name) / f"{arch}.json").write_text(text, encoding="utf-8")
        open_clip.add_model_config(_CONFIG_DIR.name)
    return arch


def load_open_clip_weights(model: torch.nn.Module, file: Path) -> None:
    """Load an open_clip checkpoint (safetensors, or .bin/.pt with weights_only=True) into `model`, strictly."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
    if next(iter(state), "").startswith("module."):
        state = {k[len("module."):]: v for k, v in state.items()}
    if hasattr(model, "text") and not any(k.startswith("text.") for k in state):  # CustomTextCLIP
        from open_clip.model import convert_to_custom_text_state_dict

        state = convert_to_custom_text_state_dict(state)
    # Buffers some versions save and others do not (position_ids) are not weights.
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{file} does not fit this open_clip architecture: {str(e).splitlines()[0]}") from e


def _load_transformers(path: Path, tokenizer_folder: Path, name: str) -> HFClipEncoder:
    from transformers import CLIPModel

    # safetensors, or .bin via torch.load(weights_only=True): never arbitrary unpickling.
    with no_progress_bars():
        model = CLIPModel.from_pretrained(str(path))
    tokenizer = load_tokenizer(tokenizer_folder)
    size, mean, std = model.config.vision_config.image_size, OPENAI_MEAN, OPENAI_STD
    for folder in (path, tokenizer_folder):
        cfg_file = folder / "preprocessor_config.json"
        if cfg_file.is_file():
            cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            crop = cfg.get("crop_size", size)
            size = crop.get("height", size) if isinstance(crop, dict) else crop
            mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
            break
    return HFClipEncoder(model, tokenizer, image_size=size, mean=mean, std=std,
                         embed_dim=model.config.projection_dim, name=name)


def clear_cache() -> None:
    """Forget every loaded CLIP (hosts call this to free memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()
