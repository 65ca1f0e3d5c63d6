"""VRAM manners in the webui: Promptist's models leave the GPU after each job.

A1111 and Forge give an extension no memory manager for its own models (ComfyUI does: there the models
are ModelPatchers it offloads, nodes/comfy_host.ManagedModel). So after each job the policy and the
reward models move to RAM (still loaded: the next job moves them back in a moment instead of reading
the files again), unless Settings → Promptist → "Keep Promptist models on the GPU between jobs" is on.
"""

from __future__ import annotations

from promptist_core.devices import move_to, release_accelerator

KEEP_SETTING = "promptist_keep_on_gpu"
KEEP_LABEL = ("Keep Promptist models on the GPU between jobs (faster; off: they wait in RAM and the GPU memory "
              "is the image model's)")


def optimizer_modules(optimizer) -> list:
    return [getattr(optimizer, "model", None), getattr(optimizer, "dfprompt_heads", None)]


def scorer_modules(scorer) -> list:
    clip, pick = getattr(scorer, "clip", None), getattr(scorer, "pick", None)
    return [getattr(clip, "module", None), getattr(pick, "module", None), getattr(scorer, "aesthetic_head", None)]


def ready(modules, device) -> None:
    """Before a job: the models back on the device they were loaded for (parked in RAM after the last)."""
    move_to(modules, device)


def after_job(opts_data: dict, modules) -> int:
    """After a job: the models to RAM, unless the keep setting is on. Returns how many moved."""
    if opts_data.get(KEEP_SETTING, False):
        return 0
    return release_accelerator(modules)


def cached_modules() -> list:
    """Every policy and CLIP promptist holds loaded (a Train or Evaluate job may have used any)."""
    from promptist_core.clip_models import cached_encoders
    from promptist_core.optimizer import cached_optimizers

    return [m for _, o in cached_optimizers() for m in optimizer_modules(o)] + [c.module for c in cached_encoders()]


def releasing(opts_data: dict, job, *, policies_back: bool = False):
    """`job` (a tab button's function) with every cached model moved off the GPU when it ends.
    `policies_back`: first every cached policy goes back to the device it was loaded for (Evaluate loads
    its policies through the core's cache, which would otherwise hand them over parked in RAM)."""
    import functools

    from promptist_core.optimizer import cached_optimizers

    @functools.wraps(job)
    def run(*args, **kwargs):
        if policies_back:
            for device, optimizer in cached_optimizers():
                ready(optimizer_modules(optimizer), device)
        try:
            return job(*args, **kwargs)
        finally:
            after_job(opts_data() if callable(opts_data) else opts_data, cached_modules())

    return run
