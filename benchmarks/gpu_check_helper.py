"""GPU readiness check (issue 16, item 4), run by benchmarks/gpu_check.sh; see that script for how to run it.

On one NVIDIA GPU, through bdctl's real engine (``bdctl.engine``: DeepSpeed ZeRO-3, bf16, the recipe's
optimizer, ``policy_module`` and the distill stage's loss heads), on randomly initialised models built from
configs (nothing is downloaded):

    bd_step     one optimizer step of Bellman Distill from the top-p cache (``bd_terms``, lean) on a
                Qwen2.5-0.5B-shaped student; synthetic top-p sets (sizes about 6, capped at 64)
    sft_step    one optimizer step of SFT (``lean_cross_entropy`` on the response tokens), same student and batch
    sampling    teacher sampling (``bdctl.sampling.sample``, temperature 1, with and without the top-p capture,
                as ``bdctl generate`` runs it: a whole bf16 teacher on the GPU) on a Qwen2.5-3B-shaped model

Reported: tokens per second (median over the measured steps), MFU (model FLOPs: 6 N per token for the
matmul weights, the output embedding included, plus 12 L H T for attention, over the GPU's dense bf16
peak; bd_step is given the same FLOP count as sft_step, so its MFU is the useful work's), and peak memory
(``torch.cuda.max_memory_allocated`` over the step). With ``--cpu`` (or when no GPU is visible) the same path
runs at small shapes in fp32 and the JSON says ``"mode": "cpu-small"``: it checks that the path works, its
figures say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_peers import StepPeak, Timer, synthetic_examples  # noqa: E402

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by device name.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}

QWEN_05B = dict(
    hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
    vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)  # fmt: skip
QWEN_3B = dict(
    hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
    vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
    max_position_embeddings=32768,
)  # fmt: skip
SMALL_STUDENT = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=256,
)  # fmt: skip
SMALL_TEACHER = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=256,
)  # fmt: skip

SHAPES = {
    "gpu": {
        "student": ("Qwen2.5-0.5B-shaped", QWEN_05B),
        "teacher": ("Qwen2.5-3B-shaped", QWEN_3B),
        "micro": 8, "seq": 1024, "prompt": 256, "k": 64, "steps": 5,
        "prompts": 64, "min_prompt": 64, "max_prompt": 256, "new_tokens": 256, "batch": 64, "rounds": 3,
    },
    "cpu-small": {
        "student": ("Qwen2-shaped, small (CPU check only)", SMALL_STUDENT),
        "teacher": ("Qwen2-shaped, small (CPU check only)", SMALL_TEACHER),
        "micro": 2, "seq": 64, "prompt": 16, "k": 16, "steps": 2,
        "prompts": 4, "min_prompt": 4, "max_prompt": 16, "new_tokens": 8, "batch": 4, "rounds": 1,
    },
}  # fmt: skip


def qwen2_config(spec: dict):
    from transformers import Qwen2Config

    vocab = spec["vocab_size"]
    return Qwen2Config(**spec, bos_token_id=vocab - 1, eos_token_id=vocab - 1, pad_token_id=0)


def matmul_params(config) -> int:
    """Weights that take part in a matmul per token: every layer's, plus the output embedding."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * config.num_key_value_heads
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i  # q, k and v, o, gate/up/down
    return layers * per_layer + config.vocab_size * h


def train_flops_per_token(config, seq: int) -> float:
    """Model FLOPs of a training step per token: 6 N + 12 L H T (PaLM's accounting, causal mask not halved)."""
    return 6 * matmul_params(config) + 12 * config.num_hidden_layers * config.hidden_size * seq


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in name:
            return value
    return None


def training_steps(shape: dict, gpu: bool, torch_adam: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from bdctl.distill_data import collate_examples
    from bdctl.engine import deepspeed_config, hf_deepspeed_context, lr_factor, make_engine, policy_module
    from bdctl.objectives.lm import IGNORE_INDEX, lean_cross_entropy
    from bdctl.recipe import load_recipe
    from bdctl.recipe.schema import DistillStage
    from bdctl.stages.distill import bd_terms

    label, spec = shape["student"]
    config_model = qwen2_config(spec)
    precision = "bf16" if gpu else "fp32"
    recipe, _ = load_recipe("smoke")  # deepspeed: zero3
    stage = DistillStage(batch_size=shape["micro"], micro_batch_size=shape["micro"], lr=1e-5, p=0.8)
    ds_config = deepspeed_config(
        recipe, stage, "gpu_check", 1, 10**6, config_model.hidden_size, precision, gpu and not torch_adam
    )
    with_ds = hf_deepspeed_context(ds_config)  # noqa: F841  (ZeRO-3 partitioned build, as the stages load)
    engine = make_engine(
        policy_module(AutoModelForCausalLM.from_config(config_model)), ds_config, lr_factor("linear", 10**6, 0)
    )
    device = engine.device
    vocab = config_model.vocab_size
    examples = synthetic_examples(vocab, shape["micro"], shape["seq"], shape["prompt"], shape["k"], seed=0)
    batch = {k: v.to(device) for k, v in collate_examples(examples, 0, vocab - 1, with_sets=True).items()}
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    labels[:, shape["prompt"] - 1 : -1] = batch["input_ids"][:, shape["prompt"] :]  # position j predicts j + 1

    heads = {
        "bd_step": lambda h, w: bd_terms(h, w, batch, stage).loss,
        "sft_step": lambda h, w: lean_cross_entropy(h, w, labels),
    }
    tokens = shape["micro"] * shape["seq"]
    flops = train_flops_per_token(config_model, shape["seq"]) * tokens
    found: dict[str, Any] = {}
    samples: dict[str, dict[str, list[float]]] = {name: {"seconds": [], "peak_mib": []} for name in heads}

    def step(name: str) -> tuple[float, float]:
        if gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            loss = engine(batch["input_ids"], batch["attention_mask"], loss_fn=heads[name])
            engine.backward(loss)
            engine.step()
            torch.cuda.synchronize()
            return time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**20
        with StepPeak() as memory, Timer() as timer:
            loss = engine(batch["input_ids"], batch["attention_mask"], loss_fn=heads[name])
            engine.backward(loss)
            engine.step()
        return timer.wall, memory.mib

    for name in heads:
        step(name)  # warm-up: kernels, the optimizer states
    for i in range(shape["steps"]):
        for name in heads if i % 2 == 0 else list(heads)[::-1]:
            seconds, peak = step(name)
            samples[name]["seconds"].append(seconds)
            samples[name]["peak_mib"].append(peak)
    for name, values in samples.items():
        seconds = statistics.median(values["seconds"])
        found[name] = {
            "seconds_median": seconds,
            "seconds": values["seconds"],
            "tokens_per_s": tokens / seconds,
            "model_tflops_per_s": flops / seconds / 1e12,
            "peak_memory_mib": max(values["peak_mib"]),
        }
    return {
        "model": label,
        "config": {k: v for k, v in spec.items()},
        "matmul_parameters": matmul_params(config_model),
        "precision": precision,
        "zero_stage": ds_config["zero_optimization"]["stage"],
        "optimizer": "torch AdamW" if (torch_adam or not gpu) else "DeepSpeed FusedAdam",
        "batch": {"micro": shape["micro"], "seq": shape["seq"], "prompt": shape["prompt"], "tokens": tokens},
        "flops_per_step": flops,
        "peak_memory": "torch.cuda.max_memory_allocated" if gpu else "peak RSS above the step's start (CPU)",
        **found,
    }


def sampling(shape: dict, gpu: bool) -> dict[str, Any]:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from bdctl.sampling import length_grouped_batches, sample

    label, spec = shape["teacher"]
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    with device:  # random weights made on the device: a 3B model's init on the host would take minutes
        model = AutoModelForCausalLM.from_config(qwen2_config(spec), dtype=dtype).eval()
    rng = np.random.default_rng(0)
    vocab = spec["vocab_size"]
    lengths = rng.integers(shape["min_prompt"], shape["max_prompt"] + 1, size=shape["prompts"])
    prompts = [rng.integers(1, vocab - 1, size=int(n)).tolist() for n in lengths]
    batches = length_grouped_batches([len(p) for p in prompts], shape["batch"])
    made = shape["prompts"] * shape["new_tokens"]

    def run(capture: bool) -> float:
        if gpu:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for rows in batches:
            sample(
                model, [prompts[i] for i in rows], rows, eos_id=None, pad_id=0, max_new_tokens=shape["new_tokens"],
                capture_top_p=0.8 if capture else None, capture_max_k=64,
            )  # fmt: skip
        if gpu:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    run(True)  # warm-up
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {"sampler": [], "sampler_with_capture": []}
    for r in range(shape["rounds"]):
        for capture in (False, True) if r % 2 == 0 else (True, False):
            times["sampler_with_capture" if capture else "sampler"].append(run(capture))
    return {
        "model": label,
        "config": dict(spec),
        "precision": "bf16" if gpu else "fp32",
        "prompts": shape["prompts"],
        "prompt_lengths": [int(lengths.min()), int(lengths.max())],
        "new_tokens": shape["new_tokens"],
        "batch": shape["batch"],
        "tokens_per_s": {name: made / statistics.median(values) for name, values in times.items()},
        "seconds": times,
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="small shapes on the CPU (also when no GPU is visible)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: by name)")
    parser.add_argument("--torch-adam", action="store_true", help="torch's AdamW instead of DeepSpeed's FusedAdam")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: train, sampling")
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available() and not args.cpu
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from bdctl.engine import init_distributed, quiet_libraries

    quiet_libraries()
    init_distributed()
    mode = "gpu" if gpu else "cpu-small"
    shape = SHAPES[mode]
    device_name = torch.cuda.get_device_name(0) if gpu else (platform.processor() or platform.machine())
    report: dict[str, Any] = {
        "mode": mode,
        "label": "one GPU, full shapes" if gpu else "CPU, SMALL shapes: checks the path only; no GPU figures",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    started = time.perf_counter()
    if "train" not in skip:
        report["train"] = training_steps(shape, gpu, args.torch_adam)
        peak = peak_tflops(device_name, args.peak_tflops) if gpu else None
        report["train"]["peak_bf16_tflops"] = peak
        for name in ("bd_step", "sft_step"):
            achieved = report["train"][name]["model_tflops_per_s"]
            report["train"][name]["mfu"] = achieved / peak if peak else None
        print(
            f"{mode}: {report['train']['model']}: "
            + "  ".join(
                f"{name} {report['train'][name]['tokens_per_s']:.0f} tok/s, "
                f"MFU {report['train'][name]['mfu'] if report['train'][name]['mfu'] is not None else 'n/a'}, "
                f"peak {report['train'][name]['peak_memory_mib']:.0f} MiB"
                for name in ("bd_step", "sft_step")
            ),
            flush=True,
        )
    if "sampling" not in skip:
        report["sampling"] = sampling(shape, gpu)
        rates = report["sampling"]["tokens_per_s"]
        print(
            f"{mode}: {report['sampling']['model']} sampling: {rates['sampler']:.0f} tok/s, "
            f"with capture {rates['sampler_with_capture']:.0f} tok/s",
            flush=True,
        )
    report["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
