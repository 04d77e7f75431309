"""`bdctl eval`: Rouge-L of one or more models on the recipe's evaluation sets, over seeds.

docs/method.md §8: every prompt of a set is answered once per seed and sampling protocol
(stages.eval.protocols: a name, temperature, top_p and top_k each; optionally MiniLLM's
no_repeat_ngram_size); each answer is scored with Rouge-L against its references
(`bdctl.metrics.rouge_l`); a model's score on a set for one seed is the mean over prompts, and
the tables report the mean ± std over the seeds, one table per protocol. Every model is sampled
under every protocol, so two numbers are only ever compared under the same one. A training stage
that kept a best export per protocol (select_each_protocol) is scored under each protocol with the
export chosen under it (its manifest's best_per_protocol); otherwise with its one export.

The work is cut into units, one per (model, protocol, eval set, seed), each stored on its own:

    eval/
      sets/<set>.jsonl                               the set as evaluated: id, instruction, input,
                                                     prompt, references
      generations/<model>/<protocol>/<set>/seed<S>.jsonl      one line per prompt: model, protocol,
                                                     set, seed, prompt_id, text, rouge_l, finish_reason, tokens
      generations/<model>/<protocol>/<set>/seed<S>.done.json  the unit's manifest: fingerprint,
                                                     count, mean Rouge-L, sha256 of the JSONL; written second
      results.json table.md table.csv               the models, protocols, sets and seeds of the latest command
      MANIFEST.json                                  written last

Reuse. A unit counts as finished only when its `.done.json` exists, names the unit's current
fingerprint (everything that decides its text: the weights' identity, the tokenizer, the set's
content, the seed, the sampling settings, precision and batch size) and the hash of its JSONL.
Both files are written atomically, the JSONL first, so an interrupted run leaves only finished
units. `bdctl eval` never deletes a unit: a rerun, with the same or more models, generates only
the units that are missing or stale (their model was retrained, the set or a setting changed),
and `--force` regenerates the requested ones. Because the stage directory keeps growing, its
MANIFEST.json means "results.json and the tables are finished for the models, sets and seeds the
manifest lists": it is removed when a command starts and written when that command's results are.
`bdctl judge` reads (and, if asked, adds) units directly, through the same functions.

Ranks. Each rank holds a whole copy of the model (generation needs no ZeRO partitioning, hence no
collectives but the final gather). A set's prompts are cut into length-grouped batches once, the
same for every world size, and rank r takes batches r, r + W, r + 2W, ...; each prompt's random
numbers come from a seed derived from (seed, prompt id). A prompt is therefore sampled in the same
batch with the same random numbers whatever the number of ranks, and the generations do not
depend on it. Rank 0 gathers the answers (`torch.distributed.gather_object`) and writes each unit,
then the results.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bdctl.answers import protocol_label
from bdctl.errors import UserError
from bdctl.evalunits import EVAL_STAGE, generate_units, plan_units, unit_done, unit_paths
from bdctl.job import Job
from bdctl.recipe.schema import EvalStage
from bdctl.rundir import MANIFEST, PREEMPT, manifest, mark_complete, write_json_atomic, write_text_atomic

STAGE = EVAL_STAGE


def stage_dir(options: dict) -> str:
    return STAGE


def stage_config(job: Job) -> EvalStage:
    return job.recipe.stages.eval


# --------------------------------------------------------------------------- the launching process
# `bdctl.submit` runs eval like any stage, with these hooks: a finished eval/ is run again (it
# reuses its finished units), and nothing in it is wiped at the start (units are kept across commands).

REUSES_FINISHED = True


def prepare(job: Job, log: Callable[[str], None] = print) -> None:
    """Launching process: resolve models, load and check the sets, plan the units.

    Fills job.info with everything the ranks need (models, sets, units), so that no rank
    resolves a name or reads a hub data set on its own.
    """
    config = stage_config(job)
    refs = list(dict.fromkeys(job.options.get("models") or config.models))
    if not refs:
        raise UserError("stages.eval.models is empty; name a model with --model")
    from bdctl.models import check_attention, role_of

    for role in dict.fromkeys(role_of(ref) for ref in refs):
        check_attention(getattr(job.recipe.models, role), role)
    job.info.update(plan_units(job, refs, config.sets, config.seeds, log))
    harness = job.options.get("harness")
    if harness:  # the tasks exist, before any model is loaded (beyond the paper: bdctl.harness)
        from bdctl.harness import task_manager

        task_manager(harness["tasks"], harness.get("include"))


def begin(job: Job, force: bool, log: Callable[[str], None]) -> bool:
    """Which units to generate (missing or stale ones; --force: all); whether the ranks have any."""
    units = job.info["units"]
    todo = [unit for unit in units if force or not unit_done(job.stage_dir, unit)]
    job.info["todo"] = todo
    # From here until write_results the directory's results are being replaced.
    (job.stage_dir / MANIFEST).unlink(missing_ok=True)
    log(f"eval: {len(units)} (model, set, seed) results: {len(units) - len(todo)} reused, {len(todo)} to generate")
    harness = job.options.get("harness")
    if harness:
        # Here, in the launching process, once: lm-eval runs its own batches on one device and
        # needs no rank; rank 0 writes its scores with the results (job.info travels in job.json).
        from bdctl.harness import run_harness

        log(f"eval: lm-evaluation-harness on {len(job.info['models'])} model(s): {', '.join(harness['tasks'])}")
        job.info["harness"] = run_harness(job.info, harness, job.stage_dir, job.recipe.seed)
    return bool(todo)


def finish_without_ranks(job: Job) -> None:
    write_results(job)  # nothing to generate: no rank needs to start


# --------------------------------------------------------------------------- every rank


def run(job: Job, rank: int, world: int) -> None:
    """Every rank: generate its share of the missing units; rank 0 writes them and the results."""
    import torch.distributed as dist

    from bdctl.tracking import StepProgress

    info = job.info
    todo = info["todo"]
    # Rank 0's own share of prompts (the bar's total): every world-th length-grouped batch.
    batch_size = info["settings"]["batch_size"]
    sizes = {s["name"]: s["examples"] for s in info["sets"]}
    mine = sum(_share(sizes[u["set"]], batch_size, 0, world) for u in todo)
    with StepProgress("eval", mine, enabled=rank == 0) as progress:
        generate_units(job.stage_dir, info, todo, rank, world, job.recipe.seed, progress, job.stage_dir / PREEMPT)
    if world > 1:
        dist.barrier()
    if rank == 0:
        write_results(job)


def _share(n: int, batch_size: int, rank: int, world: int) -> int:
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return sum(sizes[rank::world])


# --------------------------------------------------------------------------- results


def results_table(results: dict[str, Any], protocol: str) -> tuple[list[str], list[list[Any]]]:
    """One protocol's table: models as rows, sets as columns, "mean ± std" over seeds (Table 1)."""
    from bdctl.tables import mean_std_cell

    headers = ["model"] + list(results["sets"])
    scores = results["scores"][protocol]
    rows = [
        [model] + [mean_std_cell(scores[model][s]["mean"], scores[model][s]["std"]) for s in results["sets"]]
        for model in results["models"]
    ]
    return headers, rows


def write_results(job: Job) -> dict[str, Any]:
    """results.json, table.md, table.csv from the finished units, then the MANIFEST."""
    from bdctl.metrics import mean_std
    from bdctl.tables import csv_table, markdown_table

    info, out = job.info, job.stage_dir
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for protocol in info["protocols"]:
        by_model = scores[protocol["name"]] = {}
        for model in info["models"]:
            by_model[model["ref"]] = {}
            for set_info in info["sets"]:
                per_seed, weights = {}, None
                for unit in info["units"]:
                    if (unit["model"], unit["protocol"], unit["set"]) == (
                        model["name"],
                        protocol["name"],
                        set_info["name"],
                    ):
                        done = unit_done(out, unit)
                        if done is None:
                            raise UserError(
                                f"{unit_paths(out, unit)[0]}: missing after generation; run the command again"
                            )
                        per_seed[str(unit["seed"])] = done["rouge_l"]
                        weights = unit["weights"]
                mean, std = mean_std(list(per_seed.values()))
                by_model[model["ref"]][set_info["name"]] = {
                    "mean": mean, "std": std, "per_seed": per_seed, "prompts": set_info["examples"], "weights": weights,
                }  # fmt: skip
    results = {
        "metric": "rouge_l",
        "models": [m["ref"] for m in info["models"]],
        "model_dirs": {m["ref"]: m["name"] for m in info["models"]},
        "protocols": info["protocols"],
        "sets": [s["name"] for s in info["sets"]],
        "seeds": info["seeds"],
        "settings": info["settings"],
        "scores": scores,
        **({"harness": info["harness"]} if info.get("harness") else {}),
        "units": {
            "total": len(info["units"]),
            "generated": len(info["todo"]),
            "reused": len(info["units"]) - len(info["todo"]),
        },
    }
    write_json_atomic(out / "results.json", results)
    blocks = []
    for protocol in info["protocols"]:
        headers, rows = results_table(results, protocol["name"])
        blocks.append(f"### Protocol {protocol_label(protocol)}\n\n{markdown_table(headers, rows).strip()}\n")
    if info.get("harness"):
        from bdctl.harness import harness_table

        headers, rows = harness_table(info["harness"], results["models"])
        blocks.append(f"### lm-evaluation-harness (beyond the paper)\n\n{markdown_table(headers, rows).strip()}\n")
    write_text_atomic(out / "table.md", "\n".join(blocks))
    csv_headers = ["protocol", "model"] + [f"{s}_{stat}" for s in results["sets"] for stat in ("mean", "std")]
    csv_rows = [
        [p["name"], m] + [scores[p["name"]][m][s][stat] for s in results["sets"] for stat in ("mean", "std")]
        for p in info["protocols"]
        for m in results["models"]
    ]
    write_text_atomic(out / "table.csv", csv_table(csv_headers, csv_rows))
    update_model_cards(job, results)
    mark_complete(
        out, stage=STAGE, models=results["models"], protocols=[p["name"] for p in info["protocols"]],
        sets=results["sets"], seeds=results["seeds"], results="results.json",
    )  # fmt: skip
    return results


def update_model_cards(job: Job, results: dict[str, Any]) -> None:
    """Rewrite the model card of every stage export this command scored, with its test scores per
    protocol (those sampled with that very directory: export/, or export-<protocol>/)."""
    from bdctl.engine import write_model_card

    for model in job.info["models"]:
        if model["kind"] != "stage":
            continue
        stage = job.run.stage(model["ref"])
        stage_facts = manifest(stage)
        exports = [
            stage / "export",
            *(stage / kept["export"] for kept in (stage_facts or {}).get("best_per_protocol", {}).values()),
        ]
        for export in exports:
            info = manifest(export)
            if info is None:
                continue
            test = {}  # protocol -> set -> {mean, std, per_seed}: the units sampled with this directory
            for protocol, per_model in results["scores"].items():
                sets = {
                    name: entry for name, entry in per_model[model["ref"]].items() if entry["weights"] == str(export)
                }
                if sets:
                    test[protocol] = sets
            write_model_card(stage, export, info, stage_facts, test)
