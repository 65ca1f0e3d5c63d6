"""The example workflows: UI format where ComfyUI's template browser looks, API format for scripts.

ComfyUI lists every `*.json` in a pack's example_workflows/, example/, examples/, workflow/ or workflows/
folder as a template (app/custom_node_manager.py) and loads it into the canvas, which needs the UI
format the frontend saves, with a `<name>.jpg` beside it as the card's thumbnail. The UI files were
made by loading the API files in the real frontend (1.27) and saving; `graphToPrompt` on them gives
back the API files. These tests keep both in step with the node schemas.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfy_validation import LINK, validate_node

from nodes import NODES
from nodes.comfy_schema import v1_node

ROOT = Path(__file__).resolve().parents[1]
UI_DIR = ROOT / "example_workflows"
API_DIR = ROOT / "tests" / "data" / "comfyui_api"
OURS = {node.SPEC.NODE_ID: v1_node(node.SPEC) for node in NODES}
UI_FILES = sorted(UI_DIR.glob("*.json"))
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def _inputs(node) -> dict:
    types = node.INPUT_TYPES()
    return {**types["required"], **types.get("optional", {})}


def _widgets(node) -> list[str]:
    """Our inputs that are widgets, in the order the frontend stores their values (no seed control)."""
    return [name for name, (kind, *_) in _inputs(node).items() if isinstance(kind, list) or kind in WIDGET_TYPES]


def test_only_example_workflows_holds_workflows_the_template_browser_lists():
    for folder in ("example", "examples", "workflow", "workflows"):
        assert not list((ROOT / folder).glob("*.json")), f"{folder}/ is scanned by the template browser"
    names = {f.stem for f in UI_FILES}
    assert names == {"promptist_optimize_prompt", "promptist_dfprompt_encode", "promptist_score_images",
                     "promptist_sft_train", "promptist_ppo_train", "promptist_dfprompt_policy",
                     "promptist_tpo_train", "promptist_evaluate"}
    used = {n["type"] for f in UI_FILES for n in json.loads(f.read_text())["nodes"]}
    assert set(OURS) <= used  # every node of the pack appears in an example


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda f: f.stem)
def test_ui_workflow_has_what_the_frontend_loads_and_a_jpg_thumbnail(ui_file):
    ui = json.loads(ui_file.read_text())
    assert ui["version"] and ui["links"] and ui["last_node_id"] >= max(n["id"] for n in ui["nodes"])
    for node in ui["nodes"]:
        assert {"id", "type", "pos", "size", "inputs", "outputs"} <= node.keys()
    thumbnail = ui_file.with_suffix(".jpg")  # the frontend asks for <name>.jpg for custom node templates
    assert thumbnail.read_bytes()[:3] == b"\xff\xd8\xff"


@pytest.mark.parametrize("ui_file", UI_FILES, ids=lambda f: f.stem)
def test_ui_and_api_workflows_agree_with_each_other_and_with_the_node_schemas(ui_file, tmp_path, monkeypatch):
    # the DF-Prompt example loads the policy docs/training.md §9's worked example trains into models/promptist
    (tmp_path / "my-dfprompt-ppo").mkdir()
    (tmp_path / "my-dfprompt-ppo" / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    monkeypatch.setenv("PROMPTIST_MODELS_DIR", str(tmp_path))
    ui = json.loads(ui_file.read_text())
    api = json.loads((API_DIR / ui_file.name).read_text())
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    links = {link[0]: link for link in ui["links"]}  # id, from node, from slot, to node, to slot, type
    for node in ui["nodes"]:
        inputs = api[str(node["id"])]["inputs"]
        for slot in node["inputs"]:
            if slot.get("link") is not None:
                _, origin, origin_slot, *_ = links[slot["link"]]
                assert inputs[slot["name"]] == [str(origin), origin_slot]
        if node["type"] in OURS:
            schema = OURS[node["type"]]
            names = _widgets(schema)
            stored = dict(zip(names, node["widgets_values"], strict=True))  # a linked widget keeps a stale value
            assert {k: v for k, v in stored.items() if not isinstance(inputs[k], list)} == \
                {k: inputs[k] for k in names if not isinstance(inputs[k], list)}
            values = {k: LINK if isinstance(v, list) else v for k, v in inputs.items()}
            assert set(schema.INPUT_TYPES()["required"]) <= values.keys() <= _inputs(schema).keys()
            assert validate_node(schema, values) == []
