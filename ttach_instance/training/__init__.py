"""Predictor training: loss labels (cache, corruptions, tasks), ranking losses, trainer (DDP-ready)."""

from .corruptions import COMMON, HELD_OUT
from .labels import LabelCache, generate_labels, load_label_caches
from .tasks import ClassificationTask, Task

__all__ = ["COMMON", "HELD_OUT", "LabelCache", "generate_labels", "load_label_caches", "ClassificationTask", "Task"]
