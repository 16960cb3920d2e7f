"""A third-party op that misbehaves is named where it misbehaves (issue: trust, wrappers)."""

import pytest
import torch

import ttach_instance as ti
from ttach_instance.ops import CallableOp, Op
from ttach_instance.space import Candidate, TransformSpace


class Brighten(Op):
    """A plugin-style op class (defined outside ttach_instance.ops) that leaves [0, 1]."""

    family = "brighten_test"

    def apply(self, images):
        return images * 3.0


def space_of(op):
    return TransformSpace([Candidate(), Candidate(op)], name="test")


@pytest.mark.parametrize("op, message", [
    (CallableOp("to255", lambda x: x * 255), r"op 'to255' \(ttach_instance.ops.CallableOp\) returned values in \[76.51, 153\]"),
    (CallableOp("shrink", lambda x: x[..., :-1]), r"op 'shrink' .* returned torch.float32 \(2, 3, 16, 15\) for input"),
    (CallableOp("half", lambda x: x.half()), r"op 'half' .* returned torch.float16"),
    (CallableOp("nan", lambda x: x * float("nan")), r"op 'nan' .* returned values in \[nan"),
    (CallableOp("none", lambda x: None), r"op 'none' .* returned NoneType"),
    (Brighten(), r"op 'brighten_test' \(test_op_output_checks.Brighten\) returned values in"),
])
def test_misbehaving_op_is_named(op, message):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.3 + 0.3
    with pytest.raises(ValueError, match=message):
        space_of(op).apply(x, [[1], [1]])
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    with pytest.raises(ValueError, match=message):
        ti.FullSpaceWrapper(model, space_of(op))(x)


def test_well_behaved_ops_pass_and_builtins_are_not_rechecked(monkeypatch):
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    good = space_of(CallableOp("invert", lambda t: 1 - t))
    assert torch.equal(good.apply(x, [[1], [1]]), 1 - x)
    calls = []
    import ttach_instance.space as space_module

    monkeypatch.setattr(space_module, "_check_op_output", lambda *a: calls.append(a))
    ti.get_space("paper12").apply(x, [[3], [5]])
    assert calls == []  # built-in ops are tested against PIL; they skip the per-call check


def test_border_fill_through_an_op_without_an_affine_map_is_refused_only_where_pixels_are_unseen():
    from ttach_instance.space import Candidate

    flip = CallableOp("myflip", lambda x: x.flip(-1), geometric=True, deaugment_dense=lambda y: y.flip(-1))
    y = torch.rand(2, 3, 8, 8)
    back, valid = Candidate(flip).deaugment(y, fill="border")  # a flip sees every pixel: nothing to fill
    assert torch.equal(back, y.flip(-1)) and bool(valid.all())

    class ShrinkBack(Op):
        """A plugin-style geometric op whose own inverse leaves a one-pixel border unseen."""

        family = "shrink_test"

        @property
        def geometric(self):
            return True

        def apply(self, images):
            return images

        def deaugment_dense(self, outputs, mode="bilinear"):
            valid = torch.zeros_like(outputs[:, :1])
            valid[..., 1:-1, 1:-1] = 1
            return outputs * valid, valid

    back, valid = Candidate(ShrinkBack()).deaugment(y, fill="zero")
    assert torch.equal(back, y * valid) and valid[0, 0, 0, 0] == 0 and valid[0, 0, 4, 4] == 1
    with pytest.raises(ValueError, match=r"'shrink_test'.*no affine map.*fill='zero'"):
        Candidate(ShrinkBack()).deaugment(y, fill="border")
