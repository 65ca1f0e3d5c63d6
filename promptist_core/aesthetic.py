"""LAION aesthetic predictors: a small head on the L2-normalized CLIP ViT-L/14 image embedding.

Two published heads, told apart by their keys:
- v1 (LAION-AI/aesthetic-predictor, `sa_0_4_vit_l_14_linear.pth`): `nn.Linear(768, 1)`, keys
  `weight`, `bias`.
- improved (christophschuhmann/improved-aesthetic-predictor, `sac+logos+ava1-l14-linearMSE.pth`):
  MLP 768-1024-128-64-16-1 with dropouts and no activations, keys `layers.{0,2,4,6,7}.{weight,bias}`.

Both score roughly 1..10 (higher is prettier). Files are loaded with safetensors or
`torch.load(weights_only=True)` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .weights import FileModel, UnreadableWeightsError, WeightsNotFoundError, reading_weights, resolve_file

IMPROVED_AESTHETIC = FileModel(
    "sac+logos+ava1-l14-linearMSE.pth",
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth",
    "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
)
LAION_V1_AESTHETIC = FileModel(
    "sa_0_4_vit_l_14_linear.pth",
    "https://github.com/LAION-AI/aesthetic-predictor/raw/main/sa_0_4_vit_l_14_linear.pth",
    "2cd4e60f4f24ae3bcd57b847b13c1f3ba27edc28cc1a7f9ce74ee9f421243cba",
)
# Short names users can type; the file names work too.
KNOWN_AESTHETIC_HEADS: dict[str, FileModel] = {
    "improved": IMPROVED_AESTHETIC,
    "laion-v1": LAION_V1_AESTHETIC,
    IMPROVED_AESTHETIC.filename: IMPROVED_AESTHETIC,
    LAION_V1_AESTHETIC.filename: LAION_V1_AESTHETIC,
}
DEFAULT_AESTHETIC_HEAD = "improved"

HEAD_KINDS = ("linear", "mlp")
_MLP_KEYS = [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


class AestheticHead(nn.Module):
    """A LAION aesthetic head. `forward` takes L2-normalized CLIP image embeddings (B, D) -> (B,)."""

    def __init__(self, kind: str = "mlp", embed_dim: int = 768, hidden: Sequence[int] = (1024, 128, 64, 16)):
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"kind must be one of {', '.join(HEAD_KINDS)}; got {kind!r}")
        self.kind = kind
        self.embed_dim = embed_dim
        if kind == "linear":
            self.linear = nn.Linear(embed_dim, 1)
        else:
            h1, h2, h3, h4 = hidden
            # The improved predictor's exact layout (indices match its state_dict keys).
            self.layers = nn.Sequential(
                nn.Linear(embed_dim, h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
                nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1),
            )
        self.eval().requires_grad_(False)  # a frozen reward model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.ndim != 2 or embeddings.shape[-1] != self.embed_dim:
            raise ValueError(
                f"the aesthetic head expects CLIP embeddings of size {self.embed_dim} "
                f"({'ViT-L/14' if self.embed_dim == 768 else 'its CLIP model'}), shaped (batch, {self.embed_dim}); "
                f"got shape {tuple(embeddings.shape)}. Use the CLIP model the head was trained on."
            )
        param = next(self.parameters())
        x = embeddings.to(device=param.device, dtype=param.dtype)
        out = self.linear(x) if self.kind == "linear" else self.layers(x)
        return out.squeeze(-1)

    def state_dict_for_file(self) -> dict[str, torch.Tensor]:
        """The state dict in the published file's key layout (`weight`/`bias` or `layers.N.*`)."""
        sd = self.state_dict()
        return {k.removeprefix("linear."): v for k, v in sd.items()} if self.kind == "linear" else dict(sd)


def head_from_state_dict(state_dict: dict[str, torch.Tensor], *, source: str = "state dict") -> AestheticHead:
    """Build the head whose key layout matches `state_dict` (v1 linear or improved MLP)."""
    keys = set(state_dict)
    if keys == {"weight", "bias"}:
        weight = state_dict["weight"]
        if weight.ndim != 2 or weight.shape[0] != 1:
            raise ValueError(f"{source}: a linear aesthetic head needs weight of shape (1, D); got {tuple(weight.shape)}")
        head = AestheticHead("linear", embed_dim=weight.shape[1])
        head.linear.load_state_dict(state_dict)
        return head
    if keys == set(_MLP_KEYS):
        sizes = [state_dict[f"layers.{i}.weight"].shape for i in (0, 2, 4, 6, 7)]
        head = AestheticHead("mlp", embed_dim=sizes[0][1], hidden=[s[0] for s in sizes[:4]])
        head.load_state_dict(state_dict)
        return head
    raise ValueError(
        f"{source} is not a LAION aesthetic head: expected keys 'weight', 'bias' (v1 linear) or "
        f"layers.{{0,2,4,6,7}}.{{weight,bias}} (improved MLP); got {sorted(keys)[:8]}"
    )


def looks_like_head_file(path: Path) -> bool:
    """Cheap check for file pickers: safetensors by their keys (no tensors read); .pth/.pt by suffix."""
    path = Path(path)
    if path.suffix in (".pth", ".pt"):
        return True
    if path.suffix != ".safetensors":
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:
        return False
    return keys == {"weight", "bias"} or keys == set(_MLP_KEYS)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file, or a .pth/.pt/.bin via torch.load(weights_only=True) on the CPU."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with reading_weights(path):
            return load_file(str(path), device="cpu")
    try:
        # The published heads were saved on CUDA: map to the CPU. Never unpickle arbitrary objects.
        with reading_weights(path):
            loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except UnreadableWeightsError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read weights file {path}: {str(e).splitlines()[0]}") from None
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return loaded


def find_aesthetic_head(name: str = DEFAULT_AESTHETIC_HEAD, *, models_dir=None,
                        allow_download: bool | None = None) -> Path:
    """The head's file, without loading it (WeightsNotFoundError says where it goes)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("aesthetic head name is empty: use 'improved', 'laion-v1' or a .pth/.safetensors path")
    name = name.strip()
    known = KNOWN_AESTHETIC_HEADS.get(name)
    return resolve_file(name if known is None else known.filename, known=known, models_dir=models_dir,
                        allow_download=allow_download)


def load_aesthetic_head(
    name: str = DEFAULT_AESTHETIC_HEAD,
    *,
    models_dir: Path | str | Sequence[Path | str] | None = None,
    allow_download: bool | None = None,
) -> AestheticHead:
    """Load an aesthetic head: `improved`, `laion-v1`, a file name in `models_dir`, or a path.

    Known heads are downloaded once (sha256-checked) into the models folder unless offline.
    """
    path = find_aesthetic_head(name, models_dir=models_dir, allow_download=allow_download)
    if path.suffix not in (".pth", ".pt", ".bin", ".safetensors"):
        raise ValueError(f"aesthetic head {path} must be a .pth, .pt, .bin or .safetensors file")
    return head_from_state_dict(read_state_dict(path), source=str(path))


__all__ = [
    "AestheticHead", "DEFAULT_AESTHETIC_HEAD", "IMPROVED_AESTHETIC", "KNOWN_AESTHETIC_HEADS", "LAION_V1_AESTHETIC",
    "WeightsNotFoundError", "find_aesthetic_head", "head_from_state_dict", "load_aesthetic_head", "looks_like_head_file",
    "read_state_dict",
]
