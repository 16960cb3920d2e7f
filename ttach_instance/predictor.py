"""The loss predictor of "Learning Loss for Test-Time Augmentation" (Kim et al., NeurIPS 2020).

:class:`LossPredictor` maps images to one predicted *relative loss* per candidate of a
:class:`~ttach_instance.space.TransformSpace`: pixels in [0, 1] ``(B, 3, H, W)`` ->
``(B, len(space))`` float32, **lower = better** (the candidate expected to give the target
model the smallest loss on this image scores lowest; only the order and the differences
within a row carry meaning, not the absolute level). Test-time selection takes the k lowest.

Architecture, as the paper's (reimplemented from its description): a small timm backbone
(``features_only=True``) sees the image resized to ``input_size``; every feature level is
globally average-pooled and projected (``Linear(c, c)`` + SiLU); during training each level's
vector is dropped as a whole, per sample, with probability ``level_drop`` (kept ones rescaled
by ``1 / (1 - level_drop)``, like dropout); the levels are concatenated, go through dropout
and a final ``nn.Linear`` to the scores. That final linear layer is the last ``nn.Linear`` of
``predictor.modules()``, so :func:`~ttach_instance.training.trainer.apply_identity_margin` can
fold a calibration margin into its bias. The paper used EfficientNet-B0 at 64 px; the default
here is a cheaper backbone chosen by ``benchmarks/predictor_cost.py`` (see docs/BENCHMARKS.md,
"Loss predictor cost") so that the whole selection stays within ~1.5 % of a ResNet-50 forward.

Very small images work: with 32-px inputs (Tiny ImageNet, ``input_size`` 32) a stride-32
backbone's last level is 1x1, which global pooling handles like any other size; inputs of
another size are resized with antialiasing (``F.interpolate(..., mode="bilinear",
antialias=True)``), inputs already at ``input_size`` are not touched.

Checkpoints are one ``.safetensors`` file (weights + JSON metadata: space, fingerprint,
candidates, backbone, every constructor argument, normalisation, versions); nothing is pickled.
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .space import TransformSpace

#: Default backbone: the cheapest-with-margin choice of ``benchmarks/predictor_cost.py``.
DEFAULT_BACKBONE = "mobilenetv3_small_100"
FORMAT_VERSION = 1


def _versions() -> Dict[str, str]:
    from . import __version__

    out = {"ttach_instance": __version__, "torch": torch.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # a module:factory backbone does not need timm
        pass
    return out


def _build_backbone(name: str, pretrained: bool, out_indices: Optional[Sequence[int]],
                    kwargs: Dict[str, Any]) -> nn.Module:
    """A multi-level feature extractor: ``forward(x) -> [(B, C_i, H_i, W_i), ...]``.

    ``name`` is a timm model name (built with ``features_only=True``) or ``"module:factory"``,
    a callable taking ``pretrained=`` (and ``out_indices=`` when given) and returning such a
    module.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"backbone must be a timm model name or 'module:factory', got {name!r}")
    extra = dict(kwargs)
    if out_indices is not None:
        extra["out_indices"] = tuple(int(i) for i in out_indices)
    if ":" in name:
        mod, _, attr = name.partition(":")
        try:
            factory = getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"backbone {name!r}: cannot import factory {attr!r} from module {mod!r} ({e})") from e
        return factory(pretrained=pretrained, **extra)
    import timm

    if not timm.is_model(name):
        raise ValueError(f"backbone {name!r} is not a timm model name (see timm.list_models()) nor 'module:factory'")
    return timm.create_model(name, pretrained=pretrained, features_only=True, **extra)


def _backbone_norm(backbone: nn.Module) -> tuple:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    try:
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=backbone) if cfg else cfg
    except ImportError:
        pass
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def _check_triple(value: Sequence[float], arg: str) -> tuple:
    try:
        out = tuple(float(v) for v in value)
    except TypeError:
        raise TypeError(f"{arg} must be 3 numbers (one per RGB channel), got {value!r}") from None
    if len(out) != 3 or (arg == "std" and min(out) <= 0):
        raise ValueError(f"{arg} must be 3 numbers (one per RGB channel){', all > 0' if arg == 'std' else ''}, "
                         f"got {value!r}")
    return out



def checked_pixels(pixels: Tensor) -> Tensor:
    """A predictor's input validated: a floating ``(B, 3, H, W)`` tensor in pixel range, at least
    one image. Half types come back as float32 (resample and normalise in float32 on every
    device); float32/float64 come back as they are."""
    if not isinstance(pixels, Tensor):
        raise TypeError(f"pixels must be a torch.Tensor (B, 3, H, W) in [0, 1], got {type(pixels).__name__}")
    if not pixels.is_floating_point():
        raise TypeError(f"pixels must be a floating tensor with values in [0, 1], got dtype {pixels.dtype} "
                        f"(convert uint8 images with images.float() / 255)")
    if pixels.dim() != 4 or pixels.shape[1] != 3:
        raise ValueError(f"pixels must have shape (B, 3, H, W) (RGB), got {tuple(pixels.shape)}")
    if pixels.shape[0] == 0:
        raise ValueError("pixels must hold at least one image, got an empty batch")
    return pixels if pixels.dtype in (torch.float32, torch.float64) else pixels.float()


def resize_antialiased(x: Tensor, side: int) -> Tensor:
    """``x`` resized (bilinear, antialiased) to ``side x side``; untouched when already that size."""
    if tuple(x.shape[-2:]) == (side, side):
        return x
    return nn.functional.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


class IdentityGate(nn.Module):
    """An identity margin that depends on how clean the image looks.

    A constant margin (:func:`~ttach_instance.training.trainer.apply_identity_margin`) keeps
    the identity on clean images, where the predictor's small differences are mostly noise.
    It pays for that on corrupted images, which also lose candidates that would have helped.
    The gate is a logistic regression on the predictor's features: ``p = sigmoid(w . f + b)``
    estimates the probability that the image is uncorrupted. It lowers the identity's score
    by ``margin * p``. Clean-looking images keep the identity; corrupted ones get the plain
    ranking. Fitted after training by
    :func:`~ttach_instance.training.trainer.fit_identity_gate`; saved with the predictor's
    weights. The weights are plain parameters, not an ``nn.Linear``, because the ranking head
    must stay the last ``nn.Linear``.
    """

    def __init__(self, num_features: int, identity: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_features))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("margin", torch.zeros(()))
        self.register_buffer("identity", torch.tensor(int(identity)))

    def clean_probability(self, features: Tensor) -> Tensor:
        """``(B,)``: how likely each image is uncorrupted, by the gate's logistic regression."""
        return torch.sigmoid(features.float() @ self.weight.float() + self.bias.float())

    def forward(self, scores: Tensor, features: Tensor) -> Tensor:
        shift = torch.zeros_like(scores)
        shift[:, int(self.identity)] = self.margin.to(scores.dtype) * self.clean_probability(features).to(scores.dtype)
        return scores - shift


def ranking_head(predictor: nn.Module) -> Optional[nn.Linear]:
    """The predictor's ranking head: its last registered ``nn.Linear`` (features -> one score per
    candidate), where a constant identity margin is folded in and whose input an
    :class:`IdentityGate` reads; ``None`` when it has no ``nn.Linear``."""
    linears = [m for m in predictor.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def gate_scores(predictor: nn.Module, scores: Tensor, features: Tensor) -> Tensor:
    """``scores`` after the predictor's :class:`IdentityGate`, when it has one."""
    gate = getattr(predictor, "identity_gate", None)
    return scores if gate is None else gate(scores, features)


class LossPredictor(nn.Module):
    """Predicted relative loss of every candidate of ``space`` for each image (lower = better).

    Args:
        space: a :class:`TransformSpace` or a registered space name (``get_space(name)``).
        backbone: timm model name (built ``features_only=True``) or ``"module:factory"``.
        input_size: side the images are resized to (antialiased bilinear) before the backbone.
        pretrained: load the backbone's pretrained timm weights (needs them downloadable).
        out_indices: which feature levels to use (timm ``out_indices``); default all.
        level_drop: per-sample probability of dropping a whole level's vector in training.
        dropout: dropout on the concatenated vector before the final linear layer.
        mean, std: pixel normalisation; default the backbone's own (timm pretrained config).
        backbone_kwargs: extra keyword arguments for the backbone constructor (JSON values).

    ``forward(pixels)``: float ``(B, 3, H, W)`` in [0, 1] on the predictor's device (any float
    dtype; half inputs are resampled in float32) -> float32 ``(B, len(space))``.

    ``model_image_size``: ``(H, W)`` of the images the *target model* saw when the loss labels
    were made (set by :func:`~ttach_instance.training.trainer.fit_predictor`, saved with the
    weights; ``None`` when unknown): the size to bring images to before the wrapper, which is not
    the predictor's own ``input_size``.
    """

    kind = "loss-predictor"
    #: head_scores applies an :class:`IdentityGate` when one is attached (fit_identity_gate checks)
    supports_identity_gate = True
    model_image_size: Optional[Tuple[int, int]] = None

    def __init__(
        self,
        space: Union[TransformSpace, str],
        backbone: str = DEFAULT_BACKBONE,
        input_size: int = 64,
        pretrained: bool = False,
        out_indices: Optional[Sequence[int]] = None,
        level_drop: float = 0.2,
        dropout: float = 0.3,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
    ):
        super().__init__()
        from .registry import get_space

        if isinstance(space, str):
            space = get_space(space)
        if not isinstance(space, TransformSpace):
            raise TypeError(f"space must be a TransformSpace or a registered space name, got {type(space).__name__}")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 8:
            raise ValueError(f"input_size must be an int >= 8, got {input_size!r}")
        if not 0.0 <= float(level_drop) <= 1.0:
            raise ValueError(f"level_drop must be a probability in [0, 1], got {level_drop!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.space = space
        self.space_fingerprint = space.fingerprint
        self.candidate_names: List[str] = list(space.names)
        self.input_size = int(input_size)
        self.backbone_name = backbone
        self.pretrained = bool(pretrained)
        self.out_indices = None if out_indices is None else [int(i) for i in out_indices]
        self.level_drop = float(level_drop)
        self.dropout_p = float(dropout)
        self.backbone_kwargs = dict(backbone_kwargs or {})

        self.backbone = _build_backbone(backbone, self.pretrained, self.out_indices, self.backbone_kwargs)
        info = getattr(self.backbone, "feature_info", None)
        if info is not None and hasattr(info, "channels"):
            channels = list(info.channels())
        else:  # a module:factory backbone without timm's feature_info: one dry run
            with torch.no_grad():
                was = self.backbone.training
                dry = torch.zeros(1, 3, self.input_size, self.input_size)
                channels = [f.shape[1] for f in self.backbone.eval()(dry)]
                self.backbone.train(was)
        self.channels = [int(c) for c in channels]
        bmean, bstd = _backbone_norm(self.backbone)
        self.mean = _check_triple(bmean if mean is None else mean, "mean")
        self.std = _check_triple(bstd if std is None else std, "std")
        self.register_buffer("pix_mean", torch.tensor(self.mean).view(1, 3, 1, 1))
        self.register_buffer("pix_std", torch.tensor(self.std).view(1, 3, 1, 1))
        self.level_proj = nn.ModuleList(nn.Sequential(nn.Linear(c, c), nn.SiLU()) for c in self.channels)
        self.dropout = nn.Dropout(self.dropout_p)
        self.head = nn.Linear(sum(self.channels), len(space))  # must stay the last nn.Linear registered

    # -- forward ---------------------------------------------------------------------------
    def _prepare(self, pixels: Tensor) -> Tensor:
        x = resize_antialiased(checked_pixels(pixels), self.input_size)
        x = (x - self.pix_mean.to(x.dtype)) / self.pix_std.to(x.dtype)
        return x.to(self.head.weight.dtype)

    def _drop_levels(self, vectors: List[Tensor]) -> List[Tensor]:
        p = self.level_drop
        if not self.training or p <= 0:
            return vectors
        b, ref = vectors[0].shape[0], vectors[0]
        keep = (torch.rand(b, len(vectors), device=ref.device) >= p).to(ref.dtype)
        scale = 1.0 / (1.0 - p) if p < 1 else 0.0
        return [v * (keep[:, i:i + 1] * scale) for i, v in enumerate(vectors)]

    def features(self, pixels: Tensor) -> Tensor:
        """The concatenated per-level vectors ``(B, sum(channels))`` that the final layer reads."""
        feats = self.backbone(self._prepare(pixels))
        if len(feats) != len(self.level_proj):
            raise RuntimeError(f"backbone {self.backbone_name!r} returned {len(feats)} levels, expected "
                               f"{len(self.level_proj)}")
        vectors = [proj(f.mean((2, 3))) for proj, f in zip(self.level_proj, feats)]
        return self.dropout(torch.cat(self._drop_levels(vectors), 1))

    def head_scores(self, features: Tensor) -> Tensor:
        """The final layer: :meth:`features` -> relative losses (``forward = head_scores . features``),
        after the :class:`IdentityGate` when the fit gave the predictor one."""
        return gate_scores(self, self.head(features).float(), features)

    def forward(self, pixels: Tensor) -> Tensor:
        """Relative losses ``(B, len(space))`` float32, lower = better."""
        return self.head_scores(self.features(pixels))

    # -- checkpoints -----------------------------------------------------------------------
    def config(self) -> Dict[str, Any]:
        """Every constructor argument but the space (JSON values): ``LossPredictor(space, **config())``."""
        return {"backbone": self.backbone_name, "input_size": self.input_size, "pretrained": False,
                "out_indices": self.out_indices, "level_drop": self.level_drop, "dropout": self.dropout_p,
                "mean": list(self.mean), "std": list(self.std), "backbone_kwargs": self.backbone_kwargs}

    def init_from(self, model: nn.Module) -> "LossPredictor":
        """Start the backbone from a trained classifier of the same architecture -- typically the
        target model itself (a timm ``resnet18`` target for a ``backbone="resnet18"`` predictor):
        every backbone tensor is copied from the classifier's tensor of the same name and shape,
        and the classifier's input normalisation is taken over (``resolve_mean_std``); the level
        projections and the ranking head stay fresh. The stand-in for the pretrained backbone the
        paper starts from, when no pretrained weights exist for the domain (docs/BENCHMARKS.md:
        the target's own layers rank the candidates better than features learnt from scratch).
        Raises ``ValueError`` naming the first backbone tensors without a counterpart. Returns
        ``self``."""
        from .normalization import _unwrap, resolve_mean_std

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

    def metadata(self) -> Dict[str, Any]:
        return {"kind": self.kind, "format_version": FORMAT_VERSION, "space": self.space.name,
                "space_params": self.space.params, "space_fingerprint": self.space_fingerprint,
                "candidate_names": self.candidate_names, "backbone": self.backbone_name,
                "input_size": self.input_size, "config": self.config(), "channels": self.channels,
                "pretrained_init": self.pretrained, "model_image_size": self.model_image_size,
                "versions": _versions()}

    def save(self, path: str) -> None:
        """Write weights + metadata to one ``.safetensors`` file (atomically; no pickle)."""
        from .io import atomic_save_tensors

        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).endswith(".safetensors"):
            raise ValueError(f"path must end in .safetensors, got {path!r}")
        atomic_save_tensors(os.fspath(path), self.state_dict(), self.metadata())

    @classmethod
    def load(cls, path: str, space: Optional[Union[TransformSpace, str]] = None,
             map_location: Union[str, torch.device] = "cpu") -> "LossPredictor":
        """Rebuild from a :meth:`save` checkpoint (space from the registry unless given), weights
        loaded strictly, in eval mode on ``map_location``."""
        tensors, meta, space = read_predictor_checkpoint(cls, path, space, ("config",))
        predictor = cls(space, **meta["config"])
        load_predictor_weights(predictor, tensors, meta, path, f"backbone={meta['config'].get('backbone')!r}")
        return predictor.to(map_location).eval()


def read_predictor_checkpoint(cls: type, path: str, space: Optional[Union[TransformSpace, str]],
                              required: Sequence[str] = ()) -> Tuple[Dict[str, Tensor], Dict[str, Any], TransformSpace]:
    """``(tensors, metadata, space)`` of a predictor checkpoint written by ``cls.save``, checked:
    readable (not truncated), of ``cls.kind``, with the ``required`` metadata keys, and for
    ``space`` (default: rebuilt from the registry by the recorded name and parameters) by
    fingerprint. Every failure is a ``ValueError`` naming the file and what was expected."""
    from safetensors import SafetensorError

    from .registry import get_space
    from .io import load_tensors

    try:
        tensors, meta = load_tensors(os.fspath(path))
    except (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"predictor checkpoint {path!r} is unreadable (truncated or not a safetensors file): "
                         f"{e}") from e
    if meta.get("kind") != cls.kind:
        raise ValueError(f"{path!r} is not a {cls.__name__} checkpoint (kind {meta.get('kind')!r}, expected "
                         f"{cls.kind!r}); load it with ttach_instance.models.load_predictor")
    for key in ("space", "space_fingerprint", *required):
        if key not in meta:
            raise ValueError(f"predictor checkpoint {path!r} lacks metadata {key!r}")
    if space is None:
        try:
            space = get_space(meta["space"], **meta.get("space_params", {}))
        except Exception as e:  # noqa: BLE001 - the registry's error, with the checkpoint named
            raise ValueError(f"{path!r}: cannot rebuild its space {meta['space']!r} with parameters "
                             f"{meta.get('space_params', {})} from the registry ({e}); pass space=") from e
    elif isinstance(space, str):
        space = get_space(space)
    if space.fingerprint != meta["space_fingerprint"]:
        raise ValueError(f"space {space.name!r} (fingerprint {space.fingerprint}) is not the space the predictor "
                         f"{path!r} was trained for ({meta['space']!r}, fingerprint {meta['space_fingerprint']})")
    return tensors, meta, space


def load_predictor_weights(predictor: nn.Module, tensors: Dict[str, Tensor], meta: Dict[str, Any], path: str,
                           described: str = "") -> None:
    """Load ``tensors`` into ``predictor`` strictly (missing, unexpected or reshaped keys: a
    ``ValueError`` listing them) and set its ``model_image_size`` from ``meta``."""
    if "identity_gate.weight" in tensors and getattr(predictor, "identity_gate", None) is None:
        head = ranking_head(predictor)
        num_features = head.in_features if head is not None else None
        if tensors["identity_gate.weight"].shape != (num_features,):
            raise ValueError(f"predictor checkpoint {path!r}: identity_gate.weight has shape "
                             f"{tuple(tensors['identity_gate.weight'].shape)}, expected ({num_features},) "
                             f"(one weight per feature of the ranking head)")
        predictor.identity_gate = IdentityGate(num_features)  # fitted after training
    own = predictor.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    wrong = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(v.shape)})"
             for k, v in own.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = [f"missing keys {missing}" if missing else "",
                 f"unexpected keys {unexpected}" if unexpected else "", f"shape mismatch {wrong}" if wrong else ""]
        raise ValueError(f"predictor checkpoint {path!r} does not match {type(predictor).__name__}({described}): "
                         + "; ".join(p for p in parts if p))
    predictor.load_state_dict(tensors, strict=True)
    predictor.model_image_size = _image_size_meta(meta.get("model_image_size"), path)


#: What the wrappers, the CLI and the evaluation read off a predictor besides calling it.
_PREDICTOR_ATTRIBUTES = ("space", "space_fingerprint", "candidate_names", "input_size", "model_image_size")


def _image_size_meta(value: Any, path: str) -> Optional[Tuple[int, int]]:
    """A checkpoint's ``model_image_size`` (``[H, W]`` or absent) as a tuple."""
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value)):
        raise ValueError(f"predictor checkpoint {path!r}: model_image_size must be [height, width], got {value!r}")
    return int(value[0]), int(value[1])


def _predictor_space(predictor: Any, arg: str = "predictor") -> TransformSpace:
    space = getattr(predictor, "space", None)
    if not isinstance(predictor, nn.Module) or not isinstance(space, TransformSpace):
        raise TypeError(f"{arg} must be a loss predictor module with a .space (TransformSpace), got "
                        f"{type(predictor).__name__}")
    return space


class _PredictorCombination(nn.Module):
    """Base of modules built from predictors: reads ``space`` & co. off the first one."""

    def _first(self) -> nn.Module:
        raise NotImplementedError

    def __getattr__(self, name: str):
        if name in _PREDICTOR_ATTRIBUTES:
            return getattr(self._first(), name)
        return super().__getattr__(name)


class FlipAveragedPredictor(_PredictorCombination):
    """Scores of ``predictor`` averaged over the image and its horizontal mirror.

    The paper's optional test-time step: the mirrored image is scored too, and its scores are
    mapped back to the original candidates (a candidate of the mirrored image is the mirrored
    candidate of the original: ``rotate(+20)`` of ``flip(x)`` is ``flip(rotate(-20)(x))``, see
    :func:`~ttach_instance.space.flip_permutation`) before averaging. Both images go through
    ``predictor`` in one call, so it costs one predictor forward of ``2B`` rows. The result is
    mirror-consistent: scoring ``flip(x)`` gives the scores of ``x`` permuted.

    Works around any predictor module with a ``.space`` (:class:`LossPredictor`,
    :class:`~ttach_instance.models.SmallLossPredictor`, a user's) and exposes the same
    ``space``, ``space_fingerprint``, ``candidate_names`` and ``input_size``, so it drops into
    :class:`~ttach_instance.wrappers.LossGuidedWrapper` and the evaluation harness unchanged.
    """

    def __init__(self, predictor: nn.Module):
        super().__init__()
        from .space import flip_permutation

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

    def forward(self, pixels: Tensor) -> Tensor:
        both = self.predictor(torch.cat([pixels, pixels.flip(-1)]))
        plain, mirrored = both.chunk(2)
        return (plain + mirrored.index_select(1, self.source.to(mirrored.device))) / 2


class PredictorEnsemble(_PredictorCombination):
    """The mean of the scores of several predictors of one space (same fingerprint).

    Independently trained predictors make partly independent ranking errors; their mean ranks
    better than each (measured in docs/BENCHMARKS.md) at the sum of their costs. Scores are
    averaged as they are (each predicts relative losses in the same units), so margins folded
    into a member's bias carry over in proportion. ``space``, ``candidate_names`` and
    ``input_size`` are the first member's.
    """

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

    def forward(self, pixels: Tensor) -> Tensor:
        return torch.stack([m(pixels).float() for m in self.members]).mean(0)
