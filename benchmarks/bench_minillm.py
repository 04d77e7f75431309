"""What a MiniLLM step costs next to a Bellman Distill step and an SFT step, on one student and one batch
(the per-step side of the paper's Table 3).

    python benchmarks/bench_minillm.py                                  # defaults below, a table and the ratios
    python benchmarks/bench_minillm.py --layers 4 --hidden 512 --teacher-layers 8 --out bench.json

One process, one rank (CPU here, or the first GPU), the real training path: a DeepSpeed ZeRO-3 engine with
`policy_module` for the student (GPT-2 architecture from a config, random weights, vocabulary 50257) and the
stages' own loss functions. The teacher is a wider, deeper GPT-2 (its own output embedding), a whole copy beside the
student (`minillm.zero_inference: false`, the default). The batch: `micro` prompts of `prompt` random tokens,
each with a response of `response` tokens.

    sft               lean cross-entropy on the responses (what `bdctl sft` runs)
    bd                Bellman Distill, paper variant, from synthetic top-p sets (mean size about 6)
    bd_pt             bd + the pretraining term on a block batch of the same shape (how the recipes run BD)
    minillm rollout   the teacher-mixed sampler (bdctl.rollouts) producing the batch's responses from its
                      prompts: `response` tokens each (no EOS can end them early), student and teacher forwards
                      with KV caches, on the training engine in eval mode
    minillm update    one optimizer step of MiniLLM on those rollouts: L_pg + the single-step reverse KL (a
                      teacher forward and the chunked two-model term) + the pretraining term with teacher KD
                      (k = 0.5), how the recipes run it

A MiniLLM optimizer step is `update + rollout / ppo_epochs`: a collection is sampled once and trained on
`ppo_epochs` times (4 in MiniLLM). Each configuration takes one warm-up step, then `--repeat` rounds run each
configuration once; the median per configuration is reported (wall clock, forward + backward + optimizer step;
for the rollout, the sampling).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--teacher-layers", type=int, default=8)
    parser.add_argument("--teacher-hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--response", type=int, default=128)
    parser.add_argument("--micro", type=int, default=4, help="sequences per step")
    parser.add_argument("--ppo-epochs", type=int, default=4, help="passes over a collection (MiniLLM: 4)")
    parser.add_argument("--repeat", type=int, default=3, help="measured rounds (each configuration once per round)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from bdctl.engine import (
        deepspeed_config,
        hf_deepspeed_context,
        init_distributed,
        lr_factor,
        make_engine,
        policy_module,
        quiet_libraries,
    )
    from bdctl.objectives.bellman_lean import lean_terms
    from bdctl.objectives.kd import mixed_kd_loss
    from bdctl.objectives.lm import IGNORE_INDEX, lean_cross_entropy
    from bdctl.objectives.minillm import lean_log_probs, lean_reverse_kl, lean_teacher_kd, policy_loss
    from bdctl.recipe import load_recipe
    from bdctl.recipe.schema import DistillStage
    from bdctl.rollouts import mixed_sample
    from bdctl.stages.minillm import Rollout, collate_rollouts, minibatch_advantages

    quiet_libraries()
    init_distributed()
    torch.manual_seed(args.seed)
    recipe, _ = load_recipe("smoke")
    config = DistillStage(batch_size=args.micro, micro_batch_size=args.micro, lr=1e-5)
    own = config.minillm
    seq = args.prompt + args.response

    def gpt2(layers, hidden):
        return GPT2Config(
            vocab_size=args.vocab, n_layer=layers, n_embd=hidden, n_head=max(1, hidden // 64), n_positions=seq,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )  # fmt: skip

    teacher = policy_module(
        AutoModelForCausalLM.from_config(gpt2(args.teacher_layers, args.teacher_hidden))
    ).eval()  # before ZeRO-3's context
    for param in teacher.parameters():
        param.requires_grad_(False)
    ds_config = deepspeed_config(recipe, config, "bench", 1, 1000, args.hidden, "fp32", False)
    with_ds = hf_deepspeed_context(ds_config)  # noqa: F841  (partitioned load, as the stages do)
    engine = make_engine(
        policy_module(AutoModelForCausalLM.from_config(gpt2(args.layers, args.hidden))),
        ds_config,
        lr_factor("linear", 1000, 0),
    )
    device = engine.device
    teacher.to(device)
    teacher_weight = teacher.lm.get_output_embeddings().weight.detach()
    n_student = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())

    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(1, args.vocab - 1, size=args.prompt).tolist() for _ in range(args.micro)]
    responses = [rng.integers(1, args.vocab - 1, size=args.response) for _ in range(args.micro)]
    ids = torch.tensor([p + r.tolist() for p, r in zip(prompts, responses, strict=True)])
    mask = torch.ones_like(ids)
    positions = (torch.arange(args.response) + args.prompt - 1).expand(args.micro, -1)
    actions = torch.from_numpy(np.stack(responses))
    valid = torch.ones_like(actions, dtype=torch.bool)
    terminal = torch.zeros_like(valid)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, args.prompt - 1 : -1] = actions
    blocks = torch.randint(0, args.vocab, (args.micro, seq), generator=torch.Generator().manual_seed(1))
    # synthetic top-p sets: sizes about 6, the action inside nine times in ten (as bench_distill.py)
    width = 16
    kept = torch.from_numpy(np.minimum(rng.geometric(1 / 6, size=actions.shape), width))
    sets = np.stack([rng.choice(args.vocab, size=width, replace=False) for _ in range(actions.numel())]).reshape(
        *actions.shape, width
    )
    for index in np.ndindex(*actions.shape):
        action, members = int(actions[index]), sets[index]
        if rng.random() < 0.9:  # the action first in its set (distinct ids: it may already be a member)
            members[members == action] = members[0]
            members[0] = action
    cand_ids = torch.from_numpy(sets)
    cand_mask = torch.arange(width)[None, None, :] < kept[..., None]

    def at_response(hidden):
        return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))[valid]

    def pretrain(k):
        rows = None
        if k > 0:
            with torch.no_grad():
                rows = teacher(blocks, torch.ones_like(blocks), loss_fn=lambda h, w: h[:, :-1].reshape(-1, h.shape[-1]))

        def head(hidden, weight):
            ce = lean_cross_entropy(hidden[:, :-1], weight, blocks[:, 1:])
            if rows is None:
                return ce
            return mixed_kd_loss(
                ce, lean_teacher_kd(hidden[:, :-1].reshape(-1, hidden.shape[-1]), weight, rows, teacher_weight), k
            )

        return engine(blocks, torch.ones_like(blocks), loss_fn=head)

    def train(loss):
        engine.backward(loss)
        engine.step()

    def sft():
        train(engine(ids, mask, loss_fn=lambda h, w: lean_cross_entropy(h, w, labels)))

    def bd(with_pt):
        def head(hidden, weight):
            rows = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
            terms = lean_terms(rows, weight, cand_ids, cand_mask,
                               actions, valid, terminal, gamma=0.99, alpha=0.1, q_min=-10.0, chi2=True)  # fmt: skip
            return terms.loss

        loss = engine(ids, mask, loss_fn=head)
        train(loss + pretrain(0.0) if with_pt else loss)

    collected = {}

    def rollout():
        engine.eval()
        found = mixed_sample(
            engine.module, teacher, prompts, list(range(args.micro)), mix=own.teacher_mix, eos_id=-1, pad_id=0,
            max_new_tokens=args.response,
        )  # fmt: skip
        engine.train()
        collected["rollouts"] = [
            Rollout(
                row=i,
                tokens=np.asarray(f.tokens, dtype=np.int64),
                log_q=f.log_q,
                log_p=f.log_p,
                log_mix=f.log_mix,
                eos=False,
            )
            for i, f in enumerate(found)
        ]

    def update():
        rollouts = collected["rollouts"]
        batch = collate_rollouts(rollouts, minibatch_advantages(rollouts, own), own, prompts, pad_id=0)
        b_valid, b_positions = batch["valid"], batch["positions"]

        def pick(hidden):
            return hidden.gather(1, b_positions[..., None].expand(-1, -1, hidden.shape[-1]))[b_valid]

        with torch.no_grad():
            t_rows = teacher(batch["input_ids"], batch["attention_mask"], loss_fn=lambda h, w: pick(h))
        flat = torch.ones((1, int(b_valid.sum())), dtype=torch.bool)

        def head(hidden, weight):
            rows = pick(hidden)
            log_q = lean_log_probs(rows, weight, batch["actions"][b_valid])
            terms = policy_loss(log_q[None], batch["old_log_q"][b_valid][None], batch["weights"][b_valid][None],
                                batch["advantages"][b_valid][None], flat, clip=own.ppo_clip)  # fmt: skip
            return terms.loss + lean_reverse_kl(rows, weight, t_rows, teacher_weight)

        train(engine(batch["input_ids"], batch["attention_mask"], loss_fn=head) + pretrain(own.pt_kd_ratio))

    configs = {
        "sft": sft,
        "bd": lambda: bd(False),
        "bd_pt": lambda: bd(True),
        "minillm rollout": rollout,
        "minillm update": update,
    }
    for fn in configs.values():
        fn()  # warm-up (DeepSpeed's first-step set-up, the optimizer states, the allocator)
    times = {name: [] for name in configs}
    cpu = {name: [] for name in configs}
    for _ in range(args.repeat):  # rounds: a busy machine's slow spells spread over every configuration
        for name, fn in configs.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)

    print(
        f"student: GPT-2 {args.layers} layers x {args.hidden} ({n_student / 1e6:.1f} M), teacher "
        f"{args.teacher_layers} layers x {args.teacher_hidden} ({n_teacher / 1e6:.1f} M), vocabulary {args.vocab}; "
        f"batch {args.micro} x ({args.prompt} prompt + {args.response} response) tokens"
    )

    def summary(samples):
        seconds = {name: float(np.median(values)) for name, values in samples.items()}
        seconds["minillm step"] = seconds["minillm update"] + seconds["minillm rollout"] / args.ppo_epochs
        step = seconds["minillm step"]
        ratios = {
            "minillm step / sft": step / seconds["sft"],
            "minillm step / bd": step / seconds["bd"],
            "minillm step / bd_pt": step / seconds["bd_pt"],
            "minillm update / sft": seconds["minillm update"] / seconds["sft"],
            "rollout share of a minillm step": seconds["minillm rollout"] / args.ppo_epochs / step,
            "update share of a minillm step": seconds["minillm update"] / step,
            "bd_pt / sft": seconds["bd_pt"] / seconds["sft"],
        }
        return seconds, ratios

    # Wall clock is what a user waits for; the process's CPU time is the steadier measure on a shared machine.
    seconds, ratios = summary(times)
    cpu_seconds, cpu_ratios = summary(cpu)
    print(f"{'':16s} {'wall s':>8s} {'CPU s':>8s}")
    for name in seconds:
        print(f"{name:16s} {seconds[name]:8.3f} {cpu_seconds[name]:8.3f}")
    print(f"\nratios (a MiniLLM step = update + rollout / {args.ppo_epochs} PPO epochs)   wall    CPU")
    for name in ratios:
        print(f"{name:42s} {ratios[name]:6.2f}  {cpu_ratios[name]:6.2f}")
    print(
        "docs/method.md §6's estimate of the update alone, 2 + 2 N_teacher / (3 N_student): "
        f"{2 + 2 * n_teacher / (3 * n_student):.2f} x SFT"
    )
    if args.out:
        shape = {
            k: getattr(args, k)
            for k in (
                "layers",
                "hidden",
                "teacher_layers",
                "teacher_hidden",
                "vocab",
                "prompt",
                "response",
                "micro",
                "ppo_epochs",
                "repeat",
                "seed",
            )
        }
        result = {
            "shape": shape, "parameters": {"student": n_student, "teacher": n_teacher}, "seconds": seconds,
            "ratios": ratios, "cpu_seconds": cpu_seconds, "cpu_ratios": cpu_ratios,
            "samples": {"wall": times, "cpu": cpu},
        }  # fmt: skip
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
