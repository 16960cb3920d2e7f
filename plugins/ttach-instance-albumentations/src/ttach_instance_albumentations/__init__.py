"""ttach-instance-albumentations: transform spaces built from albumentations transforms.

``ttach_instance.get_space("albumentations")`` gives the default deterministic set;
:func:`space_from_albumentations` builds a space from your own list. CPU path: see README.
"""

from .ops import (
    DEFAULT_TRANSFORMS,
    AlbumentationsOp,
    albumentations_space,
    default_transforms,
    from_uint8_hwc,
    space_from_albumentations,
    to_uint8_hwc,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TRANSFORMS",
    "AlbumentationsOp",
    "albumentations_space",
    "default_transforms",
    "from_uint8_hwc",
    "space_from_albumentations",
    "to_uint8_hwc",
]
