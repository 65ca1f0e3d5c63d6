"""How the hosts import us: ComfyUI imports the folder as a package; `trainer` may clash."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from conftest import ROOT

# Import the repository folder the way ComfyUI's load_custom_node does (spec with search locations).
COMFY_STYLE_IMPORT = textwrap.dedent(f"""
    import importlib.util, logging, sys
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    PRELUDE
    spec = importlib.util.spec_from_file_location("promptist_pack", {str(ROOT / "__init__.py")!r},
                                                  submodule_search_locations=[{str(ROOT)!r}])
    module = importlib.util.module_from_spec(spec)
    sys.modules["promptist_pack"] = module
    spec.loader.exec_module(module)
    print("MAPPINGS", sorted(getattr(module, "NODE_CLASS_MAPPINGS", {{}})))
    print("ROOT_ON_PATH", {str(ROOT)!r} in sys.path)
""")


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300)


def test_comfyui_without_v3_api_gets_v1_mappings_and_our_folder_leaves_sys_path():
    done = run_python(COMFY_STYLE_IMPORT.replace("PRELUDE", ""))
    assert done.returncode == 0, done.stderr
    mappings = next(line for line in done.stdout.splitlines() if line.startswith("MAPPINGS"))
    assert {"PromptistModelLoader", "PromptistOptimizePrompt", "PromptistRewardModelLoader",
            "PromptistScoreImages"} <= set(ast.literal_eval(mappings.removeprefix("MAPPINGS ")))
    assert "ROOT_ON_PATH False" in done.stdout


def test_a_missing_dependency_is_one_clear_log_line_and_startup_continues():
    # As if open_clip_torch were not installed.
    prelude = ("import importlib.util as u; _find = u.find_spec; "
               "u.find_spec = lambda name, *a: None if name == 'open_clip' else _find(name, *a)")
    done = run_python(COMFY_STYLE_IMPORT.replace("PRELUDE", prelude))
    assert done.returncode == 0, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and "missing dependencies: open_clip_torch" in errors[0] and "install.py" in errors[0]


def test_without_diffusers_comfyui_starts_silently_as_install_py_would_install_nothing():
    # diffusers is for the headless generators and trainers; install.py skips it in ComfyUI by design.
    prelude = ("import importlib.util as u; _find = u.find_spec; "
               "u.find_spec = lambda name, *a: None if name == 'diffusers' else _find(name, *a)")
    done = run_python(COMFY_STYLE_IMPORT.replace("PRELUDE", prelude))
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith("ERROR")], done.stderr
    assert "missing dependencies" not in done.stderr
    assert "'PromptistModelLoader', 'PromptistOptimizePrompt'" in done.stdout


def test_another_package_named_trainer_is_reported_and_the_nodes_still_load(tmp_path):
    other = tmp_path / "trainer"
    other.mkdir()
    (other / "__init__.py").write_text("")
    prelude = f"sys.path.insert(0, {str(tmp_path)!r}); import trainer"
    done = run_python(COMFY_STYLE_IMPORT.replace("PRELUDE", prelude))
    assert done.returncode == 0, done.stderr
    assert "training is unavailable: 'trainer' was imported from" in done.stderr
    assert "'PromptistModelLoader', 'PromptistOptimizePrompt'" in done.stdout


def test_every_trainer_command_prints_its_help(capsys):
    """argparse formats help text with %: a setting's doc saying "68%" once made `sft --help` crash."""
    import pytest

    from trainer.cli import main

    for command in ("pairs", "sft", "ppo"):
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0, command
        assert "usage: " in capsys.readouterr().out
