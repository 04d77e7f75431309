"""What a Bellman Distill step costs next to an SFT step, on a GPT-2-shaped student (issue 4's targets).

    python benchmarks/bench_distill.py                          # all configurations, a table and the ratios
    python benchmarks/bench_distill.py --layers 4 --hidden 512 --seq 256 --micro 4 --out bench.json

One student (randomly initialised GPT-2 architecture built from a config, vocabulary 50257), one batch of
random token sequences (prompt + response, a quarter of the responses truncated, the rest ending in EOS) and a
synthetic top-p candidate set per response position (sizes drawn to mean about 6, capped at 64, the action inside
it nine times in ten, like a p = 0.8 cache of a real teacher). Every configuration runs in its own process
through the real training path: a DeepSpeed ZeRO-3 engine on one rank (CPU here), `policy_module`, and the
distill stage's own loss heads (`bdctl.stages.distill`), then `engine.backward` and `engine.step`. Each process
takes one warm-up step and then one measured optimizer step on the same batch.

    sft          lean_cross_entropy on the response tokens (what `bdctl sft` runs)
    bd           BD paper variant from the cache (bellman_lean.lean_terms), pretraining term off
    bd_pt        bd + the pretraining term: a second forward/backward on a block batch of the same shape
    bd_live      bd with the live teacher (a ZeRO-3 inference engine, 2x the student's layers) recomputing the
                 top-p sets every step, as the published code does
    bd_dense     bd from full [B, T, V] logits (bellman.dense_terms)
    released     the released variant, chunked (bellman_lean.released_lean_terms)
    released_dense  the released variant from full logits

Time: wall clock of the measured step (forward, backward, optimizer step). Peak memory: the process's resident
set size sampled every millisecond by a thread during the measured step, minus its size just before the step
(glibc is told to serve large blocks with mmap, MALLOC_MMAP_THRESHOLD_, so freed tensors leave the RSS at once).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

CONFIGS = ("sft", "bd", "bd_pt", "bd_live", "bd_dense", "released", "released_dense")


class PeakRSS:
    """Peak resident set size (bytes) above the level at start, sampled by a thread."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def synthetic_batch(args, generator):
    """Random sequences and candidate sets, collated by the stage's own collate_examples."""
    import numpy as np

    from bdctl.distill_data import collate_examples
    from bdctl.topp import Capture

    rng = np.random.default_rng(args.seed)
    eos, pad = args.vocab - 1, 0
    examples = []
    for b in range(args.micro):
        prompt = rng.integers(1, args.vocab - 1, size=args.prompt).tolist()
        response = rng.integers(1, args.vocab - 1, size=args.seq - args.prompt)
        if b % 4 != 3:  # three in four end in EOS, the others are truncated
            response[-1] = eos
        kept = np.minimum(1 + rng.geometric(1 / 6, size=len(response)) - 1, args.k).clip(1)
        sets = []
        for t, k in enumerate(kept):
            members = rng.choice(args.vocab, size=k, replace=False)
            if rng.random() < 0.9 and response[t] not in members:
                members[0] = response[t]
            sets.append(members)
        ids = np.concatenate(sets).astype(np.int32)
        capture = Capture(
            ids=ids,
            probs=np.full(len(ids), 0.1, np.float32),
            kept=kept.astype(np.int32),
            covered=np.full(len(kept), 0.8, np.float32),
        )
        examples.append((prompt, response.astype(np.int64), capture))
    return collate_examples(examples, pad, eos, with_sets=True)


def run_one(args) -> dict:
    """One configuration in this process: engine(s), a warm-up step, one measured step."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from bdctl.engine import (
        deepspeed_config,
        hf_deepspeed_context,
        init_distributed,
        lr_factor,
        make_engine,
        make_inference_engine,
        policy_module,
        quiet_libraries,
    )  # fmt: skip
    from bdctl.objectives.lm import IGNORE_INDEX, lean_cross_entropy
    from bdctl.recipe import load_recipe
    from bdctl.recipe.schema import DistillStage
    from bdctl.stages.distill import bd_terms, frame_sets, pretrain_loss, response_hidden, scored_rows
    from bdctl.topp import teacher_sets

    quiet_libraries()
    init_distributed()
    torch.manual_seed(args.seed)
    recipe, _ = load_recipe("smoke")
    config = DistillStage(
        batch_size=args.micro, micro_batch_size=args.micro, lr=1e-5, p=0.8,
        variant="released" if args.config.startswith("released") else "paper",
    )  # fmt: skip
    ds_config = deepspeed_config(recipe, config, "bench", 1, 10, args.hidden, "fp32", False)

    def gpt2(layers):
        return GPT2Config(
            vocab_size=args.vocab, n_layer=layers, n_embd=args.hidden, n_head=args.hidden // 64, n_positions=args.seq,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip

    with_ds = hf_deepspeed_context(ds_config)  # noqa: F841
    engine = make_engine(
        policy_module(AutoModelForCausalLM.from_config(gpt2(args.layers))), ds_config, lr_factor("linear", 10, 0)
    )
    teacher = None
    if args.config == "bd_live":
        teacher = make_inference_engine(
            policy_module(AutoModelForCausalLM.from_config(gpt2(2 * args.layers))), ds_config
        )
    batch = synthetic_batch(args, None)
    if args.config == "bd_live":  # the sets come from the teacher, not the cache
        del batch["cand_ids"], batch["cand_mask"]
    blocks = torch.randint(0, args.vocab, (args.micro, args.seq), generator=torch.Generator().manual_seed(1))
    valid = batch["valid"]
    labels_full = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for b in range(args.micro):  # SFT's labels: position j predicts token j + 1, response tokens only
        n = int(valid[b].sum())
        labels_full[b, batch["positions"][b, :n]] = batch["actions"][b, :n]

    def step():
        inputs = dict(batch)
        if args.config == "sft":
            loss = engine(
                inputs["input_ids"],
                inputs["attention_mask"],
                loss_fn=lambda h, w: lean_cross_entropy(h, w, labels_full),
            )
        else:
            if teacher is not None:
                with torch.no_grad():
                    found = teacher(
                        inputs["input_ids"], inputs["attention_mask"],
                        loss_fn=lambda h, w: teacher_sets(
                            scored_rows(response_hidden(h, inputs["positions"]), valid), w, 0.8, args.k),
                    )  # fmt: skip
                inputs["cand_ids"], inputs["cand_mask"] = frame_sets(valid, *found)
            dense = args.config.endswith("dense")
            loss = engine(
                inputs["input_ids"],
                inputs["attention_mask"],
                loss_fn=lambda h, w: bd_terms(h, w, inputs, config, dense).loss,
            )
            if args.config == "bd_pt":
                loss = loss + engine(blocks, torch.ones_like(blocks), loss_fn=lambda h, w: pretrain_loss(h, w, blocks))
        engine.backward(loss)
        engine.step()
        return float(loss)

    step()  # warm-up: DeepSpeed's first-step set-up and the optimizer states
    with PeakRSS() as memory:
        started = time.perf_counter()
        value = step()
        seconds = time.perf_counter() - started
    return {"config": args.config, "seconds": seconds, "peak_mib": memory.delta / 2**20, "loss": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=256, help="prompt + response tokens per sequence")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--micro", type=int, default=4, help="sequences per step")
    parser.add_argument("--k", type=int, default=64, help="cap on the candidate set size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one configuration
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    if args.config:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    shape = {k: getattr(args, k) for k in ("layers", "hidden", "vocab", "seq", "prompt", "micro", "k", "seed")}
    print(
        f"student: GPT-2 {args.layers} layers, hidden {args.hidden}, vocabulary {args.vocab}; "
        f"batch {args.micro} x {args.seq} tokens"
    )
    results = {}
    for name in args.configs.split(","):
        command = [sys.executable, __file__, "--config", name, *[f"--{k}={v}" for k, v in shape.items()]]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{name}: failed\n{done.stderr[-3000:]}")
            continue
        results[name] = json.loads(line[7:])
        print(
            f"{name:15s} {results[name]['seconds']:8.2f} s  {results[name]['peak_mib']:9.1f} MiB peak above the "
            f"step's start  loss {results[name]['loss']:.4g}"
        )

    def ratio(a, b, key):
        return results[a][key] / results[b][key] if a in results and b in results and results[b][key] else float("nan")

    report = {
        "bd / sft": ("bd", "sft", "time <= 1.10, memory <= 1.05"),
        "bd_pt / sft": ("bd_pt", "sft", "reported"),
        "bd_pt / bd": ("bd_pt", "bd", "reported"),
        "bd_live / bd": ("bd_live", "bd", "reported"),
        "bd_dense / bd (dense vs lean)": ("bd_dense", "bd", "reported"),
        "released_dense / released": ("released_dense", "released", "reported"),
    }
    print("\nratios            time    peak memory   target")
    summary = {}
    for label, (a, b, target) in report.items():
        t, m = ratio(a, b, "seconds"), ratio(a, b, "peak_mib")
        summary[label] = {"time": t, "memory": m}
        print(f"{label:30s} {t:6.2f}x  {m:6.2f}x   {target}")
    if args.out:
        args.out.write_text(json.dumps({"shape": shape, "results": results, "ratios": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
