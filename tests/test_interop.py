"""ttach compatibility: our transforms obey ttach's transform contract (mirroring ttach's own
tests) and work inside ttach.Compose and its wrappers; ttach pipelines convert into spaces
that produce ttach's views."""

import math

import pytest
import torch
import torch.nn.functional as TF
import ttach
import ttach.transforms as tt

from ttach_instance import functional as F
from ttach_instance import ops as O
from ttach_instance import interop as T
from ttach_instance.space import TransformSpace
from ttach_instance.builtin_spaces import d4, paper12

H, W = 32, 40


def smooth(n=2, h=H, w=W):
    ys, xs = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.5 + 0.4 * torch.sin(2 * math.pi * (0.6 * xs + 0.3 * ys) + p) for p in (0, 1, 2)])
    return img[None].repeat(n, 1, 1, 1)


GEOMETRIC = [
    T.Rotate([-20, 20]),
    T.Zoom([0.8, 1.2]),
    T.FiveCropsResized(24, 30),
    T.OpTransform([O.HFlip(), O.VFlip(), O.Zoom(1.1)]),
    T.SpaceTransform(paper12()),
]
PHOTOMETRIC = [T.AutoContrast(), T.Sharpness([0.2, 4.0]), T.Color([0.5, 2.0])]
ALL = GEOMETRIC + PHOTOMETRIC


def _ids(ts):
    return [type(t).__name__ for t in ts]


def _photometric(transform, p):
    if isinstance(transform, ttach.base.ImageOnlyTransform):
        return True
    if isinstance(transform, T.SpaceTransform):
        return not transform.space[p].geometric
    return p is not None and not p.geometric


def _validity(transform, p, mask):
    if isinstance(transform, T.SpaceTransform):
        return transform.space[p].deaugment(mask)[1]
    if p is None:
        return torch.ones_like(mask[:, :1])
    return p.deaugment_dense(mask)[1]


def test_types_follow_ttach():
    for t in GEOMETRIC:
        assert isinstance(t, ttach.base.DualTransform)
    for t in PHOTOMETRIC:
        assert isinstance(t, ttach.base.ImageOnlyTransform)
    # ttach convention: the identity parameter comes first.
    for t in ALL:
        if not isinstance(t, T.FiveCropsResized):
            assert t.params[0] == t.identity_param


@pytest.mark.parametrize("transform", ALL, ids=_ids(ALL))
def test_aug_deaug_mask(transform):
    # ttach tests/test_base.py: apply_deaug_mask(apply_aug_image(a)) == a; ours: where valid.
    image = smooth()
    for p in transform.params:
        aug = transform.apply_aug_image(image, **{transform.pname: p})
        assert aug.shape == image.shape
        deaug = transform.apply_deaug_mask(aug, **{transform.pname: p})
        valid = _validity(transform, p, aug).bool().expand_as(deaug)
        assert valid.float().mean() > 0.3
        if _photometric(transform, p):
            assert torch.equal(deaug, aug)  # masks of photometric views pass through
        else:
            assert (deaug - image).abs()[valid].max() < 0.03, p
            assert torch.all(deaug[~valid] == 0)


@pytest.mark.parametrize("transform", ALL, ids=_ids(ALL))
def test_label_unchanged(transform):
    label = torch.randn(2, 10)
    for p in transform.params:
        assert torch.equal(transform.apply_deaug_label(label, **{transform.pname: p}), label)


@pytest.mark.parametrize("transform", GEOMETRIC, ids=_ids(GEOMETRIC))
def test_keypoints_follow_pixels(transform):
    # A keypoint placed at a view pixel de-augments to the input coordinate that pixel shows
    # (read off an augmented coordinate ramp).
    xs = (torch.arange(W) + 0.5) / W
    ys = (torch.arange(H) + 0.5) / H
    ramp = torch.stack([xs.expand(H, W), ys[:, None].expand(H, W), torch.full((H, W), 0.5)])[None]
    py, px = torch.tensor([12, 16, 20, 14]), torch.tensor([15, 20, 24, 26])
    kp = torch.stack([(px + 0.5) / W, (py + 0.5) / H], -1)[None]
    for p in transform.params:
        if _photometric(transform, p):
            continue
        view = transform.apply_aug_image(ramp, **{transform.pname: p})[0, :2]
        back = transform.apply_deaug_keypoints(kp.clone(), **{transform.pname: p})[0]
        shown = view[:, py, px].T
        assert ((back - shown).abs() * torch.tensor([W, H])).max() < 0.15, p


@pytest.mark.parametrize(
    "ours, theirs, param_map",
    [
        (T.OpTransform([O.HFlip()]), tt.HorizontalFlip(), {None: False}),
        (T.OpTransform([O.VFlip()]), tt.VerticalFlip(), {None: False}),
        (T.OpTransform([O.Rot90(1), O.Rot90(2), O.Rot90(3)]), tt.Rotate90([0, 90, 180, 270]), None),
    ],
    ids=["hflip", "vflip", "rot90"],
)
def test_exact_ops_match_ttach(ours, theirs, param_map):
    image = torch.rand(2, 3, 16, 16)
    mask = torch.rand(2, 5, 16, 16)
    kp = torch.rand(2, 6, 2)
    their_params = theirs.params if param_map is None else [False, True]
    for p, q in zip(ours.params, their_params):
        assert torch.equal(ours.apply_aug_image(image, op=p), theirs.apply_aug_image(image, **{theirs.pname: q}))
        assert torch.equal(ours.apply_deaug_mask(mask, op=p), theirs.apply_deaug_mask(mask, **{theirs.pname: q}))
        ours_kp = ours.apply_deaug_keypoints(kp.clone(), op=p)
        assert torch.allclose(ours_kp, theirs.apply_deaug_keypoints(kp.clone(), **{theirs.pname: q}), atol=1e-6)


class Pool(torch.nn.Module):
    """A tiny classifier: channel means through a fixed linear layer."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 4)
        torch.nn.init.uniform_(self.fc.weight, -1, 1)

    def forward(self, x):
        return self.fc(x.mean((-2, -1)))


def test_classification_wrapper():
    model = Pool()
    compose = ttach.Compose([T.Rotate([20]), T.Sharpness([3.0]), tt.HorizontalFlip()])
    wrapper = ttach.ClassificationTTAWrapper(model, compose, merge_mode="mean")
    image = torch.rand(2, 3, 24, 24)
    space = TransformSpace.from_ttach(compose)
    assert len(space) == 8
    views = space.apply_all(image).reshape(2, 8, 3, 24, 24)
    expected = torch.stack([model(views[:, v]) for v in range(8)]).mean(0)
    assert torch.allclose(wrapper(image), expected, atol=1e-5)


def test_segmentation_wrapper_exact_and_resampled():
    identity = torch.nn.Identity()
    image = smooth(2, 24, 24)
    # d4 views de-augment exactly: an identity "model" gives the input back bit-for-bit.
    wrapper = ttach.SegmentationTTAWrapper(identity, d4().to_ttach(), merge_mode="mean")
    assert torch.allclose(wrapper(image), image, atol=1e-6)
    # Zoom out: every input pixel is seen, so the merged mask is the input up to resampling.
    plain = ttach.SegmentationTTAWrapper(identity, ttach.Compose([T.Zoom([0.8])]), merge_mode="mean")(image)
    assert (plain - image).abs().max() < 0.03
    # A photometric transform inside the pipeline: its views' masks pass through unchanged.
    colour = ttach.SegmentationTTAWrapper(identity, ttach.Compose([T.Color([2.0])]), merge_mode="mean")(image)
    assert torch.allclose(colour, (image + F.color(image, 2.0)) / 2, atol=1e-6)


def _ttach_views(compose, image):
    return [t.augment_image(image) for t in compose]


@pytest.mark.parametrize(
    "alias",
    [ttach.aliases.d4_transform(), ttach.aliases.hflip_transform(), ttach.aliases.flip_transform(), ttach.aliases.vlip_transform()],
    ids=["d4", "hflip", "flip", "vflip"],
)
def test_from_ttach_exact_aliases(alias):
    image = torch.rand(3, 3, 20, 20)
    space = TransformSpace.from_ttach(alias)
    assert len(space) == len(alias)
    views = space.apply_all(image).reshape(3, len(space), 3, 20, 20)
    for v, expected in enumerate(_ttach_views(alias, image)):
        assert torch.equal(views[:, v], expected), space.names[v]
    # Their masks de-augment exactly like ttach's, too.
    masks = torch.rand(3, 2, 20, 20)
    for v, transformer in enumerate(alias):
        back, valid = space[v].deaugment(masks)
        assert torch.equal(back, transformer.deaugment_mask(masks)) and torch.all(valid == 1)


def test_from_ttach_d4_matches_builtin():
    assert TransformSpace.from_ttach(ttach.aliases.d4_transform()).fingerprint == d4().fingerprint


@pytest.mark.parametrize("crop, size", [((20, 24), (32, 40)), ((21, 21), (32, 32)), ((15, 14), (31, 33))])
@pytest.mark.parametrize("ten", [False, True])
def test_from_ttach_crops_resized(crop, size, ten):
    alias = ttach.aliases.ten_crop_transform(*crop) if ten else ttach.aliases.five_crop_transform(*crop)
    image = torch.rand(2, 3, *size)
    space = TransformSpace.from_ttach(alias)
    assert len(space) == (10 if ten else 5)
    views = space.apply_all(image).reshape(2, len(space), 3, *size)
    for v, crop_view in enumerate(_ttach_views(alias, image)):
        assert crop_view.shape[-2:] == crop
        expected = TF.interpolate(crop_view, size=size, mode="bilinear", align_corners=False)
        assert torch.allclose(views[:, v], expected, atol=1e-6), space.names[v]


def test_crop_resize_rows_equal_single_boxes():
    image = torch.rand(3, 3, 20, 30)
    boxes = torch.tensor([[2, 3, 12, 17], [0, 0, 30, 20], [5, 1, 29, 19]])
    batched = F.crop_resize(image, boxes)
    for i in range(3):
        x0, y0, x1, y1 = boxes[i].tolist()
        expected = TF.interpolate(image[i : i + 1, :, y0:y1, x0:x1], size=(20, 30), mode="bilinear", align_corners=False)
        assert torch.allclose(batched[i : i + 1], expected, atol=1e-5)


def test_from_ttach_keeps_other_transforms():
    compose = ttach.Compose([tt.Multiply([0.9, 1.1]), tt.HorizontalFlip()])
    space = TransformSpace.from_ttach(compose)
    image = torch.rand(2, 3, 8, 8) * 0.8
    views = space.apply_all(image).reshape(2, len(space), 3, 8, 8)
    for v, expected in enumerate(_ttach_views(compose, image)):
        assert torch.allclose(views[:, v], expected)
    masks = torch.rand(len(space), 1, 8, 8)
    for v, transformer in enumerate(compose):
        assert torch.allclose(space[v].deaugment(masks[v : v + 1])[0], transformer.deaugment_mask(masks[v : v + 1]))


def test_space_round_trips_through_ttach():
    space = paper12()
    compose = space.to_ttach()
    assert len(compose) == 12
    back = TransformSpace.from_ttach(compose)
    assert back.fingerprint == space.fingerprint
    image = torch.rand(1, 3, 16, 16)
    for v, transformer in enumerate(compose):
        assert torch.equal(transformer.augment_image(image), space[v].apply(image))
