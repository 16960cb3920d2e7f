"""Plugin discovery end to end: fresh interpreters find throwaway plugins through real
entry-point metadata (written by hand, and written by pip), and the installed
ttach-instance-albumentations distribution is listed with its version and space."""

from __future__ import annotations

import importlib.metadata as metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

import ttach_instance as ti
from ttach_instance import cli
from ttach_instance.registry import PluginWarning

FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("ti_fake_dists_e2e", FIXTURES / "ti_fake_dists.py")
fake = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fake)


def run_python(site: Path, *args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTACH_INSTANCE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_fresh_interpreter_discovers_lists_isolates_and_reports_clashes(tmp_path):
    site = tmp_path / "site"
    for fixture in ("ti_good_plugin", "ti_broken_import_plugin", "ti_clash_plugin"):
        fake.install_fake(site, fixture)

    # the console script's code path, in a fresh process
    listing = run_python(site, "-m", "ttach_instance.cli", "plugins")
    assert listing.returncode == 0, listing.stderr
    out = listing.stdout
    assert "good  [ti-good-plugin 1.2.3]  ok\n  module: ti_good_plugin\n  spaces: toy_space\n  ops:    toy_invert" in out
    assert "broken  [ti-broken-import-plugin 0.0.1]  ERROR" in out
    assert "error:  failed to load: ImportError: ti_broken_import_plugin needs the missing package" in out
    assert "clash  [ti-clash-plugin 0.0.3]  ok\n  module: ti_clash_plugin\n  spaces: toy_space, clash_only" in out
    assert "clash: space 'toy_space' is provided by 'clash' (package ti-clash-plugin 0.0.3) and 'good'" in out
    assert "PluginWarning" not in listing.stderr  # the listing itself reports the problems

    # library use: one warning per problem, each naming the plugin; the rest works
    script = textwrap.dedent(
        """
        import json, warnings
        import ttach_instance as ti
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paper12 = ti.get_space("paper12")
            ti.list_spaces()
            mine = ti.get_space("good:toy_space")
        try:
            ti.get_space("toy_space")
            clash = None
        except ValueError as exc:
            clash = str(exc)
        print(json.dumps({"warnings": [str(w.message) for w in caught], "paper12": [paper12.provider, len(paper12)],
                          "mine": mine.names, "clash": clash}))
        """
    )
    run = run_python(site, "-c", script)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ours = [w for w in result["warnings"] if any(n in w for n in ("'broken'", "'clash'", "'good'"))]
    assert len(ours) == 3, result["warnings"]  # broken import, clash vs built-in paper12, toy_space clash
    assert sum("'broken' (package ti-broken-import-plugin 0.0.1) failed to load" in w for w in ours) == 1
    assert sum("registers space 'paper12', a name reserved by 'builtin'" in w for w in ours) == 1
    assert sum("space name 'toy_space' is registered by 'clash'" in w for w in ours) == 1
    assert result["paper12"] == ["builtin", 12]
    assert result["mine"] == ["identity", "hflip", "color(2.0)"]
    assert "'clash' (package ti-clash-plugin 0.0.3) and 'good' (package ti-good-plugin 1.2.3)" in result["clash"]

    # allow-list in a fresh process: only the good plugin is loaded
    only = run_python(site, "-m", "ttach_instance.cli", "plugins", "--json", TTACH_INSTANCE_PLUGINS="good")
    data = json.loads(only.stdout)
    status = {p["name"]: p["status"] for p in data["plugins"]}
    assert status["good"] == "ok" and status["broken"] == "disabled" and status["clash"] == "disabled"
    assert data["clashes"] == []


def test_a_pip_installed_throwaway_plugin_is_discovered(tmp_path):
    pytest.importorskip("setuptools")
    source = tmp_path / "src"
    shutil.copytree(FIXTURES / "ti_good_plugin", source)  # keep build debris out of the repo
    target = tmp_path / "site"
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300,
    )
    if pip.returncode != 0:
        pytest.skip(f"pip could not build the fixture offline: {pip.stderr[-500:]}")
    listing = run_python(target, "-m", "ttach_instance.cli", "plugins", "--json")
    assert listing.returncode == 0, listing.stderr
    good = next(p for p in json.loads(listing.stdout)["plugins"] if p["name"] == "good")
    assert (good["package"], good["version"], good["status"]) == ("ti-good-plugin", "1.2.3", "ok")
    assert good["spaces"] == ["toy_space"] and good["ops"] == ["toy_invert"]
    assert fake.PLUGINS["ti_good_plugin"][:2] == ("ti-good-plugin", "1.2.3")  # fixture table matches the pyproject


def test_the_albumentations_plugin_is_listed_when_installed(capsys, monkeypatch):
    try:
        version = metadata.version("ttach-instance-albumentations")
    except metadata.PackageNotFoundError:
        pytest.skip("ttach-instance-albumentations is not installed (pip install -e plugins/ttach-instance-albumentations)")
    monkeypatch.delenv("TTACH_INSTANCE_PLUGINS", raising=False)
    monkeypatch.delenv("TTACH_INSTANCE_DISABLE_PLUGINS", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        ti.reload()
    assert cli.main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    albu = next(p for p in data["plugins"] if p["name"] == "albumentations")
    assert (albu["package"], albu["version"], albu["status"]) == ("ttach-instance-albumentations", version, "ok")
    assert albu["spaces"] == ["albumentations"] and albu["ops"] == ["albu"]
    space = ti.get_space("albumentations")
    assert space.provider == "albumentations" and space.names[0] == "identity"


# ---------------------------------------------------------------------------------- the core's own entry point
def test_the_builtins_come_from_the_core_distributions_own_entry_point(monkeypatch):
    core = [ep for ep in metadata.entry_points(group="ttach_instance") if ep.name == "builtin"]
    assert [(ep.value, ep.dist.name) for ep in core] == [("ttach_instance.builtin_spaces", "ttach-instance")], (
        "the installed ttach-instance metadata lacks its entry point: pip install -e . (pyproject.toml declares it)")
    monkeypatch.delenv("TTACH_INSTANCE_PLUGINS", raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        reg = ti.reload()
    assert reg.builtin_source == "entry point"
    info = reg.plugins["builtin"]
    assert (info.package, info.version, info.module) == ("ttach-instance", metadata.version("ttach-instance"),
                                                         "ttach_instance.builtin_spaces")
    assert ti.get_space("paper12").provider == "builtin" and "policy" in info.spaces


def test_stale_metadata_without_the_entry_point_falls_back_to_the_same_builtins(monkeypatch):
    from ttach_instance import registry as registry_module

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PluginWarning)
        fresh = ti.reload()
    listed = registry_module._entry_points
    monkeypatch.setattr(registry_module, "_entry_points", lambda: [ep for ep in listed() if ep.name != "builtin"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PluginWarning)  # a source checkout is normal: nothing to warn about
            stale = ti.reload()
        assert stale.builtin_source == "fallback"
        assert stale.plugins["builtin"].spaces == fresh.plugins["builtin"].spaces
        assert stale.plugins["builtin"].ops == fresh.plugins["builtin"].ops
        assert ti.get_space("paper12").fingerprint == fresh.get_space("paper12").fingerprint
    finally:
        monkeypatch.undo()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PluginWarning)
            ti.reload()


def test_another_distribution_cannot_take_the_builtin_entry_point(tmp_path):
    site = tmp_path / "site"
    fake.install_fake(site, "ti_clash_plugin", entry_points={"builtin": "ti_clash_plugin"})
    script = ("import json, warnings\nimport ttach_instance as ti\n"
              "with warnings.catch_warnings(record=True) as caught:\n    warnings.simplefilter('always')\n"
              "    reg = ti.reload()\n"
              "print(json.dumps({'warnings': [str(w.message) for w in caught], 'source': reg.builtin_source,\n"
              "                  'paper12': ti.get_space('paper12').provider, 'module': reg.plugins['builtin'].module}))")
    run = run_python(site, "-c", script)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["source"] == "entry point" and result["module"] == "ttach_instance.builtin_spaces"
    assert result["paper12"] == "builtin"
    assert any("entry point 'builtin' (ti_clash_plugin) uses the reserved name 'builtin'; skipped" in w
               for w in result["warnings"]), result["warnings"]
