"""What a LoRA student saves next to full fine-tuning: training-state bytes, peak memory and step time of
one SFT optimizer step (issue 22), on the tiny student and on a ~135M model shaped like SmolLM2-135M.

    python benchmarks/bench_lora.py                               # both models, both sides, 3 rounds
    python benchmarks/bench_lora.py --models tiny --rounds 5 --out /tmp/lora.json

Models, built from configs with random weights (nothing downloaded):
    tiny    the smoke recipe's student shape: GPT-2, 1 layer, hidden 32, 2 heads, vocabulary 512
    smollm  SmolLM2-135M's shape: llama, hidden 576, 30 layers, 9 heads, 3 kv heads, ffn 1536,
            vocabulary 49152, tied embeddings (134.5M parameters)
Sides: `full` (every weight trains, as the paper does) and `lora` (bdctl.lora.apply: r 8, alpha 16, on every
attention and MLP projection: q/k/v/o/gate/up/down_proj for llama, c_attn/c_proj/c_fc for GPT-2).

Every measurement runs in its own process through bdctl's training path: the model built from its config
under the ZeRO-3 `HfDeepSpeedConfig` (for the LoRA side, `bdctl.lora.apply`, what `models.load_model` calls),
`engine.policy_module`, `engine.make_engine` (one rank, CPU, fp32, torch's Adam), `lean_cross_entropy` on a
random batch, `engine.backward` and `engine.step`. One warm-up step, then `--steps` measured steps. The
sides alternate within each round (order reversed on odd rounds) and the ratios are per round, then the
median over rounds.

    trainable       parameters the optimizer updates
    state_mib       bytes of the optimizer's tensors after the warm-up step: its fp32 parameter partitions
                    and their Adam moments (exp_avg, exp_avg_sq), read from the optimizer itself
    peak_mib        peak resident set size during the measured steps above the size just before them
                    (activations, gradients, temporaries; glibc serves large blocks with mmap so freed
                    tensors leave the RSS at once)
    seconds         wall clock per measured step (median), and the process's CPU seconds per step beside it

`--plain` runs the same policy module, loss and AdamW settings in plain torch (no DeepSpeed): a labelled
reference that separates what LoRA saves from what ZeRO-3's per-module hooks cost on the adapters' modules.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MODELS = ("tiny", "smollm")
SIDES = ("full", "lora")
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


class PeakRSS:
    """Peak resident set size (bytes) above the level at start, sampled by a thread."""

    def __init__(self, interval: float = 0.001):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.interval = interval

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


def model_config(name: str):
    from transformers import GPT2Config, LlamaConfig

    if name == "tiny":
        return GPT2Config(
            vocab_size=512, n_layer=1, n_embd=32, n_head=2, n_positions=128,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip
    return LlamaConfig(
        vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )  # fmt: skip


def optimizer_bytes(engine) -> int:
    """The optimizer's own tensors: ZeRO-3's fp32 parameter partitions (the torch optimizer's param groups
    point at them only during a step) and the torch optimizer's state (Adam's two moments per partition)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(tensor) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for flat in getattr(engine.optimizer, "fp32_partitioned_groups_flat", []):
        add(flat)
    if isinstance(engine, PlainEngine):  # the trained parameters are the fp32 master weights themselves
        for group in engine.optimizer.param_groups:
            for param in group["params"]:
                add(param)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO's wrapper -> the torch optimizer
    for state in inner.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:  # not Adam's step counter
                add(value)
    return total


class PlainEngine:
    """`--plain`: the policy module with torch's AdamW over its trainable parameters, no DeepSpeed."""

    def __init__(self, module, ds_config: dict):
        import torch

        self.module = module
        params = ds_config["optimizer"]["params"]
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=params["lr"], weight_decay=params["weight_decay"])

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def run_one(args) -> dict:
    """One side on one model in this process: engine, a warm-up step, `steps` measured steps."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    from bdctl.engine import (
        deepspeed_config,
        hf_deepspeed_context,
        init_distributed,
        lr_factor,
        make_engine,
        policy_module,
        quiet_libraries,
    )  # fmt: skip
    from bdctl.lora import apply, trainable_parameters
    from bdctl.objectives.lm import lean_cross_entropy
    from bdctl.recipe import load_recipe
    from bdctl.recipe.schema import LoRA, SFTStage

    quiet_libraries()
    init_distributed()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    config = model_config(args.model)
    recipe, _ = load_recipe("smoke")
    stage = SFTStage(batch_size=args.micro, micro_batch_size=args.micro, lr=1e-4)
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    ds_config = deepspeed_config(recipe, stage, "bench", 1, 100, hidden, "fp32", False)
    # ZeRO-3 partitioned load, as the stages do (--plain: no DeepSpeed at all)
    with_ds = None if args.plain else hf_deepspeed_context(ds_config)  # noqa: F841
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if args.side == "lora":  # what models.load_model does with models.<role>.lora
        model = apply(model, LoRA(r=8, alpha=16, target_modules=TARGETS[config.model_type]), args.seed, "bench")
    if args.plain:  # the same module, loss and AdamW settings in plain torch: what ZeRO-3 itself costs
        engine = PlainEngine(policy_module(model), ds_config)
    else:
        engine = make_engine(policy_module(model), ds_config, lr_factor("linear", 100, 0))
    generator = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, config.vocab_size, (args.micro, args.seq), generator=generator)
    labels = ids.clone()
    labels[:, : args.seq // 4] = -100  # the prompt quarter is not scored, as in SFT

    def step() -> float:
        loss = engine(ids, torch.ones_like(ids), loss_fn=lambda h, w: lean_cross_entropy(h, w, labels))
        engine.backward(loss)
        engine.step()
        return float(loss)

    step()  # warm-up: DeepSpeed's first-step set-up and the optimizer states
    state = optimizer_bytes(engine)
    walls, cpus = [], []
    with PeakRSS() as memory:
        for _ in range(args.steps):
            started, cpu = time.perf_counter(), time.process_time()
            value = step()
            walls.append(time.perf_counter() - started)
            cpus.append(time.process_time() - cpu)
    return {
        "model": args.model, "side": args.side, "trainable": trainable_parameters(engine.module.lm),
        "parameters": sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.lm.parameters()),
        "state_mib": state / 2**20, "peak_mib": (memory.peak - memory.base) / 2**20,
        "seconds": statistics.median(walls), "cpu_seconds": statistics.median(cpus), "loss": value,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="measured steps per process (after one warm-up)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--micro", type=int, default=2, help="sequences per step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plain", action="store_true", help="plain torch AdamW instead of the ZeRO-3 engine")
    parser.add_argument("--model", help=argparse.SUPPRESS)  # internal: run one side on one model
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    if args.side:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    shape = {k: getattr(args, k) for k in ("steps", "seq", "micro", "threads", "seed")}
    plain = ["--plain"] if args.plain else []
    print(f"batch {args.micro} x {args.seq} tokens, {args.steps} measured steps per process, {args.threads} thread(s)")
    report: dict[str, dict] = {}
    for model in args.models.split(","):
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        for round_ in range(args.rounds):
            for side in SIDES if round_ % 2 == 0 else SIDES[::-1]:
                command = [sys.executable, __file__, "--model", model, "--side", side,
                           *[f"--{k}={v}" for k, v in shape.items()], *plain]  # fmt: skip
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise SystemExit(f"{model} {side}: failed\n{done.stderr[-3000:]}")
                result = json.loads(line[7:])
                runs[side].append(result)
                print(
                    f"{model:7s} {side:5s} round {round_}: {result['seconds']:7.3f} s/step "
                    f"({result['cpu_seconds']:.3f} CPU s), optimizer state {result['state_mib']:8.2f} MiB, "
                    f"peak {result['peak_mib']:8.1f} MiB, "
                    f"trainable {result['trainable']:,} of {result['parameters']:,}",
                    flush=True,
                )

        pairs = list(zip(runs["lora"], runs["full"], strict=True))
        ratios = {
            key: statistics.median([lo[key] / full[key] for lo, full in pairs if full[key]] or [float("nan")])
            for key in ("seconds", "cpu_seconds", "state_mib", "peak_mib")
        }
        ratios["trainable"] = runs["lora"][0]["trainable"] / runs["full"][0]["trainable"]
        report[model] = {"runs": runs, "lora_over_full": ratios}
        print(
            f"{model}: LoRA / full  time {ratios['seconds']:.2f}x (CPU {ratios['cpu_seconds']:.2f}x), optimizer "
            f"state {ratios['state_mib']:.4f}x, peak {ratios['peak_mib']:.2f}x, trainable {ratios['trainable']:.4f}x"
        )
    if args.out:
        load = os.getloadavg()
        payload = {"shape": shape, "plain": args.plain, "load_average": load, "models": report}
        args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
