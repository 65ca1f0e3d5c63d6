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
