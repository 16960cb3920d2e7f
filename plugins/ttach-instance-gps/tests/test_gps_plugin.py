"""ttach-instance-gps: the ``gps`` space found through the plugin's entry point, checked against
the policy files themselves (their pool rebuilt from the registry, the chosen candidates taken
from it by index); every bundled policy checked; a pip-installed copy (a real wheel build) ships
its policies; broken or foreign files refused naming the file and the field."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import ttach_instance as ti
from ttach_instance.cli import main as cli
from ttach_instance.policy import PolicyError, load_policy, policy_space, repeat_names
from ttach_instance.registry import PluginWarning
from ttach_instance.search import SearchResult, policy_document

gps = pytest.importorskip("ttach_instance_gps", reason="pip install -e plugins/ttach-instance-gps")
PLUGIN = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def loaded_registry():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        ti.reload()


def gps_file(tmp_path, indices, search="gps", name="gps.json", edit=None):
    pool = ti.get_space("paper12")
    manifest = {"candidate_names": pool.names, "candidate_specs": pool.spec(), "space": "paper12",
                "space_params": {}, "space_fingerprint": pool.fingerprint, "model": {"class": "m"}, "dataset": "d",
                "num_images": 3, "size": 32, "source_size": [32, 32]}
    result = SearchResult(list(indices), [-1.0] * len(indices), [1.0] * len(indices))
    doc = policy_document(result, search, manifest, {"n": len(indices)})
    if edit:
        edit(doc)
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return str(path)


def test_gps_is_registered_through_the_plugins_entry_point(capsys):
    eps = [ep for ep in metadata.entry_points(group="ttach_instance") if ep.name == "gps"]
    assert [(ep.value, ep.dist.name) for ep in eps] == [("ttach_instance_gps.plugin", "ttach-instance-gps")]
    assert cli(["plugins", "--json"]) == 0
    info = next(p for p in json.loads(capsys.readouterr().out)["plugins"] if p["name"] == "gps")
    assert (info["package"], info["version"], info["status"]) == ("ttach-instance-gps",
                                                                  metadata.version("ttach-instance-gps"), "ok")
    assert info["spaces"] == ["gps"] and info["ops"] == []
    assert ti.get_space("gps", policy=gps.list_policies()[0]).provider == "gps"


@pytest.mark.parametrize("name", gps.list_policies())
def test_every_bundled_policy_is_a_gps_policy_of_its_pool(name):
    path = gps.policy_file(name)
    policy = load_policy(path)
    assert policy.search == "gps" and len(policy) >= 1
    pool = ti.get_space(policy.pool.name, **policy.pool.params)  # the pool as the registry builds it today
    assert pool.fingerprint == policy.pool.fingerprint and pool.names == list(policy.pool.candidate_names)
    space = ti.get_space("gps", policy=name)
    assert space.name == "gps" and space.params == {"policy": name}
    chosen = [pool.candidates[i] for i in policy.indices]
    assert space.names == repeat_names([c.name for c in chosen])
    assert [c.ops for c in space.candidates] == [c.ops for c in chosen]
    assert space.fingerprint == policy_space(path).fingerprint
    assert ti.get_space(f"gps:policy={name},n=1").names == space.names[:1]


def test_the_demo_policy_is_bundled():
    assert "demo-photos" in gps.list_policies()
    policy = load_policy(gps.policy_file("demo-photos"))
    assert policy.pool.name == "paper12" and policy.data["num_images"] == 400 and len(policy) == 8
    assert policy.scores[0] > -2.30  # better than a uniform guess over the ten classes (ln 10 = 2.303)


def test_a_policy_file_by_path_and_by_reference(tmp_path):
    path = gps_file(tmp_path, [3, 5, 3])
    space = ti.get_space("gps", path=path)
    assert space.names == ["zoom(0.8)", "autocontrast", "zoom(0.8)#2"]
    assert ti.get_space("gps", path=path, n=2).names == space.names[:2]
    assert ti.get_space(f"gps:path={path},n=2").params == {"path": path, "n": 2}
    png = str(tmp_path / "grid.png")
    assert cli(["render", "--space", f"gps:path={path}", "--output", png, "--size", "32"]) == 0
    assert os.path.getsize(png) > 0


def test_bad_arguments_and_broken_files_are_named(tmp_path, capsys):
    bundled = gps.list_policies()
    with pytest.raises(ValueError, match=r"gps: give exactly one of path=FILE\.json .* or policy=NAME"):
        ti.get_space("gps")
    with pytest.raises(ValueError, match="give exactly one of"):
        ti.get_space("gps", path="a.json", policy=bundled[0])
    with pytest.raises(ValueError, match=r"no bundled policy 'demo-photo' \(did you mean 'demo-photos'\?\); "
                                         r"bundled: \["):
        ti.get_space("gps", policy="demo-photo")
    broken = gps_file(tmp_path, [3, 5], edit=lambda d: d["steps"][1].pop("score"), name="broken.json")
    with pytest.raises(PolicyError, match=f"policy file {broken!r}: field 'steps\\[1\\]\\.score' is missing"):
        ti.get_space("gps", path=broken)
    with pytest.raises(SystemExit) as code:
        cli(["render", "--space", f"gps:path={broken}", "--output", str(tmp_path / "x.png")])
    assert code.value.code == 2 and "field 'steps[1].score' is missing" in capsys.readouterr().err
    budget = gps_file(tmp_path, [0, 4], search="budget", name="budget.json")
    with pytest.raises(ValueError, match=r"written by `ttach-instance search budget`, not GPS; the core's policy "
                                         r"space takes any policy file"):
        ti.get_space("gps", path=budget)
    assert ti.get_space(budget).names == ["identity", "zoom(1.2)"]  # ... as the core's policy space does
    with pytest.raises(PolicyError, match=r"n must be an integer in 1\.\.2"):
        ti.get_space("gps", path=gps_file(tmp_path, [3, 5], name="two.json"), n=3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ti.get_space("gps", path=str(tmp_path / "none.json"))


def test_a_pip_installed_copy_ships_its_policies(tmp_path):
    """A real (non-editable) build: the wheel carries policies/*.json and the entry point, and a
    fresh interpreter that finds that copy first uses it."""
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("*.egg-info", "__pycache__", "build", "tests"))
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
                         capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        pytest.skip(f"pip could not build the plugin offline: {pip.stderr[-500:]}")
    script = ("import json, ttach_instance as ti, ttach_instance_gps as g\n"
              "s = ti.get_space('gps', policy='demo-photos', n=2)\n"
              "print(json.dumps({'file': g.__file__, 'policies': g.list_policies(), 'names': s.names,"
              " 'provider': s.provider}))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTACH_INSTANCE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(target)] + [p for p in [env.get("PYTHONPATH")] if p])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["file"].startswith(str(target)) and got["policies"] == gps.list_policies()
    assert got["names"] == ti.get_space("gps", policy="demo-photos", n=2).names and got["provider"] == "gps"
