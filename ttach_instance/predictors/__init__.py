"""Loss predictors: one base class, a registry in timm's manner, and one checkpoint schema.

    predictor = create_predictor("small", "paper12", width=8, input_size=32)
    predictor.save("predictor.safetensors")
    predictor = load_predictor("predictor.safetensors")
    list_predictors()                    # ['small', 'timm', ...]

Names become architectures only through this registry: a checkpoint names a registered
architecture and its validated constructor arguments, never code to import. Register your own
architecture (a :class:`LossPredictorBase` subclass) in Python before loading its checkpoints::

    @register_predictor("mine")
    class MyPredictor(LossPredictorBase): ...
"""

from .base import FORMAT_VERSION, Field, LossPredictorBase
from .calibration import IdentityCalibration
from .compose import FlipAveragedPredictor, PredictorEnsemble
from .registry import create_predictor, list_predictors, load_predictor, read_checkpoint_metadata, register_predictor
from .small import SmallLossPredictor
from .timm_backbone import LossPredictor

__all__ = ["LossPredictorBase", "Field", "IdentityCalibration", "register_predictor", "create_predictor",
           "load_predictor", "list_predictors", "read_checkpoint_metadata", "LossPredictor", "SmallLossPredictor",
           "FlipAveragedPredictor", "PredictorEnsemble", "FORMAT_VERSION"]
