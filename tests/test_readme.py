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
