"""Our own minimal LoRA on `nn.Linear`, saved in the kohya key format that ComfyUI, A1111 and diffusers load.

Why not peft: `import peft` fails on the transformers 4.30 that A1111 1.10 pins (TRAINERS.md §7.2), and
what TPO needs is small: a low-rank update beside each attention projection, a switch to turn it off
(the reference model is the same UNet with the adapters off), and a file the hosts read.

File format (kohya-ss/sd-scripts `networks/lora.py`): for a module at diffusers path `a.b.to_out.0`,
`lora_unet_a_b_to_out_0.lora_down.weight` [rank, in], `.lora_up.weight` [out, rank] and `.alpha` (a
scalar); the update is `up @ down * alpha / rank`. ComfyUI's `LoraLoader` maps `lora_unet_<diffusers
path>` keys, A1111's Lora extension converts them to its compvis names, and diffusers'
`load_lora_weights` converts them to peft. ComfyUI's own `SaveLoRA` format (`diffusion_model.*`) is not
used: A1111 cannot load it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from .lora_layout import LAYOUT_METADATA_KEY, UNetLayout, a1111_save_warning

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
KOHYA_PREFIX = "lora_unet_"
# Flow transformers (SD3's MMDiT): the kohya-style names ComfyUI's LoraLoader maps to a diffusers
# SD3Transformer2DModel path (comfy/lora.py, "OneTrainer lora"); `lora_unet_` is for UNets only.
TRANSFORMER_PREFIX = "lora_transformer_"


class LoRALinear(nn.Module):
    """`base(x) + up(down(x)) * alpha / rank`. `up` starts at zero, so a fresh LoRA changes nothing; the
    LoRA weights are fp32 whatever the base's dtype (fp16 updates of a small delta round to nothing)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1; got {rank}")
        self.base = base
        self.rank, self.alpha = int(rank), float(alpha)
        device = base.weight.device
        self.down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # as kohya and peft
        nn.init.zeros_(self.up.weight)
        self.enabled = True

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (self.up(self.down(x.to(self.down.weight.dtype))) * self.scale).to(y.dtype)


def kohya_name(path: str, prefix: str = KOHYA_PREFIX) -> str:
    """`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` -> `lora_unet_down_blocks_0_..._to_out_0`."""
    return prefix + path.replace(".", "_")


def _linear_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every nn.Linear and LoRALinear, not descending into a LoRALinear."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (LoRALinear, nn.Linear)):
            yield path, child
        else:
            yield from _linear_modules(child, path)


def _set_child(root: nn.Module, path: str, child: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, child)


def attach_lora(module: nn.Module, rank: int, alpha: float,
                targets: Iterable[str] = DEFAULT_TARGETS) -> dict[str, LoRALinear]:
    """Wrap each nn.Linear whose path ends with one of `targets` (`to_q` matches `...attn1.to_q`) and freeze
    every other weight of `module`: only the LoRAs train. Returns {diffusers path: LoRALinear}; raises when
    nothing matched."""
    targets = tuple(targets)
    module.requires_grad_(False)
    loras: dict[str, LoRALinear] = {}
    for path, child in list(_linear_modules(module)):
        if isinstance(child, LoRALinear):
            raise ValueError(f"{path} already carries a LoRA; attach to a fresh model")
        if any(path == t or path.endswith("." + t) for t in targets):
            lora = LoRALinear(child, rank, alpha)
            _set_child(module, path, lora)
            loras[path] = lora
    if not loras:
        raise ValueError(f"no nn.Linear in {type(module).__name__} ends with any of {', '.join(targets)}")
    return loras


@contextlib.contextmanager
def adapters_enabled(loras: dict[str, LoRALinear], enabled: bool) -> Iterator[None]:
    """Turn every LoRA on or off inside the block (off = the base model: TPO's reference)."""
    before = {path: lora.enabled for path, lora in loras.items()}
    for lora in loras.values():
        lora.enabled = enabled
    try:
        yield
    finally:
        for path, lora in loras.items():
            lora.enabled = before[path]


def kohya_state_dict(loras: dict[str, LoRALinear], dtype: torch.dtype = torch.float16, *,
                     prefix: str = KOHYA_PREFIX) -> dict[str, torch.Tensor]:
    """The kohya tensors of `loras` in `dtype` (fp16 as kohya writes by default, or fp32)."""
    tensors = {}
    for path, lora in sorted(loras.items()):
        name = kohya_name(path, prefix)
        tensors[f"{name}.lora_down.weight"] = lora.down.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.lora_up.weight"] = lora.up.weight.detach().to("cpu", dtype).contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)
    return tensors


def save_kohya_lora(path: Path | str, loras: dict[str, LoRALinear], metadata: dict | None = None, *,
                    dtype: torch.dtype = torch.float16, prefix: str = KOHYA_PREFIX) -> Path:
    """Write `loras` as a kohya LoRA file, atomically (temporary file, fsync, rename); `prefix` names the
    model part (`lora_unet_`, or `lora_transformer_` for a flow transformer).

    The safetensors metadata gets kohya's `ss_network_module/dim/alpha` plus `metadata` (values that are not
    strings are stored as JSON), e.g. `ss_sd_model_hash`, `promptist_config`, `modelspec.title`."""
    from safetensors.torch import save_file

    if not loras:
        raise ValueError("no LoRA modules to save")
    ranks = {lora.rank for lora in loras.values()}
    alphas = {lora.alpha for lora in loras.values()}
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
            "ss_network_alpha": f"{max(alphas):g}", "ss_training_comment": "promptist TPO"}
    for key, value in (metadata or {}).items():
        if value is not None:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    warn_if_a1111_misplaces(sorted(kohya_name(p) for p in loras), meta.get(LAYOUT_METADATA_KEY))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(kohya_state_dict(loras, dtype, prefix=prefix), str(tmp), metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def warn_if_a1111_misplaces(modules: list[str], layout_json: str | None) -> str | None:
    """At save time: say (a logged warning, returned) when A1111 1.10 would not load every module where it
    belongs, on the UNet layout the LoRA was trained on (lora_layout). None when it would, or no layout is known."""
    if not layout_json:
        return None
    warning = a1111_save_warning(modules, UNetLayout.from_json(layout_json))
    if warning:
        logger.warning("promptist: %s", warning)
    return warning


def load_kohya_lora(unet: nn.Module, path: Path | str, *, prefix: str = KOHYA_PREFIX) -> dict[str, LoRALinear]:
    """Attach the LoRA in kohya file `path` to `unet` (a diffusers UNet2DConditionModel) and load its
    weights; modules that already carry a LoRA get the file's weights. Returns {diffusers path: LoRALinear}.

    Every `lora_unet_*` module of the file must name a Linear of `unet`, else one error lists what did not
    match (a LoRA for another architecture, or a text-encoder-only file)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted({k.split(".", 1)[0] for k in tensors if k.startswith(prefix)})
    if not names:
        part = "UNet" if prefix == KOHYA_PREFIX else "transformer"
        raise ValueError(f"{path} holds no {part} LoRA (no '{prefix}*' keys); is it a kohya-format LoRA?")
    by_name = {kohya_name(p, prefix): (p, m) for p, m in _linear_modules(unet)}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} LoRA modules match no Linear layer of this UNet (another base "
                         f"architecture?), e.g. {', '.join(unknown[:3])}")
    loras: dict[str, LoRALinear] = {}
    for name in names:
        module_path, module = by_name[name]
        try:
            down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        except KeyError as e:
            raise ValueError(f"{path}: {name} lacks {e.args[0]}") from None
        rank = down.shape[0]
        alpha = float(tensors[f"{name}.alpha"].item()) if f"{name}.alpha" in tensors else float(rank)
        if isinstance(module, LoRALinear):
            lora = module
            if lora.rank != rank:
                raise ValueError(f"{path}: {name} has rank {rank}, the attached LoRA has rank {lora.rank}")
            lora.alpha = alpha
        else:
            module.requires_grad_(False)
            lora = LoRALinear(module, rank, alpha)
            _set_child(unet, module_path, lora)
        if tuple(down.shape) != tuple(lora.down.weight.shape) or tuple(up.shape) != tuple(lora.up.weight.shape):
            raise ValueError(f"{path}: {name} has shapes {tuple(down.shape)}/{tuple(up.shape)}, the layer needs "
                             f"{tuple(lora.down.weight.shape)}/{tuple(lora.up.weight.shape)}")
        with torch.no_grad():
            lora.down.weight.copy_(down.float())
            lora.up.weight.copy_(up.float())
        loras[module_path] = lora
    return loras
