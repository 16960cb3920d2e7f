"""The ``ttach_instance`` entry point of ttach-instance-gps: registers the ``gps`` space."""

from __future__ import annotations

from ttach_instance.hookspecs import hookimpl

from . import gps_space


@hookimpl
def register_spaces(register):
    register("gps", gps_space, "a Greedy Policy Search policy's candidates in order, repeats as name#k: "
                               "path=FILE.json or policy=NAME (bundled), n=first n")
