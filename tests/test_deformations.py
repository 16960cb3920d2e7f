import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from ttach_instance import functional as F
from ttach_instance.training.corruptions import corrupt_batch, draw_recipes
from ttach_instance.training.deformations import Deformation, deform_batch, draw_deformations
from ttach_instance.training.labels import generate_labels
from ttach_instance.training.tasks import SegmentationTask

from _tiny import space, tiny_data, tiny_model


def photo(n=4, size=48):
    from skimage import data as skdata

    img = torch.from_numpy(np.ascontiguousarray(skdata.astronaut()[::8, ::8][:size, :size])).permute(2, 0, 1)
    return torch.stack([img.roll(9 * i, dims=-1) for i in range(n)])


def test_draws_are_a_pure_function_of_seed_and_row_within_the_ranges():
    d = Deformation(rotate=8.0, zoom=0.05, brightness=0.2)
    a = draw_deformations(range(500), 3, d)
    assert draw_deformations([7, 123], 3, d) == [a[7], a[123]]  # other rows do not matter
    assert draw_deformations(range(3), 4, d) != a[:3]
    angle, scale, bright = (np.array(v) for v in zip(*a))
    assert np.abs(angle).max() <= 8.0 and np.abs(scale - 1).max() <= 0.05 and np.abs(bright - 1).max() <= 0.2
    # uniform over the range, both signs
    assert angle.min() < -6 and angle.max() > 6 and abs(angle.mean()) < 1.0
    # a stream of its own: the corruption recipes of the same rows do not change
    assert draw_recipes(range(5), 3, 0.5, ["contrast"]) == draw_recipes(range(5), 3, 0.5, ["contrast"])


def test_zero_deformation_is_the_identity():
    x = photo()
    assert torch.equal(deform_batch(x, [(0.0, 1.0, 1.0)] * 4), x)


def test_brightness_matches_pil():
    x = photo(2)
    out = deform_batch(x, [(0.0, 1.0, 0.8), (0.0, 1.0, 1.25)])
    for i, f in enumerate((0.8, 1.25)):
        ref = np.asarray(ImageEnhance.Brightness(Image.fromarray(x[i].permute(1, 2, 0).numpy())).enhance(f))
        diff = np.abs(out[i].permute(1, 2, 0).numpy().astype(int) - ref.astype(int))
        assert diff.max() <= 1


def test_rotation_and_zoom_agree_with_the_exact_ops_inside_the_frame():
    x = photo(3)
    params = [(9.0, 1.0, 1.0), (-6.0, 1.08, 1.0), (0.0, 0.92, 1.0)]
    out = deform_batch(x, params).float() / 255
    angle = torch.tensor([p[0] for p in params])
    scale = torch.tensor([p[1] for p in params])
    ref = F.zoom(F.rotate(x.float() / 255, angle), scale)  # the PIL-exact ops (tests/test_ops_parity.py)
    inner = (out - ref).abs()[..., 6:-6, 6:-6]
    assert inner.mean() < 0.03  # one bicubic resampling vs two: a few levels apart
    # and clearly not the undeformed image (the check could not pass by doing nothing)
    assert ((x.float() / 255 - ref).abs()[..., 6:-6, 6:-6].mean(dim=(1, 2, 3)) > 0.03).all()
    # positive angles turn counter-clockwise as PIL's rotate
    pil = np.asarray(Image.fromarray(x[0].permute(1, 2, 0).numpy()).rotate(9.0, Image.BICUBIC)).astype(float) / 255
    got = out[0].permute(1, 2, 0).numpy()
    assert np.abs(got - pil)[8:-8, 8:-8].mean() < 0.03


def test_bad_deformation_arguments():
    with pytest.raises(ValueError, match="rotate"):
        Deformation(rotate=90)
    with pytest.raises(ValueError, match="zoom"):
        Deformation(zoom=1.5)
    with pytest.raises(ValueError, match="unknown deformation fields"):
        Deformation.from_spec({"rotate": 5, "shear": 2})
    with pytest.raises(TypeError, match="uint8"):
        deform_batch(photo().float(), [(0, 1, 1)] * 4)
    with pytest.raises(ValueError, match="one .angle, scale, brightness. per image"):
        deform_batch(photo(), [(0, 1, 1)])


def test_labels_with_deformation_make_every_row_a_new_input(tmp_path):
    model = tiny_model()
    images, labels = tiny_data(4, size=32)
    d = Deformation()
    cache = generate_labels(model, images, labels, space(), str(tmp_path / "c"), draws=3, corruption_p=0.5,
                            corruptions=["contrast"], seed=5, shard_size=5, progress=False, deformation=d)
    data = cache.load()
    assert cache.manifest()["deformation"] == d.spec()
    # each stored image is its recipe: deform, then corrupt
    recipes = draw_recipes(range(12), 5, 0.5, ["contrast"])
    expect = corrupt_batch(deform_batch(images[torch.arange(12) % 4], draw_deformations(range(12), 5, d)),
                           [r[0] for r in recipes], [r[1] for r in recipes], [r[2] for r in recipes])
    assert torch.equal(data["images"], expect)
    clean = (data["corruption"] < 0).nonzero().squeeze(1).tolist()
    same_image = [(a, b) for a in clean for b in clean if a < b and a % 4 == b % 4]
    assert same_image, "the draw should leave some image clean twice"
    for a, b in same_image:  # without the deformation these rows would be identical copies
        assert not torch.equal(data["images"][a], data["images"][b])
    # the setting is part of the cache's configuration
    with pytest.raises(ValueError, match="deformation"):
        generate_labels(model, images, labels, space(), str(tmp_path / "c"), draws=3, corruption_p=0.5,
                        corruptions=["contrast"], seed=5, shard_size=5, progress=False)


def test_dense_tasks_refuse_a_deformation(tmp_path):
    images, _ = tiny_data(2, size=16)
    masks = torch.zeros(2, 16, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="deformation is for classification"):
        generate_labels(tiny_model(), images, masks, space(), str(tmp_path / "s"),
                        task=SegmentationTask(), progress=False, deformation=Deformation())
