"""A trainable LoRA on a host's own ldm-layout UNet (A1111's and Forge's `diffusion_model`), host-agnostic.

The webui owns its UNet and keeps using it between and after our jobs, so the LoRA must not change the
module tree (A1111's Lora extension finds its layers by the names it gave them at load): each target
Linear gets a forward hook that adds `up(down(x)) * alpha / rank`, removed when training ends. The same
kohya tensors as `lora.LoRALinear` (same init, same file).

File names: kohya keys of the diffusers module paths (`lora_unet_down_blocks_0_attentions_0_...`), the
convention of trainer/tpo/lora.py, worked out from the ldm module tree (no host helper needed). A1111
reads diffusers names back with a fixed formula that holds only for UNets with two res blocks per level
(SD 1.x, 2.x, SDXL); for other layouts a diffusers name would miss, or worse hit the wrong layer, so such
a LoRA is saved under the ldm paths (`lora_unet_input_blocks_3_1_...`), which A1111, Forge and ComfyUI
all map directly (`kohya_names`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


class HookLoRA(nn.Module):
    """The low-rank update of one Linear, added to its output by a forward hook (fp32 factors; `up` starts
    at zero, so a fresh LoRA changes nothing)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, device: torch.device,
                 generator: torch.Generator | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1; got {rank}")
        self.rank, self.alpha = int(rank), float(alpha)
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=torch.float32)
        # kaiming_uniform_(a=sqrt(5)) as lora.LoRALinear, kohya and peft: U(-1/sqrt(in), 1/sqrt(in)), drawn
        # from `generator` (the same LoRA for the same seed: a run trained again starts where it started)
        bound = 1 / math.sqrt(in_features)
        with torch.no_grad():
            self.down.weight.copy_(torch.rand(self.down.weight.shape, generator=generator) * 2 * bound - bound)
        nn.init.zeros_(self.up.weight)
        self.enabled = True

    def hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        x = inputs[0]
        delta = self.up(self.down(x.to(self.down.weight.device, torch.float32))) * (self.alpha / self.rank)
        return output + delta.to(output.device, output.dtype)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a host's own linear layer with the same shape attributes (Forge's
    `ForgeOperations.Linear` is an nn.Module, not an nn.Linear)."""
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Linear" and hasattr(module, "in_features")
                                             and hasattr(module, "out_features"))


def _is_transformer(module: nn.Module) -> bool:
    return hasattr(module, "transformer_blocks")


def _is(module: nn.Module, kind: str) -> bool:
    return kind in type(module).__name__  # Downsample / Upsample (ldm, sgm, Forge, ComfyUI; diffusers' *2D)


def diffusers_attention_paths(diffusion_model: nn.Module) -> dict[str, str]:
    """ldm path of each spatial transformer (`input_blocks.4.1`) -> its diffusers path
    (`down_blocks.1.attentions.0`), read off the module tree: input blocks count res blocks per level
    until a Downsample, output blocks until an Upsample."""
    paths: dict[str, str] = {}
    level, index = 0, 0
    for i, block in enumerate(list(diffusion_model.input_blocks)[1:], start=1):
        parts = list(block) if isinstance(block, nn.Sequential | nn.ModuleList) else [block]
        if parts and _is(parts[0], "Downsample"):
            level, index = level + 1, 0
            continue
        for j, part in enumerate(parts):
            if _is_transformer(part):
                paths[f"input_blocks.{i}.{j}"] = f"down_blocks.{level}.attentions.{index}"
        index += 1
    for j, part in enumerate(diffusion_model.middle_block):
        if _is_transformer(part):
            paths[f"middle_block.{j}"] = "mid_block.attentions.0"
    level, index = 0, 0
    for i, block in enumerate(diffusion_model.output_blocks):
        parts = list(block)
        for j, part in enumerate(parts):
            if _is_transformer(part):
                paths[f"output_blocks.{i}.{j}"] = f"up_blocks.{level}.attentions.{index}"
        index += 1
        if any(_is(p, "Upsample") for p in parts):
            level, index = level + 1, 0
    return paths


def a1111_reads_back(ldm_path: str, diffusers_path: str) -> bool:
    """Whether A1111's Lora extension (`convert_diffusers_name_to_compvis`) maps the diffusers attention
    path back to this ldm path: input 1 + 3 * block + index, output 3 * block + index, middle 1."""
    d, parts = diffusers_path.split("."), ldm_path.split(".")
    if d[0] == "down_blocks":
        expected = f"input_blocks.{1 + 3 * int(d[1]) + int(d[3])}.1"
    elif d[0] == "up_blocks":
        expected = f"output_blocks.{3 * int(d[1]) + int(d[3])}.1"
    else:
        expected = "middle_block.1"
    return ".".join(parts[:3]) == expected


def kohya_names(ldm_paths: Iterable[str], attention_paths: dict[str, str]) -> dict[str, str]:
    """ldm Linear path -> the module path its kohya key is made of: the diffusers path when every host
    reads it back to the same layer, else (a UNet layout A1111's formula does not fit) the ldm path."""
    names = {}
    for path in ldm_paths:
        prefix = next((p for p in attention_paths if path.startswith(p + ".")), None)
        if prefix is None:
            raise ValueError(f"{path} is not inside a spatial transformer of the UNet: no diffusers name for it")
        names[path] = attention_paths[prefix] + path[len(prefix):]
    if all(a1111_reads_back(p, attention_paths[p]) for p in attention_paths):
        return names
    logger.warning("this UNet's block layout is not SD 1.x/2.x/SDXL's (A1111 would map diffusers LoRA names to "
                   "other layers): the LoRA is saved under its ldm names (A1111, Forge and ComfyUI load them; "
                   "diffusers' load_lora_weights may not)")
    return {path: path for path in ldm_paths}


class HookLoRASet:
    """LoRAs hooked onto a UNet's target Linears: `loras` {kohya module path: HookLoRA} (what
    save_kohya_lora writes), initialised from `seed`; `remove()` takes every hook off again."""

    def __init__(self, diffusion_model: nn.Module, rank: int, alpha: float, targets: Iterable[str],
                 device: torch.device, seed: int = 0):
        targets = tuple(targets)
        found = [(path, m) for path, m in diffusion_model.named_modules()
                 if is_linear(m) and any(path == t or path.endswith("." + t) for t in targets)]
        if not found:
            raise ValueError(f"no Linear layer of the UNet ends with any of {', '.join(targets)}")
        names = kohya_names([p for p, _ in found], diffusers_attention_paths(diffusion_model))
        self.loras: dict[str, HookLoRA] = {}
        self._handles = []
        generator = torch.Generator().manual_seed(int(seed))
        for path, module in sorted(found, key=lambda found: names[found[0]]):
            lora = HookLoRA(module.in_features, module.out_features, rank, alpha, device, generator)
            self.loras[names[path]] = lora
            self._handles.append(module.register_forward_hook(lora.hook))
        # Forge's BasicTransformerBlock adds in place (`x += n`) to the tensor its norm2/norm3 saved for
        # backward: once the LoRA makes x need a gradient, backward fails ("modified by an inplace
        # operation"). The norms then get a copy of x.
        for path, module in diffusion_model.named_modules():
            if path.rsplit(".", 1)[-1] in ("norm1", "norm2", "norm3") and ".transformer_blocks." in f".{path}":
                self._handles.append(module.register_forward_pre_hook(_own_copy))

    def parameters(self) -> list[nn.Parameter]:
        """In a fixed order (sorted kohya paths): checkpoints store them by position."""
        return [p for _, lora in sorted(self.loras.items()) for p in (lora.down.weight, lora.up.weight)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _own_copy(module: nn.Module, args: tuple):
    """Forward pre-hook: the module works on (and saves for backward) a copy of an input that needs a gradient."""
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


def trainable_copies(module: nn.Module) -> int:
    """Swap every inference tensor among `module`'s parameters and buffers for a normal copy; returns how
    many. Hosts that load models under `torch.inference_mode()` (ComfyUI, Forge) hand over tensors that
    cannot be saved for backward, so the LoRA's backward pass would fail in every layer. Call outside
    inference mode, after the model is on its device."""
    swapped = 0
    for child in module.modules():
        for name, p in list(child._parameters.items()):
            if p is not None and p.is_inference():
                child._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
                swapped += 1
        for name, b in list(child._buffers.items()):
            if b is not None and b.is_inference():
                child._buffers[name] = b.clone()
                swapped += 1
    return swapped


@contextlib.contextmanager
def frozen_without_checkpointing(module: nn.Module) -> Iterator[None]:
    """Inside: no parameter of `module` wants a gradient, and its blocks' own activation checkpointing is
    off (restored after). ldm's `checkpoint` (use_checkpoint: True in the SD configs) recomputes a block
    in backward and hands out gradients only for the block's own parameters: a hooked LoRA would get none
    and silently not learn."""
    grads = [(p, p.requires_grad) for p in module.parameters()]
    flags = [(m, name) for m in module.modules() for name in ("checkpoint", "use_checkpoint")
             if getattr(m, name, None) is True]
    for p, _ in grads:
        p.requires_grad_(False)
    for m, name in flags:
        setattr(m, name, False)
    try:
        yield
    finally:
        for m, name in flags:
            setattr(m, name, True)
        for p, wanted in grads:
            p.requires_grad_(wanted)
