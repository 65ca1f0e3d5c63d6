"""`GET /sdapi/v1/options` answers through the webui's `modules.api.models.OptionsModel`, built from the settings
registered when that module is first imported. Forge Neo imports it before any extension's `on_ui_settings`
(its built-in ControlNet imports `modules.api` while the scripts load), so our settings were dropped from the
answer; A1111 1.10 imports it later. Both orders are played here with a real pydantic model."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from tests.fake_webui import load_script_in_fake_webui

pydantic = pytest.importorskip("pydantic")

ROOT = Path(__file__).resolve().parents[1]


def options_module(registered: dict) -> types.ModuleType:
    """`modules.api.models` as the webui builds its OptionsModel: one field per setting registered so far."""
    module = types.ModuleType("modules.api.models")
    fields = {key: (type(info.default) | None if info.default else Any,
                    pydantic.Field(default=info.default, description=info.label))
              for key, info in registered.items()}
    fields["samples_format"] = (str | None, pydantic.Field(default="png"))  # one of the webui's own
    module.OptionsModel = pydantic.create_model("Options", **fields)
    return module


def api_answer(model, data: dict) -> dict:
    """What FastAPI sends for `response_model=model` given `shared.opts.data`: the model's fields only."""
    return model.model_validate(data).model_dump() if hasattr(model, "model_validate") else model(**data).dict()


@pytest.fixture
def webui(monkeypatch, tmp_path):
    settings = {"samples_format": "png", "promptist_model": "tiny-promptist"}
    return load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, tmp_path / "models", settings)


def test_settings_registered_after_the_options_api_was_built_are_in_its_answer(webui, monkeypatch):
    """Forge Neo's order: the API's model exists (without ours) before the settings callback runs."""
    models = options_module({})
    monkeypatch.setitem(sys.modules, "modules.api.models", models)
    (register,) = webui.host.script_callbacks.registered["ui_settings"]
    register()
    answer = api_answer(models.OptionsModel, webui.host.shared.opts.data)
    assert {key for key, *_ in webui.tab.SETTINGS} <= set(answer)
    assert answer["promptist_model"] == "tiny-promptist"  # the saved value, not the default
    assert answer["promptist_mode"] == "beam"  # not saved yet: the default, as the webui shows it
    assert answer["samples_format"] == "png"  # the webui's own settings are kept


def test_settings_registered_before_the_options_api_is_built_are_left_to_it(webui, monkeypatch):
    """A1111 1.10's order: nothing imported yet, so nothing is built or replaced; the webui's own build has ours."""
    monkeypatch.delitem(sys.modules, "modules.api.models", raising=False)
    (register,) = webui.host.script_callbacks.registered["ui_settings"]
    register()
    assert "modules.api.models" not in sys.modules
    models = options_module(webui.host.shared.opts.add_option.__self__)
    original = models.OptionsModel
    monkeypatch.setitem(sys.modules, "modules.api.models", models)
    register()  # Reload UI: the settings callback runs again, the model already has them
    assert models.OptionsModel is original
