"""ComfyUI nodes: thin adapters from ComfyUI types to promptist_core. One file per concept."""

from .optimize import NODES as OPTIMIZE_NODES

NODES = [*OPTIMIZE_NODES]
