"""The one checkpoint format of every trainer: safetensors for tensors, JSON for the rest, no pickle.

A checkpoint is a folder `step-000123/` that is also a plain model folder (config.json,
model.safetensors, tokenizer files: `PromptOptimizer` loads it), plus:
- `optimizer.safetensors` (every state tensor under `state.<param index>.<name>`) and `optimizer.json`
  (param groups and non-tensor state),
- `rng.safetensors` (torch CPU/CUDA generator states, numpy's key array) and the Python `random` state
  inside `trainer_state.json`,
- `trainer_state.json`: step, data cursor, best validation loss, the config, the loss scaler,
- any other trainable parts (PPO's value model) as `<name>.safetensors`, listed in trainer_state.json.
It is written to a temporary folder beside its final place, fsynced, then renamed, so a run killed at
any moment leaves the previous checkpoint intact. accelerate's `save_state` pickles the optimizer and RNG
(and A1111's accelerate 0.21 loads them with a bare `torch.load`), so we do not use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from promptist_core.policy_folder import fsync_dir, fsync_tree, save_policy_folder

from .config import ConfigError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE_FILE = "trainer_state.json"
TRAINING_FILES = (STATE_FILE, "optimizer.safetensors", "optimizer.json", "rng.safetensors")
STEP_PREFIX = "step-"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (incomplete, another trainer's, another format)."""


@dataclass
class Checkpoint:
    folder: Path
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])


# --- writing -------------------------------------------------------------------------------------

def optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten `optimizer.state_dict()` into safetensors-able tensors and JSON-able metadata."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def counter_generator(*counters: int) -> torch.Generator:
    """A generator seeded by (seed, step or iteration, rank, ...): a trainer that draws from it makes the same
    draws after a resume, without restoring any generator state."""
    digest = hashlib.sha256(":".join(map(str, counters)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") & (2**63 - 1))


@contextlib.contextmanager
def seeded(seed: int):
    """Inside: the global torch generators seeded by `seed`; after: restored. A trainable part built inside (a new
    LoRA's random init) is then the same in every process, whatever drew from them before (a host, another run)."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, py_state, py_gauss = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [version, list(py_state), py_gauss]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


def save_checkpoint(
    run_dir: Path,
    *,
    model=None,
    tokenizer=None,
    optimizer: torch.optim.Optimizer,
    state: dict,
    keep: int = 2,
    protect: tuple[int, ...] = (),
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    dfprompt_heads=None,
    decoding=None,
) -> Path:
    """Write `run_dir/checkpoints/step-<step>/` atomically and keep the newest `keep` (plus `protect`ed steps).

    `state` must hold `step`; it is saved as trainer_state.json with the RNG's Python state. `extra`
    maps a name to a state dict saved as `<name>.safetensors` (read back with `load_extra`).
    `dfprompt_heads` (a DF-Prompt policy's heads) are part of the model folder, so they are published
    with it, as are the policy's `decoding` defaults (`policy_folder.DecodingDefaults`). Without `model` (TPO: the trainable part is a LoRA) no model folder is written; the
    trainable tensors then go in `extra`.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{STEP_PREFIX}{int(state['step']):07d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if model is not None:
            save_policy_folder(model, tokenizer, tmp, dfprompt_heads=dfprompt_heads, decoding=decoding)
        else:
            tmp.mkdir(parents=True)
        opt_tensors, opt_meta = optimizer_to_files(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(opt_meta), encoding="utf-8")
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "rng.safetensors"))
        for name, tensors in (extra or {}).items():
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / f"{name}.safetensors"))
        full_state = {"format": FORMAT_VERSION, **state, "rng": rng_meta, "extra": sorted(extra or {})}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1), encoding="utf-8")
        fsync_tree(tmp)
        if final.exists():  # the same step saved again (a stop right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep or None]:
        if old.step not in protect and old.folder != final:
            shutil.rmtree(old.folder, ignore_errors=True)
    return final


# --- reading -------------------------------------------------------------------------------------

def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a whole safetensors file (cut short by a full disk, a copy or a kill outside our atomic
    save), or None. Reads only the header: its length, the JSON, and where the last tensor's bytes end."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is {size} bytes, shorter than a safetensors header"
            length = int.from_bytes(head, "little")
            if length > size - 8:
                return f"{path.name} is truncated ({size} bytes; its header alone needs {8 + length})"
            header = json.loads(f.read(length))
    except (OSError, ValueError) as e:
        return f"{path.name} is unreadable ({type(e).__name__}: {e})"
    if not isinstance(header, dict):
        return f"{path.name} has no safetensors header"
    end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)),
              default=0)
    if size != 8 + length + end:
        return f"{path.name} is truncated ({size} bytes; its header says {8 + length + end})"
    return None


def read_checkpoint(folder: Path) -> Checkpoint:
    """The checkpoint in `folder`; CheckpointError naming the file when one is missing, cut short or unreadable."""
    folder = Path(folder)
    missing = [name for name in TRAINING_FILES if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)})")
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {folder}: unreadable {STATE_FILE} ({e})") from None
    if state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {folder} has format {state.get('format')}, this trainer reads {FORMAT_VERSION}")
    expected = {f"{name}.safetensors" for name in state.get("extra", [])}
    missing = sorted(name for name in expected if not (folder / name).is_file())
    if missing:
        raise CheckpointError(f"checkpoint {folder} is incomplete (missing {', '.join(missing)})")
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise CheckpointError(f"checkpoint {folder}: {problem}")
    return Checkpoint(folder, state)


def _step_folders(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(root.glob(f"{STEP_PREFIX}*")) if root.is_dir() else []


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save, and folders with a
    missing or cut-short file, are left out)."""
    found = []
    for folder in _step_folders(run_dir):
        try:
            found.append(read_checkpoint(folder))
        except CheckpointError:
            continue
    return sorted(found, key=lambda c: c.step)


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The checkpoint a resume continues: the newest complete one. A newer one that is damaged (a file cut
    short or missing) is named in a warning and skipped; when the run has checkpoints but none is complete,
    CheckpointError names the damaged file. None when the run has no checkpoint yet (it starts over)."""
    problems = []
    for folder in reversed(_step_folders(run_dir)):
        try:
            checkpoint = read_checkpoint(folder)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        for problem in problems:
            logger.warning("%s; resuming from the previous complete checkpoint, %s", problem, checkpoint.folder.name)
        return checkpoint
    if problems:
        raise CheckpointError(f"no complete checkpoint to resume: {problems[0]}; restore that file, or remove "
                              f"{Path(run_dir) / 'checkpoints'} to start the run over")
    return None


def check_resume_settings(config, checkpoint: Checkpoint, fixed: tuple[str, ...]) -> None:
    """Refuse to resume `checkpoint` when a setting in `fixed` (seed, data, batch sizes: what decides the run's
    draws and data order) differs from the run that wrote it: the result would no longer be that run's."""
    saved = checkpoint.state.get("config", {})
    changed = [k for k in fixed if k in saved and saved[k] != getattr(config, k)]
    if changed:
        names = " and ".join([", ".join(changed[:-1]), changed[-1]] if len(changed) > 1 else changed)
        verb = "differ" if len(changed) > 1 else "differs"
        used = ", ".join(f"{k}={saved[k]!r}" for k in changed)
        raise ConfigError(f"cannot resume {checkpoint.folder} exactly: {names} {verb} from the run being resumed "
                          f"(it used {used}). Set {'them' if len(changed) > 1 else 'it'} back to continue this run, "
                          "or choose a new save name (command line: a new --out) to start a new run with the new "
                          f"{'settings' if len(changed) > 1 else 'setting'}")


def restore_training_state(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
    """Load the optimizer and every RNG from `checkpoint` (the model is loaded from its folder)."""
    folder = checkpoint.folder
    optimizer_from_files(optimizer, load_file(str(folder / "optimizer.safetensors")),
                         json.loads((folder / "optimizer.json").read_text(encoding="utf-8")))
    set_rng_state(load_file(str(folder / "rng.safetensors")), checkpoint.state["rng"])


def load_extra(checkpoint: Checkpoint, name: str) -> dict[str, torch.Tensor]:
    if name not in checkpoint.state.get("extra", []):
        raise CheckpointError(f"checkpoint {checkpoint.folder} holds no '{name}'")
    return load_file(str(checkpoint.folder / f"{name}.safetensors"))


def publish_model_files(source: Path, target: Path) -> Path:
    """Copy the model files of `source` (a model folder or checkpoint) into `target`, file by file,
    each through a temporary name and a rename; the training files stay behind."""
    target.mkdir(parents=True, exist_ok=True)
    skip = set(TRAINING_FILES)
    if (Path(source) / STATE_FILE).is_file():
        extra = json.loads((Path(source) / STATE_FILE).read_text(encoding="utf-8")).get("extra", [])
        skip |= {f"{name}.safetensors" for name in extra}
    for path in sorted(Path(source).iterdir()):
        if not path.is_file() or path.name in skip:
            continue
        tmp = target / f".{path.name}.tmp-{os.getpid()}"
        shutil.copyfile(path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target / path.name)
    fsync_dir(target)
    return target
