"""The entry AUTOMATIC1111 / Forge loads: a "Promptist" tab and two always-visible scripts.

The webui executes every `scripts/*.py` of an extension by path (not as a package import), registers the
`scripts.Script` subclasses it finds in the module's namespace, and clears its callbacks before it loads
the scripts again (Reload UI). So this file, on each execution, makes the two Script classes names of its
own and registers the callbacks once; the code lives in the adapter package `promptist_webui/`.
"""

import sys
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parents[1]


def _import_adapter() -> None:
    """Import our top-level packages from this extension's folder (and claim `trainer` for ours)."""
    sys.path.insert(0, str(EXTENSION_ROOT))
    try:
        import promptist_core
        import promptist_webui  # noqa: F401
        import trainer  # noqa: F401

        promptist_core.check_own_packages(EXTENSION_ROOT, names=("promptist_core", "trainer", "promptist_webui"))
        from promptist_webui import errors, evaluate, host, infotext, optimize, score, tab, tpo, train, vram  # noqa: F401
    finally:
        sys.path.remove(str(EXTENSION_ROOT))


_import_adapter()

from promptist_webui import errors, evaluate, host, infotext, optimize, score, tab, tpo, train, vram  # noqa: E402, F401

if host.IN_WEBUI:
    from promptist_webui.optimize import PromptistScript  # noqa: F401  (registered by the webui from here)
    from promptist_webui.score import PromptistScoreScript  # noqa: F401

    host.script_callbacks.on_ui_tabs(tab.on_ui_tabs)
    host.script_callbacks.on_ui_settings(tab.on_ui_settings)
    host.script_callbacks.on_infotext_pasted(infotext.on_infotext_pasted)
