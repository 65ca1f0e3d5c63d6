"""A visible warning when a prompt's `<lora:name:w>` is one of our TPO LoRAs and A1111 will not apply all of it.

A1111 1.10's Lora extension logs the modules it cannot place at debug level only (networks.py
`keys_failed_to_match`), still lists the LoRA in the infotext, and the image still changes a little: a LoRA of
another UNet layout (or one whose layout A1111's name arithmetic does not fit) looks like it worked. Before the
job samples, each of our LoRAs (their metadata says `promptist TPO`) is checked against the loaded checkpoint's
layers with the same name conversion A1111 uses (trainer.tpo.lora_layout); the job goes on, with the warning in the
console, the infotext and the comments under the image. Forge maps LoRA names through the checkpoint's own config,
so there only a different block layout is reported.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from trainer.tpo.lora_layout import (
    KOHYA_UNET_PREFIX,
    LAYOUT_METADATA_KEY,
    UNetLayout,
    a1111_compvis_name,
    kohya_modules,
    true_compvis_name,
)

LORA_TAG = re.compile(r"<lora:([^:<>]+)(?::[^<>]*)?>")
INFOTEXT_LORA_WARNING = "Promptist LoRA warning"
OUR_COMMENT = "promptist TPO"  # ss_training_comment of the LoRAs trainer.tpo saves


def lora_names(prompts) -> list[str]:
    """The LoRA names of `<lora:name:weight>` tags, once each, in order."""
    return list(dict.fromkeys(m.group(1).strip() for text in prompts if isinstance(text, str)
                              for m in LORA_TAG.finditer(text)))


def read_lora_header(path: Path) -> tuple[list[str], dict]:
    """A LoRA file's UNet module names and metadata (the safetensors header only: no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return kohya_modules(f.keys()), dict(f.metadata() or {})


def a1111_lookup(kohya_module: str, layers) -> str | None:
    """The layer name A1111 1.10's `load_network` ends up with for a kohya UNet module, or None when it drops the
    module: the converted name, then its `lora_unet` -> `diffusion_model` fallback (networks.py, v1.10.1)."""
    for name in (a1111_compvis_name(kohya_module), kohya_module.replace("lora_unet", "diffusion_model", 1)):
        if name in layers:
            return name
    return None


def a1111_lora_warning(name: str, modules: list[str], metadata: dict, layers) -> str | None:
    """One line when A1111 would drop some of the LoRA's modules on the loaded model (`layers`: A1111's layer
    names), or put them on another layer than the one they were trained for (from the LoRA's stored layout)."""
    layout = UNetLayout.from_json(metadata[LAYOUT_METADATA_KEY]) if metadata.get(LAYOUT_METADATA_KEY) else None
    dropped = misplaced = 0
    for module in modules:
        found = a1111_lookup(module, layers)
        if found is None:
            dropped += 1
        elif layout is not None and found != true_compvis_name(module, layout):
            misplaced += 1
    if not (dropped or misplaced):
        return None
    what = ", ".join(part for part in (f"{dropped} dropped" if dropped else "",
                                       f"{misplaced} on other layers" if misplaced else "") if part)
    trained = f" (trained on {metadata.get('ss_sd_model_name') or 'another checkpoint'})"
    return (f"LoRA '{name}' does not fit this checkpoint: {dropped + misplaced} of its {len(modules)} UNet modules "
            f"are not applied where they belong ({what}){trained}. A TPO LoRA fits the UNet layout it was trained "
            "on: use it with that checkpoint (or train one on this one)")


def forge_lora_warning(name: str, metadata: dict, loaded: UNetLayout | None) -> str | None:
    """Forge maps names by the checkpoint's config: only a different block layout loses modules there."""
    if loaded is None or not metadata.get(LAYOUT_METADATA_KEY):
        return None
    trained = UNetLayout.from_json(metadata[LAYOUT_METADATA_KEY])
    if trained == loaded:
        return None
    return (f"LoRA '{name}' was trained on a UNet of another block layout ({trained.describe()}; this checkpoint: "
            f"{loaded.describe()}): its modules do not all load. A TPO LoRA fits the UNet layout it was trained on")


def lora_file(name: str, lora_dirs) -> Path | None:
    """The LoRA file a tag names: the webui's own list where its Lora extension is loaded, else `<name>.safetensors`
    under the LoRA folders."""
    networks = sys.modules.get("networks")
    entry = getattr(networks, "available_networks", {}).get(name) if networks is not None else None
    if entry is not None and getattr(entry, "filename", None):
        return Path(entry.filename)
    for folder in lora_dirs:
        folder = Path(folder)
        if folder.is_dir():
            for path in folder.rglob(f"{name}.safetensors"):
                return path
    return None


def loaded_layers(sd_model) -> set[str] | None:
    """A1111's names of the loaded checkpoint's layers (its Lora extension's `network_layer_mapping`, built the
    same way from `sd_model.model` when that is not there yet); None on Forge (no A1111 name mapping)."""
    mapping = getattr(sd_model, "network_layer_mapping", None)
    if mapping:
        return set(mapping)
    model = getattr(sd_model, "model", None)
    if model is None or not hasattr(model, "named_modules") or hasattr(sd_model, "forge_objects"):
        return None
    return {name.replace(".", "_") for name, _ in model.named_modules()}


def forge_layout(sd_model) -> UNetLayout | None:
    """The loaded checkpoint's block layout in Forge: its UNet's guessed `unet_config` (backend/loader.py sets it
    as the UNet's `config`; the model's guess object holds it too)."""
    unet = getattr(getattr(getattr(sd_model, "forge_objects", None), "unet", None), "model", None)
    for config in (getattr(getattr(unet, "diffusion_model", None), "config", None),
                   getattr(getattr(unet, "config", None), "unet_config", None)):
        try:
            return UNetLayout.from_ldm_unet_config(dict(config))
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
    return None


def lora_warnings(prompts, sd_model, lora_dirs) -> list[str]:
    """The warnings for the LoRAs of ours that `prompts` name, on `sd_model` (others' LoRAs are not checked)."""
    warnings = []
    for name in lora_names(prompts):
        path = lora_file(name, lora_dirs)
        if path is None or path.suffix != ".safetensors":
            continue
        try:
            modules, metadata = read_lora_header(path)
        except Exception:  # not ours to judge: the webui reports a broken file itself
            continue
        if metadata.get("ss_training_comment") != OUR_COMMENT and LAYOUT_METADATA_KEY not in metadata:
            continue
        layers = loaded_layers(sd_model)
        if layers is not None:
            warning = a1111_lora_warning(name, modules, metadata, layers)
        else:
            warning = forge_lora_warning(name, metadata, forge_layout(sd_model))
        if warning:
            warnings.append(warning)
    return warnings


def warn_about_loras(p, sd_model, lora_dirs) -> list[str]:
    """The process hook: say each warning in the console, the infotext and the comments under the image;
    the job goes on (the user may want the image anyway)."""
    warnings = lora_warnings(getattr(p, "all_prompts", None) or [getattr(p, "prompt", "")], sd_model, lora_dirs)
    for warning in warnings:
        print(f"*** Promptist: {warning}", file=sys.stderr)
        if hasattr(p, "comment"):
            p.comment(warning)
    if warnings:
        p.extra_generation_params[INFOTEXT_LORA_WARNING] = " | ".join(warnings)
    return warnings


__all__ = ["INFOTEXT_LORA_WARNING", "KOHYA_UNET_PREFIX", "a1111_lora_warning", "lora_names", "lora_warnings",
           "warn_about_loras"]
