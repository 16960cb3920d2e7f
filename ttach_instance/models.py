"""Small target models for CPU-sized experiments (the demo and the Tiny ImageNet benchmark).

Importable factories, so the CLI can load them as ``ttach_instance.models:small_resnet``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from .predictor import (LossPredictor, checked_pixels, gate_scores, load_predictor_weights,
                        read_predictor_checkpoint, resize_antialiased)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.short is None else self.short(x)))


class SmallResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, one residual block per stage, stride 2 between stages.

    Expects inputs normalised with ``mean``/``std`` (stored as attributes so wrappers can find
    them); outputs logits ``(B, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (16, 32, 64),
        blocks: int = 1,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_channels: int = 3,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers = []
        cin = widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                layers.append(_Block(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))
        return self.head(x.mean((2, 3)))


def small_resnet(num_classes: int = 10, width: int = 16, blocks: int = 1) -> SmallResNet:
    """Factory for :class:`SmallResNet` with widths ``(w, 2w, 4w)``."""
    return SmallResNet(num_classes, widths=(width, 2 * width, 4 * width), blocks=blocks)


class SmallLossPredictor(nn.Module):
    """A ~3 M-MAC CNN loss predictor: pixels in [0, 1] ``(B, 3, H, W)`` -> ``(B, |T|)`` relative
    losses (lower = better), resized to ``input_size`` first.

    A light stand-in for :class:`ttach_instance.predictor.LossPredictor` where that module is
    not available; same call convention and safetensors + JSON ``save``/``load``.

    ``unshuffle=u`` > 1: the image is resized to ``u * input_size`` and folded into ``3 u^2``
    channels at ``input_size`` (``pixel_unshuffle``) instead of being downsampled: the net works at
    the same small resolution but sees every pixel of that size -- the fine texture that noise,
    blur and JPEG corruptions leave, which a resize to a few dozen pixels averages away.

    ``levels="all"``: the features are every stage's pooled output concatenated (as the paper's
    predictor reads four levels of its backbone), not the last stage's alone, so the early stages'
    statistics (how much fine texture, how much contrast) reach the head; nearly free, but it
    ranked no better on the Tiny ImageNet benchmark (docs/BENCHMARKS.md).

    ``detail_channels=c`` > 0: a full-resolution *detail branch* -- one 3x3 convolution with ``c``
    filters on the image at ``detail_size`` (default ``2 * input_size``), each filter's response
    pooled into its mean rectified value and its standard deviation (``2c`` features). The
    backbone runs small (a 16-px input averages blur and noise away); this branch reads the
    band-pass energy the small input loses, at ``9 * 3 * c`` MACs per pixel (few, but a 3-channel
    convolution runs slowly on CPU: with ``c = 16`` at 32 px it triples a 16-px width-16
    predictor's time, for +0.009 held-out Spearman on the benchmark).

    ``model_image_size``: as :attr:`ttach_instance.predictor.LossPredictor.model_image_size`.
    """

    kind = "small-loss-predictor"
    supports_identity_gate = True  # head_scores applies predictor.IdentityGate
    model_image_size = None

    def __init__(self, space, width: int = 8, input_size: int = 32, unshuffle: int = 1, levels: str = "last",
                 detail_channels: int = 0, detail_size: int = 0):
        super().__init__()
        for name, value, low in (("unshuffle", unshuffle, 1), ("detail_channels", detail_channels, 0),
                                 ("detail_size", detail_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if levels not in ("last", "all"):
            raise ValueError(f"levels must be 'last' (the last stage's pooled features) or 'all' (every stage's), "
                             f"got {levels!r}")
        self.unshuffle = unshuffle
        self.levels = levels
        self.space = space
        self.space_fingerprint = space.fingerprint
        self.candidate_names = list(space.names)
        self.input_size = int(input_size)
        self.width = int(width)
        self.detail_channels = detail_channels
        self.detail_size = detail_size or 2 * self.input_size
        widths = (width, 2 * width, 4 * width)
        self.net = SmallResNet(len(space), widths, in_channels=3 * unshuffle ** 2)
        num_features = (sum(widths) if levels == "all" else widths[-1]) + 2 * detail_channels
        if num_features != widths[-1]:  # the ranking head reads the wider feature vector
            self.net.head = nn.Linear(num_features, len(space))
        if detail_channels:
            self.detail = nn.Sequential(nn.Conv2d(3, detail_channels, 3, 1, 1, bias=False),
                                        nn.BatchNorm2d(detail_channels))
        self.register_buffer("pix_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("pix_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def features(self, x: Tensor) -> Tensor:
        """The pooled vector that the final linear layer reads: ``(B, 4 * width)``, ``(B, 7 * width)``
        with ``levels="all"``, plus ``2 * detail_channels`` with the detail branch."""
        x = checked_pixels(x)
        detail_input = resize_antialiased(x, self.detail_size) if self.detail_channels else None
        x = ((resize_antialiased(x, self.pixel_size) - self.pix_mean) / self.pix_std).to(self.pix_mean.dtype)
        if self.unshuffle > 1:
            x = nn.functional.pixel_unshuffle(x, self.unshuffle)
        h, stages = self.net.stem(x), []
        for layer in self.net.layers:
            h = layer(h)
            stages.append(h)
        pooled = [s.mean((2, 3)) for s in (stages if self.levels == "all" else stages[-1:])]
        if self.detail_channels:
            pooled.extend(self._detail_features(detail_input))
        return torch.cat(pooled, 1) if len(pooled) > 1 else pooled[0]

    def _detail_features(self, x: Tensor) -> list:
        """The detail branch on normalised pixels ``x`` at ``detail_size``: per filter, the mean
        rectified response and the response's spatial standard deviation."""
        y = self.detail(((x - self.pix_mean) / self.pix_std).to(self.pix_mean.dtype))
        mean = y.mean((2, 3))
        # the population std from E[y^2] - E[y]^2: a tenth of Tensor.std's time on CPU here
        return [torch.relu(y).mean((2, 3)), (y.square().mean((2, 3)) - mean.square()).clamp_min(1e-12).sqrt()]

    @property
    def pixel_size(self) -> int:
        """Side the image is resized to before the net: ``unshuffle * input_size``."""
        return self.unshuffle * self.input_size

    def head_scores(self, features: Tensor) -> Tensor:
        """The final layer: :meth:`features` -> relative losses (``forward = head_scores . features``),
        after the identity gate when the fit gave the predictor one (``predictor.IdentityGate``)."""
        return gate_scores(self, self.net.head(features), features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head_scores(self.features(x))

    def init_from(self, model: nn.Module) -> "SmallLossPredictor":
        """Start from a trained :class:`SmallResNet` classifier's layers (the target model itself,
        when it is one): every weight but the classifier head, and its input normalisation; the
        ranking head stays fresh. The stand-in for the pretrained backbone the paper starts from:
        the features already know what this target model sees. Widths must match (a
        ``SmallResNet`` of widths ``(w, 2w, 4w)`` -> ``width=w``); any ``input_size`` (the paper
        runs its ImageNet-pretrained backbone at a quarter of the resolution it was trained at).

        With ``unshuffle=u`` > 1 the stem reads ``3 u^2`` folded channels: it starts as the
        classifier's stem convolution run at full resolution and average-pooled ``u x u``
        (:func:`unshuffled_stem_weight`, exact), so the net begins where a ``1/u``-size input
        would put it but can learn the fine texture that input loses. Returns ``self``."""
        if not isinstance(model, SmallResNet):
            raise TypeError(f"init_from needs a SmallResNet classifier, got {type(model).__name__}")
        mine = {k: v for k, v in self.net.state_dict().items() if not k.startswith("head.")}
        theirs = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        stem = "stem.0.weight"
        if self.unshuffle > 1 and stem in theirs and theirs[stem].dim() == 4 and theirs[stem].shape[1] == 3:
            theirs[stem] = unshuffled_stem_weight(theirs[stem], self.unshuffle)
        bad = [f"{k}: {tuple(v.shape)} vs {tuple(mine[k].shape)}" for k, v in theirs.items()
               if k in mine and mine[k].shape != v.shape]
        missing = sorted(set(mine) - set(theirs))
        if bad or missing or set(theirs) - set(mine):
            widths = [m.conv1.out_channels for m in model.layers]
            raise ValueError(f"init_from: the classifier (stage widths {widths}) does not match this predictor "
                             f"(width={self.width}); mismatched {bad[:3]}, missing {missing[:3]}")
        with torch.no_grad():
            for k, v in theirs.items():
                mine[k].copy_(v)
            self.pix_mean.copy_(torch.tensor(model.mean).view(1, 3, 1, 1))
            self.pix_std.copy_(torch.tensor(model.std).view(1, 3, 1, 1))
        return self

    def save(self, path: str) -> None:
        from .io import atomic_save_tensors

        atomic_save_tensors(path, self.state_dict(), {
            "kind": self.kind, "space": self.space.name, "space_params": self.space.params,
            "space_fingerprint": self.space_fingerprint, "candidate_names": self.candidate_names,
            "width": self.width, "input_size": self.input_size, "unshuffle": self.unshuffle, "levels": self.levels,
            "detail_channels": self.detail_channels, "detail_size": self.detail_size,
            "model_image_size": self.model_image_size})

    @classmethod
    def load(cls, path: str, space=None) -> "SmallLossPredictor":
        """Rebuild from a :meth:`save` checkpoint, with the checks of ``LossPredictor.load``
        (truncated file, another kind or space, missing or reshaped weights: ``ValueError``)."""
        tensors, meta, space = read_predictor_checkpoint(cls, path, space, ("width", "input_size"))
        # checkpoints from before levels / the detail branch existed are "last" / none
        options = {"unshuffle": int(meta.get("unshuffle", 1)), "levels": meta.get("levels", "last"),
                   "detail_channels": int(meta.get("detail_channels", 0)), "detail_size": int(meta.get("detail_size", 0))}
        try:
            p = cls(space, meta["width"], meta["input_size"], **options)
        except ValueError as e:
            raise ValueError(f"predictor checkpoint {path!r} has invalid options: {e}") from e
        load_predictor_weights(p, tensors, meta, path,
                               f"width={meta['width']}, " + ", ".join(f"{k}={v!r}" for k, v in options.items()))
        return p.eval()


def unshuffled_stem_weight(weight: Tensor, factor: int) -> Tensor:
    """A 3x3 convolution's weight ``(O, C, 3, 3)`` (stride 1, padding 1) rewritten for the
    ``pixel_unshuffle(x, factor)`` of its input: ``(O, C * factor^2, 3, 3)`` such that, with the
    same padding, ``conv(pixel_unshuffle(x), new) == avg_pool2d(conv(x, weight), factor)``.

    Output pixel ``i`` averages the full-resolution outputs ``factor*i + s`` (``s < factor``), which
    read input rows ``factor*i + s + a`` (``a`` in -1..1): row offset ``s + a`` lies in folded cell
    ``(s + a) // factor`` (-1, 0 or 1: a 3x3 kernel suffices for any factor) at phase
    ``(s + a) % factor``, the channel ``c * factor^2 + phase_y * factor + phase_x`` of
    ``pixel_unshuffle``."""
    if weight.dim() != 4 or weight.shape[-2:] != (3, 3):
        raise ValueError(f"weight must be a 3x3 convolution's (O, C, 3, 3), got {tuple(weight.shape)}")
    out_ch, in_ch = weight.shape[:2]
    new = weight.new_zeros(out_ch, in_ch, factor, factor, 3, 3)  # [o, c, phase_y, phase_x, cell_y, cell_x]
    for sy in range(factor):
        for ay in (-1, 0, 1):
            cy, py = divmod(sy + ay, factor)
            for sx in range(factor):
                for ax in (-1, 0, 1):
                    cx, px = divmod(sx + ax, factor)
                    new[:, :, py, px, cy + 1, cx + 1] += weight[:, :, ay + 1, ax + 1] / factor ** 2
    return new.reshape(out_ch, in_ch * factor * factor, 3, 3)


def load_predictor(path: str, space=None) -> nn.Module:
    """Load a predictor checkpoint: :class:`SmallLossPredictor` or ``LossPredictor``, by its metadata."""
    if not isinstance(path, str) or not path.endswith(".safetensors"):
        raise ValueError(f"predictor must be a .safetensors checkpoint, got {path!r}")
    import json
    import os

    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"predictor checkpoint {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    except Exception as exc:  # truncated or not a safetensors file: say which file, not the parser's words only
        raise ValueError(f"predictor checkpoint {path!r} is not a readable safetensors file ({exc})") from exc
    if meta.get("kind") == SmallLossPredictor.kind:
        return SmallLossPredictor.load(path, space)

    return LossPredictor.load(path, space=space)
