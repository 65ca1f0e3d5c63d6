"""Which UNet a LoRA fits, and whether A1111 puts each of its modules on the right layer.

Our LoRAs name modules by their diffusers path (`lora_unet_down_blocks_1_attentions_0_..._to_q`). ComfyUI and
Forge map those names through the checkpoint's own config (so any block layout loads), but A1111 1.10's Lora
extension converts them with fixed arithmetic (extensions-builtin/Lora/networks.py,
`convert_diffusers_name_to_compvis`, AUTOMATIC1111/stable-diffusion-webui v1.10.1, commit 82a973c0): input
block `1 + level * 3 + i`, output block `level * 3 + i`, i.e. two ResNets per level as in SD 1.x, 2.x and SDXL.
On a UNet with another number of layers per block, a module then lands on a missing layer (dropped: A1111 logs
it at debug level only) or on another layer of the same shape (applied to the wrong place). `a1111_mapping`
says which, for one module and one layout; `UNetLayout` is the compact, host-independent description of a
UNet's blocks that our LoRAs carry in their metadata (`promptist_unet_layout`), read from a diffusers config or
a ComfyUI / ldm `unet_config`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

LAYOUT_METADATA_KEY = "promptist_unet_layout"
KOHYA_UNET_PREFIX = "lora_unet_"

# A1111 1.10's names for the sub-layers of a ResNet block (networks.py `suffix_conversion`).
A1111_RESNET_SUFFIXES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                         "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


@dataclass(frozen=True)
class UNetLayout:
    """A UNet's block structure: ResNets per down level (`layers_per_block`), which levels have attention, and
    whether the middle block has. Up levels mirror the down levels with one layer more (as diffusers and ldm
    build them). Enough to name every block in both the diffusers and the compvis (ldm) naming."""

    layers_per_block: tuple[int, ...]
    attention: tuple[bool, ...]
    mid_attention: bool = True

    def __post_init__(self):
        if len(self.layers_per_block) != len(self.attention) or not self.layers_per_block:
            raise ValueError(f"a UNet layout needs one entry per level: {self.layers_per_block}, {self.attention}")

    @property
    def levels(self) -> int:
        return len(self.layers_per_block)

    def describe(self) -> str:
        """'2 levels of 1 ResNet, attention at levels 1, 2': for messages."""
        counts = sorted(set(self.layers_per_block))
        per = (f"{counts[0]} ResNet{'s' if counts[0] != 1 else ''}" if len(counts) == 1
               else f"{list(self.layers_per_block)} ResNets")
        levels = [str(i + 1) for i, a in enumerate(self.attention) if a]
        return (f"{self.levels} levels of {per}, attention at level{'s' if len(levels) != 1 else ''} "
                f"{', '.join(levels) or 'none'}")

    def to_json(self) -> str:
        return json.dumps({"layers_per_block": list(self.layers_per_block), "attention": list(self.attention),
                           "mid_attention": self.mid_attention}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> UNetLayout:
        data = json.loads(text)
        return cls(tuple(int(n) for n in data["layers_per_block"]), tuple(bool(a) for a in data["attention"]),
                   bool(data.get("mid_attention", True)))

    @classmethod
    def from_diffusers_config(cls, config) -> UNetLayout:
        """From a diffusers UNet2DConditionModel config (the object or its dict)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        types = list(get("down_block_types"))
        per_level = get("layers_per_block", 2)
        per_level = [int(per_level)] * len(types) if isinstance(per_level, int) else [int(n) for n in per_level]
        mid = get("mid_block_type", "UNetMidBlock2DCrossAttn")
        return cls(tuple(per_level), tuple("Attn" in t for t in types), mid is not None and "Attn" in mid)

    @classmethod
    def from_ldm_unet_config(cls, config: dict) -> UNetLayout:
        """From an ldm / ComfyUI `unet_config` (`num_res_blocks`, `channel_mult`, `transformer_depth`: one entry per
        input block as ComfyUI detects it, or one per level; `transformer_depth_middle`)."""
        levels = len(config["channel_mult"])
        blocks = config["num_res_blocks"]
        blocks = [int(blocks)] * levels if isinstance(blocks, int) else [int(n) for n in blocks]
        depth = config.get("transformer_depth", [1] * levels)
        depth = [int(depth)] * levels if isinstance(depth, int) else [int(d) for d in depth]
        if len(depth) == sum(blocks):  # ComfyUI: one entry per ResNet of the input blocks
            starts = [sum(blocks[:i]) for i in range(levels)]
            attention = [any(depth[s:s + n]) for s, n in zip(starts, blocks, strict=True)]
        else:
            attention = [d > 0 for d in depth[:levels]]
        middle = config.get("transformer_depth_middle", 1)
        return cls(tuple(blocks), tuple(attention), middle is not None and int(middle) > 0)

    def compvis_prefix(self, diffusers_block: str) -> str | None:
        """`down_blocks_1_attentions_0` -> `input_blocks_3_1` for this layout (None: no such block here)."""
        m = re.fullmatch(r"(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)", diffusers_block)
        if m:
            side, level, kind, i = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
            if level >= self.levels:
                return None
            if side == "down":
                start = 1 + sum(n + 1 for n in self.layers_per_block[:level])
                if kind == "downsamplers":
                    return f"input_blocks_{start + self.layers_per_block[level]}_0" if (
                        i == 0 and level < self.levels - 1) else None
                if kind not in ("attentions", "resnets") or i >= self.layers_per_block[level] or (
                        kind == "attentions" and not self.attention[level]):
                    return None
                return f"input_blocks_{start + i}_{1 if kind == 'attentions' else 0}"
            mirrored = self.levels - 1 - level
            start = sum(n + 1 for n in reversed(self.layers_per_block[mirrored + 1:]))
            count = self.layers_per_block[mirrored] + 1
            if kind == "upsamplers":
                return (f"output_blocks_{start + count - 1}_{2 if self.attention[mirrored] else 1}"
                        if i == 0 and level < self.levels - 1 else None)
            if kind not in ("attentions", "resnets") or i >= count or (
                    kind == "attentions" and not self.attention[mirrored]):
                return None
            return f"output_blocks_{start + i}_{1 if kind == 'attentions' else 0}"
        m = re.fullmatch(r"mid_block_(attentions|resnets)_(\d+)", diffusers_block)
        if m:
            kind, i = m.group(1), int(m.group(2))
            if kind == "attentions":
                return "middle_block_1" if i == 0 and self.mid_attention else None
            return f"middle_block_{2 * i if self.mid_attention else i}" if i < 2 else None
        return None


_BLOCK = re.compile(r"((?:down|up)_blocks_\d+_(?:attentions|resnets|downsamplers|upsamplers)_\d+|"
                    r"mid_block_(?:attentions|resnets)_\d+)_(.+)")


@dataclass(frozen=True)
class A1111Mapping:
    """Where A1111 1.10 puts one kohya module, and where it belongs in a UNet of the given layout (both as A1111's
    `network_layer_mapping` names: `diffusion_model_input_blocks_1_1_...`)."""

    kohya_module: str
    a1111_name: str
    true_name: str | None

    @property
    def loads(self) -> bool:
        """A1111 applies the module to its own layer."""
        return self.true_name is not None and self.a1111_name == self.true_name


def a1111_compvis_name(kohya_module: str) -> str:
    """The layer name A1111 1.10 looks up for a kohya UNet module of diffusers naming: its
    `convert_diffusers_name_to_compvis(key, is_sd2)` for `lora_unet_*` keys (is_sd2 only changes text-encoder
    keys), ported line by line."""
    key = kohya_module
    if m := re.match(r"lora_unet_conv_in(.*)", key):
        return f"diffusion_model_input_blocks_0_0{m.group(1)}"
    if m := re.match(r"lora_unet_conv_out(.*)", key):
        return f"diffusion_model_out_2{m.group(1)}"
    if m := re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key):
        return f"diffusion_model_time_embed_{int(m.group(1)) * 2 - 2}{m.group(2)}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        level, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        suffix = A1111_RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + level * 3 + i}_{1 if kind == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key):
        kind, i, rest = m.group(1), int(m.group(2)), m.group(3)
        suffix = A1111_RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else i * 2}_{suffix}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key):
        level, kind, i, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        suffix = A1111_RESNET_SUFFIXES.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{level * 3 + i}_{1 if kind == 'attentions' else 0}_{suffix}"
    if m := re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key):
        return f"diffusion_model_input_blocks_{3 + int(m.group(1)) * 3}_0_op"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key):
        level = int(m.group(1))
        return f"diffusion_model_output_blocks_{2 + level * 3}_{2 if level > 0 else 1}_conv"
    return key


def true_compvis_name(kohya_module: str, layout: UNetLayout) -> str | None:
    """The layer a kohya UNet module of diffusers naming belongs to in the compvis model of `layout`, named as
    A1111 names it (None: the layout has no such block)."""
    if not kohya_module.startswith(KOHYA_UNET_PREFIX):
        return None
    path = kohya_module[len(KOHYA_UNET_PREFIX):]
    m = _BLOCK.fullmatch(path)
    if not m:  # conv_in, conv_out, the time embedding: the same in every layout, and A1111 names them right
        name = a1111_compvis_name(kohya_module)
        return name if name != kohya_module else None
    prefix = layout.compvis_prefix(m.group(1))
    if prefix is None:
        return None
    rest = m.group(2)
    if "resnets" in m.group(1):
        rest = A1111_RESNET_SUFFIXES.get(rest, rest)
    elif "downsamplers" in m.group(1):
        rest = "op" if rest == "conv" else rest
    return f"diffusion_model_{prefix}_{rest}"


def a1111_mapping(kohya_module: str, layout: UNetLayout) -> A1111Mapping:
    """Where A1111 1.10 applies `kohya_module` (a `lora_unet_*` name of diffusers naming) on a checkpoint of
    `layout`, and where it belongs: `.loads` is False when A1111 drops it or puts it on another layer."""
    return A1111Mapping(kohya_module, a1111_compvis_name(kohya_module), true_compvis_name(kohya_module, layout))


def a1111_misplaced(kohya_modules: Iterable[str], layout: UNetLayout) -> list[A1111Mapping]:
    """The modules A1111 1.10 would drop or apply to the wrong layer on a checkpoint of `layout`."""
    return [m for m in (a1111_mapping(k, layout) for k in kohya_modules) if not m.loads]


def kohya_modules(keys: Iterable[str]) -> list[str]:
    """The UNet module names of a kohya LoRA's tensor keys (`<module>.lora_down.weight` ...)."""
    return sorted({k.split(".", 1)[0] for k in keys if k.startswith(KOHYA_UNET_PREFIX)})


def a1111_save_warning(kohya_module_names: Iterable[str], layout: UNetLayout) -> str | None:
    """One line for a LoRA about to be saved whose modules A1111 1.10 would not all put in place; else None."""
    names = list(kohya_module_names)
    wrong = a1111_misplaced(names, layout)
    if not wrong:
        return None
    return (f"this LoRA's UNet has {list(layout.layers_per_block)} ResNets per level, not the 2 of SD 1.x/2.x/SDXL: "
            f"A1111 1.10 would drop or misplace {len(wrong)} of its {len(names)} modules (e.g. {wrong[0].kohya_module} "
            f"-> {wrong[0].a1111_name}, which belongs at {wrong[0].true_name}); ComfyUI and Forge load it fully")
