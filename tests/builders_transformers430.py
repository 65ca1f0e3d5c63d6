"""A Python with transformers 4.30 (AUTOMATIC1111 1.10's pin), transformers 4.56.2 (Forge Neo's pin), or open_clip
2.20, over the test environment.

`pip install --target DIR` puts transformers 4.30.2, tokenizers 0.13.3, huggingface_hub < 1.0 and
safetensors 0.4 into one folder; a subprocess with that folder first on PYTHONPATH sees them instead of
the environment's versions and everything else (torch, numpy, ...) from the environment. (A
`venv --system-site-packages` made from a venv's Python would see the base interpreter's packages,
not the test environment's torch.) The folder is kept under pytest's cache dir and reused across runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("transformers==4.30.2", "tokenizers==0.13.3", "huggingface_hub<1.0", "safetensors==0.4.*")
# Forge Neo ("neo-2.26") as built from its requirements.txt (/work/hosts/neo, pip freeze): transformers 4.56.2,
# tokenizers 0.22.2, huggingface_hub 0.36.2, safetensors 0.7.0.
TRANSFORMERS_456 = ("transformers==4.56.2", "tokenizers==0.22.2", "huggingface_hub==0.36.2", "safetensors==0.7.0")
# Forge Neo's diffusers pin, for the headless paths (DF-Prompt rendering, image generators); in Neo itself our
# code never imports diffusers (Neo's own backend does). diffusers 0.37 imports httpx, which this environment's
# huggingface_hub 2.x does not bring: Neo's httpx and what it needs come with it.
DIFFUSERS_0371 = ("diffusers==0.37.1", "httpx==0.24.1", "httpcore==0.17.3", "h11==0.14.0", "sniffio==1.3.1")
OPEN_CLIP_220 = ("open_clip_torch==2.20.0",)  # pure Python; its other imports (ftfy, regex) are ours
READY = ".promptist-ready"


@dataclass(frozen=True)
class OverlayPython:
    """This interpreter with `site` (the overlay's packages) and the repository first on the import path."""

    site: Path
    repo: Path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(self.site), str(self.repo)])
        env.setdefault("HF_HUB_OFFLINE", "1")
        return env

    def run(self, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], env=self.env(), capture_output=True,
                              text=True, timeout=timeout)


def install_overlay(site: Path, packages: tuple[str, ...]) -> str | None:
    """Install `packages` (without dependencies) into `site` once; None when ready, else why pip could not."""
    wanted = " ".join(packages) + "\n"
    if (site / READY).is_file() and (site / READY).read_text(encoding="utf-8") == wanted:
        return None  # installed before with these very pins (changed pins reinstall)
    site.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--upgrade", "--target", str(site), *packages]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"pip could not run: {e}"
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        return f"pip could not install {' '.join(packages)}: {lines[-1] if lines else done.returncode}"
    (site / READY).write_text(wanted, encoding="utf-8")
    return None
