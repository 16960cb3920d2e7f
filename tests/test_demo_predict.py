"""The demo ends with a predict command that works on what it trained, with no --model: the target's
file carries its spec (issue: quality that transfers, items 5)."""

import os
import shlex

import numpy as np
import pytest
import torch

from ttach_instance.cli import main
from ttach_instance.data import build_model
from ttach_instance.demo_run import photo_patch_task, predict_command
from ttach_instance.io import atomic_save_tensors
from ttach_instance.model_spec import save_model
from ttach_instance.predictors import create_predictor


def test_the_printed_predict_command_classifies_the_example(tmp_path, capsys):
    train, val = photo_patch_task(n_train=2, n_val=2, size=32)
    torch.manual_seed(0)
    model = build_model("ttach_instance.models:small_resnet", num_classes=len(train.classes), kwargs={"width": 8})
    out = str(tmp_path)
    save_model(os.path.join(out, "target.safetensors"), model, "ttach_instance.models:small_resnet",
               {"width": 8, "num_classes": len(train.classes)}, {"size": 32})  # as run_demo saves it
    predictor = create_predictor("small", "paper12", width=8, input_size=16).eval()
    os.makedirs(os.path.join(out, "fit"))
    predictor.save(os.path.join(out, "fit", "predictor.safetensors"))
    command = predict_command(out, val, 32)
    argv = shlex.split(command)
    assert argv[0] == "ttach-instance" and argv[1] == "predict"
    assert "--model" not in argv and "--num-classes" not in argv
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
    # the same weights saved without their spec: the command without --model is refused, naming the file
    plain = os.path.join(out, "plain.safetensors")
    atomic_save_tensors(plain, model.state_dict(), {"width": 8, "size": 32})
    argv_plain = [plain if a == argv[argv.index("--weights") + 1] else a for a in argv[1:]]
    with pytest.raises(SystemExit) as exc:
        main(argv_plain)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--model is required" in err and plain in err, err
