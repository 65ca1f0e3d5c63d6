"""Set up and run promptist headless from a fresh clone, with nothing but Python 3.10+:

    python3 run.py optimize "a cat riding a bike"    # any `python -m promptist_core` command
    python3 run.py test                               # lint + the test suite (what .ci/run calls)

The first run creates `.venv/` beside this file and installs what is missing: torch + torchvision when
torch does not import there (the CPU build on a Linux machine without an NVIDIA GPU), then
requirements.txt (and requirements-test.txt for `test`). Later runs reinstall only when a requirements
file changed. Hosts (ComfyUI, A1111/Forge) never use this script: they run install.py and own torch.

Environment: PROMPTIST_VENV (where the virtualenv lives, default .venv), PROMPTIST_TORCH (what to
install when torch is absent, default "torch torchvision"), PROMPTIST_TORCH_INDEX (the index for it;
empty = pip's default index).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
USAGE = __doc__.split("\n\n")[1]


def venv_dir() -> Path:
    return Path(os.environ.get("PROMPTIST_VENV") or ROOT / ".venv").resolve()


def venv_python(folder: Path) -> Path:
    return folder / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def has_nvidia_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").is_dir()


def reachable(url: str, timeout: float = 5.0) -> bool:
    """One short request: pip would retry an unreachable index for minutes before falling back."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # a server answered
    except (OSError, ValueError):
        return False


def torch_index() -> str | None:
    """PyPI's torch for Linux bundles CUDA (gigabytes); a machine without an NVIDIA GPU gets the CPU build
    from PyTorch's index when that answers, else pip's default index (None)."""
    if "PROMPTIST_TORCH_INDEX" in os.environ:
        return os.environ["PROMPTIST_TORCH_INDEX"] or None
    if platform.system() != "Linux" or has_nvidia_gpu():
        return None
    if reachable(CPU_TORCH_INDEX + "/"):
        return CPU_TORCH_INDEX
    print(f"note: {CPU_TORCH_INDEX} cannot be reached; installing torch from pip's default index", flush=True)
    return None


def requirement_files(with_tests: bool) -> list[Path]:
    return [ROOT / "requirements.txt"] + ([ROOT / "requirements-test.txt"] if with_tests else [])


def run(*command: str | Path) -> None:
    print("+", " ".join(str(c) for c in command), flush=True)
    subprocess.run([str(c) for c in command], check=True, cwd=ROOT)


def setup(with_tests: bool) -> Path:
    """Create the virtualenv and install what is missing; returns its python."""
    folder = venv_dir()
    python = venv_python(folder)
    if not python.exists():
        print(f"creating a virtualenv in {folder}", flush=True)
        venv.EnvBuilder(with_pip=True).create(folder)
    pip = (python, "-m", "pip", "install", "--quiet")
    if subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0:
        index = torch_index()
        run(*pip, *os.environ.get("PROMPTIST_TORCH", "torch torchvision").split(),
            *(("--index-url", index) if index else ()))
    files = requirement_files(with_tests)
    stamp = folder / ".promptist-requirements"
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()
    if not stamp.is_file() or stamp.read_text() != digest:
        run(*pip, *(arg for f in files for arg in ("-r", f)))
        stamp.write_text(digest)
    return python


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    try:
        if argv[0] == "test":
            python = setup(with_tests=True)
            run(python, "-m", "ruff", "check", ".")
            run(python, "-m", "pytest", "-q", *argv[1:])
            return 0
        python = setup(with_tests=False)
    except subprocess.CalledProcessError as e:
        return e.returncode
    # The job itself, from the caller's folder (relative paths, ./models/promptist) with this checkout
    # importable; its exit code is ours (2 bad input, 3 missing weights, see README).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    return subprocess.run([str(python), "-m", "promptist_core", *argv], env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
