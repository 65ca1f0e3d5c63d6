"""Install what promptist imports in this host, and nothing else. Never installs or upgrades torch.

Run by AUTOMATIC1111/Forge at start-up (with the webui's `launch` module importable), by
ComfyUI-Manager after cloning, or by hand: `python install.py`. Rules:
- per host, only what that host's code path imports: A1111/Forge and ComfyUI never import diffusers or
  accelerate (only the headless generators and trainers do), so they are not installed there;
- never upgrade or downgrade an installed package: the host pins its own (A1111 1.10: transformers
  4.30, huggingface_hub < 1.0, ...). Missing packages are installed with every installed package held at
  its version (a pip constraints file), so pip fails rather than replacing a host's pin; a package that
  is present but older than our minimum is reported, not touched;
- "installed" means importable: each module is imported in a fresh Python, so a package broken by a
  dependency (e.g. huggingface_hub 2.x under transformers 4.30) is reported instead of called fine.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "requirements.txt"
NEVER_INSTALL = {"torch", "torchvision", "torchaudio"}  # the host owns torch
# What the webui script and the ComfyUI nodes import (promptist_core without render_diffusers/generators).
HOST_PACKAGES = {"transformers", "tokenizers", "safetensors", "huggingface_hub", "open_clip_torch", "numpy",
                 "pillow", "tqdm"}
# The module each distribution is imported as.
MODULES = {"open_clip_torch": "open_clip", "pillow": "PIL", "huggingface_hub": "huggingface_hub"}


def read_requirements(path: Path = REQUIREMENTS) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip()


def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


# What the last line of a run calls each host.
HOST_NAMES = {"a1111": "AUTOMATIC1111", "forge": "Forge", "forge-neo": "Forge Neo", "comfyui": "ComfyUI",
              "headless": "headless"}


def detect_host() -> str:
    """'a1111', 'forge' or 'forge-neo' (the webui's `launch` imports), 'comfyui' (we sit in custom_nodes/), else
    'headless'. All three webuis get the same packages; the name is for the messages."""
    try:
        import launch
    except ImportError:
        return "comfyui" if HERE.parent.name == "custom_nodes" else "headless"
    roots = [Path(launch.__file__).resolve().parent] if getattr(launch, "__file__", None) else []
    return webui_kind([*roots, HERE.parent.parent])  # extensions/<us>/ sits two levels below the webui


def webui_kind(roots: list[Path]) -> str:
    """'forge-neo', 'forge' or 'a1111' for the first webui folder in `roots` that is Forge (has modules_forge/:
    lllyasviel's Forge, reForge, Forge Classic and Forge Neo; Neo's modules_forge/forge_version.py says
    `version = "neo"`), else 'a1111'. Read as text: importing modules_forge would start Forge's backend."""
    for root in roots:
        if not (root / "modules_forge").is_dir():
            continue
        try:
            version = (root / "modules_forge" / "forge_version.py").read_text(encoding="utf-8", errors="replace")
        except OSError:
            version = ""
        return "forge-neo" if re.search(r"""^version\s*=\s*["']neo""", version, re.MULTILINE) else "forge"
    return "a1111"


def requirements_for(host: str, requirements: list[str] | None = None) -> list[str]:
    """The requirements this host's code path imports (headless: all of requirements.txt)."""
    requirements = read_requirements() if requirements is None else requirements
    requirements = [r for r in requirements if _key(_name(r)) not in NEVER_INSTALL]
    if host == "headless":
        return requirements
    return [r for r in requirements if _key(_name(r)) in HOST_PACKAGES]


def installed_version(requirement: str) -> str | None:
    try:
        return importlib.metadata.version(_name(requirement))
    except importlib.metadata.PackageNotFoundError:
        return None


def too_old(requirement: str, version: str) -> bool:
    minimum = re.search(r">=\s*([\w.]+)", requirement)
    return minimum is not None and _version_tuple(version) < _version_tuple(minimum.group(1))


def not_importable(requirements: list[str], env: dict | None = None) -> dict[str, str]:
    """{requirement: error} for those whose module does not import in a fresh Python (one process for all)."""
    modules = {r: MODULES.get(_key(_name(r)), _key(_name(r))) for r in requirements}
    code = ("import importlib, json, sys\nerrors = {}\nfor m in sys.argv[1:]:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except BaseException as e:\n        errors[m] = f'{type(e).__name__}: {e}'.splitlines()[0]\n"
            "print(json.dumps(errors))")
    done = subprocess.run([sys.executable, "-c", code, *modules.values()], capture_output=True, text=True,
                          env=env, timeout=600)
    if done.returncode != 0:
        return {r: done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "python failed"
                for r in requirements}
    import json

    errors = json.loads(done.stdout.strip().splitlines()[-1])
    return {r: errors[m] for r, m in modules.items() if m in errors}


def plan(requirements: list[str]) -> tuple[list[str], list[str]]:
    """(missing requirements to install, problems to report: too old or present but not importable)."""
    missing, problems, present = [], [], []
    for r in requirements:
        version = installed_version(r)
        if version is None:
            missing.append(r)
        elif too_old(r, version):
            problems.append(f"{_name(r)} {version} is installed but promptist needs {r}; it is left as the "
                            f"host installed it (upgrade it yourself if the host allows: pip install \"{r}\")")
        else:
            present.append(r)
    for r, error in not_importable(present).items():
        problems.append(f"{_name(r)} {installed_version(r)} is installed but does not import ({error})")
    return missing, problems


def hold_installed_versions(path: Path) -> Path:
    """A pip constraints file that pins every installed distribution to its current version."""
    lines = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                    if d.metadata["Name"]})
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def install(requirements: list[str]) -> None:
    try:
        import launch  # AUTOMATIC1111 / Forge: use the webui's pip (its index, its Python)
    except ImportError:
        launch = None
    with tempfile.TemporaryDirectory(prefix="promptist-install-") as tmp:
        constraints = hold_installed_versions(Path(tmp) / "installed.txt")
        args = " ".join(f'"{r}"' for r in requirements)
        if launch is not None:
            launch.run_pip(f'install -c "{constraints}" {args}', f"promptist requirements: {', '.join(requirements)}")
        else:
            print(f"[promptist] installing {', '.join(requirements)}")
            subprocess.check_call([sys.executable, "-m", "pip", "install", "-c", str(constraints), *requirements])


def main() -> int:
    host = os.environ.get("PROMPTIST_HOST") or detect_host()
    requirements = requirements_for(host)
    missing, problems = plan(requirements)
    if missing:
        install(missing)
        missing, more = plan(missing)
        problems += more + [f"{_name(r)} could not be installed" for r in missing]
    for problem in problems:
        print(f"[promptist] {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"[promptist] all requirements are installed and import ({HOST_NAMES.get(host, host)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
