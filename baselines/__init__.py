"""Classic augmentation baselines used as *offline* expansion methods (GIF paper,
Table 1): each seed image yields ``ratio`` augmented copies with the same label."""

from .cutout import Cutout
from .gridmask import GridMask
from .randaugment import RandAugment

__all__ = ["Cutout", "GridMask", "RandAugment"]
