"""Transform spaces: ordered, named sets of candidate views.

A :class:`Candidate` is a composition of ops (applied left to right) with a name; a
:class:`TransformSpace` is an ordered tuple of candidates with a stable fingerprint. Its
:meth:`~TransformSpace.apply` transforms a batch where every sample has its own candidate(s)
and :meth:`~TransformSpace.deaugment` brings dense outputs of those views back.

Row order of ``apply(images, index)`` with ``index`` of shape ``(B, k)``: sample-major, row
``i * k + j`` is sample ``i`` under candidate ``index[i, j]`` (``index`` of shape ``(B,)`` is
``k = 1``). This is the order in which :meth:`~torch.Tensor.view` ``(B, k, ...)`` regroups the
views of each sample for merging.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import functional as F
from .ops import Identity, Op, _ExactGeometric

IndexLike = Union[Tensor, Sequence[int], Sequence[Sequence[int]]]


def _exact(candidate: "Candidate") -> bool:
    """Whether every geometric op of ``candidate`` is a flip or quarter turn (an exact permutation)."""
    return all(isinstance(op, _ExactGeometric) for op in candidate.ops if op.geometric)


def _trusted(op: Op) -> bool:
    """Built-in op classes (tested against PIL) need no output check; plugin and callable ops do."""
    return type(op).__module__ == "ttach_instance.ops" and type(op).__name__ != "CallableOp"


def _check_op_output(op: Op, images: Tensor, out: Any) -> None:
    """A third-party op's output checked where it is produced, so a misbehaving plugin is named
    instead of failing deep inside the model or the merge: same shape, dtype and device as its
    input, and (on CPU, where reading values costs no device sync) finite pixels in [0, 1]."""
    where = f"op {op.name!r} ({type(op).__module__}.{type(op).__qualname__})"
    if not isinstance(out, Tensor) or out.shape != images.shape or out.dtype != images.dtype \
            or out.device != images.device:
        raise ValueError(f"{where} returned {getattr(out, 'dtype', type(out).__name__)} "
                         f"{tuple(getattr(out, 'shape', ()))} for input {images.dtype} {tuple(images.shape)}: an op "
                         f"must return images of its input's shape, dtype and device")
    if out.device.type == "cpu" and out.numel():
        lo, hi = torch.aminmax(out.detach())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):
            raise ValueError(f"{where} returned values in [{float(lo):.4g}, {float(hi):.4g}]: an op must return "
                             f"finite pixels in [0, 1]")


class Candidate:
    """One view: ops applied in order, under a name (default: the ops' names joined by ``+``)."""

    def __init__(self, ops: Union[Op, Sequence[Op]] = (), name: Optional[str] = None):
        if isinstance(ops, Op):
            ops = (ops,)
        ops = tuple(op for op in ops if not isinstance(op, Identity))
        for op in ops:
            if not isinstance(op, Op):
                raise TypeError(f"candidate ops must be Op instances, got {type(op).__name__}")
        self.ops: Tuple[Op, ...] = ops
        self.name = name or ("+".join(op.name for op in ops) if ops else "identity")

    @property
    def geometric(self) -> bool:
        return any(op.geometric for op in self.ops)

    @property
    def invertible(self) -> bool:
        return all(op.invertible for op in self.ops)

    @property
    def is_identity(self) -> bool:
        return not self.ops

    def spec(self) -> Dict[str, Any]:
        return {"name": self.name, "ops": [op.spec() for op in self.ops]}

    def __repr__(self) -> str:
        return f"<Candidate {self.name}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Candidate) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(json.dumps(self.spec(), sort_keys=True))

    def apply(self, images: Tensor) -> Tensor:
        for op in self.ops:
            out = op.apply(images)
            if not _trusted(op):
                _check_op_output(op, images, out)
            images = out
        return images

    def theta(self, height: int, width: int, device: Union[str, torch.device] = "cpu") -> Optional[Tensor]:
        """Composed view->input map ``(2, 3)``, or ``None`` if some geometric op has none."""
        return _compose_thetas(self.ops, height, width, device)

    def deaugment(
        self, outputs: Tensor, mode: str = "bilinear", image_size: Optional[Tuple[int, int]] = None,
        fill: str = "zero",
    ) -> Tuple[Tensor, Tensor]:
        """Bring dense outputs ``(N, K, h, w)`` of this view back: ``(outputs, validity)``.

        ``fill``: what pixels the view did not see hold, ``"zero"`` or ``"border"`` (the nearest
        covered value); where ops without an affine map leave pixels unseen, ``"border"`` is a
        ``ValueError`` naming them (op-specific inverses only know zero).

        ``image_size``: ``(H, W)`` of the images the view was made from, when the outputs have
        another resolution (a strided head): maps are built for the image (pixel-exact crop
        boxes, zoom rounding) and, in normalised coordinates, applied at the outputs' size.

        Exact inverses (flips, quarter turns) at either end of the chain are applied as pixel
        permutations, so flip/rot90 candidates and their compositions come back bit-exact;
        the geometric ops between them are undone with one resampling through their composed
        affine map (no compounding interpolation error), or op by op when some op has no map.
        """
        geometric = [op for op in self.ops if op.geometric]
        ones = torch.ones_like(outputs[:, :1], dtype=outputs.dtype if outputs.is_floating_point() else torch.float32)
        if not geometric:
            return outputs, ones
        lead = 0
        while lead < len(geometric) and isinstance(geometric[lead], _ExactGeometric):
            lead += 1
        trail = len(geometric)
        while trail > lead and isinstance(geometric[trail - 1], _ExactGeometric):
            trail -= 1
        for op in reversed(geometric[trail:]):
            outputs = op.inverse(outputs)
        middle = geometric[lead:trail]
        valid = ones
        if middle:
            h, w = image_size if image_size is not None else outputs.shape[-2:]
            theta = _compose_thetas(middle, int(h), int(w), outputs.device)
            if theta is not None:
                outputs, valid = F.deaugment_dense(outputs, theta, mode=mode, fill=fill)
            else:
                if len(middle) == 1:
                    outputs, valid = middle[0].deaugment_dense(outputs, mode=mode)
                else:
                    outputs, valid = _deaugment_chain(middle, outputs, ones, mode)
                if fill != "zero" and bool((valid < 1).any()):
                    raise ValueError(f"candidate {self.name!r}: op(s) {[op.name for op in middle]} have no affine map, "
                                     f"so the pixels this view did not see cannot take the nearest covered value "
                                     f"(fill={fill!r}); use fill='zero' (a wrapper's coverage='zero' or 'identity')")
        for op in reversed(geometric[:lead]):
            outputs, valid = op.inverse(outputs), op.inverse(valid)
        return outputs, valid

    def deaugment_keypoints(self, keypoints: Tensor, height: int, width: int) -> Tensor:
        for op in reversed(self.ops):
            keypoints = op.deaugment_keypoints(keypoints, height, width)
        return keypoints


def _aliases(a: Tensor, b: Tensor) -> bool:
    """``a`` shares memory with ``b`` (an op that returned its input, or a view of it)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _compose_thetas(ops: Sequence[Op], height: int, width: int, device: Union[str, torch.device]) -> Optional[Tensor]:
    total = F.identity_theta(1, device)[0]
    for op in ops:
        if not op.geometric:
            continue
        theta = op.theta(height, width, device)
        if theta is None:
            return None
        total = F.compose_theta(theta.to(device), total)
    return total


def _deaugment_chain(ops: Sequence[Op], outputs: Tensor, ones: Tensor, mode: str) -> Tuple[Tensor, Tensor]:
    """Op-specific inverses in reverse order; validity travels with the outputs as a channel."""
    integer = not outputs.is_floating_point()
    if integer:
        mode = "nearest"  # label maps: never blend class ids
    work, valid = outputs.to(ones.dtype), ones
    for op in reversed(ops):
        stacked, op_valid = op.deaugment_dense(torch.cat([work, valid], 1), mode=mode)
        work, valid = stacked[:, :-1], stacked[:, -1:] * op_valid.to(stacked.dtype)
    valid = (valid > 0.5).to(ones.dtype)
    work = work * valid
    if integer:
        work = work.round()
    return work.to(outputs.dtype), valid


def _as_candidate(item: Any) -> Candidate:
    if isinstance(item, Candidate):
        return item
    if isinstance(item, Op):
        return Candidate(item)
    if isinstance(item, (list, tuple)) and all(isinstance(op, Op) for op in item):
        return Candidate(item)
    raise TypeError(f"a space is made of Candidate or Op instances (or lists of ops), got {item!r}")


class TransformSpace:
    """An ordered set of named candidates.

    ``name`` and ``params`` record how the space was built (``get_space(name, **params)``);
    the ``fingerprint`` hashes the candidates themselves (names, ops and parameters), so a
    predictor trained for one space refuses another that merely shares its name.
    """

    def __init__(
        self,
        candidates: Iterable[Any],
        name: str = "custom",
        params: Optional[Dict[str, Any]] = None,
    ):
        self.candidates: Tuple[Candidate, ...] = tuple(_as_candidate(c) for c in candidates)
        if not self.candidates:
            raise ValueError(f"space {name!r}: a transform space needs at least one candidate, got none")
        names = [c.name for c in self.candidates]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"space {name!r}: candidate names must be unique, repeated: {duplicates}")
        self.name = name
        self.params = dict(params or {})
        #: The plugin that registered the space (set by :func:`ttach_instance.get_space`).
        self.provider: Optional[str] = None
        self._row_plan: Optional[List[Tuple[type, Tensor, Tensor]]] = None
        self._row_plan_built = False

    # -- identity
    @property
    def names(self) -> List[str]:
        return [c.name for c in self.candidates]

    def spec(self) -> List[Dict[str, Any]]:
        return [c.spec() for c in self.candidates]

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.spec(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.candidates)

    def __iter__(self) -> Iterator[Candidate]:
        return iter(self.candidates)

    def __getitem__(self, i: Union[int, str]) -> Candidate:
        if isinstance(i, str):
            return self.candidates[self.index_of(i)]
        return self.candidates[i]

    def index_of(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"space {self.name!r} has no candidate {name!r}; candidates: {self.names}") from None

    def __repr__(self) -> str:
        return f"TransformSpace({self.name!r}, {len(self)} candidates: {', '.join(self.names)})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TransformSpace) and other.spec() == self.spec()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    @property
    def geometric(self) -> bool:
        return any(c.geometric for c in self.candidates)

    @property
    def invertible(self) -> bool:
        return all(c.invertible for c in self.candidates)

    def check_invertible(self) -> None:
        """Raise unless every candidate's dense outputs can be de-augmented."""
        bad = [c.name for c in self.candidates if not c.invertible]
        if bad:
            raise ValueError(
                f"space {self.name!r} has geometric candidates without an inverse for dense outputs: {bad}; "
                f"segmentation needs every geometric candidate to be invertible"
            )

    # -- composition
    def product(self, other: "TransformSpace", name: Optional[str] = None) -> "TransformSpace":
        """Every candidate of ``self`` followed by every candidate of ``other`` (self-major)."""
        cands = []
        for a in self.candidates:
            for b in other.candidates:
                if a.is_identity or b.is_identity:
                    cand_name = b.name if a.is_identity else a.name
                else:
                    cand_name = f"{a.name}+{b.name}"
                cands.append(Candidate(a.ops + b.ops, name=cand_name))
        return TransformSpace(cands, name=name or f"{self.name}*{other.name}")

    def subset(self, names_or_indices: Sequence[Union[int, str]], name: Optional[str] = None) -> "TransformSpace":
        cands = [self[i] for i in names_or_indices]
        return TransformSpace(cands, name=name or f"{self.name}[subset]")

    # -- index handling
    def check_index(self, index: IndexLike, batch: int, device: torch.device) -> Tensor:
        """Validate ``index`` and return it as a ``(B, k)`` LongTensor."""
        if not isinstance(index, Tensor):
            index = torch.as_tensor(index, dtype=torch.long, device=device)
        if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise TypeError(f"index must be an integer tensor of candidate indices, got dtype {index.dtype}")
        if index.device != torch.device(device) and not (index.device.type == torch.device(device).type == "cpu"):
            raise ValueError(f"index is on {index.device} but the images are on {device}; move it with .to(images.device)")
        if index.dim() == 1:
            index = index[:, None]
        if index.dim() != 2 or index.shape[0] != batch:
            raise ValueError(f"index must have shape (B,) or (B, k) with B = {batch}, got {tuple(index.shape)}")
        if index.shape[1] == 0:
            raise ValueError("index must select at least one candidate per sample (k >= 1)")
        index = index.long()
        if index.device.type == "cpu" and index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= len(self):
                raise ValueError(f"index values must be in [0, {len(self) - 1}] for space {self.name!r}, got [{lo}, {hi}]")
        return index

    # -- forward
    def apply(self, images: Tensor, index: IndexLike, grouped: Optional[bool] = None) -> Tensor:
        """Apply candidate ``index[i, j]`` to sample ``i``; returns ``(B * k, C, H, W)``.

        ``grouped=True`` runs each candidate present once on its samples (needs the set of
        candidates present, so it reads the index on the host); ``grouped=False`` runs each
        op family once over all rows with per-row parameters (no host synchronisation, only
        for spaces of built-in ops). Default: grouped on CPU; on accelerators per-row when the
        space supports it, otherwise every candidate on every image and a device-side gather of
        the selected rows (no host synchronisation either; cheap for the flips, quarter turns and
        crops that lack a per-row form).
        """
        F.check_images(images)
        idx = self.check_index(index, images.shape[0], images.device)
        if grouped is None:
            if images.device.type != "cpu" and self.row_plan() is None:
                return self._apply_gathered(images, idx)
            grouped = images.device.type == "cpu"
        if not grouped:
            if self.row_plan() is None:
                raise ValueError(f"space {self.name!r} has ops without a per-row form; use grouped=True")
            return self._apply_rows(images, idx)
        return self._apply_grouped(images, idx)

    def _apply_gathered(self, images: Tensor, idx: Tensor) -> Tensor:
        b, k = idx.shape
        every = torch.stack([cand.apply(images) for cand in self.candidates], 1)  # (B, T, C, H, W)
        rows = torch.arange(b, device=images.device)[:, None].expand(b, k)
        return every[rows, idx].reshape((b * k,) + tuple(images.shape[1:]))

    def apply_all(self, images: Tensor) -> Tensor:
        """Every candidate on every sample: ``(B * len(space), C, H, W)``, sample-major."""
        b = images.shape[0]
        index = torch.arange(len(self), device=images.device).expand(b, -1)
        return self.apply(images, index)

    def _apply_grouped(self, images: Tensor, idx: Tensor) -> Tensor:
        """Each candidate present once, on its samples (reads the index on the host).

        When one candidate covers a ``k = 1`` batch its output is returned as it is (a copy
        only if it is the input itself), so the view builder costs what the op costs; a mixed
        batch gathers each candidate's samples and writes its views into one buffer in the
        input's layout.
        """
        b, k = idx.shape
        flat = idx.reshape(-1)
        counts = torch.bincount(flat, minlength=len(self)).tolist()
        present = [c for c, count in enumerate(counts) if count]
        if k == 1 and len(present) == 1:
            # One candidate covers the batch: its output is the result (no gather, no scatter).
            out = self.candidates[present[0]].apply(images)
            return out.clone() if _aliases(out, images) else out
        # Keep a channels-last input channels-last: convolutions on CPU run markedly faster on it
        # (~1.4x for the example U-Net), so views in NCHW would make TTA look dearer than it is.
        channels_last = images.dim() == 4 and not images.is_contiguous() and images.is_contiguous(
            memory_format=torch.channels_last)
        out = torch.empty((b * k,) + tuple(images.shape[1:]), dtype=images.dtype, device=images.device,
                          memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for c in present:
            rows = (flat == c).nonzero().squeeze(1)
            samples = rows // k if k > 1 else rows
            out.index_copy_(0, rows, self.candidates[c].apply(images.index_select(0, samples)))
        return out

    def row_plan(self) -> Optional[List[Tuple[type, Tensor, Tensor]]]:
        """Per-row execution plan: op-family slots with a parameter table per candidate.

        Candidates' op sequences are merged into one sequence of family slots (each candidate
        fits as a subsequence, in order); a candidate that does not use a slot gets the
        family's identity parameters there. ``None`` when some op has no per-row form.
        """
        if self._row_plan_built:
            return self._row_plan
        self._row_plan_built = True
        if not all(op.supports_rows for c in self.candidates for op in c.ops):
            return None
        slots: List[type] = []
        assignment: List[Dict[int, Op]] = []
        for cand in self.candidates:
            pos, used = 0, {}
            for op in cand.ops:
                while pos < len(slots) and slots[pos] is not type(op):
                    pos += 1
                if pos == len(slots):
                    slots.append(type(op))
                used[pos] = op
                pos += 1
            assignment.append(used)
        plan = []
        for s, family in enumerate(slots):
            table = torch.tensor(
                [list(assignment[c][s].row_params() if s in assignment[c] else family.identity_row_params())
                 for c in range(len(self))],
                dtype=torch.float64,
            )
            present = torch.tensor([s in assignment[c] for c in range(len(self))])
            plan.append((family, table, present))
        self._row_plan = plan
        return plan

    def _row_plan_on(self, device: torch.device) -> List[Tuple[type, Tensor, Tensor]]:
        # The parameter tables are copied to an accelerator once, not on every call: a
        # host-to-device copy per forward is a needless transfer on the sync-free path.
        cache = self.__dict__.setdefault("_row_plan_devices", {})
        key = str(device)
        if key not in cache:
            cache[key] = [(family, table.to(device), present.to(device))
                          for family, table, present in self.row_plan()]  # type: ignore[union-attr]
        return cache[key]

    def _apply_rows(self, images: Tensor, idx: Tensor) -> Tensor:
        b, k = idx.shape
        flat = idx.reshape(-1)
        views = images.repeat_interleave(k, 0) if k > 1 else images
        for family, table, present in self._row_plan_on(images.device):
            params = table[flat].to(torch.float32)
            used = present[flat]
            # Rows whose candidate does not use this slot keep their pixels exactly.
            views = torch.where(used[:, None, None, None], family.apply_rows(views, params), views)
        return views

    # -- de-augmentation
    def thetas(self, height: int, width: int, device: Union[str, torch.device] = "cpu") -> Optional[Tensor]:
        """``(len(space), 2, 3)`` view->input map of every candidate, or ``None`` if some
        geometric candidate has no affine map."""
        maps = [c.theta(height, width, device) for c in self.candidates]
        if any(m is None for m in maps):
            return None
        return torch.stack(maps)  # type: ignore[arg-type]

    def _inverse_table(self, height: int, width: int, device: torch.device) -> Optional[Tuple[Tensor, Tensor]]:
        """``(inverse maps (T, 2, 3) float32, resampled (T,) bool)`` on ``device`` for images of
        ``height x width``, built once per size and device (then only indexed: no host transfer
        in a forward); ``None`` when some geometric candidate has no affine map. ``resampled``:
        the candidate moves pixels by more than flips and quarter turns (those are undone as exact
        permutations, never resampled)."""
        cache = self.__dict__.setdefault("_inverse_tables", {})
        key = (int(height), int(width), str(device))
        if key not in cache:
            table = self.thetas(height, width, "cpu")
            if table is None:
                cache[key] = None
            else:
                inverse = F.invert_theta(table.to(torch.float64)).to(torch.float32)
                resampled = torch.tensor([c.geometric and not _exact(c) for c in self.candidates])
                cache[key] = (inverse.to(device), resampled.to(device))
        return cache[key]

    def deaugment(
        self,
        outputs: Tensor,
        index: IndexLike,
        mode: str = "bilinear",
        fill: str = "zero",
        image_size: Optional[Tuple[int, int]] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Bring dense view outputs ``(B * k, K, h, w)`` (rows as :meth:`apply` made them)
        back to the input frame: the one de-augmentation of the library. Returns ``(outputs,
        validity)``, validity ``(B * k, 1, h, w)``: 1 where the view saw the input pixel, 0 where
        it did not.

        ``mode``: ``"bilinear"`` for logits/probabilities, ``"nearest"`` for label maps (integer
        outputs are always resampled ``nearest``). ``fill``: what uncovered pixels hold,
        ``"zero"`` or ``"border"`` (the nearest covered value). ``image_size``: ``(H, W)`` of the
        input images when the outputs have another resolution (a strided head): the maps are
        built for the images (pixel-exact crop boxes) and applied at the outputs' resolution.

        When every candidate has an affine map the rows that need it are resampled in one
        ``grid_sample`` through cached inverse maps (on accelerators without a host
        synchronisation); flips and quarter turns come back as exact permutations, photometric
        rows untouched. Spaces with other
        geometric ops are undone candidate by candidate (grouped on CPU; on accelerators every
        candidate's inverse on all rows and a device-side choice); ``fill="border"`` then needs
        every resampled op to have an affine map (:meth:`Candidate.deaugment`).
        """
        if not isinstance(outputs, Tensor) or outputs.dim() != 4:
            raise ValueError(f"outputs must be a dense (N, K, h, w) tensor, got {getattr(outputs, 'shape', type(outputs))}")
        if mode not in ("bilinear", "nearest", "bicubic"):
            raise ValueError(f"mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
        if fill not in ("zero", "border"):
            raise ValueError(f"fill must be 'zero' or 'border', got {fill!r}")
        if not isinstance(index, Tensor):
            index = torch.as_tensor(index, dtype=torch.long, device=outputs.device)
        idx = self.check_index(index, index.shape[0], outputs.device)
        b, k = idx.shape
        if outputs.shape[0] != b * k:
            raise ValueError(f"outputs has {outputs.shape[0]} rows but index selects B*k = {b}*{k} = {b * k} views")
        h, w = outputs.shape[-2:]
        if image_size is not None:
            if len(image_size) != 2 or not all(isinstance(v, int) and v > 0 for v in image_size):
                raise ValueError(f"image_size must be (height, width) in pixels, got {image_size!r}")
        ih, iw = image_size if image_size is not None else (h, w)
        flat = idx.reshape(-1)
        vdtype = outputs.dtype if outputs.is_floating_point() else torch.float32
        entry = self._inverse_table(int(ih), int(iw), outputs.device)
        if entry is not None:
            inverse, resampled = entry
            exact = [c for c, cand in enumerate(self.candidates) if cand.geometric and _exact(cand)]
            if outputs.device.type == "cpu":
                # A host-side selection costs nothing here: resample only the rows that need it,
                # permute the flipped / turned ones back exactly, copy the photometric ones.
                rows = resampled[flat].nonzero().squeeze(1)
                back = outputs.clone()
                valid = torch.ones((outputs.shape[0], 1, h, w), dtype=vdtype)
                if rows.numel():
                    back[rows], valid[rows] = F.warp_back(outputs[rows], inverse[flat[rows]], mode, fill)
                for c in exact:
                    rows = (flat == c).nonzero().squeeze(1)
                    if rows.numel():
                        back[rows] = self.candidates[c].deaugment(outputs[rows])[0]
                return back, valid
            back, valid = F.warp_back(outputs, inverse[flat], mode, fill)
            keep = ~resampled[flat][:, None, None, None]
            back = torch.where(keep, outputs, back)
            valid = torch.where(keep, torch.ones_like(valid), valid)
            for c in exact:  # device-side choice: no host synchronisation
                back = torch.where((flat == c)[:, None, None, None], self.candidates[c].deaugment(outputs)[0], back)
            return back, valid
        self.check_invertible()
        if outputs.device.type != "cpu":
            # No affine map for some candidate: each candidate's inverse on all rows, then a
            # device-side choice per row -- no host synchronisation, T times the work.
            back = torch.zeros_like(outputs)
            valid = torch.zeros((outputs.shape[0], 1, h, w), dtype=vdtype, device=outputs.device)
            for c, cand in enumerate(self.candidates):
                back_c, valid_c = cand.deaugment(outputs, mode=mode, image_size=image_size, fill=fill)
                pick = (flat == c)[:, None, None, None]
                back = torch.where(pick, back_c.to(back.dtype), back)
                valid = torch.where(pick, valid_c.to(vdtype), valid)
            return back, valid
        back = torch.empty_like(outputs)
        valid = torch.ones((outputs.shape[0], 1, h, w), dtype=vdtype, device=outputs.device)
        for c in torch.unique(flat).tolist():
            rows = (flat == c).nonzero().squeeze(1)
            out_c, valid_c = self.candidates[c].deaugment(outputs[rows], mode=mode, image_size=image_size, fill=fill)
            back[rows] = out_c
            valid[rows] = valid_c.to(vdtype)
        return back, valid

    def deaugment_keypoints(self, keypoints: Tensor, index: IndexLike, image_size: Tuple[int, int]) -> Tensor:
        """Keypoints ``(B * k, P, 2)`` (``(x, y)`` in [0, 1]) of each view back to the input frame."""
        idx = self.check_index(index, len(index), keypoints.device).reshape(-1)
        if keypoints.dim() != 3 or keypoints.shape[0] != idx.shape[0] or keypoints.shape[-1] != 2:
            raise ValueError(f"keypoints must have shape ({idx.shape[0]}, P, 2), got {tuple(keypoints.shape)}")
        h, w = image_size
        out = keypoints.clone()
        for c in torch.unique(idx).tolist():
            rows = (idx == c).nonzero().squeeze(1)
            out[rows] = self.candidates[c].deaugment_keypoints(keypoints[rows], h, w)
        return out

    # ttach interop: ``to_ttach()`` and ``TransformSpace.from_ttach(compose)`` are defined in
    # interop.py and attached there (the arrow points interop -> space only); importing
    # ttach_instance imports interop, so every TransformSpace has them.


def _mirrored(spec: dict) -> dict:
    ops = []
    for op in spec["ops"]:
        op = dict(op)
        if op.get("op") == "rotate":
            op["angle"] = -op["angle"]
        elif op.get("op") not in ("hflip", "vflip", "zoom", "autocontrast", "sharpness", "color", "identity", "rot90"):
            return {}
        if op.get("op") == "rot90":
            op["k"] = (-op["k"]) % 4
        ops.append(op)
    return {"ops": ops}


def flip_permutation(space) -> Optional[List[int]]:
    """``perm`` with ``loss(candidate j, flip(x)) ~ loss(candidate perm[j], x)`` (rotations swap
    sign under a horizontal flip; photometric ops and zoom commute with it), or ``None`` when some
    candidate has no mirror in the space."""
    specs = [{"ops": c["ops"]} for c in space.spec()]
    perm = []
    for spec in specs:
        m = _mirrored(spec)
        if m not in specs:
            return None
        perm.append(specs.index(m))
    return perm
