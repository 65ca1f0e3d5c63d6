"""The README's formulas and CLIP layouts say what the code does."""

from __future__ import annotations

import re

from conftest import ROOT

from promptist_core.clip_models import OPEN_CLIP_FILES
from promptist_core.rewards import PRESETS

README = (ROOT / "README.md").read_text(encoding="utf-8")


def preset_formula(name: str) -> str:
    return re.search(rf"`{name}` =\s*`([^`]*)`", README).group(1)


def test_the_relevance_term_of_each_preset_is_written_as_the_code_computes_it():
    for name, preset in PRESETS.items():
        cos = "max(cos, 0)" if preset.cosine_floor == 0.0 else "cos"
        assert preset.cosine_floor in (None, 0.0)
        term = f"min({preset.relevance_scale:g}·{cos} − {preset.relevance_offset:g}, 0)"
        assert term in preset_formula(name), (name, preset_formula(name))
        assert ("PickScore" in preset_formula(name)) == bool(preset.pick_weight)


def test_the_clip_layout_table_names_each_layout_the_loader_takes_and_every_host():
    table = README.split("**CLIP layouts, and where each works.**", 1)[1].split("\n\n", 2)[1]
    header, _, *rows = table.splitlines()
    assert [c.strip() for c in header.strip("|").split("|")][2:] == [
        "headless (`--clip-model`, `load_clip`)", "ComfyUI (`clip_model` list)", "A1111/Forge (Settings → Promptist)"]
    layouts = {row.strip("|").split("|")[0].strip(): row for row in rows}
    assert set(layouts) == {"open_clip single file + architecture", "open_clip Hub folder",
                            "transformers `CLIPModel` folder"}
    assert "--clip-architecture" in layouts["open_clip single file + architecture"]
    assert all(f"`{name}`" in layouts["open_clip Hub folder"] for group in OPEN_CLIP_FILES for name in group)
    assert '`"model_type": "clip"`' in layouts["transformers `CLIPModel` folder"]


# --- README and the manuals in docs/: their commands and their map of the tree ---

MANUALS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_commands(text: str) -> list[str]:
    """The lines of the ```bash and ```sh blocks, continued lines joined and comments dropped."""
    lines = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.split(" #")[0].strip() for line in joined.splitlines() if line.strip()
                  and not line.lstrip().startswith("#")]
    return lines


def subcommands(parser) -> dict:
    import argparse

    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_cli_command_in_the_readme_and_the_docs_names_a_command_and_flags_the_cli_takes():
    from promptist_core.cli import build_parser as core_parser
    from trainer.cli import build_parser as trainer_parser

    clis = {"trainer": subcommands(trainer_parser()), "promptist_core": subcommands(core_parser())}
    seen = {name: set() for name in clis}
    for manual in MANUALS:
        for line in shell_commands(manual.read_text(encoding="utf-8")):
            match = re.search(r"-m (trainer|promptist_core) (\S+)(.*)", line)
            if not match:
                continue
            cli, command, rest = match.groups()
            assert command in clis[cli], f"{manual.name}: `{line}`: {cli} has no command {command!r}"
            options = clis[cli][command]._option_string_actions
            for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", rest):
                assert flag in options, f"{manual.name}: `{line}`: `{cli} {command}` has no {flag}"
            seen[cli].add(command)
    assert seen["trainer"] == set(clis["trainer"])  # the manuals show every trainer command
    assert {"optimize", "score", "dfprompt"} <= seen["promptist_core"]


def test_the_readme_links_the_manuals_and_its_layout_map_matches_the_tree():
    readme = MANUALS[0].read_text(encoding="utf-8")
    for manual in MANUALS[1:]:
        assert f"](docs/{manual.name})" in readme
    layout = readme.split("\n## Layout\n", 1)[1].split("```")[1]
    named = set(re.findall(r"(?<![\w/])([a-z_]+)/", layout))
    assert all((ROOT / name).is_dir() or (ROOT / "trainer" / name).is_dir() for name in named), named
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {"scripts", "docs", "tests", "bench"}
    assert packages <= named, packages - named
    assert {p.parent.name for p in (ROOT / "trainer").glob("*/__init__.py")} <= named
