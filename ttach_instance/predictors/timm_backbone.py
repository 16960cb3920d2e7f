"""``LossPredictor``: a timm backbone read at every feature level, as the paper's predictor.

A small timm backbone (``features_only=True``) sees the image resized to ``input_size``; every
feature level is globally average-pooled and projected (``Linear(c, c)`` + SiLU); in training
each level's vector is dropped as a whole, per sample, with probability ``level_drop`` (kept
ones rescaled by ``1 / (1 - level_drop)``); the levels are concatenated, go through dropout and
the ranking ``head``. The paper used EfficientNet-B0 at 64 px; the default backbone is the
cheapest one that keeps selection within a few percent of a ResNet-50 forward
(``benchmarks/predictor_cost.py``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..normalization import _unwrap, resolve_mean_std
from ..space import TransformSpace
from .registry import register_predictor
from .base import MAX_SIDE, Field, LossPredictorBase, checked_pixels, resize_antialiased

__all__ = ["DEFAULT_BACKBONE", "LossPredictor"]

DEFAULT_BACKBONE = "mobilenetv3_small_100"


def _is_timm_model(name: Any) -> bool:
    """A timm architecture name, or ``architecture.tag`` with a tag timm knows (no hub or file paths)."""
    import timm

    if not isinstance(name, str) or ":" in name or not timm.is_model(name):
        return False
    return "." not in name or name in timm.list_pretrained()


def _check_triple(value: Sequence[float], arg: str) -> tuple:
    field = Field("floats", 1e-6 if arg == "std" else -10.0, 10.0, length=3)
    try:
        return tuple(field.validate(arg, list(value), "LossPredictor"))
    except TypeError:
        raise TypeError(f"{arg} must be 3 numbers (one per RGB channel), got {value!r}") from None


def _backbone_norm(backbone: nn.Module) -> tuple:
    mean, std = resolve_mean_std(backbone)
    return (mean or (0.485, 0.456, 0.406)), (std or (0.229, 0.224, 0.225))


@register_predictor("timm")
class LossPredictor(LossPredictorBase):
    """Predicted relative loss of every candidate of ``space`` (lower = better), from a timm backbone.

    Args:
        space: a :class:`TransformSpace` or a registered space name.
        backbone: a timm model name (``timm.list_models()``), built ``features_only=True``.
        input_size: side the images are resized to (antialiased bilinear) before the backbone.
        pretrained: start from the backbone's pretrained timm weights (needs them downloadable;
            a checkpoint never asks for them: its weights are loaded instead).
        out_indices: which feature levels to use (timm ``out_indices``); default all.
        level_drop: per-sample probability of dropping a whole level's vector in training.
        dropout: dropout on the concatenated vector before the head.
        mean, std: pixel normalisation; default the backbone's own (timm data config).
    """

    config_schema = {
        "backbone": Field("str", check=(_is_timm_model, "a timm model name (timm.list_models())")),
        "input_size": Field("int", 8, MAX_SIDE),
        "out_indices": Field("ints", 0, 15, optional=True, max_length=16),
        "level_drop": Field("float", 0.0, 1.0),
        "dropout": Field("float", 0.0, 0.999),
        "mean": Field("floats", -10.0, 10.0, length=3),
        "std": Field("floats", 1e-6, 10.0, length=3),
    }

    def __init__(self, space: Union[TransformSpace, str], backbone: str = DEFAULT_BACKBONE, input_size: int = 64,
                 pretrained: bool = False, out_indices: Optional[Sequence[int]] = None, level_drop: float = 0.2,
                 dropout: float = 0.3, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__(space, input_size)
        import timm

        if not _is_timm_model(backbone):
            raise ValueError(f"backbone must be a timm model name (see timm.list_models()), got {backbone!r}; "
                             f"other architectures are registered with ttach_instance.predictors.register_predictor")
        if not 0.0 <= float(level_drop) <= 1.0:
            raise ValueError(f"level_drop must be a probability in [0, 1], got {level_drop!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.backbone_name = backbone
        self.out_indices = None if out_indices is None else [int(i) for i in out_indices]
        self.level_drop = float(level_drop)
        self.dropout_p = float(dropout)
        extra = {} if self.out_indices is None else {"out_indices": tuple(self.out_indices)}
        try:
            self.backbone = timm.create_model(backbone, pretrained=bool(pretrained), features_only=True, **extra)
        except (OSError, RuntimeError) as e:  # no hub (offline), no such weights, a broken download
            if not pretrained:
                raise
            raise ValueError(f"pretrained weights of timm backbone {backbone!r} could not be loaded "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); if this machine "
                             f"is offline, fetch them where the hub is reachable and start from the file: "
                             f"fit --backbone-weights FILE.safetensors (LossPredictor.load_backbone_weights)") from None
        self.channels = [int(c) for c in self.backbone.feature_info.channels()]
        bmean, bstd = _backbone_norm(self.backbone)
        self.mean = _check_triple(bmean if mean is None else mean, "mean")
        self.std = _check_triple(bstd if std is None else std, "std")
        self.register_buffer("pix_mean", torch.tensor(self.mean).view(1, 3, 1, 1))
        self.register_buffer("pix_std", torch.tensor(self.std).view(1, 3, 1, 1))
        self.level_proj = nn.ModuleList(nn.Sequential(nn.Linear(c, c), nn.SiLU()) for c in self.channels)
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(sum(self.channels), len(self.space))

    def _drop_levels(self, vectors: List[Tensor]) -> List[Tensor]:
        p = self.level_drop
        if not self.training or p <= 0:
            return vectors
        b, ref = vectors[0].shape[0], vectors[0]
        keep = (torch.rand(b, len(vectors), device=ref.device) >= p).to(ref.dtype)
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        return [v * (keep[:, i:i + 1] * scale) for i, v in enumerate(vectors)]

    def features(self, pixels: Tensor) -> Tensor:
        """The concatenated per-level vectors ``(B, sum(channels))`` that the head reads."""
        x = resize_antialiased(checked_pixels(pixels), self.input_size)
        x = ((x - self.pix_mean.to(x.dtype)) / self.pix_std.to(x.dtype)).to(self.head.weight.dtype)
        vectors = [proj(f.mean((2, 3))) for proj, f in zip(self.level_proj, self.backbone(x))]
        return self.dropout(torch.cat(self._drop_levels(vectors), 1))

    def config(self) -> Dict[str, Any]:
        return {"backbone": self.backbone_name, "input_size": self.input_size, "out_indices": self.out_indices,
                "level_drop": self.level_drop, "dropout": self.dropout_p, "mean": list(self.mean),
                "std": list(self.std)}

    def load_backbone_weights(self, path: str) -> "LossPredictor":
        """Start the backbone from a local ``.safetensors`` file of its timm model's weights (the
        state dict as timm saves it, e.g. the hub's ``model.safetensors``; the classifier's and
        other unused tensors are ignored): the pretrained start without a download. ``ValueError``
        naming the file and the backbone tensors it lacks or holds in another shape. Returns ``self``."""
        from ..io import load_tensors

        if not isinstance(path, str) or not path.endswith(".safetensors"):
            raise ValueError(f"backbone weights must be a .safetensors file, got {path!r}")
        tensors, _ = load_tensors(path)
        mine = self.backbone.state_dict()
        missing = [k for k in mine if k not in tensors]
        wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})" for k, v in mine.items()
                 if k in tensors and tensors[k].shape != v.shape]
        if missing or wrong:
            parts = [f"{len(missing)} of its {len(mine)} tensors missing (first: {missing[:3]})" if missing else "",
                     f"{len(wrong)} of another shape (first: {wrong[:3]})" if wrong else ""]
            raise ValueError(f"backbone weights {path!r} are not those of timm backbone {self.backbone_name!r}: "
                             + "; ".join(p for p in parts if p))
        self.backbone.load_state_dict({k: tensors[k].to(mine[k].dtype) for k in mine})
        return self

    def init_from(self, model: nn.Module) -> "LossPredictor":
        """Start the backbone from a trained classifier of the same architecture -- typically the
        target model itself: every backbone tensor is copied from the classifier's tensor of the
        same name and shape, and the classifier's input normalisation is taken over; the level
        projections and the head stay fresh. The stand-in for a pretrained backbone where no
        pretrained weights exist for the domain. ``ValueError`` naming the first backbone
        tensors without a counterpart. Returns ``self``."""
        inner = _unwrap(model)
        if not isinstance(inner, nn.Module):
            raise TypeError(f"init_from needs an nn.Module classifier, got {type(model).__name__}")
        mine, theirs = self.backbone.state_dict(), inner.state_dict()
        absent = [k for k, v in mine.items() if k not in theirs or theirs[k].shape != v.shape]
        if absent:
            raise ValueError(f"init_from: {len(absent)} of the backbone's {len(mine)} tensors have no same-named, "
                             f"same-shaped tensor in the {type(inner).__name__} (first: {absent[:3]}); the "
                             f"classifier must have the backbone's architecture ({self.backbone_name!r})")
        self.backbone.load_state_dict({k: theirs[k] for k in mine})
        mean, std = resolve_mean_std(inner)
        if mean is not None:
            self.mean, self.std = _check_triple(mean, "mean"), _check_triple(std, "std")
            with torch.no_grad():
                self.pix_mean.copy_(torch.tensor(self.mean).view(1, 3, 1, 1))
                self.pix_std.copy_(torch.tensor(self.std).view(1, 3, 1, 1))
        return self
