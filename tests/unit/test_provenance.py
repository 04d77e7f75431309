"""What a stage is made from (bdctl.provenance): which settings count, what a rerun says changed, which
stages a stage reads, a data file edited in place, stale stages in `bdctl runs` and in reproduce's plan.
In-process and without DeepSpeed: the finished stages here are manifests written by hand with the very
records bdctl stamps on them (`submit.made_from`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bdctl import provenance
from bdctl.errors import UserError
from bdctl.job import Job
from bdctl.launch import LaunchOptions
from bdctl.pipeline import inputs_of, stages
from bdctl.recipe import load_recipe
from bdctl.rundir import RunDir, mark_complete
from tests.conftest import RECIPES, write_recipe

SMOKE = str(RECIPES / "smoke.yaml")


def job(stage_name: str, overrides: list[str] = (), options: dict | None = None, root: str = "runs/smoke") -> Job:
    recipe, _ = load_recipe(SMOKE, list(overrides))
    stage = "generate" if stage_name.startswith(("generate", "score_")) else stage_name.split("/")[0]
    return Job(stage=stage, options=options or {}, recipe=recipe, recipe_path=SMOKE, run_root=root,
               stage_name=stage_name, world_size=1)  # fmt: skip


# --------------------------------------------------------------------------- which settings count


@pytest.mark.parametrize(
    "neutral",
    [
        "stages.generate.report_examples=8",
        "tracking.report_to=[tensorboard]",
        "description=another line",
        "stages.teacher_sft.keep_checkpoints=5",
        "stages.teacher_sft.keep_checkpoints_after_finish=true",
        "stages.distill.keep_checkpoints=5",
    ],
)
def test_result_neutral_settings_change_no_fingerprint(neutral):
    for stage in ("teacher_sft", "generate", "distill/bd"):
        assert job(stage, [neutral]).fingerprint() == job(stage).fingerprint(), (stage, neutral)
        assert job(stage, [neutral]).settings() == job(stage).settings()


@pytest.mark.parametrize(
    "stage, change",
    [
        ("teacher_sft", "stages.teacher_sft.lr=1e-4"),
        ("teacher_sft", "data.max_length=112"),
        ("teacher_sft", "seed=8"),
        ("generate", "stages.generate.cache_top_p=0.5"),
        ("distill/bd", "stages.distill.lr=5e-4"),
        ("distill/bd", "stages.generate.cache_max_k=8"),  # distill reads generate's cache
    ],
)
def test_settings_that_change_a_result_change_the_fingerprint(stage, change):
    assert job(stage, [change]).fingerprint() != job(stage).fingerprint()


def test_other_stages_settings_do_not_count():
    assert job("teacher_sft", ["stages.distill.lr=5e-4"]).fingerprint() == job("teacher_sft").fingerprint()


def test_neutral_keys_are_one_list():
    assert provenance.is_neutral("stages.generate.report_examples")
    assert provenance.is_neutral("stages.student_sft.keep_checkpoints")
    assert provenance.is_neutral("tracking.wandb.project")
    assert not provenance.is_neutral("stages.generate.n_samples")
    assert not provenance.is_neutral("stages.teacher_sft.lr")


# --------------------------------------------------------------------------- what changed, in words


def record(**changes) -> dict:
    base = {
        "stage": "generate",
        "settings": {"stages.generate.top_p": 1.0, "stages.generate.n_samples": 8},
        "options": {"score": None},
        "sources": {"mydata.jsonl": "a" * 64},
        "data": 100.0,
        "inputs": {"teacher_sft": {"fingerprint": "f1", "finished_at": 10.0}},
    }
    return {**base, **changes}


def test_differences_name_each_change():
    old = record()
    assert provenance.differences("generate", old, record()) == []
    new = record(
        settings={"stages.generate.top_p": 0.8, "stages.generate.n_samples": 8},
        sources={"mydata.jsonl": "b" * 64},
        inputs={"teacher_sft": {"fingerprint": "f1", "finished_at": 20.0}},
    )
    assert provenance.differences("generate", old, new) == [
        "stages.generate.top_p: 1.0 -> 0.8",
        "data source mydata.jsonl changed",
        "teacher_sft was retrained after generate",
    ]
    assert provenance.differences("generate", old, record(options={"score": "train"})) == [
        "option score: null -> train"
    ]
    assert provenance.differences("distill/bd", record(stage="distill/bd"), record(data=200.0)) == [
        "the data split was made again after distill/bd"
    ]
    remade = record(inputs={"generate": {"fingerprint": "g", "finished_at": 1.0}})
    again = record(inputs={"generate": {"fingerprint": "h", "finished_at": 1.0}})
    assert provenance.differences("distill/bd", remade, again) == ["generate was made again after distill/bd"]


def test_a_record_fingerprint_ignores_when_things_were_made():
    assert provenance.fingerprint(record()) == provenance.fingerprint(record(data=5.0, started_at=9.0))
    retrained_alike = record(inputs={"teacher_sft": {"fingerprint": "f1", "finished_at": 99.0}})
    assert provenance.fingerprint(record()) == provenance.fingerprint(retrained_alike)
    assert provenance.fingerprint(record()) != provenance.fingerprint(record(options={"score": "train"}))


# --------------------------------------------------------------------------- which stages a stage reads


def test_inputs_of_each_stage():
    recipe, _ = load_recipe(SMOKE)
    assert inputs_of(recipe, "teacher_sft") == ()
    assert inputs_of(recipe, "generate") == ("teacher_sft",)
    assert inputs_of(recipe, "score_train") == ("teacher_sft",)
    assert inputs_of(recipe, "distill/bd") == ("generate", "student_sft")
    assert inputs_of(recipe, "distill/bd-p0.5") == ("generate", "student_sft")
    assert inputs_of(recipe, "distill/kd") == ("score_train",)
    assert inputs_of(recipe, "distill/minillm") == ("teacher_sft", "student_sft")
    assert inputs_of(recipe, "judge") == ("eval",)
    assert set(inputs_of(recipe, "eval")) == set(recipe.stages.eval.models) & {
        "teacher_sft", "student_sft", "distill/bd", "distill/bd-p0.5", "distill/kd", "distill/seqkd", "distill/minillm"
    }  # fmt: skip
    live, _ = load_recipe(SMOKE, ["stages.distill.teacher_source=live"])
    assert inputs_of(live, "distill/kd") == ("teacher_sft",)  # the live teacher, not the scored cache
    path, _ = load_recipe(SMOKE, ["stages.generate.model=/models/teacher"])
    assert inputs_of(path, "generate") == ()  # a path's identity is its setting


# --------------------------------------------------------------------------- a data file edited in place


def test_an_edited_data_file_is_refused_then_remade_with_force(tmp_path):
    from bdctl.data.prepare import prepare_data, stale_data
    from bdctl.data.synthetic import synthetic_instructions

    data = tmp_path / "mydata.jsonl"
    rows = synthetic_instructions(120, seed=3)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe_file = write_recipe(
        tmp_path / "r.yaml", data__source={"path": str(data)}, data__split={"valid": 8, "test": 8, "seed": 1}
    )
    recipe, _ = load_recipe(str(recipe_file))
    run = RunDir(tmp_path / "runs/smoke")
    prepare_data(recipe, run, log=lambda *_: None)
    first = json.loads((run.data / "MANIFEST.json").read_text())
    assert first["sources"] == {str(data): provenance.file_digest(data)}
    assert stale_data(recipe, run) is None

    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:100]))  # same settings, other contents
    assert stale_data(recipe, run) == f"data source {data} changed since it was prepared"
    with pytest.raises(UserError, match=f"data source {data} changed since it was prepared; pass --force"):
        prepare_data(recipe, run, log=lambda *_: None)
    assert json.loads((run.data / "MANIFEST.json").read_text()) == first  # refused: nothing was touched

    remade = prepare_data(recipe, run, log=lambda *_: None, remake=True)
    assert sum(remade.counts.values()) < sum(first["counts"].values())
    assert stale_data(recipe, run) is None
    # a stage made from the old split now says so
    made = {"data": first["finished_at"], "sources": first["sources"], "inputs": {}}
    assert provenance.remade_inputs(run.root, "teacher_sft", made) == [
        "the data split was made again after teacher_sft",
        f"data source {data} changed",
    ]


# --------------------------------------------------------------------------- finished stages, by hand


def finish(run: Path, stage_name: str, overrides: list[str] = (), **options) -> dict:
    """A finished stage as bdctl leaves it: a manifest stamped with the record its command makes."""
    from bdctl.reproduce import stage_job
    from bdctl.submit import made_from

    stage = next(s for s in stages(load_recipe(SMOKE)[0]) if s.directory == stage_name)
    planned = stage_job(stage, SMOKE, list(overrides))
    planned.run_root = str(run)
    made = made_from(planned)
    (run / stage_name).mkdir(parents=True, exist_ok=True)
    (run / stage_name / "job.json").write_text(json.dumps({"recipe_path": SMOKE, "stage_name": stage_name}))
    (run / stage_name / "export.bin").write_bytes(b"x" * 1000)
    mark_complete(run / stage_name, made_from=made)
    return made


@pytest.fixture
def finished_run(tmp_path, monkeypatch) -> Path:
    """teacher_sft, generate and student_sft finished under the smoke recipe, in tmp/runs/smoke."""
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs/smoke"
    for name in ("teacher_sft", "generate", "student_sft"):
        finish(run, name)
    return run


def test_a_finished_stage_with_other_settings_is_refused_not_reused(finished_run):
    from bdctl.submit import submit

    logged = []
    kept = submit("sft", SMOKE, [], {"model": "teacher"}, LaunchOptions(), log=logged.append)
    assert kept is not None and "already complete" in logged[-1]
    neutral = ["stages.teacher_sft.keep_checkpoints=7", "tracking.report_to=[]"]
    submit("sft", SMOKE, neutral, {"model": "teacher"}, LaunchOptions(), log=logged.append)
    assert "already complete" in logged[-1]
    with pytest.raises(UserError) as error:
        submit("sft", SMOKE, ["stages.teacher_sft.lr=1e-4"], {"model": "teacher"}, LaunchOptions(), log=print)
    assert str(error.value) == (
        "runs/smoke/teacher_sft is finished but was made from something else: stages.teacher_sft.lr: 0.003 -> "
        "0.0001; pass --force to redo it (its old result is replaced), or use another name / run_dir to keep both"
    )
    assert (finished_run / "teacher_sft/export.bin").is_file()  # nothing destroyed


def test_a_retrained_teacher_makes_generate_stale(finished_run):
    from bdctl.submit import submit

    finish(finished_run, "teacher_sft")  # retrained (same settings, a new finish)
    with pytest.raises(UserError, match="generate is finished but was made from something else: teacher_sft was "
                                        "retrained after generate; pass --force"):  # fmt: skip
        submit("generate", SMOKE, [], {"score": None}, LaunchOptions(), log=print)


def test_runs_shows_stale_stages_and_disk(finished_run):
    from bdctl.cli import app

    finish(finished_run, "teacher_sft")
    # distill/bd made from the (now stale) generate
    finish(finished_run, "distill/bd")
    result = CliRunner().invoke(app, ["runs", str(finished_run), "--json"])
    assert result.exit_code == 0, result.output
    found = {s["stage"]: s for s in json.loads(result.output)[0]["stages"]}
    assert found["teacher_sft"]["state"] == "finished" and found["student_sft"]["state"] == "finished"
    assert found["generate"]["state"] == "stale"
    assert found["generate"]["detail"].startswith("teacher_sft was retrained after generate")
    assert found["distill/bd"]["state"] == "stale"
    assert found["distill/bd"]["detail"].startswith("generate is stale (teacher_sft was retrained after generate)")
    assert all(s["disk_bytes"] > 1000 for s in found.values())  # the export stand-in, the manifest, job.json
    table = CliRunner().invoke(app, ["runs", str(finished_run)], env={"COLUMNS": "250"})
    assert "stale" in table.output and " KB " in table.output


def test_reproduce_plans_every_stage_downstream_of_a_change(finished_run):
    from bdctl.reproduce import plan_states, reproduce

    recipe, _ = load_recipe(SMOKE)
    states = {p.stage.directory: p for p in plan_states(SMOKE, [], stages(recipe), RunDir("runs/smoke"), recipe)}
    assert [states[n].state for n in ("teacher_sft", "generate", "student_sft", "distill/bd")] == [
        "skip", "skip", "skip", "run"
    ]  # fmt: skip

    change = ["stages.teacher_sft.lr=1e-4"]
    changed, _ = load_recipe(SMOKE, change)
    states = {p.stage.directory: p for p in plan_states(SMOKE, change, stages(changed), RunDir("runs/smoke"), changed)}
    assert states["teacher_sft"].state == "stale"
    assert states["teacher_sft"].reasons == ["stages.teacher_sft.lr: 0.003 -> 0.0001"]
    assert states["generate"].state == "stale" and states["generate"].reasons == ["teacher_sft is redone first"]
    assert states["student_sft"].state == "skip"  # not downstream of the teacher

    logged: list[str] = []
    with pytest.raises(UserError) as error:
        reproduce(SMOKE, change, [], None, None, dry_run=False, log=logged.append)
    assert str(error.value).startswith(
        "finished stages of runs/smoke are stale for this recipe: teacher_sft (stages.teacher_sft.lr: 0.003 -> "
        "0.0001), generate (teacher_sft is redone first)"
    )
    assert "pass --force to redo them" in str(error.value) and logged == []  # nothing ran
    assert not (finished_run / "report.md").exists()

    reproduce(SMOKE, change, [], None, None, dry_run=True, log=logged.append)
    text = "\n".join(logged)
    assert "stale[/] teacher_sft: stages.teacher_sft.lr: 0.003 -> 0.0001" in text
    assert "bdctl sft" in text and "--force" in text.split("teacher_sft: bdctl sft")[1].splitlines()[0]
    assert "skip[/] student_sft" in text
    assert "reproduce redoes them only with --force" in text

    with pytest.raises(UserError, match="teacher_sft must be redone before generate"):
        reproduce(SMOKE, change, [], "generate", None, dry_run=False, log=logged.append)


def test_no_stage_is_made_from_a_stale_one(finished_run):
    from bdctl.submit import require_fresh_inputs

    bd = job("distill/bd", ["stages.distill.method=bd"], {"method": "bd"}, root=str(finished_run))
    require_fresh_inputs(bd)  # generate and student_sft are current
    finish(finished_run, "teacher_sft")  # retrained: generate, made from the old teacher, is stale
    with pytest.raises(UserError) as error:
        require_fresh_inputs(bd)
    assert str(error.value) == (
        f"{finished_run}/generate is stale (teacher_sft was retrained after generate); redo it first: "
        f"bdctl generate {SMOKE} --force"
    )
