"""The one step-callback protocol of every trainer, and its headless wiring (tqdm, Ctrl-C).

A trainer calls `callback(step, total, metrics)` after every optimizer step. The callback may raise
`StopTraining` to stop: the trainer then saves a checkpoint and re-raises, so `--resume` continues
from exactly there. ComfyUI and A1111 wire their progress bars and Interrupt buttons to the same call.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

StepCallback = Callable[[int, int, dict], None]


class StopTraining(Exception):
    """Raised by a step callback to stop training after saving a checkpoint (Ctrl-C, Cancel, Interrupt).

    The trainer re-raises it as `StopTraining.saved(...)`: `stopped_at` ("iteration 2") and `checkpoints` (the
    folder) say where the run stands, so that each host can phrase how to continue it; the text itself is the
    command line's advice."""

    def __init__(self, message: str = "", *, stopped_at: str | None = None, checkpoints: Path | None = None):
        super().__init__(message)
        self.stopped_at, self.checkpoints = stopped_at, checkpoints

    @classmethod
    def saved(cls, stopped_at: str, checkpoints: Path) -> StopTraining:
        return cls(f"stopped at {stopped_at}; resume with --resume (checkpoint in {checkpoints})",
                   stopped_at=stopped_at, checkpoints=checkpoints)


def stop_requested(callback: StepCallback | None, step: int, total: int, metrics: dict, runtime) -> bool:
    """Call the step callback on the main process; True on every rank when it raised StopTraining (the
    trainer then saves a checkpoint and re-raises)."""
    stop = False
    if runtime.is_main and callback is not None:
        try:
            callback(step, total, metrics)
        except StopTraining:
            stop = True
    return runtime.broadcast_flag(stop)


def chain(*callbacks: StepCallback | None) -> StepCallback:
    """One callback that calls each given one in order."""
    active = [c for c in callbacks if c is not None]

    def call(step: int, total: int, metrics: dict) -> None:
        for c in active:
            c(step, total, metrics)

    return call


class ConsoleProgress:
    """tqdm bar with the latest metrics; the first Ctrl-C asks for a stop at the end of the step (a
    checkpoint is saved), a second one interrupts at once. Use as a context manager."""

    def __init__(self, total: int, initial: int = 0, desc: str = "training", enabled: bool = True,
                 shown: tuple[str, ...] = ("loss", "valid_loss", "lr", "reward", "kl")):
        self.total, self.initial, self.desc, self.enabled, self.shown = total, initial, desc, enabled, shown
        self.stop_requested = False
        self._bar = None
        self._previous_handler = None

    def __enter__(self) -> ConsoleProgress:
        if self.enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, unit="step", dynamic_ncols=True)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
        if self._bar is not None:
            self._bar.close()

    def _on_sigint(self, signum, frame) -> None:
        if self.stop_requested:
            raise KeyboardInterrupt
        self.stop_requested = True
        message = "stopping after this step and saving a checkpoint (Ctrl-C again to abort without saving)"
        (self._bar.write if self._bar is not None else print)(message)

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        if self._bar is not None:
            self._bar.n = step
            shown = {k: f"{metrics[k]:.4g}" for k in self.shown if isinstance(metrics.get(k), float)}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()
        if self.stop_requested:
            raise StopTraining("stopped by Ctrl-C")
