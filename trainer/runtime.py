"""Where a trainer runs: one process (default, and always inside ComfyUI or A1111), or data parallel.

Started by `accelerate launch --multi_gpu --num_processes N -m trainer ...` (or torchrun), each
process sees RANK / WORLD_SIZE / LOCAL_RANK and joins a torch.distributed group: the trainable model
goes through DDP, frozen parts are replicated. We never build an `accelerate.Accelerator`: it sets
process-wide state that does not belong in a long-lived host, and its mixed precision and checkpoint
formats change between the accelerate 0.21 that A1111 pins and current releases. Mixed precision and
checkpoints are ours (see checkpoint.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from promptist_core.devices import pick_device

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """None for fp32. `auto`: bf16 where the GPU has it, fp16 on other GPUs, fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return None
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


@dataclass
class Runtime:
    """Device, precision and process group of a training run."""

    device: torch.device
    precision: torch.dtype | None = None  # autocast dtype; None = fp32
    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.precision)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 needs loss scaling; bf16 and fp32 do not."""
        if self.precision is torch.float16:
            return torch.amp.GradScaler(self.device.type)
        return None

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DDP over the trainable module when data parallel; the module itself otherwise."""
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def no_sync(self, module: torch.nn.Module):
        """Skip the gradient all-reduce (every micro-batch but the last of an accumulation)."""
        return module.no_sync() if self.distributed else contextlib.nullcontext()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """True on every rank if it is True on any (a stop request from rank 0's Ctrl-C)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.all_reduce_sum(t).item() > 0)


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where this torch has one for the parameters' device (CUDA, and CPU
    from torch 2.4: about 3x faster than the default loop there), else the default implementation (the
    torch that A1111 1.10 ships)."""
    groups = list(groups)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def optimizer_step(optimizer: torch.optim.Optimizer, params, scaler: torch.amp.GradScaler | None, lr: float,
                   grad_clip: float | None) -> float:
    """One update after the gradients are accumulated: unscale (fp16), clip to `grad_clip` (None or 0: no
    clipping, the norm is still measured), set `lr`, step, clear the gradients. Returns the gradient norm."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf")).item()
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def local_runtime(device: str | torch.device = "auto", precision: str = "auto") -> Runtime:
    """One process on one device: the hosts' runtime, and headless without a launcher."""
    target = pick_device(device)
    return Runtime(target, autocast_dtype(target, precision))


def runtime_from_env(device: str | torch.device = "auto", precision: str = "auto") -> Runtime:
    """Data parallel when a launcher set WORLD_SIZE > 1, else `local_runtime`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return local_runtime(device, precision)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and str(device) not in ("cpu",)
    if use_cuda:
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device("cpu")
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if use_cuda else "gloo")
    return Runtime(target, autocast_dtype(target, precision), world, rank)


def step_plan(items: int, micro_batch: int, accumulation: int, devices: int, *, what: str,
              setting: str, suggestion: str) -> tuple[str, str | None]:
    """What one optimizer step costs, said at the start of a run, and a warning when the data is smaller than
    one step (a paper-scale effective batch on a few dozen pairs re-reads them many times per step, slowly and
    with no hint). Returns (the plan line, the warning or None)."""
    per_step = micro_batch * accumulation * devices
    plan = (f"each step: {accumulation} micro-batch{'es' if accumulation != 1 else ''} of {micro_batch} {what}"
            f"{f' on each of {devices} devices' if devices > 1 else ''} = {per_step} {what} per step; "
            f"{items} {what} to train on")
    if items >= per_step:
        return plan, None
    return plan, (f"the data ({items} {what}) is smaller than one step ({per_step}): every step goes over it "
                  f"{per_step / max(items, 1):.1f} times; for data this small set {setting} to {suggestion}")


# What a run's learning rates add up to (the sum over its steps) must reach before its loss moves visibly. Measured
# on the tiny TPO test task (notes/harden-train.md): the TDPO loss moved from ln 2 by about 100 x that sum (8 steps
# at 1e-5 with the default 100-step warmup: sum 3.6e-6, loss 0.6929; at 1e-4 without warmup: 8e-4, 0.630; 64 steps
# at 1e-4: 6.4e-3, 0.39). Below this sum a run cannot show more than a loss near its start.
SHORT_RUN_TOTAL_LR = 5e-4
LOSS_MOVE_PER_TOTAL_LR = 100.0  # the measured slope above, loss per unit of summed learning rate
QUICK_LOOK_STEPS = 100  # runs this short are quick looks: the accumulation hint applies


def short_run_notes(learning_rates: Sequence[float], accumulation: int, *, lr: float, warmup_steps: int = 0,
                    start_loss: str,
                    settings: tuple[str, str, str] = ("--lr", "--max-steps", "--grad-accum")) -> list[str]:
    """What a short run can show, said at its start: a run whose learning rates sum to little ends with the loss
    near its start (TPO's default lr 1e-5 over a few steps), and a quick look pays for every accumulated
    micro-batch. `learning_rates`: the rate of every step (`lr` after `warmup_steps`); `settings`: the host's
    names of lr, steps and accumulation."""
    lr_name, steps_name, accum_name = settings
    steps, total = len(learning_rates), float(sum(learning_rates))
    notes = []
    if total < SHORT_RUN_TOTAL_LR:
        warmup = f" (still in its {warmup_steps}-step warmup)" if warmup_steps >= steps else \
            (f" (after a {warmup_steps}-step warmup)" if warmup_steps else "")
        notes.append(f"a {steps}-step run at lr {lr:g}{warmup} adds up to a learning rate of {total:.2g}: expect "
                     f"the loss to end near its start ({start_loss}; a tiny test model moved "
                     f"{LOSS_MOVE_PER_TOTAL_LR * total:.2g} at this total) and the implicit accuracy to say little; "
                     f"for a quick check raise {lr_name} (e.g. 1e-4) or {steps_name}")
    if accumulation > 1 and steps <= QUICK_LOOK_STEPS:
        notes.append(f"each step accumulates {accumulation} micro-batches ({accum_name} {accumulation}): for a "
                     f"quick look set {accum_name} 1, about {accumulation}x faster per step")
    return notes
