"""Forge Neo shows the Train/Evaluate tabs' images through its own gradio hook, which writes them into the
"Directory for temporary images" setting (default `<data dir>/tmp`, created only when the setting changes): with
`--data-dir` the folder was missing and the Train button's answer failed after the run had saved."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from tests.fake_webui import _Component, load_script_in_fake_webui

ROOT = Path(__file__).resolve().parents[1]


def build_tab(monkeypatch, tmp_path, settings):
    webui = load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, tmp_path / "models", settings)
    infotext = types.ModuleType("modules.infotext_utils")
    infotext.create_buttons = lambda tabnames: {name: _Component() for name in tabnames}
    infotext.register_paste_params_button = lambda binding: None
    infotext.ParamBinding = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "modules.infotext_utils", infotext)
    monkeypatch.setattr(sys.modules["modules.sd_samplers"], "visible_samplers", lambda: [], raising=False)
    ((tab, title, elem_id),) = webui.tab.on_ui_tabs()
    return webui, title


def test_building_the_tab_creates_a_missing_temporary_images_folder(monkeypatch, tmp_path):
    temp = tmp_path / "neo-data" / "tmp"
    _, title = build_tab(monkeypatch, tmp_path, {"temp_dir": str(temp)})
    assert title == "Promptist"
    assert temp.is_dir()


def test_an_empty_temporary_images_setting_creates_nothing(monkeypatch, tmp_path):
    """A1111 1.10 and Forge classic default to "" (the system temp folder)."""
    before = set(tmp_path.iterdir())
    build_tab(monkeypatch, tmp_path, {"temp_dir": ""})
    assert set(tmp_path.iterdir()) == before


def test_the_default_temporary_images_folder_is_created_when_config_json_has_none(monkeypatch, tmp_path):
    """The webui's `opts.temp_dir` answers the setting's default when config.json (`opts.data`) lacks it."""
    temp = tmp_path / "neo-data" / "tmp"
    webui = load_script_in_fake_webui(ROOT / "scripts" / "promptist.py", monkeypatch, tmp_path / "models", {})
    webui.host.shared.opts.temp_dir = str(temp)  # as Options.__getattr__ gives data_labels' default
    webui.host.ensure_temp_dir()
    assert temp.is_dir()
