"""The rules of a training run that every host follows (ComfyUI's train nodes, the webui's Train tabs).

A run lives in `<models folder>/<save name>`: its checkpoints, train_log.csv, curves.png and, for PPO,
the prompts it trains on (`prompts.txt`). Queueing or pressing Train again with the same save name
continues it. What a host adds is only its glue: which models folder, where relative paths are looked
up, how an error reaches the user, how progress and the preview are shown.

    folder = run_folder(models_root, save_name, label="save_name")   # ValueError names the problem
    data = input_file(data_file, "data_file", search=[input_dir, Path.cwd()])
    prompts = run_prompts(prompts, prompts_file, folder, resume=resume, search=[...])
    curve = LiveCurve(folder, {"loss": ("loss", "valid_loss")}, "SFT")
    # in the step callback:
    curve.add(step, metrics); picture = curve.preview(step, total)   # None until one is due

Every check raises ValueError with a message that names the host's field (`label`); nothing here
imports a host.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

PROMPTS_FILE = "prompts.txt"  # the prompts of a run given as text, kept in its folder
PREVIEW_EVERY_S = 1.0  # the live curve is redrawn at most this often (and always at the last step)
# The curves of each trainer: a panel's title -> the logged keys drawn in it.
SFT_PANELS = {"loss": ("loss", "valid_loss")}
PPO_PANELS = {"reward": ("reward", "reward_aes", "reward_rel", "reward_pick"), "KL": ("kl",)}
DF_PANELS = {"mean weight": ("mean_weight",), "head KL": ("kl_weight", "kl_range")}  # a DF-Prompt policy's heads
TPO_PANELS = {"loss": ("loss",), "implicit accuracy": ("accuracy", "valid_accuracy")}


# --- the run's folder ----------------------------------------------------------------------------

def save_name_problem(name: str | None, label: str = "save name") -> str | None:
    """Why `name` cannot name a run's folder inside a models folder, or None (`label`: what the host calls
    the field, starting the message)."""
    if not name or not name.strip():
        return f"{label} is empty: give the run a folder name, e.g. my-promptist"
    if "/" in name or "\\" in name or name.strip() in (".", "..") or name != name.strip():
        return f"{label} must be a plain folder name (no path separators, no leading or trailing spaces); got {name!r}"
    return None


def is_run(folder: Path) -> bool:
    """A training run's folder (it has checkpoints), as opposed to a model someone put there."""
    return (Path(folder) / "checkpoints").is_dir()


def not_a_run_problem(folder: Path, label: str = "save name") -> str | None:
    """Why training may not write into `folder`: it holds a model that is not a training run (training
    would overwrite it). None for a new folder or a run to continue."""
    from promptist_core.optimizer import causal_lm_problem

    if is_run(folder) or causal_lm_problem(folder) is not None:
        return None
    return f"{folder} holds a model that is not a training run; choose another {label.lower()} (training would overwrite it)"


def run_folder(models_root: Path, save_name: str, *, label: str = "save name") -> Path:
    """`models_root/<save name>`: a new folder, or a training run to continue; ValueError otherwise."""
    problem = save_name_problem(save_name, label)
    folder = Path(models_root) / save_name if problem is None else None
    problem = problem or not_a_run_problem(folder, label)
    if problem:
        raise ValueError(problem)
    return folder


# --- input files ----------------------------------------------------------------------------------

def input_file(path: str, label: str, *, search: Sequence[Path] = ()) -> Path:
    """An existing file: absolute, or relative to the first folder of `search` that holds it (the host's
    input folder, the working directory); ValueError names what was looked at."""
    if not path or not path.strip():
        raise ValueError(f"{label} is empty: give a file path")
    given = Path(path.strip()).expanduser()
    candidates = [given] if given.is_absolute() else [Path(folder) / given for folder in search]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise ValueError(f"{label}: no such file {path!r} (looked at {', '.join(str(c) for c in candidates)})")


# --- what a run keeps, refused if it differs on resume ---------------------------------------------

def differs_from_run(what: str, folder: Path, label: str = "save name") -> str:
    """The refusal when a continued run is given other inputs than it started with."""
    return (f"the {what} differ from those of the run in {folder} being continued; restore them or choose "
            f"another {label.lower()} for a new run")


def prompts_text(prompts: str, label: str = "prompts", file_label: str = "prompts file") -> str:
    """Plain prompts typed one per line -> the text kept in the run folder (blank lines and spaces dropped)."""
    lines = [line.strip() for line in (prompts or "").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{label} is empty: give plain prompts, one per line, or a {file_label.lower()}")
    return "\n".join(lines) + "\n"


def kept_prompts_problem(folder: Path, text: str, resume: bool, label: str = "save name") -> str | None:
    """Why `text` cannot be this run's prompts: a continued run must read the prompts it started with."""
    path = Path(folder) / PROMPTS_FILE
    if resume and path.is_file() and path.read_text(encoding="utf-8") != text:
        return differs_from_run("prompts", folder, label)
    return None


def run_prompts(prompts: str, prompts_file: str, folder: Path, *, resume: bool, search: Sequence[Path] = (),
                labels: tuple[str, str, str] = ("prompts", "prompts file", "save name")) -> str:
    """The prompts file the run trains on: `prompts_file`, or the typed `prompts` kept in the run's folder
    (written there, so that a resumed run reads the same prompts; other prompts on resume are refused).
    `labels`: the host's names of the prompts, prompts-file and save-name fields."""
    prompts_label, file_label, save_label = labels
    if prompts_file and prompts_file.strip():
        return str(input_file(prompts_file, file_label, search=search))
    text = prompts_text(prompts, prompts_label, file_label)
    problem = kept_prompts_problem(folder, text, resume, save_label)
    if problem:
        raise ValueError(problem)
    path = Path(folder) / PROMPTS_FILE
    if not (path.is_file() and path.read_text(encoding="utf-8") == text):
        Path(folder).mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return str(path)


# --- the live curve ---------------------------------------------------------------------------------

class LiveCurve:
    """The run's curves as the step callback sees them, drawn as a preview at most every `every_s` seconds.

    `panels` maps a panel title to the metric keys drawn in it. A resumed run starts from what its
    train_log.csv already holds before the first step of this session.
    """

    def __init__(self, folder: Path, panels: dict[str, tuple[str, ...]], title: str, *,
                 every_s: float = PREVIEW_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self.folder, self.panels, self.title = Path(folder), panels, title
        self.every_s, self.clock = every_s, clock
        self.series: dict[str, list[tuple[int, float]]] | None = None
        self.last_drawn: float | None = None

    def keys(self) -> list[str]:
        return [k for keys in self.panels.values() for k in keys]

    def logged(self, before: int) -> dict[str, list[tuple[int, float]]]:
        """The curve in train_log.csv before step `before` (the resumed part)."""
        from .training_log import logged_series

        return logged_series(self.folder, self.keys(), before)

    def add(self, step: int, metrics: dict) -> None:
        """Append this step's finite numbers (the first call reads the logged part first)."""
        if self.series is None:
            self.series = self.logged(step)
        for k, v in metrics.items():
            if k in self.series and isinstance(v, (int, float)) and v == v:
                self.series[k].append((step, float(v)))

    def due(self, step: int, total: int) -> bool:
        """A preview is due: the first, the last step, or `every_s` seconds after the previous one."""
        return step >= total or self.last_drawn is None or self.clock() - self.last_drawn >= self.every_s

    def preview(self, step: int, total: int):
        """The curves as a PIL image when a preview is due (see `due`), else None."""
        if not self.due(step, total):
            return None
        self.last_drawn = self.clock()
        return self.image()

    def image(self):
        """The curves now (before any step: all that train_log.csv holds)."""
        from .training_log import plot_curves

        series = self.series if self.series is not None else self.logged(1 << 62)
        return plot_curves({name: {k: series.get(k, []) for k in keys} for name, keys in self.panels.items()},
                           self.title)
