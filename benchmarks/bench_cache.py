"""Benchmark of the sparse teacher cache's formats: format 2 (compact, the default) against format 1.

One run, one set of teacher samples, both formats written from the same captures:

(a) bytes per generated token (the manifest's, index included), target <= 96 at a mean top-p set
    size |A_t| of about 25;
(b) read throughput, tokens/s, format 2 against format 1, target >= 0.9x. Three read paths, every
    example once per pass in a shuffled order (as the distill stage's loader visits them), in
    batches of 8, files in the page cache (decoding is measured, not the disk):
      - ``loader``: the distill stage's own data path, `TrainData.example` and `collate_examples`
        with the sets (what training reads);
      - ``collate``: ``cache[i]`` and `collate_candidates`, the candidate tensors alone;
      - ``decode``: ``cache[i]`` and its ids and probabilities as int64 / float32 arrays, no
        collation (the cache's own cost, format 1 being nearly free memory-map views).
    The two formats alternate batch by batch (which goes first flips every batch), so load from
    other jobs on a shared machine falls on both alike; a pass's ratio is format-1 time / format-2
    time summed over its batches, and the median and spread (min, max) over ``--repeats`` passes are
    reported, from CPU time of this process (less disturbed by other load) and from wall time;
(c) KD (sparse dense reference and lean) and BD (dense and lean) losses of a random student from
    the format-2 batches against the format-1 ones and against the exact float32 probabilities.

The teacher is bench_generate's tiny GPT-2 (4 layers, hidden 128) with its output embedding scaled
by ``--peak``; 15.2 gives a mean |A_t| of about 25 at p = 0.8 on vocabulary 2000 (a real 135M
instruct model had 25.7, issue 16). Token ids take 2 bytes in both vocabularies (2000 and that
model's 49152), so the sizes carry over; the top-1 probability is reported because the log-code
escapes (format 2) depend on the shape of the distribution, not only on |A_t|.

    python benchmarks/bench_cache.py --out benchmarks/results/cache.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import build_teacher  # noqa: E402

from bdctl.cache import CacheWriter, TeacherCache, collate_candidates, finalize  # noqa: E402
from bdctl.distill_data import Item, TrainData, collate_examples  # noqa: E402
from bdctl.sampling import Sample, length_grouped_batches, sample  # noqa: E402


def write(directory: Path, samples: list[Sample], fmt: int, args: argparse.Namespace) -> dict:
    """A cache of ``samples`` in format ``fmt``, one shard per ``--shard`` examples (like generate's batches)."""
    with CacheWriter(directory, 0, top_p=args.top_p, max_k=args.max_k, format=fmt) as writer:
        for prompt_id, result in enumerate(samples):
            writer.add_sample(prompt_id, 0, result)
            if writer.pending == args.shard:
                writer.flush()
    return finalize(
        directory, teacher="bench-gpt2-tiny", tokenizer_hash="none", top_p=args.top_p, max_k=args.max_k,
        vocab_size=args.vocab,
    )  # fmt: skip


def read_loader(data: TrainData, batch: np.ndarray) -> int:
    out = collate_examples([data.example(int(i)) for i in batch], pad_id=1, eos_id=0, with_sets=True)
    return int(out["valid"].sum())


def read_collate(data: TrainData, batch: np.ndarray) -> int:
    return int(collate_candidates([data.cache[int(i)] for i in batch])["valid"].sum())


def read_decode(data: TrainData, batch: np.ndarray) -> int:
    tokens = 0
    for i in batch:
        example = data.cache[int(i)]
        example.capture.ids.astype(np.int64)
        example.capture.probs.astype(np.float32)
        tokens += len(example)
    return tokens


def timed(fn: Callable[[], int]) -> tuple[float, float, int]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def losses(batches: dict, vocab: int, seed: int) -> dict[str, dict[str, float]]:
    """KD and BD of a random student (hidden 32, float64) from each batch form."""
    from bdctl.objectives.bellman import candidate_mask, dense_loss
    from bdctl.objectives.bellman_lean import lean_loss
    from bdctl.objectives.kd import lean_sparse_kd_loss, sparse_kd_loss_dense

    torch.manual_seed(seed)
    valid = batches["exact"]["valid"]
    hidden = torch.randn(*valid.shape, 32, dtype=torch.float64)
    weight = torch.randn(vocab, 32, dtype=torch.float64) / 2
    logits = hidden @ weight.T
    out: dict[str, dict[str, float]] = {}
    for key, batch in batches.items():
        sets = (batch["cand_ids"], batch["cand_probs"].double(), batch["cand_mask"], valid)
        actions = batch["cand_ids"][..., 0]  # the teacher's top-1 action; EOS off, so nothing is terminal
        terminal = torch.zeros_like(valid)
        mask = candidate_mask(batch["cand_ids"], batch["cand_mask"], valid.shape, vocab)
        out[str(key)] = {
            "kd_dense": float(sparse_kd_loss_dense(logits, *sets)),
            "kd_lean": float(lean_sparse_kd_loss(hidden, weight, *sets)),
            "bd_dense": float(dense_loss(logits, mask, actions, valid, terminal)),
            "bd_lean": float(
                lean_loss(hidden, weight, batch["cand_ids"], batch["cand_mask"], actions, valid, terminal)
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/cache.json", help="where to write the JSON results")
    parser.add_argument("--prompts", type=int, default=128, help="prompts sampled (one response each)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per response (EOS off)")
    parser.add_argument("--vocab", type=int, default=2000, help="teacher vocabulary")
    parser.add_argument("--peak", type=float, default=15.2, help="output-embedding scale: 15.2 gives mean |A_t| ~ 25")
    parser.add_argument("--top-p", type=float, default=0.8, help="the cache's p")
    parser.add_argument("--max-k", type=int, default=64, help="the cache's cap on a set")
    parser.add_argument("--shard", type=int, default=16, help="examples per shard")
    parser.add_argument("--repeats", type=int, default=9, help="timed read runs of each format and path")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompts, teacher, sampling and order")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_teacher(args.vocab, args.peak, args.seed)
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(2, args.vocab, size=int(n)).tolist() for n in rng.integers(8, 65, size=args.prompts)]
    samples: list[Sample] = [None] * len(prompts)  # type: ignore[list-item]
    started = time.perf_counter()
    for batch in length_grouped_batches([len(p) for p in prompts], 64):
        found = sample(
            model, [prompts[i] for i in batch], [1000 + i for i in batch], eos_id=None, pad_id=1,
            max_new_tokens=args.max_new_tokens, capture_top_p=args.top_p, capture_max_k=args.max_k,
        )  # fmt: skip
        for i, result in zip(batch, found, strict=True):
            samples[i] = result
    sampling_s = time.perf_counter() - started
    kept = np.concatenate([s.capture.kept for s in samples])
    top1 = np.concatenate([s.capture.probs[s.capture.offsets()[:-1]] for s in samples])

    with tempfile.TemporaryDirectory() as tmp:
        manifests = {fmt: write(Path(tmp) / f"v{fmt}", samples, fmt, args) for fmt in (1, 2)}
        caches = {fmt: TeacherCache(Path(tmp) / f"v{fmt}") for fmt in (1, 2)}
        escapes = sum(p.stat().st_size // 2 for p in (Path(tmp) / "v2").glob("*.escapes.u16"))
        items = [Item(row=i, source=i, length=len(s.tokens)) for i, s in enumerate(samples)]
        data = {fmt: TrainData(prompts, items, cache=caches[fmt], with_sets=True) for fmt in (1, 2)}
        paths = {"loader": read_loader, "collate": read_collate, "decode": read_decode}
        for fmt in (1, 2):  # warm-up: maps the shards, fills the page cache
            for fn in paths.values():
                fn(data[fmt], np.arange(len(samples)))
        # runs[path][fmt]: (wall, cpu) seconds of each pass
        runs: dict[str, dict[int, list[tuple[float, float]]]] = {name: {1: [], 2: []} for name in paths}
        flip = 0
        for repeat in range(args.repeats):
            order = np.random.default_rng(args.seed + repeat).permutation(len(samples))
            for name, fn in paths.items():
                total = {1: [0.0, 0.0], 2: [0.0, 0.0]}
                for start in range(0, len(order), 8):
                    flip += 1
                    for fmt in (1, 2) if flip % 2 else (2, 1):
                        wall, cpu, tokens = timed(lambda: fn(data[fmt], order[start : start + 8]))  # noqa: B023
                        total[fmt][0] += wall
                        total[fmt][1] += cpu
                for fmt in (1, 2):
                    runs[name][fmt].append((total[fmt][0], total[fmt][1]))

        first = np.arange(min(16, len(samples)))
        batches = {
            "exact": collate_candidates([samples[int(i)].capture for i in first]),
            1: collate_candidates([caches[1][int(i)] for i in first]),
            2: collate_candidates([caches[2][int(i)] for i in first]),
        }
        values = losses(batches, args.vocab, args.seed)

    n_tokens = len(kept)
    throughput: dict[str, dict] = {}
    for name in paths:
        entry: dict[str, dict] = {}
        for clock, slot in (("cpu", 1), ("wall", 0)):
            rates = {fmt: [n_tokens / run[slot] for run in runs[name][fmt]] for fmt in (1, 2)}
            ratios = [a[slot] / b[slot] for a, b in zip(runs[name][1], runs[name][2], strict=True)]
            entry[clock] = {
                "format1_tokens_per_s": spread(rates[1]),
                "format2_tokens_per_s": spread(rates[2]),
                "ratio_format2_to_1": spread(ratios),
            }
        throughput[name] = entry

    def rel(a: float, b: float) -> float:
        return abs(a - b) / abs(b)

    loss_diff = {
        key: {
            "format2_vs_format1": rel(values["2"][key], values["1"][key]),
            "format2_vs_exact": rel(values["2"][key], values["exact"][key]),
            "format1_vs_exact": rel(values["1"][key], values["exact"][key]),
        }
        for key in values["exact"]
    }
    results = {
        "device": "cpu",
        "threads": args.threads,
        "teacher": {"arch": "gpt2", "layers": 4, "hidden": 128, "vocab": args.vocab, "peak": args.peak},
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "tokens": n_tokens,
        "sampling_seconds": sampling_s,
        "top_p": args.top_p,
        "max_k": args.max_k,
        "set_size": {
            "mean": float(kept.mean()),
            "median": float(np.median(kept)),
            "p90": float(np.percentile(kept, 90)),
            "capped_fraction": manifests[1]["capped_fraction"],
        },
        "top1_probability_mean": float(top1.mean()),
        "bytes_per_token": {f"format{fmt}": manifests[fmt]["bytes_per_token"] for fmt in (1, 2)},
        "data_bytes_per_token": {f"format{fmt}": manifests[fmt]["data_bytes"] / n_tokens for fmt in (1, 2)},
        "format2_escapes_per_token": escapes / n_tokens,
        "read_timing": (
            "per pass, every example once in a shuffled order, batches of 8, formats alternating batch by batch; "
            "ratio = format-1 time / format-2 time of the pass"
        ),
        "read_throughput": throughput,
        "losses": values,
        "loss_relative_difference": loss_diff,
        "float16_relative_rounding": 2.0**-11,
        "targets": {"format2_bytes_per_token": "<= 96", "read_throughput_ratio": ">= 0.9"},
    }

    print(
        f"{args.prompts} responses x {args.max_new_tokens} tokens, teacher gpt2 4x128 V={args.vocab} "
        f"peak {args.peak:g}, p = {args.top_p:g}, cap {args.max_k}: mean |A_t| {kept.mean():.2f} "
        f"(median {np.median(kept):g}), mean top-1 probability {top1.mean():.3f}"
    )
    b = results["bytes_per_token"]
    print(f"  bytes/token: format 1 {b['format1']:.1f}, format 2 {b['format2']:.1f} (target <= 96)")
    for name in paths:
        for clock in ("cpu", "wall"):
            r = throughput[name][clock]
            ratio = r["ratio_format2_to_1"]
            print(
                f"  read {name:<8}{clock:<5} format 1 {r['format1_tokens_per_s']['median']:>10.0f} tok/s, "
                f"format 2 {r['format2_tokens_per_s']['median']:>10.0f} tok/s, ratio {ratio['median']:.3f} "
                f"[{ratio['min']:.3f}, {ratio['max']:.3f}] (median [min, max] of {args.repeats})"
            )
    for key, diff in loss_diff.items():
        print(
            f"  {key:<9} {values['2'][key]:.6f}: |2-1|/1 {diff['format2_vs_format1']:.2e}, |2-exact| "
            f"{diff['format2_vs_exact']:.2e}, |1-exact| {diff['format1_vs_exact']:.2e} (float16 rounding 4.9e-4)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
