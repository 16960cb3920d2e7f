"""ttach-instance: instance-aware test-time augmentation on top of ttach."""

from . import functional, interop  # noqa: F401 - interop attaches TransformSpace.to_ttach / from_ttach
from .embedding import EmbeddingTTAWrapper, RandomResizedCropSampler
from .merge import MERGE_MODES, merge_outputs
from .ops import Op
from .registry import get_space, list_ops, list_spaces, make_op, reload, space_from_specs
from .selection import select_oracle, select_random, select_topk
from .space import Candidate, TransformSpace
from .wrappers import (FullSpaceWrapper, LossGuidedSegmentationWrapper, LossGuidedWrapper, RandomKSegmentationWrapper,
                       RandomKWrapper, SegmentationTTAWrapper, Selection, TTAWrapper)

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "EmbeddingTTAWrapper",
    "FullSpaceWrapper",
    "LossGuidedWrapper",
    "MERGE_MODES",
    "Op",
    "LossGuidedSegmentationWrapper",
    "RandomKSegmentationWrapper",
    "SegmentationTTAWrapper",
    "TTAWrapper",
    "RandomKWrapper",
    "RandomResizedCropSampler",
    "Selection",
    "TransformSpace",
    "functional",
    "get_space",
    "list_ops",
    "list_spaces",
    "make_op",
    "merge_outputs",
    "reload",
    "select_oracle",
    "select_random",
    "select_topk",
    "space_from_specs",
]

_LAZY = {name: "predictors" for name in ("LossPredictor", "SmallLossPredictor", "create_predictor", "load_predictor",
                                        "list_predictors", "register_predictor")}


def __getattr__(name: str):
    # LossPredictor is imported on first use: `import ttach_instance` never depends on the
    # predictor module (or timm) being importable.
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(f".{_LAZY[name]}", __name__)
        except ImportError as exc:
            raise AttributeError(
                f"ttach_instance.{name} is unavailable: importing ttach_instance.{_LAZY[name]} failed ({exc})"
            ) from exc
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
