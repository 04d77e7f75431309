"""The stage registry: every registered module provides the Stage interface and coherent hooks."""

from __future__ import annotations

import importlib

import pytest

from bdctl.stages import STAGES, Stage, stage_module


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_registered_stage_is_a_stage(name):
    module = stage_module(name)
    assert isinstance(module, Stage)
    # A stage whose begin can report "nothing for the ranks" must say how it finishes without them.
    if hasattr(module, "begin") and not hasattr(module, "run_in_process"):
        assert hasattr(module, "finish_without_ranks"), name


def test_a_module_without_the_interface_is_refused(monkeypatch):
    monkeypatch.setitem(STAGES, "broken", "bdctl.rundir")  # a module with none of the three functions
    assert not isinstance(importlib.import_module("bdctl.rundir"), Stage)
    with pytest.raises(TypeError, match="bdctl.rundir lacks part of the Stage interface"):
        stage_module("broken")


def test_only_eval_and_judge_keep_finished_output_and_only_judge_runs_in_one_process():
    reuses = {name for name in STAGES if getattr(stage_module(name), "REUSES_FINISHED", False)}
    single = {name for name in STAGES if hasattr(stage_module(name), "run_in_process")}
    assert reuses == {"eval", "judge"} and single == {"judge"}
