"""Model cards: the README.md of every Hugging Face directory a training stage exports (best/,
export/, export-<protocol>/), in the form the Hugging Face hub shows: YAML front matter
(library_name, base_model when it is a hub id, tags, pipeline_tag, and the measured scores as a
`model-index`), then Markdown: the models, the method and its settings, the data, the scores
measured so far (validation at the kept step; test once `bdctl eval` has run), the command that
made it and bdctl's version.

Pure: `card_facts` turns what a stage directory records (job.json's payload, the stage's facts,
the export's info, eval's scores) into `CardFacts`, and `render_card` turns those into text.
Reading and writing files is `bdctl.engine.write_model_card`'s part.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from typing import Any

import yaml

from bdctl.methods import METHODS

BEYOND_PAPER = "beyond the paper"
METHOD_NAMES = {
    "sft": "supervised fine-tuning (response tokens only)",
    **{
        name: method.summary + ("" if method.in_paper else f" ({BEYOND_PAPER}: docs/method.md §5.1)")
        for name, method in METHODS.items()
    },
}
# The settings of each method the card lists (recipe keys of stages.distill; sft: of its stage).
_TRAIN_KEYS = (
    "lr", "epochs", "max_steps", "batch_size", "warmup_ratio", "warmup_steps", "schedule", "schedule_steps",
    "adam_betas", "weight_decay", "select",
)  # fmt: skip
_METHOD_KEYS = {name: method.card_keys for name, method in METHODS.items()}
# Whose keys the command's --set list leaves out: the CLI sets them itself (--method, --ablation).
CLI_SET_KEYS = ("stages.distill.method", "stages.distill.ablations")


@dataclass(frozen=True)
class Score:
    """One measured number: what it is, on which data, under which sampling protocol."""

    metric: str  # "loss" or "rouge"
    name: str  # e.g. "validation loss", "Rouge-L"
    value: float
    dataset: str  # the data set's hub id or path (dataset_id), e.g. "databricks/databricks-dolly-15k"
    split: str  # "validation" or "test"
    protocol: str | None = None  # protocol label (sampled scores only)
    detail: str = ""  # e.g. "mean ± std over seeds [10, 20]: 23.10 ± 0.40"
    set_name: str = ""  # the eval set's name in bdctl's tables (dolly, selfinst, ...), when not the id


@dataclass(frozen=True)
class CardFacts:
    title: str  # e.g. "smoke: distill/bd"
    directory: str  # export, export-release, best
    version: str
    method: str  # sft, bd, kd, seqkd, minillm
    role: str  # what the model is: "student" or "teacher"
    base_model: str  # what the weights started from, in words
    base_model_id: str | None  # a hub id for the front matter, when known
    teacher: str | None
    settings: list[tuple[str, str]]  # (setting, value), value marked when beyond the paper
    notes: list[str]  # the run's own description of what it did
    data: list[str]
    validation: list[Score]
    validation_step: int | None
    selected_by: str  # the validation score that kept this checkpoint, e.g. "rouge_l, protocol release"
    test: list[Score]
    command: str
    recipe_path: str  # the recipe file the stage ran (job.json), for the commands the card suggests
    tags: list[str] = field(default_factory=list)
    license: str | None = None  # the base model's, when its card or config says
    language: list[str] = field(default_factory=list)  # the base model's card's, when it says
    datasets: list[str] = field(default_factory=list)  # hub ids or local paths the model was trained on


# --------------------------------------------------------------------------- facts


def _describe_spec(spec: dict[str, Any], built: dict[str, Any] | None = None) -> str:
    """The model a spec names, in words; `built`: the manifest of the directory a gguf or
    from_teacher spec was built into (models.build_models), for its source, choice and size."""
    built = built or {}
    source = built.get("source") or {}
    sha = f", sha256 {source['sha256'][:12]}" if source.get("sha256") else ""
    if spec.get("gguf"):
        arch = f" {built['architecture']}" if built.get("architecture") else ""
        return f"the GGUF file {spec['gguf']} ({arch.strip() or 'model'}{sha}, dequantised to float32)"
    if spec.get("from_teacher"):
        choice = spec["from_teacher"]
        layers = built.get("layers") or choice.get("layers") or f"{choice['keep']} chosen {choice.get('how') or 'even'}"
        of = f" of {built['teacher_layers']}" if built.get("teacher_layers") else ""
        size = f", {built['parameters']:,} parameters" if built.get("parameters") else ""
        return (
            f"the teacher's layers {layers}{of} with its embeddings, final norm and head{size} (cut from "
            f"{source.get('label', 'the teacher')}{sha}; {BEYOND_PAPER}: DistilBERT-style initialisation)"
        )
    if spec.get("tiny"):
        tiny = spec["tiny"]
        layers = f"{tiny['layers']} layer{'s' if tiny['layers'] > 1 else ''}"
        return f"a randomly initialised tiny {tiny['arch']} ({layers}, hidden {tiny['hidden']})"
    revision = f" (revision {spec['revision']})" if spec.get("revision") else ""
    return f"{spec['path']}{revision}"


def _hub_id(spec: dict[str, Any]) -> str | None:
    """The spec's hub id, for base_model (a local directory or a tiny spec has none)."""
    path = spec.get("path")
    if not path or path.startswith(("/", ".", "~")):
        return None
    return path


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "auto"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def protocol_text(protocol: dict[str, Any]) -> str:
    """ "minillm (temperature 1, top_p 1, top_k 0)", as eval's tables name a protocol."""
    return (
        f"{protocol['name']} (temperature {protocol['temperature']:g}, top_p {protocol['top_p']:g}, "
        f"top_k {protocol['top_k']})"
    )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): node}


def _under(key: str, ignore: tuple[str, ...]) -> bool:
    """Whether a dotted recipe key is one of `ignore` or lies below one."""
    return any(key == skip or key.startswith(skip + ".") for skip in ignore)


def override_flags(overrides: list[str], ignore: tuple[str, ...] = CLI_SET_KEYS) -> list[str]:
    """The command's own `--set key=value` items as options, less the CLI's own keys (`ignore`)."""
    return [f"--set {shlex.quote(item)}" for item in overrides if not _under(item.split("=", 1)[0], ignore)]


def set_flags(
    resolved: dict[str, Any], from_file: dict[str, Any] | None, ignore: tuple[str, ...] = CLI_SET_KEYS
) -> list[str]:
    """The `--set key=value` options that turn the recipe file's values into the resolved recipe
    (keys under `ignore` are the CLI's own, from --method / --ablation), for a job that did not
    record its overrides."""
    if from_file is None:
        return []
    mine, theirs = _flatten(resolved), _flatten(from_file)
    flags = []
    for key in sorted(mine):
        if _under(key, ignore):
            continue
        if key not in theirs or theirs[key] != mine[key]:
            flags.append("--set " + shlex.quote(f"{key}={json.dumps(mine[key])}"))
    return flags


def card_facts(
    job: dict[str, Any],
    directory: str,
    info: dict[str, Any],
    stage_facts: dict[str, Any] | None = None,
    test: dict[str, dict[str, dict[str, Any]]] | None = None,
    *,
    version: str,
    counts: dict[str, Any] | None = None,
    command: str,
    flags: list[str] | None = None,
    built: dict[str, dict[str, Any]] | None = None,
    base_card: dict[str, Any] | None = None,
) -> CardFacts:
    """The facts of one exported directory.

    job: job.json's payload (stage, stage_name, options, recipe as JSON, recipe_path); directory:
    best, export or export-<protocol>; info: the export's info (step, select, val_loss, rouge_l,
    rouge_l@<protocol>); stage_facts: the stage manifest's facts (notes) when known; test: eval's
    scores of this directory, protocol -> set -> {mean, std, per_seed}; counts: data/split.json;
    command: the stage's command (`rundir.stage_command`), flags: its --set options; built: role ->
    the manifest of the model directory a gguf or from_teacher spec was built into; base_card: the
    base model's hub metadata when known (`license`, `language`: its card's front matter or config).
    """
    built = built or {}
    recipe, stage = job["recipe"], job["stage_name"]
    options = job.get("options") or {}
    models, stages = recipe["models"], recipe["stages"]
    if job["stage"] == "sft":
        role = options.get("model", stage.removesuffix("_sft"))
        config, method = stages[stage], "sft"
        base_spec = models[role]
        teacher = None
        settings = [(key, _value(config.get(key))) for key in _TRAIN_KEYS if config.get(key) is not None]
        init = config.get("init", "base")
    else:
        role, config = "student", stages["distill"]
        method = options.get("method") or config["method"]
        base_spec = models["student"]
        generate = stages["generate"]
        teacher_ref = generate["model"]
        teacher = (
            f"{teacher_ref} of this run (the teacher {_describe_spec(models['teacher'], built.get('teacher'))}, "
            "fine-tuned by bdctl sft)"
            if teacher_ref == "teacher_sft"
            else teacher_ref
        )
        settings = [(key, _value(config.get(key))) for key in _TRAIN_KEYS if config.get(key) is not None]
        for key in _METHOD_KEYS.get(method, ()):
            text = _value(config.get(key))
            if key == "anchor_coef" and config.get(key):
                text += f" ({BEYOND_PAPER})"
            if key == "outside" and config.get(key) == "drop":
                text += f" ({BEYOND_PAPER}: the paper's Eq. 17 gives such actions q_min)"
            settings.append((key, text))
        if method == "minillm":
            settings += [(f"minillm.{k}", _value(v)) for k, v in (config.get("minillm") or {}).items() if v is not None]
        if METHODS.get(method) is not None and METHODS[method].divergence is not None:
            divergence = config.get("divergence") or {}
            settings += [(f"divergence.{k}", f"{_value(v)} ({BEYOND_PAPER})") for k, v in divergence.items()]
        if method in ("bd", "seqkd"):
            dstar = config.get("dstar", "generate")
            variant = (
                generate.get("variants", {}).get(dstar.removeprefix("generate-"), {}) if dstar != "generate" else {}
            )
            sampled = {
                k: variant.get(k) if variant.get(k) is not None else generate[k]
                for k in ("n_samples", "temperature", "top_p")
            }
            settings.append(("D*", f"{dstar}: {sampled['n_samples']} teacher samples per prompt, temperature "
                                   f"{sampled['temperature']:g}, top_p {sampled['top_p']:g}"))  # fmt: skip
        init = config.get("init", "auto")
        if init == "auto":
            init = "student_sft" if method == "bd" else "base"
    lora = base_spec.get("lora")
    if lora:  # models.<role>.lora: adapters trained, then merged into the exported weights
        settings.append(("LoRA", _lora_text(lora)))
    base = _describe_spec(base_spec, built.get(role))
    if init != "base":
        base = f"{base}, starting from {init}" + (" of this run" if init.endswith("_sft") else "")

    data = _data_lines(recipe, counts)
    validation, step, selected_by = _validation(recipe, config, info)
    return CardFacts(
        title=f"{recipe['name']}: {stage}",
        directory=directory,
        version=version,
        method=method,
        role=role,
        base_model=base,
        base_model_id=_hub_id(base_spec),
        teacher=teacher,
        settings=settings,
        notes=list((stage_facts or {}).get("notes") or []),
        data=data,
        validation=validation,
        validation_step=step,
        selected_by=selected_by,
        test=_test_scores(recipe, test or {}),
        command=" ".join([command, *(flags or [])]),
        recipe_path=str(job["recipe_path"]),
        tags=[
            "distillation",
            "bdctl",
            method,
            *(["bellman-distill"] if method == "bd" else []),
            *(["lora"] if lora else []),
        ],  # fmt: skip
        license=(base_card or {}).get("license"),
        language=_as_list((base_card or {}).get("language")),
        datasets=[d for d in (_source_id(recipe), _pretrain_id(recipe)) if d],
    )


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _source_id(recipe: dict[str, Any]) -> str | None:
    """The instruction data's id for the hub's `datasets` field: a hub id or a local path (synthetic: none)."""
    source = recipe["data"]["source"]
    return source.get("hub") or source.get("path")


def _pretrain_id(recipe: dict[str, Any]) -> str | None:
    corpus = recipe["data"].get("pretrain") or {}
    return corpus.get("hub") or corpus.get("path")


def dataset_id(recipe: dict[str, Any], set_name: str | None) -> str:
    """What model-index names a score's data set by: the eval set's hub id or path, the instruction
    data's for the run's own splits (validation, and test sets with split:), "synthetic" for bdctl's."""
    sets = {s["name"]: s for s in recipe["stages"].get("eval", {}).get("sets") or []}
    chosen = sets.get(set_name or "") or {}
    return chosen.get("hub") or chosen.get("path") or _source_id(recipe) or "bdctl synthetic instruction tasks"


def _data_lines(recipe: dict[str, Any], counts: dict[str, Any] | None) -> list[str]:
    data = recipe["data"]
    source = data["source"]
    if source.get("synthetic"):
        origin = f"bdctl's synthetic instruction tasks ({source['synthetic']['n']} examples)"
    elif source.get("path"):
        origin = f"the local file {source['path']}"
    else:
        origin = f"the hub data set {source['hub']}" + (
            f" ({source['hub_config']})" if source.get("hub_config") else ""
        )
    lines = [f"instructions: {origin}"]
    if counts:
        lines.append(
            f"split: {counts.get('train')} train / {counts.get('valid')} validation / {counts.get('test')} test "
            "examples "
            f"(seed {data['split']['seed']}; over-long examples dropped: {json.dumps(counts.get('dropped', {}))})"
        )
    template = data.get("template")
    if data.get("format", "instruction") != "instruction":
        lines.append(
            f"conversations (data.format: {data['format']}) in the tokenizer's own chat template: trained on every "
            "assistant turn; sampled, distilled and evaluated on the last assistant turn given the conversation before"
            " it" + (f"; system prompt: {data['system_prompt']!r}" if data.get("system_prompt") else "")
        )
    elif template == "chat":
        lines.append(
            "prompt format: the tokenizer's own chat template (user turn: the instruction, a blank line, the input); "
            "the response is the assistant turn and ends with the template's end-of-turn token"
        )
    elif template:
        lines.append("prompt format: the recipe's own template (data.template)")
    else:
        lines.append("prompt format: bdctl's Alpaca-style template (### Instruction / ### Input / ### Response)")
    lines.append(
        f"lengths: prompts up to {data['max_prompt_length']} tokens, prompt + response up to {data['max_length']}"
    )
    if data.get("pretrain"):
        corpus = data["pretrain"]
        name = "synthetic" if corpus.get("synthetic") else corpus.get("path") or corpus.get("hub")
        lines.append(f"pretraining corpus (for the LM term): {name}, blocks of {corpus['block_size']} tokens")
    return lines


def _protocol(recipe: dict[str, Any], name: str | None) -> dict[str, Any]:
    protocols = recipe["stages"]["eval"]["protocols"]
    return next((p for p in protocols if p["name"] == name), protocols[0])


def _validation(
    recipe: dict[str, Any], config: dict[str, Any], info: dict[str, Any]
) -> tuple[list[Score], int | None, str]:
    """The kept checkpoint's validation scores, its step, and what kept it."""
    split = "validation"
    scores = []
    if isinstance(info.get("val_loss"), (int, float)):
        scores.append(
            Score(
                "loss",
                "validation loss (golden responses, token mean)",
                float(info["val_loss"]),
                dataset_id(recipe, None),
                split,
            )  # fmt: skip
        )
    # rouge_l is the selection protocol's score, rouge_l@<protocol> each protocol's (select_each_protocol)
    chosen = _protocol(recipe, config.get("select_protocol"))["name"]
    rouge: dict[str, float] = {}
    if isinstance(info.get("rouge_l"), (int, float)):
        rouge[chosen] = float(info["rouge_l"])
    for key, value in info.items():
        if key.startswith("rouge_l@") and isinstance(value, (int, float)):
            rouge.setdefault(key.removeprefix("rouge_l@"), float(value))
    detail = f"first {config['select_prompts']} prompts" if config.get("select_prompts") else ""
    for name, value in rouge.items():
        label = protocol_text(_protocol(recipe, name))
        scores.append(Score("rouge", "Rouge-L", value, dataset_id(recipe, None), split, label, detail))
    select = str(info.get("select") or config.get("select") or "")
    if select == "rouge_l":
        select = f"rouge_l, protocol {chosen}"
    elif select.startswith("rouge_l@"):
        select = f"rouge_l, protocol {select.removeprefix('rouge_l@')}"
    step = info.get("step")
    return scores, int(step) if isinstance(step, int) else None, select


def _test_scores(recipe: dict[str, Any], test: dict[str, dict[str, dict[str, Any]]]) -> list[Score]:
    scores = []
    for protocol, sets in test.items():
        label = protocol_text(_protocol(recipe, protocol))
        for name, entry in sets.items():
            seeds = list(entry.get("per_seed", {}))
            detail = f"mean ± std over seeds {', '.join(seeds)}: {entry['mean']:.2f} ± {entry['std']:.2f}"
            scores.append(
                Score("rouge", "Rouge-L", float(entry["mean"]), dataset_id(recipe, name), "test", label, detail, name)
            )
    return scores


# --------------------------------------------------------------------------- text


def _lora_text(lora: dict[str, Any]) -> str:
    adapter = " (also kept alone in adapter/, peft's format)" if lora.get("save_adapter") else ""
    return (
        f"r {lora['r']}, alpha {lora['alpha']:g}, dropout {lora['dropout']:g}, target modules "
        f"{', '.join(lora['target_modules'])}; only the adapters trained, merged into these weights{adapter} "
        f"({BEYOND_PAPER})"
    )


def front_matter(facts: CardFacts) -> dict[str, Any]:
    """The card's YAML metadata (the hub's model card fields: huggingface.co/docs/hub/model-cards)."""
    meta: dict[str, Any] = {"library_name": "transformers"}
    if facts.license:
        meta["license"] = facts.license
    if facts.language:
        meta["language"] = facts.language
    if facts.base_model_id:
        meta["base_model"] = facts.base_model_id
    if facts.datasets:
        meta["datasets"] = facts.datasets
    meta["tags"] = facts.tags
    meta["pipeline_tag"] = "text-generation"
    results = []
    for score in [*facts.validation, *facts.test]:
        name = score.name + (f", protocol {score.protocol}" if score.protocol else "")
        results.append(
            {
                "task": {"type": "text-generation", "name": "Instruction following"},
                "dataset": {"name": score.dataset, "type": score.dataset, "split": score.split},
                "metrics": [{"type": score.metric, "name": name, "value": score.value}],
            }
        )
    if results:
        meta["model-index"] = [{"name": f"{facts.title} ({facts.directory})", "results": results}]
    return meta


def _table(rows: list[tuple[str, str]], headers: tuple[str, str]) -> list[str]:
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    return [f"| {headers[0]} | {headers[1]} |", "|---|---|", *(f"| {cell(a)} | {cell(b)} |" for a, b in rows)]


def render_card(facts: CardFacts) -> str:
    """The README.md text of an exported directory."""
    meta = yaml.safe_dump(front_matter(facts), sort_keys=False, allow_unicode=True).strip()
    lines = [
        "---", meta, "---", "",
        f"# {facts.title} ({facts.directory})", "",
        f"The {facts.role} model of the `{facts.title.split(': ', 1)[1]}` stage of the bdctl recipe "
        f"`{facts.title.split(': ', 1)[0]}`, trained with {METHOD_NAMES.get(facts.method, facts.method)}, "
        f"exported by bdctl {facts.version}.",
        "", "## Models", "",
        *_table([("base model", facts.base_model), *([("teacher", facts.teacher)] if facts.teacher else [])],
                ("", "")),
        "", "## Method and settings", "",
        *_table(facts.settings, ("setting", "value")),
    ]  # fmt: skip
    if facts.notes:
        lines += ["", "What the run did, in its own words:", "", *(f"- {note}" for note in facts.notes)]
    lines += ["", "## Data", "", *(f"- {line}" for line in facts.data), "", "## Scores", ""]
    step = f" at step {facts.validation_step}" if facts.validation_step is not None else ""
    kept = f", kept for the best {facts.selected_by}" if facts.selected_by else ""
    lines += [f"Validation, measured during training{step}{kept}:", ""]
    lines += _table([_score_row(s) for s in facts.validation], ("score", "value")) if facts.validation else ["(none)"]
    lines += ["", "Test (`bdctl eval`):", ""]
    if facts.test:
        lines += _table(
            [(f"{s.set_name or s.dataset}: {s.name}, protocol {s.protocol}", s.detail) for s in facts.test],
            ("score", "value"),
        )
    else:
        lines.append(f"not evaluated yet; `bdctl eval {shlex.quote(facts.recipe_path)}` adds the scores here.")
    lines += [
        "", "## How it was made", "", "```bash", facts.command, "```", "",
        f"bdctl {facts.version}; the resolved recipe (every default filled in) is the stage directory's recipe.yaml.",
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def _score_row(score: Score) -> tuple[str, str]:
    what = score.name + (f", protocol {score.protocol}" if score.protocol else "")
    return what + (f" ({score.detail})" if score.detail else ""), f"{score.value:.4f}"


def parse_front_matter(text: str) -> dict[str, Any]:
    """The YAML metadata of a card (between the first two `---` lines)."""
    if not text.startswith("---\n"):
        return {}
    end = text.index("\n---\n", 4)
    loaded = yaml.safe_load(text[4:end])
    return loaded if isinstance(loaded, dict) else {}
