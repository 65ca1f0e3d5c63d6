"""What our nodes need from ComfyUI: the models folder, memory management, progress, interrupts.

Imported by every node file; when ComfyUI is absent (tests, headless) each function falls back to
plain behaviour (default models folder, no offloading, no progress bar) so the node functions can
be called directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from promptist_core.weights import default_models_dir

try:
    import comfy.model_management as model_management
    import comfy.utils as comfy_utils
    import folder_paths
except ImportError:
    model_management = comfy_utils = folder_paths = None

MODELS_KEY = "promptist"


def register_models_folder() -> None:
    """Make `models/promptist` a ComfyUI model folder, unless the user configured one already."""
    if folder_paths is not None and MODELS_KEY not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(MODELS_KEY, os.path.join(folder_paths.models_dir, MODELS_KEY))


def models_dirs() -> list[Path]:
    """Folders to search for model folders: ComfyUI's `models/promptist` (+ extra_model_paths.yaml)."""
    if folder_paths is None:
        return [default_models_dir()]
    register_models_folder()
    return [Path(p) for p in folder_paths.get_folder_paths(MODELS_KEY)]


def list_model_folders(default: str, accept: Callable[[Path], bool]) -> list[str]:
    """`default` first, then the policy bundled with promptist (usable with nothing copied or downloaded), then
    every sub-folder of the models folders that `accept` takes."""
    from promptist_core.weights import BUNDLED_POLICY

    names = list(dict.fromkeys([default, BUNDLED_POLICY]))
    for d in models_dirs():
        if d.is_dir():
            names += sorted(p.name for p in d.iterdir() if p.is_dir() and p.name not in names and accept(p))
    return names


def load_device() -> torch.device:
    """The device ComfyUI computes on (honours --cpu, --gpu-only, ...)."""
    if model_management is None:
        from promptist_core.devices import pick_device

        return pick_device("auto")
    return torch.device(model_management.get_torch_device())


def offload_device() -> torch.device:
    if model_management is None:
        return torch.device("cpu")
    return torch.device(model_management.text_encoder_offload_device())


class _Holder(torch.nn.Module):
    """ModelPatcher assigns `model.device`, which transformers models expose read-only: hand it a holder."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.device = next(module.parameters()).device


# ComfyUI logs "Requested to load <class name>" for every load: one named holder class per kind of model.
_HOLDER_CLASSES: dict[str, type] = {}


def holder_class(name: str) -> type:
    """The `_Holder` subclass called `name` (what ComfyUI's log shows), e.g. PromptistPolicy."""
    if name not in _HOLDER_CLASSES:
        _HOLDER_CLASSES[name] = type(name, (_Holder,), {"__doc__": _Holder.__doc__})
    return _HOLDER_CLASSES[name]


class ManagedModel:
    """A torch module handed to ComfyUI's memory manager, so it can be offloaded when VRAM is short."""

    def __init__(self, module, on_device, name: str):
        self.module = module
        self.patcher = None
        if model_management is not None:
            import comfy.model_patcher

            self.patcher = comfy.model_patcher.ModelPatcher(holder_class(name)(module), load_device=on_device,
                                                            offload_device=offload_device())

    def load(self) -> None:
        """Move the module to its compute device (ComfyUI may evict other models to make room)."""
        if self.patcher is not None:
            model_management.load_models_gpu([self.patcher])


# Module level: ComfyUI clones node classes per run, so a cache on a class would be lost.
_MANAGED: dict[int, ManagedModel] = {}


def managed(module: torch.nn.Module, on_device: torch.device, name: str) -> ManagedModel:
    """The one ManagedModel of `module` (models are cached by the core, so their handles are too).
    `name` is what ComfyUI's log calls it ("Requested to load PromptistPolicy")."""
    if id(module) not in _MANAGED:
        _MANAGED[id(module)] = ManagedModel(module, on_device, name)
    return _MANAGED[id(module)]


def step_progress(total: int):
    """A callback(step, steps) for core loops: advances ComfyUI's progress bar by one per call (out of
    `total` over the whole node run) and raises ComfyUI's interrupt when the user cancels."""
    bar = comfy_utils.ProgressBar(total) if comfy_utils is not None else None

    def callback(step: int, steps: int) -> None:
        if model_management is not None:
            model_management.throw_exception_if_processing_interrupted()
        if bar is not None:
            bar.update(1)

    return callback
