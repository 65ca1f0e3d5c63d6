"""install.py: per host only what that host imports, never an installed package changed, importability checked."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import pytest
from conftest import ROOT


def load_installer():
    spec = importlib.util.spec_from_file_location("promptist_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def installer():
    return load_installer()


def test_requirements_never_name_torch(installer):
    names = {installer._name(r).lower() for r in installer.read_requirements()}
    assert not names & {"torch", "torchvision", "torchaudio"}
    assert {"transformers", "safetensors", "open_clip_torch", "diffusers", "accelerate"} <= names


def test_the_webui_and_comfyui_get_only_what_their_code_imports(installer):
    for host in ("a1111", "comfyui"):
        names = {installer._key(installer._name(r)) for r in installer.requirements_for(host)}
        assert not names & {"diffusers", "accelerate", "torch"}  # A1111 never imports diffusers
        assert {"transformers", "safetensors", "open_clip_torch", "huggingface_hub"} <= names
    headless = {installer._key(installer._name(r)) for r in installer.requirements_for("headless")}
    assert {"diffusers", "accelerate"} <= headless


def test_the_webui_is_detected_by_its_launch_module(installer, monkeypatch):
    monkeypatch.setitem(sys.modules, "launch", types.ModuleType("launch"))
    assert installer.detect_host() == "a1111"


def fake_webui(root, monkeypatch, forge_version: str | None):
    """A webui folder whose `launch` module the installer imports; with modules_forge/ when `forge_version`."""
    root.mkdir()
    (root / "launch.py").write_text("")
    if forge_version is not None:
        (root / "modules_forge").mkdir()
        (root / "modules_forge" / "forge_version.py").write_text(forge_version)
    launch = types.ModuleType("launch")
    launch.__file__ = str(root / "launch.py")
    monkeypatch.setitem(sys.modules, "launch", launch)


@pytest.mark.parametrize(("forge_version", "host", "name"), [
    (None, "a1111", "AUTOMATIC1111"),
    ("version = '1.0.2v1.10.1'\n", "forge", "Forge"),  # lllyasviel's Forge
    ('version = "neo"\nrelease = "2.26"\n', "forge-neo", "Forge Neo"),
])
def test_forge_and_forge_neo_are_told_from_a1111_and_named_so(installer, tmp_path, monkeypatch, capsys,
                                                               forge_version, host, name):
    fake_webui(tmp_path / "webui", monkeypatch, forge_version)
    monkeypatch.delenv("PROMPTIST_HOST", raising=False)
    assert installer.detect_host() == host
    assert installer.requirements_for(host) == installer.requirements_for("a1111")  # the same packages
    monkeypatch.setattr(installer, "plan", lambda requirements: ([], []))
    assert installer.main() == 0
    assert capsys.readouterr().out.strip().endswith(f"all requirements are installed and import ({name})")


def test_installed_packages_are_never_upgraded_only_reported(installer):
    missing, problems = installer.plan(["pytest>=1.0", "surely-not-a-package-xyz", "pytest>=999.0"])
    assert missing == ["surely-not-a-package-xyz"]
    assert len(problems) == 1 and "pytest" in problems[0] and "left as the host installed it" in problems[0]


def test_a_package_that_is_present_but_does_not_import_is_reported(installer, tmp_path, monkeypatch):
    (tmp_path / "pytest.py").write_text("raise ImportError('cannot import name X from huggingface_hub')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    assert installer.not_importable(["pytest>=1.0"], env=env) == {
        "pytest>=1.0": "ImportError: cannot import name X from huggingface_hub"}
    assert installer.not_importable(["pytest>=1.0", "pillow"]) == {}


def test_missing_packages_are_installed_with_every_installed_package_held(installer, monkeypatch):
    calls = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda command, desc: calls.append((command, open(command.split('"')[1]).read()))
    monkeypatch.setitem(sys.modules, "launch", launch)
    installer.install(["surely-not-a-package-xyz"])
    ((command, constraints),) = calls
    assert command.startswith("install -c ") and command.endswith('"surely-not-a-package-xyz"')
    held = dict(line.split("==", 1) for line in constraints.splitlines())
    assert held["transformers"] == installer.installed_version("transformers")
    assert held["safetensors"] == installer.installed_version("safetensors")


def test_running_it_twice_installs_nothing():
    for _ in range(2):
        done = subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr
        assert "all requirements are installed and import" in done.stdout
