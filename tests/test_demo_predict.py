"""The demo ends with a predict command that works on what it trained (issue: quality that transfers, item 5)."""

import os
import shlex

import numpy as np
import pytest
import torch

from ttach_instance.cli import main
from ttach_instance.data import build_model
from ttach_instance.demo_run import photo_patch_task, predict_command
from ttach_instance.io import atomic_save_tensors
from ttach_instance.predictors import create_predictor


def test_the_printed_predict_command_classifies_the_example(tmp_path, capsys):
    train, val = photo_patch_task(n_train=2, n_val=2, size=32)
    torch.manual_seed(0)
    model = build_model("ttach_instance.models:small_resnet", num_classes=len(train.classes), kwargs={"width": 8})
    out = str(tmp_path)
    atomic_save_tensors(os.path.join(out, "target.safetensors"), model.state_dict(), {"width": 8, "size": 32})
    predictor = create_predictor("small", "paper12", width=8, input_size=16).eval()
    os.makedirs(os.path.join(out, "fit"))
    predictor.save(os.path.join(out, "fit", "predictor.safetensors"))
    command = predict_command(out, val, len(train.classes), 32)
    argv = shlex.split(command)
    assert argv[0] == "ttach-instance" and argv[1] == "predict"
    assert main(argv[1:]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(os.path.join(out, "example.png"))
    # class and view computed independently: the predictor's lowest score, that candidate's view
    # of the example (read back from the PNG the command names), the model's softmax on it
    from PIL import Image

    import ttach_instance as ti

    model.eval()
    image = torch.from_numpy(np.array(Image.open(argv[-1]).convert("RGB")))
    image = image.permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor(model.mean).view(1, 3, 1, 1), torch.tensor(model.std).view(1, 3, 1, 1)
    with torch.no_grad():
        view = int(predictor(image).argmin(1))
        probs = model((ti.get_space("paper12")[view].apply(image) - mean) / std).softmax(1)[0]
    cls = int(probs.argmax())
    expected = f"class {val.classes[cls]} (p={float(probs[cls]):.3f}); views: {predictor.candidate_names[view]}"
    assert line.endswith(expected), (line, expected)
    # without --model-kwargs the factory's default width does not fit the saved weights: a clear error
    argv_plain = [a for a in argv[1:] if a not in ("--model-kwargs", '{"width": 8}')]
    with pytest.raises(SystemExit) as exc:
        main(argv_plain)
    assert exc.value.code == 2 and "weights" in capsys.readouterr().err.lower()
