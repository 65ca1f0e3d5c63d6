"""ComfyUI nodes: thin adapters from ComfyUI types to promptist_core. One file per concept."""

from .dfprompt import NODES as DFPROMPT_NODES
from .evaluate import NODES as EVALUATE_NODES
from .optimize import NODES as OPTIMIZE_NODES
from .rewards import NODES as REWARD_NODES
from .train import NODES as TRAIN_NODES
from .train_tpo import NODES as TPO_NODES

NODES = [*OPTIMIZE_NODES, *DFPROMPT_NODES, *REWARD_NODES, *TRAIN_NODES, *TPO_NODES, *EVALUATE_NODES]
