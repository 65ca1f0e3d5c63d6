"""Device and dtype policy: half precision on accelerators, fp32 on CPU, the host's choice first."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "gpu", "cpu")


def pick_device(policy: str | torch.device | None = "auto") -> torch.device:
    """`auto`/`gpu` -> CUDA, then Apple MPS, then CPU; `cpu` -> CPU; a torch.device passes through."""
    if isinstance(policy, torch.device):
        return policy
    policy = (policy or "auto").lower()
    if policy == "cpu":
        return torch.device("cpu")
    if policy not in DEVICE_CHOICES:
        return torch.device(policy)  # e.g. "cuda:1", as a host may pass
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 where the GPU supports it, else fp16 on accelerators; always fp32 on CPU unless asked."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        return {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}[dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter or buffer; CPU for one without any)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def move_to(modules, device: str | torch.device) -> int:
    """Move each module (None skipped) that is not on `device` there; returns how many moved. A model a
    host parked in RAM after the last job goes back to its compute device before this one."""
    device, moved = torch.device(device), 0
    for module in modules:
        if module is not None and module_device(module) != device:
            module.to(device)
            moved += 1
    return moved


def release_accelerator(modules) -> int:
    """Move every module (None skipped) that sits on an accelerator to the CPU and give the freed memory
    back (CUDA's cache emptied): what a host without a memory manager does after a job, so its VRAM is
    the image model's again. The modules stay loaded, in RAM. Returns how many moved."""
    moved = sum(1 for module in modules if module is not None and module_device(module).type != "cpu"
                and module.to("cpu") is not None)
    if moved and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return moved
