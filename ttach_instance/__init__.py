"""ttach-instance: instance-aware test-time augmentation on top of ttach."""

from . import functional
from .ops import Op
from .registry import get_space, list_ops, list_spaces, make_op, reload, space_from_specs
from .space import Candidate, TransformSpace

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "Op",
    "TransformSpace",
    "functional",
    "get_space",
    "list_ops",
    "list_spaces",
    "make_op",
    "reload",
    "space_from_specs",
]
