"""Pure batched kernels for test-time transforms.

Every image kernel takes float tensors ``(N, C, H, W)`` in pixel range ``[0, 1]`` on any
device, and returns a new tensor of the same shape, dtype and device. Parameters are either
a Python number (the same for the whole batch) or a 1-D tensor of length ``N`` (one value
per row), so a batch that mixes candidates can be transformed without a Python loop over
samples and without synchronising with the host.

Reference semantics are the PIL pipeline of "Learning Loss for Test-Time Augmentation":
geometric ops act on a mirror-expanded (numpy ``symmetric``) canvas three times the image
size and the centre is cropped back, so rotated corners and zoomed-out borders hold
mirrored content; photometric ops are PIL's ``ImageOps.autocontrast`` and
``ImageEnhance.Sharpness`` / ``Color``. Where the maths is the same we compute it directly
on the image (reflection padding of the sampling grid instead of a 3x canvas, a separable
resampling matrix instead of resizing a canvas), which is what makes the kernels fast.

Geometry convention: an affine ``theta`` of shape ``(N, 2, 3)`` maps normalised output
(view) coordinates to normalised input coordinates, exactly as
:func:`torch.nn.functional.affine_grid` with ``align_corners=False`` reads it. De-augmenting
a dense output samples it with the inverse map.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

Param = Union[float, int, Tensor]

#: PIL ``ImageFilter.SMOOTH``: the "degenerate" image of ``ImageEnhance.Sharpness``.
SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
SMOOTH_SCALE = 13.0
#: ITU-R 601-2 luma, as PIL's ``convert("L")`` (used by ``ImageEnhance.Color``).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

_HALF_TYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- validation


def check_images(images: Tensor, name: str = "images", check_range: bool = True) -> None:
    """Raise a clear error unless ``images`` is a float ``(N, C, H, W)`` batch in [0, 1].

    The value-range check reads the data, which on an accelerator would synchronise with the
    host; it therefore runs only for CPU tensors (on CUDA, ranges are the caller's contract).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions (N, C, H, W), got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}; "
            f"convert uint8 images with `images.float() / 255`"
        )
    if images.shape[1] not in (1, 3):
        raise ValueError(
            f"{name} must have 1 or 3 channels (dim 1), got {images.shape[1]} "
            f"(shape {tuple(images.shape)}); is the batch channels-last?"
        )
    if images.shape[-1] < 2 or images.shape[-2] < 2:
        raise ValueError(f"{name} must be at least 2x2 pixels, got shape {tuple(images.shape)}")
    if check_range and images.device.type == "cpu" and images.numel() and not in_unit_range(images):
        lo, hi = torch.aminmax(images.detach().float())
        raise ValueError(
            f"{name} must hold pixel values in [0, 1], got min {float(lo):.4g}, max {float(hi):.4g}; "
            f"undo the model's normalisation first (or pass mean/std to the wrapper)"
        )


_RANGE_TOL = 1e-3
#: float32 bit pattern of ``1 + _RANGE_TOL`` read as int32.
_UPPER_BITS = int(torch.tensor(1 + _RANGE_TOL, dtype=torch.float32).view(torch.int32))


def _flat(images: Tensor) -> Tensor:
    """The elements of ``images`` as a 1-D tensor, a view for contiguous and channels-last
    batches (the order does not matter to a reduction; reducing a channels-last tensor as
    ``(N, C, H, W)`` would walk it with stride C)."""
    if images.is_contiguous():
        return images.view(-1)
    if images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last):
        return images.permute(0, 2, 3, 1).reshape(-1)
    return images.reshape(-1)


def in_unit_range(images: Tensor) -> bool:
    """All values of ``images`` in ``[-1e-3, 1 + 1e-3]`` (so none NaN), in one read of the data
    for contiguous and channels-last float32 batches (a host synchronisation on accelerators).

    float32 goes through its bit patterns: non-negative floats order like their int32
    patterns, and every negative float (and -NaN) has a negative pattern, so one integer
    ``aminmax`` (a third faster than the float one, which must propagate NaN) bounds the
    values from above and says whether any is negative; only then is the float minimum read.
    """
    flat = _flat(images.detach())
    if flat.dtype == torch.float32:
        lo_bits, hi_bits = torch.aminmax(flat.view(torch.int32))
        if int(hi_bits) > _UPPER_BITS:
            return False
        return int(lo_bits) >= 0 or float(flat.amin()) >= -_RANGE_TOL  # amin propagates NaN: False
    lo, hi = torch.aminmax(flat)
    return bool(lo >= -_RANGE_TOL) and bool(hi <= 1 + _RANGE_TOL)


def row_param(value: Param, n: int, ref: Tensor, name: str) -> Tensor:
    """A parameter as a float tensor of shape ``(n,)`` on ``ref``'s device."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(n)
        if value.dim() != 1 or value.shape[0] != n:
            raise ValueError(f"{name} must be a number or a 1-D tensor of length {n}, got shape {tuple(value.shape)}")
        if value.device != ref.device:
            raise ValueError(f"{name} is on {value.device} but the images are on {ref.device}")
        return value.to(torch.float32)
    return torch.full((n,), float(value), device=ref.device, dtype=torch.float32)


def _work_dtype(images: Tensor) -> Tensor:
    # CPU kernels for conv/grid_sample/matmul in half precision are slow or missing; compute in
    # float32 there and cast back. On accelerators half types run natively.
    if images.dtype in _HALF_TYPES and images.device.type == "cpu":
        return images.float()
    return images


def _sample_dtype(images: Tensor) -> Tensor:
    # grid_sample needs the grid in the input's dtype; a half-precision grid places samples
    # up to ~1 px off at 224 px (bfloat16 keeps 8 bits), so resampling always runs in float32
    # for half types, on every device.
    return images.float() if images.dtype in _HALF_TYPES else images


def symmetric_indices(index: Tensor, size: int) -> Tensor:
    """Map integer indices into ``[0, size)`` the way numpy's ``symmetric`` padding does
    (the edge pixel is repeated: ..., 1, 0 | 0, 1, ..., n-1 | n-1, n-2, ...)."""
    period = 2 * size
    index = torch.remainder(index, period)
    return torch.where(index >= size, period - 1 - index, index)


def pad_symmetric(images: Tensor, pad: int) -> Tensor:
    """Mirror-pad the last two dims by ``pad`` pixels, numpy ``symmetric`` style."""
    h, w = images.shape[-2:]
    rows = symmetric_indices(torch.arange(-pad, h + pad, device=images.device), h)
    cols = symmetric_indices(torch.arange(-pad, w + pad, device=images.device), w)
    return images.index_select(-2, rows).index_select(-1, cols)


# --------------------------------------------------------------------------- geometry


def rotation_theta(angle: Tensor, height: int, width: int) -> Tensor:
    """``(N, 2, 3)`` view->input map of a rotation by ``angle`` degrees about the centre,
    counter-clockwise on screen for positive angles (as ``PIL.Image.rotate``)."""
    a = torch.deg2rad(-angle.to(torch.float64))
    cos, sin = torch.cos(a), torch.sin(a)
    aspect = height / width
    zero = torch.zeros_like(cos)
    # PIL: x_in = cos*x + sin*y, y_in = -sin*x + cos*y in centred pixel units; normalised
    # coordinates rescale x by W/2 and y by H/2, hence the aspect factors.
    row0 = torch.stack([cos, sin * aspect, zero], -1)
    row1 = torch.stack([-sin / aspect, cos, zero], -1)
    return torch.stack([row0, row1], -2)


def zoom_theta(scale: Tensor, height: int, width: int) -> Tensor:
    """``(N, 2, 3)`` view->input map of :func:`zoom` (scale > 1 zooms in), with the exact
    rounding of the canvas size and of the centre crop that :func:`zoom` applies."""
    rows = []
    for size in (width, height):
        canvas = 3 * size
        out = torch.round(canvas * scale.to(torch.float64))
        left = torch.floor((out - size) / 2)
        ratio = canvas / out
        # x_in(normalised) = u * ratio + (1 + 2 * left / size) * ratio - 3, see zoom().
        rows.append((ratio, (1 + 2 * left / size) * ratio - 3))
    (sx, tx), (sy, ty) = rows
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, tx], -1), torch.stack([zero, sy, ty], -1)], -2)


def crop_theta(box: Tensor, height: int, width: int) -> Tensor:
    """``(N, 2, 3)`` view->input map of cropping ``box = (x0, y0, x1, y1)`` (pixels, end
    exclusive, shape ``(N, 4)``) and resizing the crop to the full image size."""
    box = box.to(torch.float64)
    x0, y0, x1, y1 = box.unbind(-1)
    sx = (x1 - x0) / width
    sy = (y1 - y0) / height
    tx = (x0 + x1) / width - 1
    ty = (y0 + y1) / height - 1
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, tx], -1), torch.stack([zero, sy, ty], -1)], -2)


def flip_theta(horizontal: Tensor, vertical: Tensor) -> Tensor:
    """``(N, 2, 3)`` map of optional horizontal / vertical flips (bool tensors ``(N,)``)."""
    one = torch.ones(horizontal.shape, dtype=torch.float64, device=horizontal.device)
    sx = torch.where(horizontal, -one, one)
    sy = torch.where(vertical, -one, one)
    zero = torch.zeros_like(sx)
    return torch.stack([torch.stack([sx, zero, zero], -1), torch.stack([zero, sy, zero], -1)], -2)


def rot90_theta(k: Tensor) -> Tensor:
    """``(N, 2, 3)`` map of ``torch.rot90(x, k, dims=(-2, -1))`` (square images)."""
    k = torch.remainder(k.to(torch.int64), 4)
    table = torch.tensor(
        [[[1, 0, 0], [0, 1, 0]], [[0, -1, 0], [1, 0, 0]], [[-1, 0, 0], [0, -1, 0]], [[0, 1, 0], [-1, 0, 0]]],
        dtype=torch.float64,
        device=k.device,
    )
    return table[k]


def identity_theta(n: int, device: Union[str, torch.device] = "cpu") -> Tensor:
    theta = torch.zeros(n, 2, 3, dtype=torch.float64, device=device)
    theta[:, 0, 0] = 1
    theta[:, 1, 1] = 1
    return theta


def compose_theta(outer: Tensor, inner: Tensor) -> Tensor:
    """Map of applying the op with ``inner`` first and then ``outer``.

    View->input maps compose in reverse: a view pixel of the outer op reads the outer op's
    input, which is the inner op's view, which reads the original through ``inner``.
    """
    return torch.matmul(_homogeneous(inner), _homogeneous(outer))[..., :2, :]


def invert_theta(theta: Tensor) -> Tensor:
    return torch.linalg.inv(_homogeneous(theta))[..., :2, :]


def _homogeneous(theta: Tensor) -> Tensor:
    bottom = torch.zeros(theta.shape[:-2] + (1, 3), dtype=theta.dtype, device=theta.device)
    bottom[..., 0, 2] = 1
    return torch.cat([theta, bottom], -2)


def warp(
    images: Tensor,
    theta: Tensor,
    mode: str = "bilinear",
    padding_mode: str = "reflection",
) -> Tensor:
    """Sample ``images`` through ``theta`` (``(N, 2, 3)`` or ``(2, 3)``)."""
    images = _sample_dtype(images)
    n = images.shape[0]
    theta = theta.to(device=images.device)
    if theta.dim() == 2:
        theta = theta.unsqueeze(0)
    grid_dtype = images.dtype
    if theta.shape[0] == 1 and n > 1:
        # One map for the whole batch: build the grid once and broadcast it.
        grid = F.affine_grid(theta.to(grid_dtype), [1, 1, *images.shape[-2:]], align_corners=False)
        grid = grid.expand(n, -1, -1, -1)
    else:
        grid = F.affine_grid(theta.to(grid_dtype), [n, 1, *images.shape[-2:]], align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode=mode, padding_mode=padding_mode, align_corners=False)


# --------------------------------------------------------------------------- image ops


def rotate(images: Tensor, angle: Param) -> Tensor:
    """Rotate by ``angle`` degrees (counter-clockwise) about the centre, mirrored fill.

    The paper rotates a 3x mirror-expanded canvas with ``PIL.Image.rotate(..., BICUBIC)``;
    PIL's affine bicubic (``Geometry.c``) is Keys' cubic with ``a = -1`` over the 4x4
    neighbours, which we reproduce exactly (torch's ``grid_sample`` bicubic uses
    ``a = -0.75`` and lands 0.7-1.9 / 255 away from PIL). Taps outside the frame read the
    mirror image (numpy ``symmetric``), so no black corners appear.

    On CPU each distinct angle becomes a sparse ``(H*W, H*W)`` matrix with 16 entries a row
    (cached for the last few angle/size pairs) applied to the batch in one sparse product,
    which is faster than ``grid_sample``. On accelerators the 16 taps are gathered directly
    with per-row maps (no host synchronisation).
    """
    check_images(images, check_range=False)
    n, c, h, w = images.shape
    angles = row_param(angle, n, images, "angle") if isinstance(angle, Tensor) else None
    work = _sample_dtype(images)
    if images.device.type == "cpu":
        pixels = _pixel_major(work)
        if angles is None:
            out = _sparse_apply(_rotation_matrix(float(angle), h, w, work.dtype), pixels)
        else:
            out = torch.empty_like(pixels)
            values = angles.tolist()
            for value in sorted(set(values)):
                cols = torch.tensor([i * c + j for i, v in enumerate(values) if v == value for j in range(c)])
                matrix = _rotation_matrix(value, h, w, work.dtype)
                out.index_copy_(1, cols, _sparse_apply(matrix, pixels.index_select(1, cols)))
        # Back to (N, C, H, W) with a 2-D transposing copy (blocked): ~4x faster than writing
        # the (H, W, N, C) product into either 4-D layout directly.
        out = out.t().contiguous().view(n, c, h, w)
    else:
        base = angles if angles is not None else torch.tensor([float(angle)], device=images.device)
        out = _rotate_gather(work, rotation_theta(base, h, w))
    return _clamp_into(out, images)


def _clamp_into(out: Tensor, like: Tensor) -> Tensor:
    """``out`` (a fresh buffer) clamped to [0, 1] in ``like``'s dtype and layout (channels-last
    stays channels-last, anything else becomes contiguous): one pass when the dtypes agree,
    in place when the layout does too."""
    fmt = torch.channels_last if _channels_last(like) else torch.contiguous_format
    if out.dtype != like.dtype:  # half types are resampled in float32
        return out.clamp_(0, 1).to(like.dtype, memory_format=fmt)
    if out.is_contiguous(memory_format=fmt):
        return out.clamp_(0, 1)
    if torch.is_grad_enabled() and out.requires_grad:  # out= is not differentiable
        return out.clamp_(0, 1).contiguous(memory_format=fmt)
    dest = torch.empty(like.shape, dtype=like.dtype, device=like.device, memory_format=fmt)
    return torch.clamp(out, 0, 1, out=dest)


def _bicubic_factors(theta: Tensor, height: int, width: int, a: float = -1.0) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Separable factors of bicubic sampling through the view->input maps ``theta``
    ``(N, 2, 3)``: column and row source indices ``ix``, ``iy`` and weights ``wx``, ``wy``,
    each ``(N, H*W, 4)``; the 16 taps of output pixel ``p`` are ``iy[p, j] * W + ix[p, i]``
    with weight ``wy[p, j] * wx[p, i]``. Taps outside the frame are mirrored in (numpy
    ``symmetric``)."""
    device = theta.device
    theta = theta.to(torch.float64)
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    u = torch.stack([(2 * xs + 1) / width - 1, (2 * ys + 1) / height - 1], -1).reshape(-1, 2)
    mapped = torch.einsum("nij,pj->npi", theta[..., :2], u) + theta[:, None, :, 2]  # (N, HW, 2)
    sx = (mapped[..., 0] + 1) * (width / 2) - 0.5  # source coordinates, pixel centres at integers
    sy = (mapped[..., 1] + 1) * (height / 2) - 0.5
    x0, y0 = torch.floor(sx), torch.floor(sy)
    offsets = torch.arange(-1, 3, dtype=torch.float64, device=device)
    wx = _pil_cubic((sx - x0)[..., None] - offsets, a)
    wy = _pil_cubic((sy - y0)[..., None] - offsets, a)
    ix = symmetric_indices((x0[..., None] + offsets).long(), width)
    iy = symmetric_indices((y0[..., None] + offsets).long(), height)
    return ix, iy, wx, wy


def _bicubic_taps(theta: Tensor, height: int, width: int, a: float = -1.0) -> Tuple[Tensor, Tensor]:
    """Source pixel indices and weights ``(N, H*W, 16)`` (see :func:`_bicubic_factors`)."""
    ix, iy, wx, wy = _bicubic_factors(theta, height, width, a)
    index = (iy[..., :, None] * width + ix[..., None, :]).flatten(-2)
    weight = (wy[..., :, None] * wx[..., None, :]).flatten(-2)
    return index, weight


_ROTATION_CACHE: "dict[tuple, Tensor]" = {}
_ROTATION_CACHE_SIZE = 8


def _rotation_matrix(angle: float, height: int, width: int, dtype: torch.dtype) -> Tensor:
    """Sparse CSR ``(H*W, H*W)`` matrix of :func:`rotate` by ``angle`` on CPU (cached)."""
    key = (float(angle), height, width, dtype)
    matrix = _ROTATION_CACHE.pop(key, None)
    if matrix is None:
        theta = rotation_theta(torch.tensor([float(angle)]), height, width)
        index, weight = _bicubic_taps(theta, height, width)
        size = height * width
        crow = torch.arange(0, 16 * size + 1, 16, dtype=torch.int64)
        # Folded taps may repeat a column within a row; the sparse product sums them.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            matrix = torch.sparse_csr_tensor(
                crow, index[0].reshape(-1), weight[0].reshape(-1).to(dtype), (size, size), check_invariants=False
            )
    _ROTATION_CACHE[key] = matrix  # most recently used last
    while len(_ROTATION_CACHE) > _ROTATION_CACHE_SIZE:
        _ROTATION_CACHE.pop(next(iter(_ROTATION_CACHE)))
    return matrix


def _pixel_major(images: Tensor) -> Tensor:
    """``(H*W, N*C)`` row-major copy of a batch (one copy from either layout): the operand of
    the rotation's sparse product, which reads a row of it per tap."""
    n, c, h, w = images.shape
    if _channels_last(images):
        return images.permute(2, 3, 0, 1).reshape(h * w, n * c)
    return images.reshape(n * c, h * w).t().contiguous()


def _sparse_apply(matrix: Tensor, pixels: Tensor) -> Tensor:
    # addmm with beta = 0 ignores its (uninitialised) input; writing into it with out= is
    # ~1.3x faster than torch.sparse.mm (which zero-fills and accumulates), but out= is not
    # differentiable, so a graph through the pixels takes the plain call.
    out = torch.empty((matrix.shape[0], pixels.shape[1]), dtype=pixels.dtype, device=pixels.device)
    if torch.is_grad_enabled() and pixels.requires_grad:
        return torch.addmm(out, matrix, pixels, beta=0)
    return torch.addmm(out, matrix, pixels, beta=0, out=out)


def _rotate_gather(images: Tensor, theta: Tensor) -> Tensor:
    """Bicubic (``a = -1``) sampling of ``images`` through ``theta`` by gathering the 16 taps
    (per-row maps, no host synchronisation); the accelerator path of :func:`rotate`. Taps are
    formed one at a time from the separable factors, so memory stays at a few ``(N, H*W)``
    tensors."""
    n, c, h, w = images.shape
    ix, iy, wx, wy = _bicubic_factors(theta, h, w)
    wx, wy = wx.to(images.dtype), wy.to(images.dtype)
    flat = images.reshape(n, c, h * w)
    out = torch.zeros_like(flat)
    for j in range(4):
        row = iy[..., j] * w
        for i in range(4):
            index = (row + ix[..., i]).expand(n, -1)
            taps = flat.gather(2, index[:, None, :].expand(n, c, h * w))
            out.addcmul_(taps, (wy[..., j] * wx[..., i]).expand(n, -1)[:, None, :])
    return out.reshape(n, c, h, w)


def _pil_cubic(x: Tensor, a: float = -0.5) -> Tensor:
    # Keys' cubic: PIL's resize uses a = -0.5, its affine transforms a = -1; torch's
    # grid_sample / interpolate use a = -0.75.
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def zoom_matrix(scale: Tensor, size: int) -> Tensor:
    """``(N, size, size)`` linear map of one axis of :func:`zoom`.

    It is PIL's antialiased bicubic resize of a ``3 * size`` mirror-expanded canvas to
    ``round(3 * size * scale)`` pixels, followed by the centre crop, composed into one
    matrix: the resize weights are computed as ``PIL.Image.resize`` computes them
    (``precompute_coeffs``), then canvas taps are folded back onto the image by the
    symmetric reflection.
    """
    scale = scale.to(torch.float64)
    device = scale.device
    canvas = 3 * size
    out = torch.round(canvas * scale)  # (N,)
    left = torch.floor((out - size) / 2)
    inv = canvas / out  # source pixels per output pixel
    support_scale = inv.clamp(min=1.0)
    support = 2.0 * support_scale
    max_taps = int(math.ceil(float(support.max()))) * 2 + 1
    j = torch.arange(size, device=device, dtype=torch.float64)
    center = (j[None, :] + left[:, None] + 0.5) * inv[:, None]  # (N, size)
    xmin = torch.floor(center - support[:, None] + 0.5).clamp(min=0)
    xmax = torch.floor(center + support[:, None] + 0.5).clamp(max=canvas)
    taps = xmin[..., None] + torch.arange(max_taps, device=device, dtype=torch.float64)  # (N, size, T)
    weights = _pil_cubic((taps - center[..., None] + 0.5) / support_scale[:, None, None])
    weights = torch.where(taps < xmax[..., None], weights, torch.zeros_like(weights))
    weights = weights / weights.sum(-1, keepdim=True)
    source = symmetric_indices(taps.long() - size, size)
    matrix = torch.zeros(scale.shape[0], size, size, dtype=torch.float64, device=device)
    return matrix.scatter_add_(-1, source, weights)


_ZOOM_CACHE: "dict[tuple, Tensor]" = {}
_ZOOM_CACHE_SIZE = 16


def _zoom_matrix_cached(scale: float, size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``zoom_matrix`` of one scalar scale, ``(size, size)`` in ``dtype`` on ``device`` (cached:
    building it costs milliseconds, more than applying it to a small batch)."""
    key = (float(scale), size, str(device), dtype)
    matrix = _ZOOM_CACHE.pop(key, None)
    if matrix is None:
        matrix = zoom_matrix(torch.tensor([float(scale)], device=device), size)[0].to(dtype)
    _ZOOM_CACHE[key] = matrix  # most recently used last
    while len(_ZOOM_CACHE) > _ZOOM_CACHE_SIZE:
        _ZOOM_CACHE.pop(next(iter(_ZOOM_CACHE)))
    return matrix


def zoom(images: Tensor, scale: Param) -> Tensor:
    """Zoom about the centre by ``scale`` (> 1 zooms in, < 1 zooms out with mirrored borders).

    Antialiased bicubic like ``PIL.Image.resize`` (the paper resizes the mirror-expanded
    canvas and crops its centre); applied as two small matrix products per image.
    """
    check_images(images, check_range=False)
    n, _, h, w = images.shape
    scale_rows = row_param(scale, n, images, "scale") if isinstance(scale, Tensor) else None
    if scale_rows is None and not float(scale) > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if scale_rows is not None and scale_rows.device.type == "cpu" and not bool((scale_rows > 0).all()):
        raise ValueError(f"scale must be > 0 in every row, got min {float(scale_rows.min()):.4g}")
    # Resampling weights in half precision would bias every output by their rounding (bfloat16:
    # ~0.4 %); the two small matrix products run in float32 for half types on every device.
    work = _sample_dtype(images)
    if _channels_last(work):
        work = work.contiguous()  # the products read image rows; the result goes back below
    if scale_rows is None:
        mh = _zoom_matrix_cached(float(scale), h, images.device, work.dtype)
        mw = _zoom_matrix_cached(float(scale), w, images.device, work.dtype)
        out = torch.matmul(torch.matmul(mh, work), mw.transpose(0, 1))
    else:
        mh = zoom_matrix(scale_rows, h).to(work.dtype)
        mw = zoom_matrix(scale_rows, w).to(work.dtype)
        out = torch.matmul(torch.matmul(mh[:, None], work), mw[:, None].transpose(-1, -2))
    return _clamp_into(out, images)


def autocontrast(images: Tensor, enabled: Optional[Tensor] = None) -> Tensor:
    """``PIL.ImageOps.autocontrast`` (cutoff 0): stretch each channel of each image so its
    minimum becomes 0 and its maximum 1; a constant channel is left unchanged.

    ``enabled`` (bool ``(N,)``) restricts the stretch to some rows (others pass through).
    Two reductions for the extrema and one fused multiply-add, each a vectorised pass over
    the memory as it lies (contiguous or channels-last); the output keeps the input's layout.
    """
    check_images(images, check_range=False)
    work = _dense(_work_dtype(images))
    lo, hi = _channel_extrema(work)  # (N, C)
    span = hi - lo
    keep = span <= 0
    if enabled is not None:
        keep = keep | ~enabled.to(device=images.device, dtype=torch.bool)[:, None]
    one = torch.ones_like(span)
    scale = torch.where(keep, one, one / torch.where(keep, one, span))
    shift = torch.where(keep, torch.zeros_like(lo), -lo * scale)
    out = _channel_affine(work, scale, shift)
    return out.clamp_(0, 1).to(images.dtype)


def _dense(images: Tensor) -> Tensor:
    """``images`` itself when contiguous or channels-last, else a contiguous copy."""
    if images.is_contiguous() or images.is_contiguous(memory_format=torch.channels_last):
        return images
    return images.contiguous()


def _channels_last(images: Tensor) -> bool:
    """Channels-last memory (and not also contiguous, as ``C == 1`` or ``H == W == 1`` are)."""
    return not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)


def _channel_extrema(images: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-image, per-channel minimum and maximum ``(N, C)`` of a contiguous or channels-last
    batch. Blocks of image rows are reduced onto one another first (an outer reduction,
    vectorised along the memory), then the one block left: ~2x faster than reducing
    ``(N, C, H*W)`` along its last dim, and ~30x faster than that on a channels-last batch,
    which it would read with stride C."""
    n, c, h, w = images.shape
    r = next(r for r in (8, 4, 2, 1) if h % r == 0)  # rows per block
    if _channels_last(images):
        blocks = images.permute(0, 2, 3, 1).reshape(n, h // r, r * w * c)
        return blocks.amin(1).view(n, r * w, c).amin(1), blocks.amax(1).view(n, r * w, c).amax(1)
    blocks = images.view(n * c, h // r, r * w)
    return blocks.amin(1).view(n, c, r * w).amin(-1), blocks.amax(1).view(n, c, r * w).amax(-1)


def _channel_affine(images: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``shift + images * scale`` with per-image, per-channel ``scale``/``shift`` ``(N, C)``,
    in the input's layout. The coefficients are laid out along a whole image row first:
    broadcasting two ``(N, C, 1, 1)`` operands over the pixels drops ``addcmul`` to its scalar
    loop (~4x slower); same arithmetic, same bits."""
    n, c, h, w = images.shape
    if _channels_last(images):
        rows = images.permute(0, 2, 3, 1).reshape(n, h, w * c)
        pattern = (n, 1, w, c)
        out = torch.addcmul(shift[:, None, None].expand(pattern).reshape(n, 1, w * c), rows,
                            scale[:, None, None].expand(pattern).reshape(n, 1, w * c))
        return out.view(n, h, w, c).permute(0, 3, 1, 2)
    return torch.addcmul(shift[..., None, None].expand(n, c, 1, w).contiguous(), images,
                         scale[..., None, None].expand(n, c, 1, w).contiguous())


def sharpness(images: Tensor, factor: Param) -> Tensor:
    """``PIL.ImageEnhance.Sharpness``: ``f * x + (1 - f) * smooth(x)`` with PIL's 3x3 SMOOTH.

    SMOOTH is ``(box3x3 + 4 * centre) / 13``, so the blend is ``a * x + b * box3x3(x)``: a
    separable box sum (four adds) and one fused multiply-add. The border ring is filtered
    too, over mirrored pixels, as on the paper's mirror-expanded canvas (PIL alone copies the
    ring unfiltered); a one-pixel symmetric pad is a replicate pad.
    """
    check_images(images, check_range=False)
    n = images.shape[0]
    work = _work_dtype(images)
    padded = F.pad(work, (1, 1, 1, 1), mode="replicate")
    rows = padded[..., :, :-2] + padded[..., :, 1:-1]
    rows += padded[..., :, 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :]
    box += rows[..., 2:, :]
    if isinstance(factor, Tensor):
        f = row_param(factor, n, images, "factor").to(work.dtype)[:, None, None, None]
        out = box.mul_((1 - f) / SMOOTH_SCALE).addcmul_(work, f + 4 * (1 - f) / SMOOTH_SCALE)
    else:
        f = float(factor)
        out = box.mul_((1 - f) / SMOOTH_SCALE).add_(work, alpha=f + 4 * (1 - f) / SMOOTH_SCALE)
    return out.clamp_(0, 1).to(images.dtype)


def color(images: Tensor, factor: Param) -> Tensor:
    """``PIL.ImageEnhance.Color``: blend with the ITU-R 601 grayscale image.

    ``f * x + (1 - f) * gray(x)`` is a 3x3 colour matrix, applied as one matrix product over
    the pixels as they lie in memory (``(N, 3, H*W)`` contiguous, ``(N, H*W, 3)``
    channels-last: the same sums, the same bits); the output keeps the input's layout.
    Single-channel images are returned unchanged.
    """
    check_images(images, check_range=False)
    n, c, h, w = images.shape
    if c == 1:
        return images.clone()
    work = _dense(_work_dtype(images))
    luma = torch.tensor(LUMA_WEIGHTS, dtype=work.dtype, device=work.device)
    eye = torch.eye(3, dtype=work.dtype, device=work.device)
    gray_matrix = luma.expand(3, 3)
    if isinstance(factor, Tensor):
        f = row_param(factor, n, images, "factor").to(work.dtype)[:, None, None]
    else:
        f = float(factor)
    matrix = f * eye + (1 - f) * gray_matrix  # (3, 3) or (N, 3, 3)
    if _channels_last(work):
        pixels = work.permute(0, 2, 3, 1).reshape(n, h * w, 3)
        out = torch.matmul(pixels, matrix.transpose(-1, -2)).view(n, h, w, 3).permute(0, 3, 1, 2)
    else:
        out = torch.matmul(matrix, work.view(n, 3, h * w)).view(n, 3, h, w)
    return out.clamp_(0, 1).to(images.dtype)


# --------------------------------------------------------------------------- RandAugment ops
#
# The RandAugment op set (translate, shear, brightness, contrast, equalize, posterize,
# solarize), PIL-faithful like the paper's ops: geometric ones are PIL's affine bicubic on the
# mirror-expanded canvas, photometric ones PIL's ImageEnhance / ImageOps.


def translate_theta(fraction: Tensor, axis: str) -> Tensor:
    """``(N, 2, 3)`` view->input map of :func:`translate_x` (``axis="x"``) or
    :func:`translate_y` (``"y"``) by ``fraction`` of the image side (content moves right /
    down for positive values)."""
    t = fraction.to(torch.float64)
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    tx, ty = (-2 * t, zero) if axis == "x" else (zero, -2 * t)
    return torch.stack([torch.stack([one, zero, tx], -1), torch.stack([zero, one, ty], -1)], -2)


def shear_theta(shear: Tensor, axis: str, height: int, width: int) -> Tensor:
    """``(N, 2, 3)`` view->input map of :func:`shear_x` (``axis="x"``: a view pixel at centred
    pixel coordinates ``(X, Y)`` reads the input at ``(X + shear * Y, Y)``) or :func:`shear_y`
    (reads ``(X, Y + shear * X)``). Normalised coordinates rescale by ``W/2`` and ``H/2``, hence
    the aspect factor."""
    s = shear.to(torch.float64)
    one, zero = torch.ones_like(s), torch.zeros_like(s)
    if axis == "x":
        rows = ([one, s * (height / width), zero], [zero, one, zero])
    else:
        rows = ([one, zero, zero], [s * (width / height), one, zero])
    return torch.stack([torch.stack(rows[0], -1), torch.stack(rows[1], -1)], -2)


def _check_rows(values: Tensor, ok: Tensor, name: str, expected: str) -> None:
    """Refuse per-row parameters outside their range (CPU tensors only: reading them on an
    accelerator would synchronise with the host)."""
    if values.device.type == "cpu" and values.numel() and not bool(ok.all()):
        bad = values[~ok]
        raise ValueError(f"{name} must be {expected} in every row, got {float(bad[0]):.4g}")


def _check_scalar(value: Param, ok: bool, name: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _shift_lines(images: Tensor, shift: Tensor) -> Tensor:
    """Resample every image row along x: ``out[n, c, y, x] = in[n, c, y, x + shift[n, y]]``
    (``shift`` ``(N, H)`` or ``(N, 1)``, pixels, float64), with PIL's affine bicubic
    (``a = -1``) and mirrored taps (numpy ``symmetric``).

    A translation or a shear along x leaves every source row where it is, so PIL's 4x4
    bicubic has weight 1 on the centre row and 0 on the others (Keys' cubic at 0 and +-1): the
    exact result is this 1-D filter. A row's shift is the same for all its pixels, so its four
    weights are too: four gathers and multiply-adds whatever the device, per-row parameters
    included (no host synchronisation). An integer shift copies pixels exactly.
    """
    n, c, h, w = images.shape
    device = images.device
    whole = torch.floor(shift)
    offsets = torch.arange(-1, 3, dtype=torch.float64, device=device)
    weight = _pil_cubic((shift - whole)[..., None] - offsets, -1.0).to(images.dtype)  # (N, H|1, 4)
    # Weights laid out along the row (contiguous in x): broadcasting a (N, 1, 1, 1) operand over
    # the pixels drops the multiply to its scalar loop (~3x slower); same arithmetic, same bits.
    weight = weight.permute(2, 0, 1)[..., None].expand(4, n, shift.shape[1], w).contiguous()
    first = torch.arange(w, device=device) + (whole.long() - 1)[..., None]  # (N, H|1, W): tap -1
    out = None
    for k in range(4):
        taps = images.gather(3, symmetric_indices(first + k, w)[:, None].expand(n, c, h, w))
        out = taps.mul_(weight[k][:, None]) if out is None else out.addcmul_(taps, weight[k][:, None])
    return out


def _unit_rows(value: Param, n: int, images: Tensor, name: str, what: str = "") -> Tensor:
    """A parameter in [-1, 1] as float64 ``(n,)`` rows. A scalar goes through float32 like the
    per-row form (a space's float32 parameter table), so both forms give the same bits."""
    expected = f"in [-1, 1]{what}"
    if isinstance(value, Tensor):
        rows = row_param(value, n, images, name)
        _check_rows(rows, rows.abs() <= 1, name, expected)
    else:
        _check_scalar(value, math.isfinite(float(value)) and abs(float(value)) <= 1, name, expected)
        rows = torch.full((n,), float(value), dtype=torch.float32, device=images.device)
    return rows.to(torch.float64)


def _shift_along(images: Tensor, shift: Tensor, axis: str) -> Tensor:
    """:func:`_shift_lines` along ``axis`` (``"y"``: on the transposed image), in ``images``'
    dtype and layout."""
    work = _sample_dtype(images)
    if axis == "x":
        out = _shift_lines(work, shift)
    else:
        out = _shift_lines(work.transpose(-1, -2), shift).transpose(-1, -2)
    return _clamp_into(out, images)


def _translate(images: Tensor, fraction: Param, axis: str) -> Tensor:
    check_images(images, check_range=False)
    n, _, h, w = images.shape
    t = _unit_rows(fraction, n, images, f"translate_{axis}: fraction", " (a fraction of the image side)")
    side = w if axis == "x" else h
    return _shift_along(images, (-t * side)[:, None], axis)  # the view reads `t * side` pixels back


def translate_x(images: Tensor, fraction: Param) -> Tensor:
    """Move the content right by ``fraction`` of the width (left for negative), mirrored fill.

    PIL: ``expanded.transform(size, AFFINE, (1, 0, -fraction * W, 0, 1, 0), BICUBIC)`` on the
    mirror-expanded canvas, centre cropped (the RandAugment op with the paper's mirrored
    borders instead of black). ``fraction`` in [-1, 1]; sub-pixel shifts are bicubic."""
    return _translate(images, fraction, "x")


def translate_y(images: Tensor, fraction: Param) -> Tensor:
    """Move the content down by ``fraction`` of the height (up for negative); see
    :func:`translate_x`."""
    return _translate(images, fraction, "y")


def _shear(images: Tensor, shear: Param, axis: str) -> Tensor:
    check_images(images, check_range=False)
    n, _, h, w = images.shape
    s = _unit_rows(shear, n, images, f"shear_{axis}: shear")
    lines = h if axis == "x" else w
    # Centred coordinate of each line (pixel centres at +0.5, as PIL's affine reads them).
    centred = torch.arange(lines, dtype=torch.float64, device=images.device) + 0.5 - lines / 2
    return _shift_along(images, s[:, None] * centred, axis)


def shear_x(images: Tensor, shear: Param) -> Tensor:
    """Shear along x about the image centre: the view pixel at centred coordinates ``(X, Y)``
    reads the input at ``(X + shear * Y, Y)``, bicubic, mirrored fill.

    PIL: RandAugment's ``transform(size, AFFINE, (1, shear, 0, 0, 1, 0), BICUBIC)`` taken about
    the centre of the mirror-expanded canvas (so the image is sheared symmetrically and no
    corner is left empty), centre cropped. ``shear`` in [-1, 1]."""
    return _shear(images, shear, "x")


def shear_y(images: Tensor, shear: Param) -> Tensor:
    """Shear along y about the centre: ``(X, Y)`` reads ``(X, Y + shear * X)``; see
    :func:`shear_x`."""
    return _shear(images, shear, "y")


def _factor_of(factor: Param, n: int, images: Tensor, work: Tensor, name: str):
    """A blend factor >= 0: a Python float, or ``(N, 1, 1, 1)`` in ``work``'s dtype."""
    if isinstance(factor, Tensor):
        f = row_param(factor, n, images, name)
        _check_rows(f, f >= 0, name, ">= 0")
        return f.to(work.dtype)[:, None, None, None]
    _check_scalar(factor, math.isfinite(float(factor)) and float(factor) >= 0, name, ">= 0")
    return float(factor)


def brightness(images: Tensor, factor: Param) -> Tensor:
    """``PIL.ImageEnhance.Brightness``: blend with black, ``factor * x`` clipped to [0, 1]
    (``factor >= 0``; 1 is the identity). Elementwise, so the output keeps the input's layout."""
    check_images(images, check_range=False)
    work = _work_dtype(images)
    f = _factor_of(factor, images.shape[0], images, work, "brightness: factor")
    return (work * f).clamp_(0, 1).to(images.dtype)


def contrast(images: Tensor, factor: Param) -> Tensor:
    """``PIL.ImageEnhance.Contrast``: blend with a flat image at the mean grey level,
    ``m + factor * (x - m)`` clipped to [0, 1] (``factor >= 0``).

    ``m`` is PIL's: the mean of the ITU-R 601 luma image (the channel itself for one channel),
    rounded to an 8-bit level (``int(mean + 0.5)``), one value per image."""
    check_images(images, check_range=False)
    n, c = images.shape[:2]
    work = _work_dtype(images)
    f = _factor_of(factor, n, images, work, "contrast: factor")
    means = work.mean(dim=(-2, -1))  # (N, C)
    if c == 3:
        gray = means @ torch.tensor(LUMA_WEIGHTS, dtype=means.dtype, device=means.device)
    else:
        gray = means[:, 0]
    gray = (torch.floor(gray * 255 + 0.5) / 255)[:, None, None, None]
    # lerp: exact at factor 1 (the identity), as its weight >= 0.5 branch computes end - (end - start) * (1 - w)
    return torch.lerp(gray.expand_as(work), work, f).clamp_(0, 1).to(images.dtype)


def _levels(work: Tensor) -> Tensor:
    """The 8-bit levels PIL would hold: ``round(255 * x)`` as uint8."""
    return (work * 255).round_().clamp_(0, 255).to(torch.uint8)


def _enabled_rows(out: Tensor, work: Tensor, enabled: Optional[Tensor]) -> Tensor:
    if enabled is None:
        return out
    keep = enabled.to(device=out.device, dtype=torch.bool)[:, None, None, None]
    return torch.where(keep, out, work)


def equalize(images: Tensor, enabled: Optional[Tensor] = None) -> Tensor:
    """``PIL.ImageOps.equalize``: per-channel histogram equalisation with PIL's lookup table
    (torchvision's ``v2.functional.equalize``, which reproduces it on 8-bit images), on the
    8-bit levels of the input (``round(255 * x)``; a channel PIL leaves alone comes back
    quantised to those levels). ``enabled`` (bool ``(N,)``) restricts it to some rows."""
    from torchvision.transforms.v2 import functional as TF  # a second import of torchvision costs nothing

    check_images(images, check_range=False)
    work = _work_dtype(images)
    out = TF.equalize(_levels(work)).to(work.dtype).div_(255)
    fmt = torch.channels_last if _channels_last(images) else torch.contiguous_format
    return _enabled_rows(out, work, enabled).to(images.dtype, memory_format=fmt)


def posterize(images: Tensor, bits: Param) -> Tensor:
    """``PIL.ImageOps.posterize``: keep the ``bits`` (1-8) high bits of each 8-bit level
    (``round(255 * x)``), i.e. ``level & ~(2 ** (8 - bits) - 1)``, back in [0, 1].

    torchvision's float kernel quantises to ``2 ** bits`` levels of [0, 1] instead (up to 4/255
    off PIL), so the masking runs here, per row when ``bits`` is a tensor."""
    check_images(images, check_range=False)
    n = images.shape[0]
    work = _work_dtype(images)
    if isinstance(bits, Tensor):
        b = row_param(bits, n, images, "posterize: bits")
        _check_rows(b, (b >= 1) & (b <= 8) & (b == b.round()), "posterize: bits", "an integer in [1, 8]")
        mask = (256 - torch.pow(2.0, 8 - b.round())).to(torch.uint8)[:, None, None, None]
    else:
        ok = isinstance(bits, (int, float)) and not isinstance(bits, bool) and float(bits).is_integer() \
            and 1 <= bits <= 8
        _check_scalar(bits, ok, "posterize: bits", "an integer in [1, 8]")
        mask = 256 - 2 ** (8 - int(bits))
    return torch.bitwise_and(_levels(work), mask).to(work.dtype).div_(255).to(images.dtype)


def solarize(images: Tensor, threshold: Param) -> Tensor:
    """``PIL.ImageOps.solarize``: invert the pixels at or above ``threshold`` (PIL's threshold
    / 255: ``x >= threshold`` becomes ``1 - x``), as torchvision's ``v2.functional.solarize``,
    with per-row thresholds. ``threshold >= 0``; above 1 nothing is inverted (the identity)."""
    check_images(images, check_range=False)
    n = images.shape[0]
    work = _work_dtype(images)
    if isinstance(threshold, Tensor):
        t = row_param(threshold, n, images, "solarize: threshold")
        _check_rows(t, t >= 0, "solarize: threshold", ">= 0")
        t = t.to(work.dtype)[:, None, None, None]
    else:
        _check_scalar(threshold, math.isfinite(float(threshold)) and float(threshold) >= 0, "solarize: threshold",
                      ">= 0")
        t = float(threshold)
    return torch.where(work >= t, 1 - work, work).to(images.dtype)


def hflip(images: Tensor) -> Tensor:
    return images.flip(-1)


def vflip(images: Tensor) -> Tensor:
    return images.flip(-2)


def rot90(images: Tensor, k: int) -> Tensor:
    """Rotate by ``k * 90`` degrees counter-clockwise (``torch.rot90`` on the spatial dims)."""
    return torch.rot90(images, int(k), dims=(-2, -1))


def crop_resize(images: Tensor, box: Union[Sequence[float], Tensor], mode: str = "bilinear") -> Tensor:
    """Crop ``box = (x0, y0, x1, y1)`` (pixels, end exclusive; ``(4,)`` or ``(N, 4)``) and
    resize the crop back to the image size, so every view of a crop space has the input's
    shape and one model call fits them all.

    The result is exactly "crop, then ``F.interpolate(..., align_corners=False)``": samples
    near the crop's edge are clamped to the crop (no pixels from outside the box leak in),
    which is what resizing ttach's ``FiveCrops`` output gives. ``mode``: ``"bilinear"`` or
    ``"nearest"``.
    """
    check_images(images, check_range=False)
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    n, _, h, w = images.shape
    box_t = torch.as_tensor(box, dtype=torch.float64, device=images.device)
    if box_t.dim() == 1:
        box_t = box_t[None]
    if box_t.dim() != 2 or box_t.shape[-1] != 4 or box_t.shape[0] not in (1, n):
        raise ValueError(f"box must have shape (4,), (1, 4) or ({n}, 4) as (x0, y0, x1, y1), got {tuple(box_t.shape)}")
    if box_t.device.type == "cpu":
        x0, y0, x1, y1 = box_t.unbind(-1)
        if not bool(((0 <= x0) & (x0 < x1) & (x1 <= w) & (0 <= y0) & (y0 < y1) & (y1 <= h)).all()):
            raise ValueError(f"box must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}, got {box_t.tolist()}")
        if box_t.shape[0] == 1 and bool((box_t == box_t.round()).all()):
            # One integer box: slice and resize (the fast path).
            bx0, by0, bx1, by1 = (int(v) for v in box_t[0].tolist())
            crop = _work_dtype(images)[..., by0:by1, bx0:bx1]
            kwargs = {"align_corners": False} if mode == "bilinear" else {}
            return F.interpolate(crop, size=(h, w), mode=mode, **kwargs).to(images.dtype)
    # Per-row boxes: one grid_sample, sampling positions clamped to the box's pixel centres.
    theta = crop_theta(box_t, h, w).expand(n, 2, 3)
    work = _sample_dtype(images)
    grid = F.affine_grid(theta.to(work.dtype), [n, 1, h, w], align_corners=False)
    size = torch.tensor([w, h], dtype=grid.dtype, device=grid.device)
    lo = (2 * box_t[:, :2].to(grid.dtype) + 1) / size - 1  # first pixel centre, normalised
    hi = (2 * box_t[:, 2:].to(grid.dtype) - 1) / size - 1  # last pixel centre
    grid = torch.maximum(torch.minimum(grid, hi.expand(n, 2)[:, None, None]), lo.expand(n, 2)[:, None, None])
    out = F.grid_sample(work, grid.to(work.dtype), mode=mode, padding_mode="border", align_corners=False)
    return out.to(images.dtype)


def five_crop_boxes(height: int, width: int, crop_height: int, crop_width: int) -> list:
    """Boxes of ttach's FiveCrops order: left-top, left-bottom, right-bottom, right-top, centre.

    The centre box starts at ``H // 2 - crop_height // 2`` as ``ttach.functional.center_crop``
    (one pixel off ``(H - crop_height) // 2`` when the parities differ)."""
    if not (0 < crop_height <= height and 0 < crop_width <= width):
        raise ValueError(
            f"crop size must be positive and at most the image size {height}x{width}, "
            f"got {crop_height}x{crop_width}"
        )
    top, left = height // 2 - crop_height // 2, width // 2 - crop_width // 2
    return [
        (0, 0, crop_width, crop_height),
        (0, height - crop_height, crop_width, height),
        (width - crop_width, height - crop_height, width, height),
        (width - crop_width, 0, width, crop_height),
        (left, top, left + crop_width, top + crop_height),
    ]


# --------------------------------------------------------------------------- de-augmentation


def _check_theta(theta: Tensor, n: int, name: str = "theta") -> Tensor:
    if not isinstance(theta, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, 2, 3) or (2, 3), got {type(theta).__name__}")
    if theta.dim() == 2:
        theta = theta.unsqueeze(0)
    if theta.dim() != 3 or theta.shape[-2:] != (2, 3) or theta.shape[0] not in (1, n):
        raise ValueError(f"{name} must have shape ({n}, 2, 3), (1, 2, 3) or (2, 3), got {tuple(theta.shape)}")
    if not theta.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {theta.dtype}")
    return theta.expand(n, 2, 3)


def deaugment_dense(
    outputs: Tensor,
    theta: Tensor,
    mode: str = "bilinear",
    fill: str = "zero",
) -> Tuple[Tensor, Tensor]:
    """Bring dense view outputs ``(N, K, h, w)`` back to the input frame.

    ``theta`` is the view->input map of each row (``(N, 2, 3)``, or one ``(2, 3)`` map for all
    rows). Returns the de-augmented outputs and a validity map ``(N, 1, h, w)``: 1 where the
    input pixel was seen by the view, 0 where it was not (outside a crop, a zoomed-in border,
    a rotated corner). ``fill="zero"``: invalid pixels hold 0; ``fill="border"``: the nearest
    covered value (the view's edge extrapolated). Works at the outputs' own resolution
    (normalised coordinates), on their device.

    Floating outputs keep their dtype (half types are resampled in float32 on CPU); the
    validity map has the outputs' dtype. Integer outputs are label maps: they are always
    resampled with ``nearest`` (blending class ids is meaningless), keep their dtype, and
    their validity map is float32.
    """
    if not isinstance(outputs, Tensor) or outputs.dim() != 4:
        raise ValueError(
            f"outputs must be a dense (N, K, h, w) tensor, got {tuple(getattr(outputs, 'shape', ())) or type(outputs).__name__}"
        )
    theta = _check_theta(theta, outputs.shape[0])
    return warp_back(outputs, invert_theta(theta.to(device=outputs.device, dtype=torch.float64)), mode, fill)


def warp_back(outputs: Tensor, inverse: Tensor, mode: str = "bilinear", fill: str = "zero") -> Tuple[Tensor, Tensor]:
    """:func:`deaugment_dense` with the input->view maps ``inverse`` ``(N, 2, 3)`` given (the
    inverses of the views' maps, e.g. computed once per space and size and cached)."""
    if mode not in ("bilinear", "nearest", "bicubic"):
        raise ValueError(f"mode must be 'bilinear', 'nearest' or 'bicubic', got {mode!r}")
    if fill not in ("zero", "border"):
        raise ValueError(f"fill must be 'zero' or 'border', got {fill!r}")
    n, _, h, w = outputs.shape
    integer = not outputs.is_floating_point()
    if integer:
        mode = "nearest"
        work = outputs.to(torch.float32)
    else:
        work = _sample_dtype(outputs)
    grid = F.affine_grid(inverse.to(work.dtype), [n, 1, h, w], align_corners=False)
    # Border padding: a covered pixel within half a pixel of the view's edge reads the edge
    # value instead of blending with zeros; uncovered pixels are zeroed below (fill="zero").
    back = F.grid_sample(work, grid.to(work.dtype), mode=mode, padding_mode="border", align_corners=False)
    # A pixel is covered when its centre falls inside the view; the tolerance absorbs the
    # rounding of exact pixel-centre maps (flips, integer crops).
    tol = 1e-4
    valid = ((grid.abs() <= 1 + tol).all(-1)).unsqueeze(1)
    if fill == "zero":
        back = back * valid.to(back.dtype)
    if integer:
        return back.round().to(outputs.dtype), valid.to(torch.float32)
    return back.to(outputs.dtype), valid.to(outputs.dtype)


def deaugment_keypoints(keypoints: Tensor, theta: Tensor) -> Tensor:
    """Map keypoints ``(N, P, 2)`` given as ``(x, y)`` in ``[0, 1]`` (ttach's convention)
    from view coordinates back to input coordinates. ``theta``: ``(N, 2, 3)`` or ``(2, 3)``."""
    if not isinstance(keypoints, Tensor) or keypoints.dim() != 3 or keypoints.shape[-1] != 2:
        raise ValueError(
            f"keypoints must be a tensor of shape (N, P, 2) holding (x, y) in [0, 1], "
            f"got {tuple(getattr(keypoints, 'shape', ())) or type(keypoints).__name__}"
        )
    if not keypoints.is_floating_point():
        raise TypeError(f"keypoints must be a floating-point tensor, got dtype {keypoints.dtype}")
    theta = _check_theta(theta, keypoints.shape[0]).to(device=keypoints.device, dtype=torch.float64)
    u = keypoints.to(torch.float64) * 2 - 1
    x = torch.einsum("nij,npj->npi", theta[..., :2], u) + theta[..., None, :, 2]
    return ((x + 1) / 2).to(keypoints.dtype)
