"""The plugin registry, in-process: throwaway plugins (tests/fixtures/) are made discoverable
as installed distributions by writing a ``*.dist-info`` beside them on a temporary sys.path
entry, so ``importlib.metadata`` finds their entry points as after ``pip install``."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch

import ttach_instance as ti
from ttach_instance import cli, registry as registry_module, builtin_spaces
from ttach_instance.ops import BUILTIN_OPS, HFlip
from ttach_instance.registry import PluginWarning
from ttach_instance.space import Candidate, TransformSpace

_spec = importlib.util.spec_from_file_location(
    "ti_fake_dists", Path(__file__).resolve().parent / "fixtures" / "ti_fake_dists.py"
)
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)


def _forget_fixture_modules():
    for name in fake.MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """``install(fixture, ...)`` makes a throwaway plugin installed; afterwards everything,
    the registry included, is as before."""
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.delenv("TTACH_INSTANCE_PLUGINS", raising=False)
    monkeypatch.delenv("TTACH_INSTANCE_DISABLE_PLUGINS", raising=False)
    _forget_fixture_modules()

    def install(fixture, **kwargs):
        return fake.install_fake(path, fixture, **kwargs)

    yield install
    monkeypatch.undo()
    _forget_fixture_modules()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        ti.reload()


def reload_recording():
    """Reload; return the registry and the PluginWarning messages it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = ti.reload()
    return reg, [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]


def run_cli(capsys, *args):
    code = cli.main(["plugins", *args])
    return code, capsys.readouterr().out


def mentioning(messages, *words):
    return [m for m in messages if all(w in m for w in words)]


# ---------------------------------------------------------------------------------- built-ins


def test_builtins_are_registered_through_the_same_pluggy_hook():
    reg = ti.reload()
    impls = reg.pm.hook.register_spaces.get_hookimpls()
    assert [i.plugin for i in impls if i.plugin_name == "builtin"] == [builtin_spaces]
    info = reg.plugins["builtin"]
    assert info.package == "ttach-instance" and info.status == "ok"
    assert info.spaces == list(builtin_spaces.BUILTIN_SPACES) + list(builtin_spaces.PARAMETRIC_SPACES)
    assert info.ops == list(BUILTIN_OPS)
    assert set(builtin_spaces.BUILTIN_SPACES) <= set(ti.list_spaces())
    space = ti.get_space("paper12")
    assert space.provider == "builtin" and space.name == "paper12"
    assert space.fingerprint == builtin_spaces.paper12().fingerprint
    # the qualified form reaches the same space and records the bare name
    assert ti.get_space("builtin:paper12").name == "paper12"


def test_unknown_names_and_bad_parameters_say_what_is_expected():
    with pytest.raises(ValueError, match=r"unknown space 'paper13' \(did you mean 'paper12'.*available spaces: \[.*'d4'"):
        ti.get_space("paper13")
    with pytest.raises(ValueError, match="unknown op 'rotat'.*did you mean 'rotate'"):
        ti.make_op("rotat", angle=3)
    with pytest.raises(TypeError, match=r"space 'five_crops'.*bad parameters \['size'\].*accepts \(crop_size"):
        ti.get_space("five_crops", size=3)
    with pytest.raises(TypeError, match="space must be a TransformSpace, a space name, .* or a policy file path, got int"):
        ti.get_space(3)
    with pytest.raises(ValueError, match="parameters can only be given with a space name"):
        ti.get_space(ti.get_space("hflip"), crop_size=3)
    space = ti.get_space("hflip")
    assert ti.get_space(space) is space


def test_space_from_specs_rebuilds_every_builtin_space():
    x = torch.rand(2, 3, 24, 24)
    for name, (factory, _) in builtin_spaces.BUILTIN_SPACES.items():
        space = factory()
        rebuilt = ti.space_from_specs(json.loads(json.dumps(space.spec())), name=name)
        assert rebuilt.names == space.names and rebuilt.fingerprint == space.fingerprint, name
        last = torch.full((2,), len(space) - 1)
        assert torch.equal(rebuilt.apply(x, last), space.apply(x, last)), name
    # short forms: a single op spec, a list (composition), and list parameters -> tuples
    short = ti.space_from_specs([{"op": "identity"}, [{"op": "hflip"}, {"op": "rot90", "k": 1}],
                                 {"op": "crop", "position": "center", "size": [0.5, 0.5]}])
    assert short.names == ["identity", "hflip+rot90(1)", "crop_center(0.5x0.5)"]
    with pytest.raises(TypeError, match="specs must be a list"):
        ti.space_from_specs("paper12")
    with pytest.raises(ValueError, match=r"specs\[1\]: an op spec is a dict with a string 'op' key"):
        ti.space_from_specs([{"op": "identity"}, {"angle": 3}])
    with pytest.raises(ValueError, match=r"specs\[0\]\.ops: 'ops' must be a list"):
        ti.space_from_specs([{"name": "x", "ops": "rotate"}])


# ------------------------------------------------------------------------- discovery, listing


def test_an_installed_plugin_is_discovered_listed_and_usable(site, capsys):
    site("ti_good_plugin")
    reg, messages = reload_recording()
    assert messages == []
    assert "toy_space" in ti.list_spaces() and "toy_invert" in ti.list_ops()
    info = reg.plugins["good"]
    assert (info.package, info.version, info.module, info.status) == ("ti-good-plugin", "1.2.3", "ti_good_plugin", "ok")
    assert (info.spaces, info.ops) == (["toy_space"], ["toy_invert"])

    space = ti.get_space("toy_space", strength=3.0)
    assert space.provider == "good" and space.params == {"strength": 3.0}
    assert space.names == ["identity", "hflip", "color(3.0)"]
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(space.apply(x, torch.tensor([1, 1])), torch.flip(x, dims=[-1]))
    assert torch.equal(ti.make_op("toy_invert").apply(x), 1.0 - x)

    code, out = run_cli(capsys)
    assert code == 0
    block = out[out.index("good  [ti-good-plugin 1.2.3]  ok"):]
    assert block.splitlines()[1:4] == ["  module: ti_good_plugin", "  spaces: toy_space", "  ops:    toy_invert"]
    code, out = run_cli(capsys, "--json")
    data = json.loads(out)
    good = next(p for p in data["plugins"] if p["name"] == "good")
    assert good["version"] == "1.2.3" and good["spaces"] == ["toy_space"] and data["clashes"] == []


def test_a_plugin_that_fails_to_import_is_reported_once_and_skipped(site, capsys):
    site("ti_good_plugin")
    site("ti_broken_import_plugin")
    reg, messages = reload_recording()
    broken = mentioning(messages, "'broken'", "ti-broken-import-plugin 0.0.1", "nonexistent_dependency")
    assert len(broken) == 1 and len(messages) == 1, messages
    assert reg.plugins["broken"].status == "error"
    # nothing is warned again on later use
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        space = ti.get_space("paper12")
        ti.list_spaces()
        ti.get_space("toy_space")
    assert not [w for w in caught if issubclass(w.category, PluginWarning)]
    # built-ins and the other plugin keep working
    x = torch.rand(3, 3, 16, 16)
    reference = builtin_spaces.paper12()
    idx = torch.tensor([0, 5, 11])
    assert space.fingerprint == reference.fingerprint
    assert torch.equal(space.apply(x, idx), reference.apply(x, idx))
    assert reg.plugins["good"].status == "ok"

    code, out = run_cli(capsys)
    assert code == 0
    assert "broken  [ti-broken-import-plugin 0.0.1]  ERROR" in out
    assert "  error:  failed to load: ImportError: ti_broken_import_plugin needs the missing package" in out
    assert run_cli(capsys, "--strict")[0] == 1


def test_a_plugin_whose_hook_raises_is_skipped_as_a_whole(site):
    site("ti_raising_hook_plugin")
    reg, messages = reload_recording()
    assert len(mentioning(messages, "'raising'", "RuntimeError", "hook exploded on purpose")) == 1
    assert len(messages) == 1, messages
    # it registered a space before raising and has a working op hook: neither is kept
    assert "raising_space" not in ti.list_spaces() and "raising_op" not in ti.list_ops()
    info = reg.plugins["raising"]
    assert info.status == "error" and info.spaces == [] and info.ops == []
    assert not reg.pm.has_plugin("raising")
    assert ti.get_space("paper12").provider == "builtin"


def test_misbehaving_plugins_are_caught(site):
    site("ti_misbehaving_plugin")
    reg, messages = reload_recording()
    assert len(mentioning(messages, "'reentrant'", "used from inside a plugin")) == 1
    assert len(mentioning(messages, "'misspelled'", "unknown hook(s) ['register_space']")) == 1
    assert len(mentioning(messages, "'bad_name'", "no ':'", "'bad:name'")) == 1
    assert len(messages) == 3, messages
    assert {n: reg.plugins[n].status for n in ("reentrant", "misspelled", "bad_name", "wrong_type")} == {
        "reentrant": "error", "misspelled": "error", "bad_name": "error", "wrong_type": "ok"}
    assert "reentrant_space" not in ti.list_spaces()
    with pytest.raises(TypeError, match="space 'not_a_space' from plugin 'wrong_type' returned str, expected TransformSpace"):
        ti.get_space("not_a_space")


def test_plugin_warnings_point_at_the_callers_line(site):
    site("ti_broken_import_plugin")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ti.reload()
    (warning,) = [w for w in caught if issubclass(w.category, PluginWarning)]
    assert warning.filename == __file__


def test_warnings_as_errors_raise_once_but_leave_the_registry_built(site):
    site("ti_good_plugin")
    site("ti_broken_import_plugin")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        with pytest.raises(PluginWarning, match="'broken'"):
            ti.reload()
        reg = registry_module.registry()  # built, no second raise
        assert reg.plugins["broken"].status == "error"
        assert ti.get_space("toy_space").provider == "good"


# ---------------------------------------------------------------------------------- clashes


def test_two_plugins_with_one_space_name_clash(site, capsys):
    site("ti_good_plugin")
    site("ti_clash_plugin")
    reg, messages = reload_recording()
    clash = mentioning(messages, "space name 'toy_space'", "'good' (package ti-good-plugin 1.2.3)",
                       "'clash' (package ti-clash-plugin 0.0.3)")
    assert len(clash) == 1, messages
    with pytest.raises(ValueError) as err:
        ti.get_space("toy_space")
    text = str(err.value)
    # providers in load order: built-ins, then entry points sorted by name
    assert "'clash' (package ti-clash-plugin 0.0.3) and 'good' (package ti-good-plugin 1.2.3)" in text
    assert "'clash:toy_space' or 'good:toy_space'" in text
    assert reg.clashes == {"toy_space": ["clash", "good"]}
    # both stay reachable by qualified name, and are listed that way
    assert ti.get_space("good:toy_space").names == ["identity", "hflip", "color(2.0)"]
    qualified = ti.get_space("clash:toy_space")
    assert qualified.names == ["identity", "vflip"] and qualified.name == "clash:toy_space"
    names = ti.list_spaces()
    assert {"good:toy_space", "clash:toy_space"} <= set(names) and "toy_space" not in names
    assert ti.get_space("clash_only").provider == "clash"

    code, out = run_cli(capsys)
    assert code == 0
    assert ("clash: space 'toy_space' is provided by 'clash' (package ti-clash-plugin 0.0.3) and "
            "'good' (package ti-good-plugin 1.2.3); unusable bare, use clash:toy_space, good:toy_space") in out
    code, out = run_cli(capsys, "--json")
    assert json.loads(out)["clashes"] == [{"kind": "space", "name": "toy_space", "providers": ["clash", "good"]}]
    assert run_cli(capsys, "--strict")[0] == 1


def test_builtin_names_are_reserved(site):
    site("ti_clash_plugin")  # registers paper12, with trylast (first in pluggy's call order)
    reg, messages = reload_recording()
    reserved = mentioning(messages, "'clash' (package ti-clash-plugin 0.0.3)", "space 'paper12'", "'builtin'")
    assert len(reserved) == 1 and len(messages) == 1, messages
    space = ti.get_space("paper12")
    assert space.provider == "builtin" and space.fingerprint == builtin_spaces.paper12().fingerprint
    assert "paper12" not in reg.clashes
    info = reg.plugins["clash"]
    assert info.status == "ok" and info.spaces == ["toy_space", "clash_only"]
    assert any("paper12" in e for e in info.errors)
    with pytest.raises(ValueError, match="unknown space 'clash:paper12'"):
        ti.get_space("clash:paper12")


def test_two_distributions_with_one_entry_point_name(site):
    site("ti_good_plugin")
    site("ti_clash_plugin", entry_points={"good": "ti_clash_plugin"})
    reg, messages = reload_recording()
    # the first found keeps the name (sys.path order; here one folder, so either)
    winner = reg.plugins["good"]
    loser_pkg = ({"ti-good-plugin", "ti-clash-plugin"} - {winner.package}).pop()
    loser = reg.plugins[f"good@{loser_pkg}"]
    assert winner.status == "ok" and loser.status == "error"
    dup = mentioning(messages, f"'good@{loser_pkg}' (package {loser_pkg}",
                     f"uses the entry-point name 'good' already taken by 'good' (package {winner.package}")
    assert len(dup) == 1, messages
    expected = "ti_good_plugin" if winner.package == "ti-good-plugin" else "ti_clash_plugin"
    assert winner.module == expected and ti.get_space("toy_space").provider == "good"


# -------------------------------------------------------------------------- env variables


def test_allow_list_and_deny_list(site, monkeypatch, capsys):
    site("ti_good_plugin")
    site("ti_broken_import_plugin")

    monkeypatch.setenv("TTACH_INSTANCE_PLUGINS", "good")
    reg, messages = reload_recording()
    assert messages == [] and reg.plugins["broken"].status == "disabled" and "toy_space" in ti.list_spaces()
    code, out = run_cli(capsys)
    assert "broken  [ti-broken-import-plugin 0.0.1]  disabled" in out and "note:  not in TTACH_INSTANCE_PLUGINS" in out

    monkeypatch.setenv("TTACH_INSTANCE_PLUGINS", "ti-good_plugin")  # a distribution name, normalised
    reg, messages = reload_recording()
    assert messages == [] and reg.plugins["good"].status == "ok"

    monkeypatch.setenv("TTACH_INSTANCE_PLUGINS", "none")
    reg, messages = reload_recording()
    assert messages == [] and "toy_space" not in ti.list_spaces()
    assert {n for n, i in reg.plugins.items() if i.status == "ok"} == {"builtin"}
    assert ti.get_space("paper12").provider == "builtin"

    monkeypatch.delenv("TTACH_INSTANCE_PLUGINS")
    monkeypatch.setenv("TTACH_INSTANCE_DISABLE_PLUGINS", "broken, nosuchplugin")
    reg, messages = reload_recording()
    assert reg.plugins["broken"].status == "disabled" and reg.plugins["good"].status == "ok"
    assert messages == ["ttach-instance plugins: TTACH_INSTANCE_DISABLE_PLUGINS names 'nosuchplugin', "
                        "which is not an installed ttach-instance plugin"]


# --------------------------------------------------------------------------- thread safety


def test_concurrent_first_use_builds_one_registry(monkeypatch):
    built = []
    real_init = registry_module.Registry.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(registry_module.Registry, "__init__", counting_init)
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    results = []
    barrier = threading.Barrier(4)

    def worker():
        barrier.wait()
        results.append(registry_module.registry())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and len(results) == 4 and all(r is built[0] for r in results)


def test_transform_space_passthrough_keeps_user_spaces():
    space = TransformSpace([Candidate(), Candidate(HFlip())], name="mine")
    assert ti.get_space(space) is space
