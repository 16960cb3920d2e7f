"""ttach-instance-albumentations against albumentations called directly on the same uint8 images."""

from __future__ import annotations

import json
import warnings

import albumentations as A
import numpy as np
import pytest
import torch

import ttach_instance as ti
from ttach_instance.ops import HFlip
from ttach_instance.registry import PluginWarning
from ttach_instance_albumentations import (
    DEFAULT_TRANSFORMS,
    AlbumentationsOp,
    albumentations_space,
    default_transforms,
    space_from_albumentations,
)

RNG = np.random.default_rng(7)
# smooth-ish images with structure, so blurs/CLAHE/equalize all do something
_base = RNG.integers(0, 256, size=(3, 40, 40, 3), dtype=np.uint8)
IMAGES_U8 = ((_base.astype(np.float32) * 0.6) + np.linspace(0, 100, 40)[None, :, None, None]).clip(0, 255).astype(np.uint8)


def as_tensor(u8: np.ndarray, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).to(dtype) / 255.0


def reference(transform, u8: np.ndarray) -> torch.Tensor:
    """albumentations itself, image by image, as a float tensor in [0, 1]."""
    out = np.stack([transform(image=img)["image"].reshape(img.shape) for img in u8])
    return as_tensor(out)


@pytest.fixture(scope="module", autouse=True)
def loaded_registry():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        ti.reload()


@pytest.mark.parametrize("name", DEFAULT_TRANSFORMS)
def test_default_ops_equal_albumentations_on_the_same_uint8_images(name):
    op = AlbumentationsOp(default_transforms()[name], name=name)
    x = as_tensor(IMAGES_U8)
    got = op.apply(x)
    want = reference(default_transforms()[name], IMAGES_U8)  # an independent instance
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert torch.equal(got, want)
    assert not torch.equal(got, x), f"{name} did nothing on the test images"
    assert not op.geometric and op.invertible


def test_registered_space_through_the_entry_point():
    space = ti.get_space("albumentations")
    assert space.provider == "albumentations"
    assert space.names == ["identity", *DEFAULT_TRANSFORMS]
    assert space.invertible and not space.geometric
    x = as_tensor(IMAGES_U8)
    index = torch.tensor([[0, 1], [2, 3], [4, len(space) - 1]])
    views = space.apply(x, index)
    table = default_transforms()
    for i in range(3):
        for j in range(2):
            c = int(index[i, j])
            want = x[i : i + 1] if c == 0 else reference(table[space.names[c]], IMAGES_U8[i : i + 1])
            assert torch.equal(views[i * 2 + j : i * 2 + j + 1], want), (i, j)
    subset = ti.get_space("albumentations", names=["gamma_0.8", "clahe"])
    assert subset.names == ["identity", "clahe", "gamma_0.8"]  # default order
    with pytest.raises(ValueError, match=r"names: unknown default transform\(s\) \['clahe2'\]"):
        albumentations_space(names=["clahe2"])


def test_op_family_is_registered_and_specs_round_trip():
    space = ti.get_space("albumentations")
    rebuilt = ti.space_from_specs(json.loads(json.dumps(space.spec())), name="albumentations")
    assert rebuilt.fingerprint == space.fingerprint and rebuilt.names == space.names
    x = as_tensor(IMAGES_U8)
    last = torch.full((3,), len(space) - 1)
    assert torch.equal(rebuilt.apply(x, last), space.apply(x, last))
    op = ti.make_op("albu", transform=A.Equalize(p=1.0), name="eq")
    assert isinstance(op, AlbumentationsOp) and op.name == "eq"
    assert torch.equal(op.apply(x), reference(A.Equalize(p=1.0), IMAGES_U8))
    # the fingerprint ignores albumentations' version stamp
    assert "__version__" not in json.dumps(space.spec())


def test_conversion_quantises_and_keeps_dtype_and_device():
    clahe = default_transforms()["clahe"]
    op = AlbumentationsOp(clahe, name="clahe")
    torch.manual_seed(0)
    x = torch.rand(2, 3, 24, 24, dtype=torch.float64) * 1.2 - 0.1  # off-grid, out of range
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    got = op.apply(x)
    assert got.dtype == torch.float64 and got.device == x.device
    want = np.stack([clahe(image=img)["image"] for img in u8])
    assert torch.equal(got, torch.from_numpy(want).permute(0, 3, 1, 2).to(torch.float64) / 255.0)
    assert op.apply(x.half()).dtype == torch.float16
    as_u8 = torch.from_numpy(IMAGES_U8).permute(0, 3, 1, 2)
    out_u8 = op.apply(as_u8)
    assert out_u8.dtype == torch.uint8
    assert torch.equal(out_u8.float() / 255.0, reference(clahe, IMAGES_U8))


def test_grayscale_batches():
    gray = IMAGES_U8[..., :1].copy()
    op = AlbumentationsOp(default_transforms()["clahe"], name="clahe")
    assert torch.equal(op.apply(as_tensor(gray)), reference(default_transforms()["clahe"], gray))


def test_user_space_from_albumentations_mixes_compositions_and_tensor_ops():
    space = space_from_albumentations(
        [A.CLAHE(clip_limit=(3, 3), p=1), [A.Equalize(p=1), A.MedianBlur(blur_limit=(3, 3), p=1)], HFlip()],
        names=["clahe3", "eq+median", "hflip"],
        name="mine",
    )
    assert space.names == ["identity", "clahe3", "eq+median", "hflip"] and space.name == "mine"
    x = as_tensor(IMAGES_U8)
    composed = space.apply(x, torch.full((3,), 2))
    eq = np.stack([A.Equalize(p=1)(image=i)["image"] for i in IMAGES_U8])
    assert torch.equal(composed, reference(A.MedianBlur(blur_limit=(3, 3), p=1), eq))
    assert torch.equal(space.apply(x, torch.full((3,), 3)), torch.flip(x, dims=[-1]))
    default_names = space_from_albumentations([A.CLAHE(clip_limit=(3, 3), p=1)], include_identity=False).names
    assert default_names == ["clahe(clip_limit=3.0, tile_grid_size=8)"]


def test_spatial_transforms_are_geometric_without_inverse():
    space = space_from_albumentations([A.HorizontalFlip(p=1)], names=["albu_hflip"])
    op = space[1].ops[0]
    assert op.geometric and not op.invertible and not space.invertible
    x = as_tensor(IMAGES_U8)
    assert torch.equal(op.apply(x), torch.flip(x, dims=[-1]))  # classification can still use it
    with pytest.raises(ValueError, match="albu_hflip"):
        space.check_invertible()
    with pytest.raises(ValueError, match="no inverse"):
        op.deaugment_dense(torch.rand(2, 4, 8, 8))


def test_refuses_random_or_shape_changing_transforms_and_bad_input():
    with pytest.raises(ValueError, match="p=0.5; test-time ops must always apply"):
        AlbumentationsOp(A.CLAHE(clip_limit=(2, 2)))
    with pytest.raises(ValueError, match="different results under different random seeds"):
        AlbumentationsOp(A.GaussianBlur(sigma_limit=(0.5, 3.0), p=1))
    resize = AlbumentationsOp(A.Resize(16, 16, p=1), name="resize16")
    with pytest.raises(ValueError, match=r"resize16 changed the image shape from \(40, 40, 3\) to \(16, 16, 3\)"):
        resize.apply(as_tensor(IMAGES_U8))
    with pytest.raises(TypeError, match="transform must be an albumentations transform"):
        AlbumentationsOp(lambda im: im)
    with pytest.raises(TypeError, match="transforms must be a list"):
        space_from_albumentations(A.Equalize(p=1))
    with pytest.raises(TypeError, match=r"transforms\[1\]: expected an albumentations transform"):
        space_from_albumentations([A.Equalize(p=1), "clahe"])
    with pytest.raises(ValueError, match="names must be a list with one name per transform"):
        space_from_albumentations([A.Equalize(p=1)], names=["a", "b"])
    op = AlbumentationsOp(A.Equalize(p=1), name="eq")
    with pytest.raises(ValueError, match=r"images must be a \(B, C, H, W\) batch"):
        op.apply(torch.rand(3, 8, 8))
    with pytest.raises(TypeError, match="floating point in \\[0, 1\\] or uint8"):
        op.apply(torch.zeros(1, 3, 8, 8, dtype=torch.int32))
