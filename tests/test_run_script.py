"""run.py and the README's two commands: the first screen names them and .ci/run runs the test command."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import run  # noqa: E402  (run.py at the repository root)

sys.path.remove(str(ROOT))


def readme_code_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_the_first_screen_of_the_readme_gives_the_two_commands():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    [block] = readme_code_blocks(first_screen)
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert 'python3 run.py optimize "a cat riding a bike"' in commands
    assert "python3 run.py test" in commands


def test_ci_runs_the_test_command_written_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    tests_section = readme.split("\n## Tests\n", 1)[1]
    test_command = readme_code_blocks(tests_section)[0].strip()
    assert test_command == "python3 run.py test"
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    assert ci_lines[-1] == test_command


def test_torch_comes_from_the_cpu_index_on_linux_without_an_nvidia_gpu(monkeypatch):
    monkeypatch.delenv("PROMPTIST_TORCH_INDEX", raising=False)
    monkeypatch.setattr(run.platform, "system", lambda: "Linux")
    monkeypatch.setattr(run, "has_nvidia_gpu", lambda: False)
    monkeypatch.setattr(run, "reachable", lambda url: url.startswith(run.CPU_TORCH_INDEX))
    assert run.torch_index() == run.CPU_TORCH_INDEX
    monkeypatch.setattr(run, "reachable", lambda url: False)  # offline but for package registries: PyPI
    assert run.torch_index() is None
    monkeypatch.setattr(run, "has_nvidia_gpu", lambda: True)
    assert run.torch_index() is None
    monkeypatch.setenv("PROMPTIST_TORCH_INDEX", "")
    monkeypatch.setattr(run, "has_nvidia_gpu", lambda: False)
    assert run.torch_index() is None


@pytest.fixture
def set_up(monkeypatch, tmp_path):
    """run.main with the set-up step replaced by this interpreter (tests never install packages),
    called from another folder than the checkout."""
    monkeypatch.setattr(run, "setup", lambda with_tests: sys.executable)
    monkeypatch.chdir(tmp_path)
    return run.main


def test_a_command_runs_promptist_core_from_any_folder(set_up, capfd):
    assert set_up(["dfprompt", "a horse, [anime:0.5-1:1.5]", "--steps", "4"]) == 0
    assert capfd.readouterr().out.splitlines() == ["steps 0-1: a horse, (anime:1.5)", "steps 2-3: a horse"]


def test_the_jobs_exit_code_is_run_pys(set_up, tmp_path, capfd):
    assert set_up(["optimize", "a cat", "--model", "microsoft/Promptist", "--offline", "--models-dir",
                   str(tmp_path)]) == 3
    assert "model 'microsoft/Promptist' was not found" in capfd.readouterr().err
