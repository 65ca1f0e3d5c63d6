"""ComfyUI entry point: registers the Promptist nodes. Nothing heavy is imported here.

ComfyUI imports this folder as a package. Our libraries (`promptist_core`, `trainer`) are
top-level packages in this folder: put it on sys.path just long enough to import them, so our
`nodes/` folder never shadows ComfyUI's own `nodes` module.
"""

import logging
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent
_log = logging.getLogger("promptist")


def _import_core() -> bool:
    sys.path.insert(0, str(_ROOT))
    try:
        import promptist_core
        import trainer  # noqa: F401  (claims the name for ours before anyone else's)

        promptist_core.check_own_packages(_ROOT)
        return True
    except ImportError as e:
        _log.error("[promptist] not loaded: %s. Run: python %s", e, _ROOT / "install.py")
        return False
    finally:
        sys.path.remove(str(_ROOT))


if _import_core():
    try:
        from .nodes import NODES
        from .nodes.comfy_schema import HAS_V3
    except ImportError as e:  # an optional dependency missing: one clear line, ComfyUI keeps starting
        _log.error("[promptist] nodes not loaded: %s. Run: python %s", e, _ROOT / "install.py")
        NODES, HAS_V3 = [], False

    if HAS_V3:
        from comfy_api.latest import ComfyExtension

        class PromptistExtension(ComfyExtension):
            async def get_node_list(self):
                return list(NODES)

        async def comfy_entrypoint() -> ComfyExtension:
            return PromptistExtension()

    else:
        NODE_CLASS_MAPPINGS = {n.SPEC.NODE_ID: n for n in NODES}
        NODE_DISPLAY_NAME_MAPPINGS = {n.SPEC.NODE_ID: n.SPEC.DISPLAY_NAME for n in NODES}
