"""Accelerator paths: device and dtype preservation, CPU-vs-device agreement, half types.

Skipped without CUDA. ``TTACH_INSTANCE_TEST_DEVICE=cpu`` runs the same checks on the CPU
(used to validate this file where no GPU is available; CPU half types compute in float32).
"""

import os

import pytest
import torch

from ttach_instance import functional as F
from ttach_instance.ops import Rotate, Zoom
from ttach_instance.space import Candidate
from ttach_instance.builtin_spaces import d4, five_crops, paper12, ten_crops

DEVICE = os.environ.get("TTACH_INSTANCE_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(), reason="CUDA not available"
)
# Tolerances against the float32 CPU result: float32 kernels differ by summation order only;
# half types by their rounding (float16 ~ 2^-11, bfloat16 ~ 2^-8 of the value) plus
# resampling matrices stored in that dtype.
TOL = {torch.float32: 1e-4, torch.float16: 6e-3, torch.bfloat16: 3e-2}
SPACES = [paper12(), d4(), five_crops(24), ten_crops(0.75)]


def images(n=6, h=32, w=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, h, w, generator=g)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_candidates_agree_with_cpu(space, dtype):
    x = images()
    xd = x.to(DEVICE, dtype)
    for cand in space:
        out = cand.apply(xd)
        assert out.device == xd.device and out.dtype == dtype, cand.name
        ref = cand.apply(x)
        assert (out.float().cpu() - ref).abs().max() <= TOL[dtype], cand.name


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_space_apply_agrees_with_cpu(dtype):
    space = paper12()
    x = images(8)
    index = torch.randint(0, len(space), (8, 3), generator=torch.Generator().manual_seed(1))
    ref = space.apply(x, index)
    xd = x.to(DEVICE, dtype)
    for grouped in (None, True, False):
        out = space.apply(xd, index.to(DEVICE), grouped=grouped)
        assert out.device == xd.device and out.dtype == dtype
        assert (out.float().cpu() - ref).abs().max() <= TOL[dtype]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("space", SPACES, ids=lambda s: s.name)
def test_deaugment_agrees_with_cpu(space, dtype):
    g = torch.Generator().manual_seed(2)
    index = torch.randint(0, len(space), (4, 2), generator=g)
    outputs = torch.rand(8, 3, 32, 32, generator=g)
    for fill in ("zero", "border"):
        ref_back, ref_valid = space.deaugment(outputs, index, fill=fill)
        # On the device every row goes through one grid_sample (cached inverse maps, a per-row
        # choice for photometric rows); on the CPU only the rows that moved are resampled.
        back, valid = space.deaugment(outputs.to(DEVICE, dtype), index.to(DEVICE), fill=fill)
        assert back.device.type == torch.device(DEVICE).type and back.dtype == dtype and valid.dtype == dtype
        both = (valid.cpu() == 1) & (ref_valid == 1)
        # Validity may flip only where a pixel centre sits on the view's edge (rounding).
        assert (valid.cpu() != ref_valid).float().mean() < 2e-3
        assert (back.float().cpu() - ref_back).abs()[both.expand_as(ref_back)].max() <= max(TOL[dtype], 1e-3)
        if fill == "zero":
            assert torch.all(back.cpu()[(valid.cpu() == 0).expand_as(back)] == 0)
    kp = torch.rand(8, 5, 2, generator=g)
    ref_kp = space.deaugment_keypoints(kp, index, (32, 32))
    got = space.deaugment_keypoints(kp.to(DEVICE), index.to(DEVICE), (32, 32))
    assert got.device.type == torch.device(DEVICE).type and torch.allclose(got.cpu(), ref_kp, atol=1e-5)


def test_integer_masks_on_device():
    labels = torch.randint(0, 7, (8, 1, 32, 32))
    index = torch.arange(8)
    ref_back, _ = paper12().deaugment(labels, index)
    back, valid = paper12().deaugment(labels.to(DEVICE), index.to(DEVICE))
    assert back.dtype == labels.dtype and valid.dtype == torch.float32
    assert (back.cpu() != ref_back).float().mean() < 2e-3


def test_row_parameter_kernels_on_device():
    x = images(3)
    for kernel, values in ((F.rotate, [-20.0, 0.0, 33.0]), (F.zoom, [0.8, 1.0, 1.7]), (F.sharpness, [0.2, 1.0, 4.0]), (F.color, [0.5, 1.0, 2.0])):
        out = kernel(x.to(DEVICE), torch.tensor(values, device=DEVICE))
        assert torch.allclose(out.cpu(), kernel(x, torch.tensor(values)), atol=1e-4)
    enabled = torch.tensor([True, False, True], device=DEVICE)
    assert torch.allclose(F.autocontrast(x.to(DEVICE), enabled).cpu(), F.autocontrast(x, enabled.cpu()), atol=1e-5)


def test_geometry_keeps_precision_in_half():
    # A bfloat16 sampling grid would misplace samples by up to ~1 px at 224 px; resampling runs
    # in float32, so a zoom of a smooth ramp in bfloat16 stays within bfloat16 rounding.
    ramp = torch.linspace(0.1, 0.9, 224).expand(1, 3, 224, 224).contiguous()
    for cand in (Candidate(Rotate(20)), Candidate(Zoom(1.2)), Candidate([Zoom(0.8), Rotate(-20)])):
        ref = cand.apply(ramp)
        out = cand.apply(ramp.to(DEVICE, torch.bfloat16))
        assert (out.float().cpu() - ref).abs().max() < 1e-2, cand.name


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a second device")
def test_index_on_another_device_is_rejected():
    x = images(2).to(DEVICE)
    with pytest.raises(ValueError, match="index is on cpu"):
        paper12().apply(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="angle is on"):
        F.rotate(x, torch.tensor([1.0, 2.0]))
