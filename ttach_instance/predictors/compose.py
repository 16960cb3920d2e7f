"""Predictors built from predictors: flip-averaged scoring and ensembles (composed at run time,
not saved: save and load their members)."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..space import TransformSpace, flip_permutation

__all__ = ["FlipAveragedPredictor", "PredictorEnsemble"]

#: What the wrappers, the CLI and the evaluation read off a predictor besides calling it.
_PREDICTOR_ATTRIBUTES = ("space", "space_fingerprint", "candidate_names", "input_size", "model_image_size")


def _predictor_space(predictor: object, arg: str = "predictor") -> TransformSpace:
    space = getattr(predictor, "space", None)
    if not isinstance(predictor, nn.Module) or not isinstance(space, TransformSpace):
        raise TypeError(f"{arg} must be a loss predictor module with a .space (TransformSpace), got "
                        f"{type(predictor).__name__}")
    return space


def _temperatures(predictor: object) -> List[Dict[str, Any]]:
    """``predictor``'s recorded weighted-merge temperatures (copies; none for a predictor that
    records none)."""
    return [dict(e) for e in getattr(predictor, "merge_temperatures", None) or ()]


def _setting(entry: Dict[str, Any]) -> Tuple[Any, Any, Any]:
    return entry["k"], entry["flip"], entry["merge_space"]


class _PredictorCombination(nn.Module):
    """Base of modules built from predictors: reads ``space`` & co. off the first one.
    ``merge_temperatures`` (what the loss-guided wrappers read, given no temperature) is each
    combination's own rule, read-only: a combination is not saved, so a temperature is stored
    with a member (``fuse temperature``)."""

    def _first(self) -> nn.Module:
        raise NotImplementedError

    def _merge_temperatures(self) -> List[Dict[str, Any]]:
        raise NotImplementedError

    @property
    def merge_temperatures(self) -> List[Dict[str, Any]]:
        return self._merge_temperatures()

    @merge_temperatures.setter
    def merge_temperatures(self, value: Any) -> None:
        raise AttributeError(f"a {type(self).__name__} is not saved: store the temperature with its member "
                             f"predictor (fusion.store_temperature on it, then save it)")

    def __getattr__(self, name: str):
        if name in _PREDICTOR_ATTRIBUTES:
            return getattr(self._first(), name)
        return super().__getattr__(name)


class FlipAveragedPredictor(_PredictorCombination):
    """Scores of ``predictor`` averaged over the image and its horizontal mirror (the paper's
    optional test-time step). A candidate of the mirrored image is the mirrored candidate of the
    original (``rotate(+20)`` of ``flip(x)`` is ``flip(rotate(-20)(x))``,
    :func:`~ttach_instance.space.flip_permutation`), so the mirrored scores are permuted back
    before averaging. Both images go through ``predictor`` in one call of ``2B`` rows."""

    def __init__(self, predictor: nn.Module):
        super().__init__()
        space = _predictor_space(predictor)
        perm = flip_permutation(space)
        if perm is None:
            raise ValueError(f"space {space.name!r} has candidates without a mirror image in the space "
                             f"(e.g. a left crop): flip averaging needs every candidate's mirror, names {space.names}")
        self.predictor = predictor
        # mirrored[:, j] scores candidate j of flip(x) ~ candidate perm[j] of x: gather the inverse.
        self.register_buffer("source", torch.argsort(torch.tensor(perm)), persistent=False)

    def _first(self) -> nn.Module:
        return self._modules["predictor"]

    def _merge_temperatures(self) -> List[Dict[str, Any]]:
        """``merge_temperatures``: the member's. Flip averaging means two estimates of the same
        losses, in the member's units, so the softmax over them keeps the member's sharpness."""
        return _temperatures(self.predictor)

    def forward(self, pixels: Tensor) -> Tensor:
        both = self.predictor(torch.cat([pixels, pixels.flip(-1)]))
        plain, mirrored = both.chunk(2)
        return (plain + mirrored.index_select(1, self.source.to(mirrored.device))) / 2


class PredictorEnsemble(_PredictorCombination):
    """The mean of the scores of several predictors of one space (same fingerprint): partly
    independent ranking errors average out, at the sum of the members' costs."""

    def __init__(self, predictors: Sequence[nn.Module]):
        super().__init__()
        members = list(predictors)
        if len(members) < 1:
            raise ValueError("predictors must hold at least one predictor, got none")
        spaces = [_predictor_space(p, f"predictors[{i}]") for i, p in enumerate(members)]
        for i, space in enumerate(spaces[1:], 1):
            if space.fingerprint != spaces[0].fingerprint:
                raise ValueError(f"predictors[{i}] scores space {space.name!r} (fingerprint {space.fingerprint}), "
                                 f"predictors[0] space {spaces[0].name!r} ({spaces[0].fingerprint}): an ensemble "
                                 f"needs one space")
        self.members = nn.ModuleList(members)

    def _first(self) -> nn.Module:
        return self._modules["members"][0]

    def _merge_temperatures(self) -> List[Dict[str, Any]]:
        """``merge_temperatures``: the first member's entries that every member records with the
        same temperature (e.g. one predictor twice): the mean of scores sharing one fitted
        temperature keeps it. Members that disagree (each fitted alone) give none for that
        setting -- their mean is another scorer, fitted for by no one -- so the wrappers use 1."""
        members = [_temperatures(m) for m in self.members]
        return [e for e in members[0] if all(any(_setting(o) == _setting(e) and o["temperature"] == e["temperature"]
                                                  for o in other) for other in members[1:])]

    def forward(self, pixels: Tensor) -> Tensor:
        return torch.stack([m(pixels).float() for m in self.members]).mean(0)
