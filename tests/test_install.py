"""install.py: installs only what is missing or too old, never torch."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from conftest import ROOT


def load_installer():
    spec = importlib.util.spec_from_file_location("promptist_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_never_name_torch():
    installer = load_installer()
    names = {installer._name(r).lower() for r in installer.read_requirements()}
    assert not names & {"torch", "torchvision", "torchaudio"}
    assert {"transformers", "safetensors", "open_clip_torch", "diffusers", "accelerate"} <= names


def test_installed_requirements_are_left_alone_and_missing_or_old_ones_are_listed():
    installer = load_installer()
    assert installer.missing_requirements(installer.read_requirements()) == []  # this environment has them
    assert installer.missing_requirements(["pytest>=1.0", "torch>=99", "surely-not-a-package-xyz"]) == [
        "surely-not-a-package-xyz"]
    assert installer.missing_requirements(["pytest>=999.0"]) == ["pytest>=999.0"]


def test_running_it_twice_installs_nothing():
    for _ in range(2):
        done = subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        assert "all requirements are installed" in done.stdout
