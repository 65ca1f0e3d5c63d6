"""Install promptist's runtime dependencies into the host's Python. Never installs or upgrades torch.

Run by AUTOMATIC1111/Forge at start-up (with the webui's `launch` module importable), by
ComfyUI-Manager after cloning, or by hand: `python install.py`. Idempotent: only requirements that
are missing or older than our minimum are installed, so a host's own pins are left alone when
they already satisfy us.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent / "requirements.txt"
NEVER_INSTALL = {"torch", "torchvision", "torchaudio"}  # the host owns torch


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def is_satisfied(requirement: str) -> bool:
    """Installed, and at least the `>=` minimum if one is given (other specifiers: presence only)."""
    try:
        installed = importlib.metadata.version(_name(requirement))
    except importlib.metadata.PackageNotFoundError:
        return False
    minimum = re.search(r">=\s*([\w.]+)", requirement)
    return minimum is None or _version_tuple(installed) >= _version_tuple(minimum.group(1))


def missing_requirements(requirements: list[str]) -> list[str]:
    return [r for r in requirements if _name(r).lower() not in NEVER_INSTALL and not is_satisfied(r)]


def install(requirements: list[str]) -> None:
    try:
        import launch  # AUTOMATIC1111 / Forge: use the webui's pip (its index, its Python)
    except ImportError:
        launch = None
    for requirement in requirements:
        if launch is not None:
            launch.run_pip(f'install "{requirement}"', f"promptist requirement: {requirement}")
        else:
            print(f"[promptist] installing {requirement}")
            subprocess.check_call([sys.executable, "-m", "pip", "install", requirement])


def main() -> int:
    needed = missing_requirements(read_requirements())
    if not needed:
        print("[promptist] all requirements are installed")
        return 0
    install(needed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
