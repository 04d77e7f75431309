"""bdctl side by side with the tools a user would pick instead, on one machine in one run (issue 16).

    python benchmarks/bench_peers.py                       # every comparison, full size (CPU: about 10-15 min)
    python benchmarks/bench_peers.py --smoke               # every comparison at tiny shapes (CI; well under 1 min)
    python benchmarks/bench_peers.py --only sampling --out /tmp/peers.json

Each comparison runs in this one process, the sides alternating within every round (the order reversed
on odd rounds, so slow drift from other load hits every side alike), and reports the median of the
per-round ratios with their spread (quartiles and min-max):

distill_vs_trl
    One optimizer step of Hugging Face TRL's ``GKDTrainer`` (off-policy ``lmbda = 0``, forward KL
    ``beta = 0``, live teacher, fp32, no gradient checkpointing: TRL's bf16 and checkpointing defaults
    are turned off so both sides do the same fp32 arithmetic) against one optimizer step of bdctl on the
    same student (GPT-2 shape), teacher (twice the layers) and batch, through bdctl's real training path
    (DeepSpeed ZeRO-3 engine, ``policy_module``, the distill stage's loss heads):

        kd_live    word-level KD with the live teacher (a ZeRO-3 inference engine), the exact teacher
                   distribution: the same math as TRL's (cross-entropy with the teacher = forward KL + the
                   teacher's entropy, a constant), ``kd_ratio = 1``
        kd_cache   word-level KD from the sparse top-p cache (``lean_sparse_kd_loss``), no teacher forward
        bd_cache   Bellman Distill (paper variant) from the cache (``bellman.lean_terms``)

    The cache sides read synthetic top-p sets (sizes about 6, capped at 64, a p = 0.8 cache of a real
    teacher) collated by the stage's own ``collate_examples``; TRL's step is timed from its
    ``on_step_begin`` to its ``on_step_end`` callback (forward, backward, clipping, optimizer step).

sampling_vs_generate
    bdctl's batched sampler (``bdctl.sampling.sample``, with and without the top-p capture) against
    ``model.generate`` on the same batches (same batch size, left padding, temperature 1, top_k 0, top_p 1,
    EOS off so every row makes the same number of tokens): tokens per second. A second, labelled baseline
    is ``generate`` called once per prompt (on the first ``loop_prompts`` prompts: a rate, not a total).
    The teacher is a random GPT-2 whose output embedding is scaled by ``peak`` so that its top-0.8 sets
    are a few tokens wide, as a trained teacher's are (the capture's cost follows the set size).

loss_memory_vs_vocab
    Peak memory of one loss forward + backward from fixed hidden states and batch (the output embedding
    and hidden states require gradients), for vocabularies 32k, 50k and 152k (Qwen 2.5's): BD lean
    (``bellman.lean_terms``) against dense (``bellman.dense_terms`` on full logits), both through the stage's
    ``bd_terms``; KD from the cache (the stage's ``ce_and_kd``) against dense KD (``kd.dense_kd_loss`` on full
    student and teacher logits; the teacher's logits are an input, allocated before the measurement, so not
    counted: this flatters dense KD) and against top-k KD on full student logits (``sparse_kd_loss_dense``).

Memory: the peak resident set size during the measured step above the resident set size just before it.
The kernel's high-water mark (VmHWM) is reset before every measured step (``/proc/self/clear_refs``, Linux
4.0+; a 1 ms sampling thread where that is refused, named in the JSON), and glibc is told to serve every
block above 128 KiB with mmap (``MALLOC_MMAP_THRESHOLD_``, set by re-executing this script), so freed
tensors leave the resident set at once and one side's garbage is not the next side's free memory. It counts
everything the step allocates (activations, logits, gradients, optimizer temporaries), not the weights and
optimizer states already resident. tracemalloc does not see torch's allocations, so it is not used.

Time: wall clock (``perf_counter``, what a user waits for) and the process's CPU time (``process_time``,
far less disturbed when other jobs share the cores). With one thread (the default) the two agree on an idle
machine. Ratios below 1 mean bdctl is faster / leaner.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

COMPARISONS = ("distill_vs_trl", "sampling_vs_generate", "loss_memory_vs_vocab")
MMAP_THRESHOLD = "131072"  # bytes: glibc serves larger blocks with mmap and returns them on free
TRL_PIN = "trl==1.16.0"  # the `bench` extra's pin


# --------------------------------------------------------------------------- shapes


@dataclass
class DistillShape:
    layers: int = 4
    hidden: int = 512
    teacher_layers: int = 8
    vocab: int = 50257
    micro: int = 4  # sequences per step
    seq: int = 256  # prompt + response tokens per sequence
    prompt: int = 64
    k: int = 64  # cap on the candidate set size
    rounds: int = 5


@dataclass
class SamplingShape:
    layers: int = 4
    hidden: int = 256
    vocab: int = 50257
    peak: float = 20.0  # output-embedding scale: top-0.8 sets of a few tokens
    prompts: int = 32
    min_prompt: int = 16
    max_prompt: int = 64
    new_tokens: int = 64
    batch: int = 16
    loop_prompts: int = 4
    top_p: float = 0.8
    max_k: int = 64
    rounds: int = 5


@dataclass
class VocabShape:
    vocabs: list[int] = field(default_factory=lambda: [32000, 50257, 151936])
    hidden: int = 512
    micro: int = 4
    seq: int = 256
    prompt: int = 64
    k: int = 64


SMOKE = {
    "distill_vs_trl": DistillShape(
        layers=2, hidden=64, teacher_layers=4, vocab=1000, micro=2, seq=32, prompt=8, k=16, rounds=2
    ),
    "sampling_vs_generate": SamplingShape(
        layers=2,
        hidden=64,
        vocab=1000,
        prompts=8,
        min_prompt=4,
        max_prompt=12,
        new_tokens=8,
        batch=4,
        loop_prompts=2,
        rounds=2,
    ),  # fmt: skip
    "loss_memory_vs_vocab": VocabShape(vocabs=[3200, 5000, 15200], hidden=64, micro=2, seq=32, prompt=8, k=16),
}
FULL = {"distill_vs_trl": DistillShape(), "sampling_vs_generate": SamplingShape(), "loss_memory_vs_vocab": VocabShape()}

TARGETS = {
    "kd_cache / trl: time": 0.5,
    "kd_cache / trl: peak memory": 0.5,
    "bd_cache / trl: time": 0.6,
    "sampler / generate (batched): tokens/s": 1.5,  # at least
    "capture overhead: time": 1.10,
    "bd lean / dense at 152k: peak memory": 0.25,
}
AT_LEAST = {"sampler / generate (batched): tokens/s"}


# --------------------------------------------------------------------------- measuring


def _status_kib(field_name: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field_name}")


def _can_reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


HIGH_WATER = _can_reset_high_water() if sys.platform == "linux" else False
MEMORY_METHOD = (
    "peak RSS above the RSS before the step: kernel high-water mark (VmHWM) reset via /proc/self/clear_refs"
    if HIGH_WATER
    else "peak RSS above the RSS before the step: /proc/self/statm sampled every 1 ms by a thread"
)


class StepPeak:
    """Peak resident set size (bytes) above its level at entry, for one block of code."""

    def __enter__(self) -> StepPeak:
        if HIGH_WATER:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        self.base = self.peak = _status_kib("VmRSS") * 1024
        if not HIGH_WATER:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if HIGH_WATER:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _status_kib("VmRSS") * 1024)

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


class Timer:
    """Wall and CPU seconds of one block of code."""

    def __enter__(self) -> Timer:
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def spread(values: list[float]) -> dict[str, Any]:
    """Median, quartiles and range of per-round ratios (or of raw measurements)."""
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {
        "median": statistics.median(ordered),
        "q1": q1,
        "q3": q3,
        "min": ordered[0],
        "max": ordered[-1],
        "n": len(ordered),
        "values": values,
    }


def ratios(a: list[float], b: list[float]) -> dict[str, Any]:
    """Per-round a / b (the two sides measured in the same round), summarised."""
    return spread([x / y for x, y in zip(a, b, strict=True)])


def alternating(names: list[str], round_index: int) -> list[str]:
    return names if round_index % 2 == 0 else names[::-1]


# --------------------------------------------------------------------------- shared builders


def gpt2_config(layers: int, hidden: int, vocab: int, positions: int, tied: bool = True):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=vocab, n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 64), n_positions=positions,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=vocab - 1, eos_token_id=vocab - 1,
        pad_token_id=0, tie_word_embeddings=tied,
    )  # fmt: skip


def synthetic_examples(vocab: int, micro: int, seq: int, prompt: int, k: int, seed: int) -> list:
    """(prompt, response, Capture) triples: random tokens, three responses in four ending in EOS (vocab - 1),
    and a top-p set per response position the way a p = 0.8 cache of a real teacher looks (sizes about 6,
    capped at k, the action inside nine times in ten, probabilities decreasing and summing to about 0.8)."""
    import numpy as np

    from bdctl.topp import Capture

    rng = np.random.default_rng(seed)
    eos = vocab - 1
    examples = []
    for b in range(micro):
        tokens = rng.integers(1, vocab - 1, size=prompt).tolist()
        response = rng.integers(1, vocab - 1, size=seq - prompt)
        if b % 4 != 3:
            response[-1] = eos
        kept = np.minimum(rng.geometric(1 / 6, size=len(response)), k).astype(np.int32)
        ids, probs = [], []
        for t, n in enumerate(kept):
            members = rng.choice(vocab, size=n, replace=False)
            if rng.random() < 0.9 and response[t] not in members:
                members[0] = response[t]
            weights = np.sort(rng.dirichlet(np.ones(n)))[::-1] * 0.8
            ids.append(members)
            probs.append(weights)
        capture = Capture(
            ids=np.concatenate(ids).astype(np.int32),
            probs=np.concatenate(probs).astype(np.float32),
            kept=kept,
            covered=np.full(len(kept), 0.8, np.float32),
        )
        examples.append((tokens, response.astype(np.int64), capture))
    return examples


# --------------------------------------------------------------------------- (a) distillation step vs TRL


def _trl_tokenizer(pad_id: int, eos_id: int):
    """A two-token tokenizer built in memory: GKDTrainer needs a processing class for its pad id only."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": pad_id, "<eos>": eos_id}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")), pad_token="<pad>", eos_token="<eos>"
    )


def distill_vs_trl(shape: DistillShape, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    try:
        import trl
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        missing = f"TRL is not installed: pip install -e '.[bench]' (or pip install {TRL_PIN})"
        log(f"distill_vs_trl: skipped, {missing}")
        return {"skipped": missing}

    from bdctl.distill_data import collate_examples
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
    from bdctl.objectives.kd import teacher_probabilities
    from bdctl.objectives.lm import IGNORE_INDEX
    from bdctl.recipe import load_recipe
    from bdctl.recipe.schema import DistillStage
    from bdctl.stages.distill import bd_terms, ce_and_kd, response_hidden, scored_rows

    quiet_libraries()
    examples = synthetic_examples(shape.vocab, shape.micro, shape.seq, shape.prompt, shape.k, seed)
    batch = collate_examples(examples, 0, shape.vocab - 1, with_sets=True)
    # TRL's labels: the response tokens, -100 elsewhere; its logits at i score labels[i + 1], the same
    # positions as bdctl's response frame (positions[b, t] predicts response token t).
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, shape.prompt :] = batch["input_ids"][:, shape.prompt :]
    n_scored = int(batch["valid"].sum())
    assert n_scored == int((labels != IGNORE_INDEX).sum())

    # --- TRL first, before DeepSpeed's process group and ZeRO-3 context exist (both change how
    # transformers and accelerate build models and trainers).
    from datasets import Dataset

    torch.manual_seed(seed)
    student = AutoModelForCausalLM.from_config(gpt2_config(shape.layers, shape.hidden, shape.vocab, shape.seq))
    teacher = AutoModelForCausalLM.from_config(
        gpt2_config(shape.teacher_layers, shape.hidden, shape.vocab, shape.seq)
    ).eval()
    rows = shape.micro * (shape.rounds + 1)  # one batch per step, a warm-up step first
    dataset = Dataset.from_dict(
        {
            "input_ids": batch["input_ids"].repeat(shape.rounds + 1, 1).tolist(),
            "attention_mask": batch["attention_mask"].repeat(shape.rounds + 1, 1).tolist(),
            "labels": labels.repeat(shape.rounds + 1, 1).tolist(),
        }
    )
    assert len(dataset) == rows

    def collate(features: list[dict]) -> dict[str, torch.Tensor]:
        return {key: torch.tensor([f[key] for f in features]) for key in ("input_ids", "attention_mask", "labels")}

    config = DistillStage(batch_size=shape.micro, micro_batch_size=shape.micro, lr=1e-5, p=0.8, kd_ratio=1.0)
    out_dir = tempfile.mkdtemp(prefix="bench-peers-trl-")
    trl_args = GKDConfig(
        output_dir=out_dir, per_device_train_batch_size=shape.micro, gradient_accumulation_steps=1,
        max_steps=shape.rounds + 1, learning_rate=config.lr, weight_decay=config.weight_decay,
        max_grad_norm=config.grad_clip, lr_scheduler_type="constant", lmbda=0.0, beta=0.0, seq_kd=False,
        temperature=1.0, bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True, report_to="none",
        logging_steps=10**9, save_strategy="no", dataloader_num_workers=0, disable_tqdm=True, max_length=None,
        seed=seed,
    )  # fmt: skip

    # --- bdctl: the student as a ZeRO-3 training engine, the live teacher as a ZeRO-3 inference engine
    init_distributed()
    recipe, _ = load_recipe("smoke")  # its deepspeed section: zero3, precision auto (fp32 on CPU)
    ds_config = deepspeed_config(recipe, config, "bench", 1, 10**6, shape.hidden, "fp32", False)
    with_ds = hf_deepspeed_context(ds_config)

    def model(layers: int):
        return policy_module(
            AutoModelForCausalLM.from_config(gpt2_config(layers, shape.hidden, shape.vocab, shape.seq))
        )

    engine = make_engine(model(shape.layers), ds_config, lr_factor("linear", 10**6, 0))
    live = make_inference_engine(model(shape.teacher_layers), ds_config)
    del with_ds  # only needed while loading; TRL's trainer would otherwise think ZeRO-3 is on
    valid = batch["valid"]

    def teacher_head(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # as the distill stage's live KD
        return teacher_probabilities(scored_rows(response_hidden(h, batch["positions"]), valid), w)

    def kd_live():
        with torch.no_grad():
            probs = live(batch["input_ids"], batch["attention_mask"], loss_fn=teacher_head)
        return engine(
            batch["input_ids"], batch["attention_mask"], loss_fn=lambda h, w: ce_and_kd(h, w, batch, 1.0, probs)
        )[0]

    def kd_cache():
        return engine(
            batch["input_ids"], batch["attention_mask"], loss_fn=lambda h, w: ce_and_kd(h, w, batch, 1.0, None)
        )[0]

    def bd_cache():
        return engine(
            batch["input_ids"], batch["attention_mask"], loss_fn=lambda h, w: bd_terms(h, w, batch, config).loss
        )

    sides: dict[str, Callable[[], torch.Tensor]] = {"kd_live": kd_live, "kd_cache": kd_cache, "bd_cache": bd_cache}
    record: dict[str, dict[str, list[float]]] = {
        name: {"wall": [], "cpu": [], "peak_mib": [], "loss": []} for name in ["trl", *sides]
    }

    def step(name: str, measured: bool) -> None:
        with StepPeak() as memory, Timer() as timer:
            loss = sides[name]()
            engine.backward(loss)
            engine.step()
        if measured:
            for key, value in (
                ("wall", timer.wall),
                ("cpu", timer.cpu),
                ("peak_mib", memory.mib),
                ("loss", float(loss)),
            ):
                record[name][key].append(value)

    for name in sides:  # warm-up: DeepSpeed's first-step set-up, the optimizer states
        step(name, measured=False)

    class Rounds(TrainerCallback):
        """Times TRL's own optimizer step, then runs bdctl's sides in the same round."""

        def on_step_begin(self, args, state, control, **kwargs):
            self.memory, self.timer = StepPeak().__enter__(), Timer().__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.timer.__exit__()
            self.memory.__exit__()
            if state.global_step == 1:
                return  # TRL's warm-up step
            for key, value in (("wall", self.timer.wall), ("cpu", self.timer.cpu), ("peak_mib", self.memory.mib)):
                record["trl"][key].append(value)
            for name in alternating(list(sides), state.global_step):
                step(name, measured=True)
            log(f"  round {state.global_step - 1}/{shape.rounds}: " + "  ".join(
                f"{n} {record[n]['wall'][-1]:.2f}s" for n in record
            ))  # fmt: skip

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "train_loss" in logs:
                record["trl"]["loss"].append(float(logs["train_loss"]))

    trainer = GKDTrainer(
        model=student, teacher_model=teacher, args=trl_args, train_dataset=dataset, data_collator=collate,
        processing_class=_trl_tokenizer(0, shape.vocab - 1), callbacks=[Rounds(), LossLog()],
    )  # fmt: skip
    log(
        f"distill_vs_trl: student GPT-2 {shape.layers}x{shape.hidden}, teacher {shape.teacher_layers}x{shape.hidden}, "
        f"vocabulary {shape.vocab}; batch {shape.micro} x {shape.seq} tokens ({n_scored} scored); {shape.rounds} rounds"
    )
    trainer.train()

    summary: dict[str, Any] = {}
    for name in sides:
        summary[f"{name} / trl"] = {
            "time_wall": ratios(record[name]["wall"], record["trl"]["wall"]),
            "time_cpu": ratios(record[name]["cpu"], record["trl"]["cpu"]),
            "peak_memory": ratios(record[name]["peak_mib"], record["trl"]["peak_mib"]),
        }
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    return {
        "peer": f"trl {trl.__version__} experimental.gkd.GKDTrainer (lmbda 0, beta 0, live teacher, fp32)",
        "peer_mode": "full trainer step",
        "shape": asdict(shape),
        "parameters": {"student": n_student, "teacher": n_teacher},
        "scored_positions": n_scored,
        "raw": {name: {k: spread(v) for k, v in values.items() if v} for name, values in record.items()},
        "ratios": summary,
        "notes": [
            "time = one optimizer step (forward, backward, clipping, optimizer step); memory = peak RSS of the step "
            "above the RSS before it",
            "TRL's defaults bf16=True and gradient_checkpointing=True are turned off so both sides run the same fp32 "
            "step without recomputation",
            "bdctl's losses are cross-entropies with the teacher, TRL's is the KL: they differ by the teacher's "
            "entropy (no gradient), so the loss values are not comparable",
        ],
    }


# --------------------------------------------------------------------------- (b) sampling vs generate


def sampling_vs_generate(shape: SamplingShape, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import GPT2LMHeadModel

    from bdctl.sampling import left_padded, length_grouped_batches, sample

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(
        gpt2_config(shape.layers, shape.hidden, shape.vocab, shape.max_prompt + shape.new_tokens, tied=False)
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(shape.peak)  # see the module docstring
    model.eval()
    model.generation_config.eos_token_id = None  # EOS off: every row makes new_tokens tokens, on every side
    pad = 0
    rng = np.random.default_rng(seed)
    lengths = rng.integers(shape.min_prompt, shape.max_prompt + 1, size=shape.prompts)
    prompts = [rng.integers(1, shape.vocab - 1, size=int(n)).tolist() for n in lengths]
    seeds = list(range(1000, 1000 + shape.prompts))
    batches = length_grouped_batches([len(p) for p in prompts], shape.batch)
    device = torch.device("cpu")
    captured: list = []

    def ours(capture: bool) -> int:
        made = 0
        for rows in batches:
            found = sample(
                model, [prompts[i] for i in rows], [seeds[i] for i in rows], eos_id=None, pad_id=pad,
                max_new_tokens=shape.new_tokens, capture_top_p=shape.top_p if capture else None,
                capture_max_k=shape.max_k,
            )  # fmt: skip
            made += sum(len(s.tokens) for s in found)
            if capture:
                captured[:] = found
        return made

    def generate(rows_of: list[list[int]]) -> int:
        made = 0
        with torch.inference_mode():
            for rows in rows_of:
                input_ids, attention_mask, _, _ = left_padded([prompts[i] for i in rows], pad, device)
                out = model.generate(
                    input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                    max_new_tokens=shape.new_tokens, min_new_tokens=shape.new_tokens, pad_token_id=pad,
                )  # fmt: skip
                made += out[:, input_ids.shape[1] :].numel()
        return made

    sides: dict[str, Callable[[], int]] = {
        "sampler": lambda: ours(False),
        "sampler_with_capture": lambda: ours(True),
        "generate_batched": lambda: generate(batches),
        "generate_per_prompt": lambda: generate([[i] for i in range(shape.loop_prompts)]),
    }
    expected = {
        name: shape.new_tokens * (shape.loop_prompts if name == "generate_per_prompt" else shape.prompts)
        for name in sides
    }
    for fn in sides.values():
        fn()  # warm-up
    record: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "tokens": []} for name in sides}
    log(
        f"sampling_vs_generate: GPT-2 {shape.layers}x{shape.hidden} vocabulary {shape.vocab} (peak {shape.peak:g}); "
        f"{shape.prompts} prompts of {shape.min_prompt}-{shape.max_prompt} tokens, {shape.new_tokens} new tokens, "
        f"batch {shape.batch}; {shape.rounds} rounds"
    )
    for r in range(shape.rounds):
        for name in alternating(list(sides), r):
            with Timer() as timer:
                made = sides[name]()
            assert made == expected[name], (name, made, expected[name])
            record[name]["wall"].append(timer.wall)
            record[name]["cpu"].append(timer.cpu)
            record[name]["tokens"].append(made)
        log(f"  round {r + 1}/{shape.rounds}: " + "  ".join(f"{n} {record[n]['wall'][-1]:.2f}s" for n in sides))

    def rate(name: str, clock: str) -> list[float]:
        return [t / s for t, s in zip(record[name]["tokens"], record[name][clock], strict=True)]

    summary: dict[str, Any] = {}
    for clock in ("wall", "cpu"):
        summary[f"sampler / generate (batched): tokens/s, {clock}"] = ratios(
            rate("sampler", clock), rate("generate_batched", clock)
        )
        summary[f"sampler with capture / generate (batched): tokens/s, {clock}"] = ratios(
            rate("sampler_with_capture", clock), rate("generate_batched", clock)
        )
        summary[f"sampler / generate (per prompt): tokens/s, {clock}"] = ratios(
            rate("sampler", clock), rate("generate_per_prompt", clock)
        )
        summary[f"capture overhead: time, {clock}"] = ratios(
            record["sampler_with_capture"][clock], record["sampler"][clock]
        )
    kept = np.concatenate([s.capture.kept for s in captured])
    return {
        "peer": "transformers GenerationMixin.generate (sampling, temperature 1, top_k 0, top_p 1)",
        "shape": asdict(shape),
        "generated_tokens": expected,
        "tokens_per_s": {name: {clock: spread(rate(name, clock)) for clock in ("wall", "cpu")} for name in sides},
        "raw": {name: {k: spread(v) for k, v in values.items() if k != "tokens"} for name, values in record.items()},
        "ratios": summary,
        "capture_set_size": {"mean": float(kept.mean()), "median": float(np.median(kept)), "max": int(kept.max())},
        "notes": [
            "generate_per_prompt runs the first loop_prompts prompts one at a time: a rate, not the same total",
            "the same length-grouped batches, left-padded by bdctl.sampling.left_padded, on both batched sides",
        ],
    }


# --------------------------------------------------------------------------- (c) loss memory vs vocabulary


def _vocab_point(vocab: int, shape: VocabShape, seed: int, config, variants: tuple[str, ...]) -> dict[str, float]:
    """Peak MiB of one loss forward + backward per variant, at one vocabulary size."""
    import torch

    from bdctl.distill_data import collate_examples
    from bdctl.objectives.kd import dense_kd_loss, sparse_kd_loss_dense
    from bdctl.stages.distill import bd_terms, ce_and_kd, response_hidden

    batch = collate_examples(
        synthetic_examples(vocab, shape.micro, shape.seq, shape.prompt, shape.k, seed), 0, vocab - 1, True
    )
    generator = torch.Generator().manual_seed(seed)
    weight = (0.02 * torch.randn(vocab, shape.hidden, generator=generator)).requires_grad_()
    hidden = torch.randn(shape.micro, shape.seq, shape.hidden, generator=generator).requires_grad_()
    with torch.no_grad():  # dense KD's live-teacher logits: an input, allocated before the measurement
        teacher_logits = response_hidden(torch.randn_like(hidden), batch["positions"]) @ weight.T

    def student_logits() -> torch.Tensor:
        return response_hidden(hidden, batch["positions"]) @ weight.T

    heads: dict[str, Callable[[], torch.Tensor]] = {
        "bd_lean": lambda: bd_terms(hidden, weight, batch, config).loss,
        "bd_dense": lambda: bd_terms(hidden, weight, batch, config, dense=True).loss,
        "kd_cache": lambda: ce_and_kd(hidden, weight, batch, 1.0, None)[0],
        "kd_cache_dense": lambda: sparse_kd_loss_dense(
            student_logits(), batch["cand_ids"], batch["cand_probs"], batch["cand_mask"], batch["valid"]
        ),
        "kd_dense": lambda: dense_kd_loss(student_logits(), teacher_logits, batch["valid"]),
    }
    found = {}
    for name in variants:
        weight.grad = hidden.grad = None
        with StepPeak() as memory:
            heads[name]().backward()
        found[name] = memory.mib
    return found


def loss_memory_vs_vocab(shape: VocabShape, seed: int, log: Callable[[str], None]) -> dict[str, Any]:
    from bdctl.recipe.schema import DistillStage

    config = DistillStage(batch_size=shape.micro, micro_batch_size=shape.micro, p=0.8)
    variants = ("bd_lean", "bd_dense", "kd_cache", "kd_cache_dense", "kd_dense")
    table: dict[str, dict[str, float]] = {name: {} for name in variants}
    log(
        f"loss_memory_vs_vocab: hidden {shape.hidden}, batch {shape.micro} x {shape.seq} tokens "
        f"({shape.seq - shape.prompt} scored each); vocabularies {shape.vocabs}"
    )
    for vocab in shape.vocabs:
        point = _vocab_point(vocab, shape, seed, config, variants)
        for name in variants:
            table[name][str(vocab)] = point[name]
        log(f"  vocabulary {vocab}: " + "  ".join(f"{n} {point[n]:.1f} MiB" for n in variants))
    summary = {}
    for vocab in map(str, shape.vocabs):
        summary[f"bd lean / dense at {vocab}: peak memory"] = table["bd_lean"][vocab] / table["bd_dense"][vocab]
        summary[f"kd cache / dense kd at {vocab}: peak memory"] = table["kd_cache"][vocab] / table["kd_dense"][vocab]
        summary[f"kd cache / kd cache on full logits at {vocab}: peak memory"] = (
            table["kd_cache"][vocab] / table["kd_cache_dense"][vocab]
        )
    return {
        "shape": asdict(shape),
        "peak_mib": table,
        "ratios": summary,
        "notes": [
            "one loss forward + backward from fixed hidden states [micro, seq, hidden] and output embedding "
            "[vocab, hidden], both requiring gradients; measured once per point (memory, not time)",
            "kd_dense's teacher logits are an input allocated before the measurement: its peak is an underestimate",
        ],
    }


# --------------------------------------------------------------------------- report


def judge_targets(results: dict[str, Any], largest_vocab: int) -> dict[str, Any]:
    """Each issue-16 target with the measured median (and its spread) it is judged on."""
    found: dict[str, Any] = {}
    distill = results.get("distill_vs_trl", {}).get("ratios", {})
    sampling = results.get("sampling_vs_generate", {}).get("ratios", {})
    vocab = results.get("loss_memory_vs_vocab", {}).get("ratios", {})
    measured = {
        "kd_cache / trl: time": distill.get("kd_cache / trl", {}).get("time_cpu"),
        "kd_cache / trl: peak memory": distill.get("kd_cache / trl", {}).get("peak_memory"),
        "bd_cache / trl: time": distill.get("bd_cache / trl", {}).get("time_cpu"),
        "sampler / generate (batched): tokens/s": sampling.get("sampler / generate (batched): tokens/s, cpu"),
        "capture overhead: time": sampling.get("capture overhead: time, cpu"),
        "bd lean / dense at 152k: peak memory": vocab.get(f"bd lean / dense at {largest_vocab}: peak memory"),
    }
    for name, target in TARGETS.items():
        value = measured[name]
        if value is None:
            continue
        median = value["median"] if isinstance(value, dict) else value
        met = median >= target if name in AT_LEAST else median <= target
        found[name] = {
            "target": (">= " if name in AT_LEAST else "<= ") + f"{target:g}",
            "median": median,
            "spread": [value["min"], value["max"]] if isinstance(value, dict) else None,
            "met": met,
        }
    return found


def plot(results: dict[str, Any], path: Path, smoke: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    title = "bdctl against its peers" + (" (SMOKE: tiny shapes, figures meaningless)" if smoke else "")
    fig.suptitle(title)

    def bars(ax, items: list[tuple[str, dict]], targets: dict[str, float]) -> None:
        labels = [label for label, _ in items]
        medians = [value["median"] for _, value in items]
        low = [value["median"] - value["min"] for _, value in items]
        high = [value["max"] - value["median"] for _, value in items]
        ax.bar(range(len(items)), medians, yerr=[low, high], capsize=4, color="tab:blue")
        for i, label in enumerate(labels):
            if label in targets:
                ax.hlines(targets[label], i - 0.4, i + 0.4, colors="tab:red", linestyles="--")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(items)), [label.replace(": ", "\n") for label in labels], fontsize=7, rotation=20)

    distill = results.get("distill_vs_trl")
    ax = axes[0]
    if distill and "ratios" in distill:
        items = []
        for side in ("kd_live", "kd_cache", "bd_cache"):
            items.append((f"{side}: time", distill["ratios"][f"{side} / trl"]["time_cpu"]))
            items.append((f"{side}: memory", distill["ratios"][f"{side} / trl"]["peak_memory"]))
        bars(ax, items, {"kd_cache: time": 0.5, "kd_cache: memory": 0.5, "bd_cache: time": 0.6})
        ax.set_title(f"distillation step / TRL GKD ({distill['peer_mode']})\nCPU time and peak memory; red: target")
        ax.set_ylabel("ratio to TRL (median, min-max)")
    sampling = results.get("sampling_vs_generate")
    ax = axes[1]
    if sampling:
        r = sampling["ratios"]
        items = [
            ("vs generate batched", r["sampler / generate (batched): tokens/s, cpu"]),
            ("+capture vs generate batched", r["sampler with capture / generate (batched): tokens/s, cpu"]),
            ("vs generate per prompt", r["sampler / generate (per prompt): tokens/s, cpu"]),
            ("capture overhead (time)", r["capture overhead: time, cpu"]),
        ]
        bars(ax, items, {"vs generate batched": 1.5, "capture overhead (time)": 1.10})
        ax.set_yscale("log")
        ax.set_title("bdctl sampler: tokens/s ratio (CPU time)\nred: target")
    memory = results.get("loss_memory_vs_vocab")
    ax = axes[2]
    if memory:
        vocabs = memory["shape"]["vocabs"]
        for name, values in memory["peak_mib"].items():
            ax.plot(vocabs, [values[str(v)] for v in vocabs], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary")
        ax.set_ylabel("peak memory of one loss step, MiB")
        ax.set_title("loss memory against vocabulary")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(results: dict[str, Any], log: Callable[[str], None]) -> None:
    def fmt(value: Any) -> str:
        if isinstance(value, dict):
            quartiles = f"[{value['q1']:.3f}, {value['q3']:.3f}]"
            return f"{value['median']:7.3f}  {quartiles}  ({value['min']:.3f}-{value['max']:.3f})"
        return f"{value:7.3f}"

    log("\nratio                                                       median  [quartiles]  (min-max)")
    for comparison, found in results.items():
        for label, value in found.get("ratios", {}).items():
            if isinstance(value, dict) and "median" not in value:
                for key, sub in value.items():
                    log(f"{comparison}: {label}: {key:11s} {fmt(sub)}")
            else:
                log(f"{comparison}: {label:50s} {fmt(value)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, every comparison, for CI (no timing value)")
    parser.add_argument(
        "--only", default=",".join(COMPARISONS), help=f"comma-separated subset of {', '.join(COMPARISONS)}"
    )
    parser.add_argument("--rounds", type=int, help="override the rounds of the timed comparisons")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads for every side (1: steadiest on a shared machine)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "peers.json")
    parser.add_argument("--png", type=Path, help="figure path (default: --out with .png)")
    args = parser.parse_args()

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:  # glibc reads it at start-up only
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "PYTHONWARNINGS": "ignore"}
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(key, None)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(COMPARISONS))
    if unknown:
        parser.error(f"--only: unknown comparison(s) {', '.join(unknown)}; expected {', '.join(COMPARISONS)}")
    import torch

    torch.set_num_threads(args.threads)
    shapes: dict[str, Any] = SMOKE if args.smoke else FULL
    if args.rounds:
        for name in ("distill_vs_trl", "sampling_vs_generate"):
            shapes[name].rounds = args.rounds

    def log(line: str) -> None:
        print(line, flush=True)

    started = time.perf_counter()
    runners = {
        "distill_vs_trl": distill_vs_trl,
        "sampling_vs_generate": sampling_vs_generate,
        "loss_memory_vs_vocab": loss_memory_vs_vocab,
    }
    results: dict[str, Any] = {}
    for name in COMPARISONS:
        if name in chosen:
            began = time.perf_counter()
            results[name] = runners[name](shapes[name], args.seed, log)
            results[name]["seconds"] = time.perf_counter() - began
    largest = max(shapes["loss_memory_vs_vocab"].vocabs)
    report = {
        "smoke": args.smoke,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "memory_method": MEMORY_METHOD,
        "timing": "per-round ratios of the sides measured in the same round; wall = perf_counter, cpu = process_time",
        "comparisons": results,
        "targets": {} if args.smoke else judge_targets(results, largest),
        "seconds": time.perf_counter() - started,
    }
    print_table(results, log)
    if report["targets"]:
        log("\ntarget                                          median     (min-max)       target   met")
        for label, value in report["targets"].items():
            low, high = value["spread"] or (value["median"], value["median"])
            log(f"{label:45s} {value['median']:8.3f}  ({low:.3f}-{high:.3f})  {value['target']:>8s}   {value['met']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    png = args.png or args.out.with_suffix(".png")
    plot(results, png, args.smoke)
    log(f"wrote {args.out} and {png} in {report['seconds']:.0f} s")


if __name__ == "__main__":
    main()
