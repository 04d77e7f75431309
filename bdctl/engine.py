"""DeepSpeed on every rank: process group, ZeRO config from the recipe, engine, checkpoints, export.

The objectives compute logits from the final hidden states and the output embedding (so that
full-vocabulary logits can be avoided), which means the output embedding is used outside its own
module. Under ZeRO-3 a parameter is only gathered while its owner's forward runs, so `policy_module`
registers that weight as an external parameter of the root module: DeepSpeed then gathers it for
the whole loss computation, forward and backward.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bdctl.environment import launcher_rank
from bdctl.errors import UserError, space_for
from bdctl.recipe.schema import Recipe, Train
from bdctl.rundir import (
    RunDir,
    manifest,
    mark_complete,
    read_json,
    replace_dir,
    stage_command,
    write_json_atomic,
    write_text_atomic,
)

# What an export was chosen for (step, selection metric, scores), until its stage finishes and
# the same facts go into its MANIFEST.json.
EXPORT_INFO = "selected.json"

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "deepspeed_configs"


# --------------------------------------------------------------------------- process group


def quiet_libraries() -> None:
    """Keep library chatter off the user's terminal (ranks and the launching process alike).

    Through environment variables the libraries read when they are imported, so that calling
    this costs no import (`--dry-run` and a judge over HTTP never load torch); a library already
    imported is told directly.
    """
    import logging
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' loading bars follow it
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "deepspeed" in sys.modules:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    # DeepSpeed still calls collectives that torch deprecates; not actionable for a user.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")


def quiet_deepspeed() -> None:
    """Before a rank imports DeepSpeed: name the CPU accelerator on a machine without CUDA devices
    (rather than have DeepSpeed warn that it guessed), and keep its INFO lines in the rank's log."""
    import logging

    import torch

    if torch.cuda.device_count() == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_STARTUP_OUTPUT: list[str] = []


def startup_output() -> list[str]:
    """What libraries printed while this process joined its process group (once), for its log."""
    lines = list(_STARTUP_OUTPUT)
    _STARTUP_OUTPUT.clear()
    return lines


def init_distributed() -> tuple[int, int]:
    """Join the process group set up by the launcher (or make a group of one); returns (rank, world)."""
    quiet_deepspeed()
    if launcher_rank() is None:  # started in-process, without a launcher (checked: one line if malformed)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if not dist.is_initialized():
        # DeepSpeed's CPU backend print()s "DeepSpeed deepspeed_shm_comm_op built successfully" on
        # every rank of every command (no logger, no verbosity setting): kept for the rank's log
        # (`startup_output`), off the terminal.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False)
        _STARTUP_OUTPUT.extend(line for line in printed.getvalue().splitlines() if line.strip())
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), dist.get_world_size()


def global_mean(total: float, count: float, device) -> float:
    """sum(total) / sum(count) over all ranks (e.g. a validation loss from per-rank sums)."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([total, count], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor[0] / tensor[1]).item()


def on_gpu() -> bool:
    quiet_deepspeed()  # the launching process may reach DeepSpeed here first (e.g. to pick a precision)
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


# --------------------------------------------------------------------------- config


def resolve_precision(recipe: Recipe) -> str:
    wanted = recipe.deepspeed.precision
    if wanted != "auto":
        return wanted
    if on_gpu():
        from deepspeed.accelerator import get_accelerator

        return "bf16" if get_accelerator().is_bf16_supported() else "fp16"
    return "fp32"


def config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".json" or "/" in name:
        if not path.is_file():
            raise UserError(f"deepspeed.config: {name}: file not found")
        return path
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise UserError(f"deepspeed.config: no config named {name!r} in {CONFIG_DIR} (known: {known})")
    return path


def check_batch_split(train: Train, stage: str, world_size: int) -> None:
    """The global batch must be micro batch x gradient accumulation x ranks."""
    if train.batch_size % (train.micro_batch_size * world_size):
        raise UserError(
            f"stages.{stage}.batch_size ({train.batch_size}) is not a multiple of "
            f"micro_batch_size ({train.micro_batch_size}) x ranks ({world_size})"
        )


def deepspeed_config(
    recipe: Recipe,
    train: Train,
    stage: str,
    world_size: int,
    total_steps: int,
    hidden_size: int,
    precision: str,
    gpu: bool,
) -> dict[str, Any]:
    """The recipe's ZeRO config with every "auto" field filled in.

    The global batch is the recipe's; it must split into micro batch x accumulation x ranks.
    """
    path = config_path(recipe.deepspeed.config)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
    check_batch_split(train, stage, world_size)
    per_step = train.micro_batch_size * world_size
    values = {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.batch_size // per_step,
        "gradient_clipping": train.grad_clip,
        "bf16.enabled": precision == "bf16",
        "fp16.enabled": precision == "fp16",
        "optimizer.params.lr": train.lr,
        "optimizer.params.weight_decay": train.weight_decay,
        "optimizer.params.torch_adam": not gpu,  # DeepSpeed's fused Adam needs a GPU
        "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
    }
    _fill_auto(config, values, path, prefix="")
    if train.adam_betas is not None:
        if "optimizer" not in config:
            raise UserError(f"stages.{stage}.adam_betas: the DeepSpeed config {path} has no optimizer to set them on")
        config["optimizer"].setdefault("params", {})["betas"] = list(train.adam_betas)
    return config


def _fill_auto(node: dict, values: dict[str, Any], path: Path, prefix: str) -> None:
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            _fill_auto(value, values, path, prefix=f"{dotted}.")
        elif value == "auto":
            if dotted not in values:
                raise UserError(f"{path}: {dotted}: bdctl cannot fill 'auto' here; give a value")
            node[key] = values[dotted]


# --------------------------------------------------------------------------- model + engine


def policy_module(model):
    """Wrap a causal LM so the loss runs inside the root forward, output embedding gathered."""
    import deepspeed
    import torch

    class _PolicyModule(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm
            deepspeed.zero.register_external_parameter(self, lm.get_output_embeddings().weight)

        @property
        def config(self):  # the sampler reads the position limit from it
            return self.lm.config

        def forward(self, input_ids, attention_mask=None, loss_fn: Callable | None = None, **lm_kwargs):
            if loss_fn is None:
                # A plain causal-LM forward (sampling for Rouge-L selection), still through the
                # root module, so ZeRO-3 gathers and releases parameters as in training.
                return self.lm(input_ids=input_ids, attention_mask=attention_mask, **lm_kwargs)
            hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return loss_fn(hidden.last_hidden_state, self.lm.get_output_embeddings().weight)

    return _PolicyModule(model)


def hf_deepspeed_context(config: dict):
    """Keep the returned object alive while loading a model: transformers then loads it
    partitioned under ZeRO-3 (deepspeed.zero.Init) instead of whole on every rank."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(config)


def lr_factor(schedule: str, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Learning-rate factor per optimizer step: linear warm-up over `warmup_steps`, then `schedule`
    ("linear" or "cosine" decay to zero at `total_steps`, or "constant") until `total_steps`.

    The warm-up is bdctl's: step 1 already trains at lr / (warmup + 1), and at the full rate when
    there is no warm-up (DeepSpeed's WarmupDecayLR and transformers' warm-up spend their first step at
    rate zero). After it, cosine is transformers' get_cosine_schedule_with_warmup (half a cycle), the
    BD release's `cosine_trm` [bellman/trainer.py:82-83].
    """

    def factor(step: int) -> float:  # step = optimizer steps taken so far
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if schedule == "linear":
            return 1.0 - progress
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def lr_schedule(train: Train, stage: str, run_steps: int) -> Callable[[int], float]:
    """The recipe's schedule for a run of `run_steps` optimizer steps (`Train.schedule`,
    `warmup_steps` or `warmup_ratio`, `schedule_steps`)."""
    total = train.schedule_steps or run_steps
    if run_steps > total:
        raise UserError(
            f"stages.{stage}.schedule_steps ({total}) is shorter than the run ({run_steps} optimizer steps): "
            "raise schedule_steps, or cap the run with max_steps"
        )
    warmup = int(train.warmup_ratio * total) if train.warmup_steps is None else train.warmup_steps
    return lr_factor(train.schedule, total, warmup)


def describe_optimisation(train: Train) -> str:
    """The optimiser and schedule of a training stage in words (a run's header)."""
    betas = f"betas {list(train.adam_betas)}" if train.adam_betas is not None else "the DeepSpeed config's betas"
    warmup = (
        f"{train.warmup_steps} warm-up steps"
        if train.warmup_steps is not None
        else (f"warm-up {train.warmup_ratio:g} of the schedule" if train.warmup_ratio > 0 else "no warm-up")
    )
    length = f"over {train.schedule_steps} steps" if train.schedule_steps is not None else "over the run"
    return (
        f"optimiser: AdamW lr {train.lr:g}, {betas}, weight decay {train.weight_decay:g}; "
        f"{train.schedule} schedule, {warmup}, {length}"
    )


def make_engine(module, config: dict, schedule: Callable[[int], float] | None = None):
    """A DeepSpeed engine; the learning rate follows `schedule` (a factor per optimizer step, see
    `lr_schedule`) unless the DeepSpeed config brings a scheduler of its own."""
    import deepspeed
    import torch

    scheduler = None
    if schedule is not None and "scheduler" not in config:
        scheduler = lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)  # noqa: E731
    params = [p for p in module.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config, lr_scheduler=scheduler)
    return engine


def make_inference_engine(module, config: dict):
    """A frozen model (distill's live teacher) as a DeepSpeed engine without an optimizer.

    Under ZeRO-3 its weights stay partitioned across ranks and are gathered layer by layer in
    each forward (collective: every rank must run the same forward passes). Eval mode, no
    gradients; call it under torch.no_grad().
    """
    import deepspeed

    config = {k: v for k, v in config.items() if k not in ("optimizer", "scheduler")}
    for param in module.parameters():
        param.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()
    return engine


# --------------------------------------------------------------------------- checkpoints + export


def gathered_state_dict(model, rank: int) -> dict:
    """Full weights on rank 0, gathered one parameter at a time from the ZeRO-3 partitions."""
    import deepspeed

    state = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    if rank == 0:
        persistent = set(model.state_dict().keys())
        state.update({n: b.detach().cpu() for n, b in model.named_buffers() if n in persistent})
    return state


def export_hf(engine, tokenizer, out_dir: Path, rank: int, info: dict | None = None) -> None:
    """Save the engine's language model as a standard Hugging Face directory (weights, config,
    tokenizer), with `info` (which step, which scores) in EXPORT_INFO. Collective: every rank must
    call it. The directory appears whole or not at all, but without a manifest: it is a candidate
    of an unfinished stage until the stage's `bdctl.training.finish` marks it complete.
    """
    import torch.distributed as dist

    from bdctl import lora

    model = engine.module.lm
    if hasattr(engine, "empty_partition_cache"):
        # ZeRO-3 may still have parameters in flight from the last forward (prefetching);
        # settle them before gathering one by one.
        engine.empty_partition_cache()
    adapter_spec, adapter = lora.spec_of(model), None
    if adapter_spec is None:
        state = gathered_state_dict(model, rank)
    else:  # a LoRA model: the base with its adapters merged in, under the plain model's names
        state = lora.merged_state_dict(model, rank)
        if adapter_spec.save_adapter:
            adapter = lora.adapter_state_dict(model, rank)
    if rank == 0:
        tmp = out_dir.with_name(f".{out_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        needed = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
        try:
            with space_for(out_dir.parent, f"the export {out_dir.name}", needed):
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
                if adapter is not None:
                    lora.save_adapter(model, adapter, tmp / lora.ADAPTER_DIR)
                tokenizer.save_pretrained(tmp)
                write_json_atomic(tmp / EXPORT_INFO, info or {})
                write_model_card(out_dir.parent, tmp, info or {}, directory=out_dir.name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never half an export, nor the space it took
            raise
        replace_dir(tmp, out_dir)
    dist.barrier()


def _parameter_count(module) -> int:
    """Parameters of a module, whole also when ZeRO-3 has partitioned them (`ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose manifest was written (a half-written one never counts)."""
    if not root.is_dir():
        return None
    steps = {p: done["step"] for p in root.iterdir() if p.is_dir() and (done := manifest(p)) is not None}
    return max(steps, key=steps.__getitem__, default=None)


def check_resumable(checkpoint: Path, fingerprint: str, world: int) -> None:
    """Refuse a checkpoint written for another recipe or another number of ranks."""
    info = read_json(checkpoint / "MANIFEST.json")
    if info.get("fingerprint") != fingerprint:
        raise UserError(
            f"{checkpoint}: this checkpoint belongs to a different recipe or stage settings; "
            f"use --force to start over (or restore the recipe it was made with)"
        )
    if info.get("world_size") != world:
        raise UserError(
            f"{checkpoint}: written by {info.get('world_size')} ranks; "
            f"resume with the same number of ranks (now {world})"
        )


MODEL_CARD = "README.md"


def write_model_card(
    stage_dir: Path,
    export_dir: Path,
    info: dict,
    stage_facts: dict | None = None,
    test: dict | None = None,
    directory: str | None = None,
) -> None:
    """Write (or rewrite) the model card README.md of an exported directory of `stage_dir`
    (`bdctl.modelcard`): from the stage's job.json, the export's `info` (step and validation
    scores), the stage's facts once it has them (notes), eval's `test` scores (protocol -> set ->
    {mean, std, per_seed}) and the run's data split. `directory`: the name the card gives the
    directory (export_dir may be a temporary one). Nothing is written without a job.json."""
    import logging

    import bdctl
    from bdctl.modelcard import card_facts, override_flags, render_card, set_flags
    from bdctl.recipe import load_recipe

    job_file = stage_dir / "job.json"
    if not job_file.is_file():
        return
    job = read_json(job_file)
    split = Path(job["run_root"]) / "data" / "split.json"
    counts = read_json(split) if split.is_file() else None
    run = RunDir(job["run_root"])  # gguf / from_teacher models: their manifests name source, choice and size
    built = {role: found for role in ("teacher", "student") if (found := manifest(run.built_model(role)))}
    if "overrides" in job:  # the command's own --set items (jobs written since bdctl records them)
        flags = override_flags(job["overrides"])
    else:  # an older job.json: the resolved recipe against the file's (as the CLI applied --ablation)
        try:
            recipe, _ = load_recipe(job["recipe_path"])
            from_file = recipe.model_dump(mode="json")
            ablation = (job.get("options") or {}).get("ablation")
            if ablation:
                from_file["stages"]["distill"].update(recipe.stages.distill.ablations.runs().get(ablation, {}))
        except (UserError, OSError):
            from_file = None  # the recipe file moved or changed beyond reading: the command without --set
        flags = set_flags(job["recipe"], from_file)
    try:
        facts = card_facts(
            job, directory or export_dir.name, info, stage_facts, test, version=bdctl.__version__, counts=counts,
            command=stage_command(job["stage_name"], job["recipe_path"]), flags=flags, built=built,
            base_card=base_model_card(job),
        )  # fmt: skip
        text = render_card(facts)
    except (KeyError, TypeError, ValueError) as exc:
        # A card is documentation: a job.json it cannot read (another bdctl version's) must not end a run.
        logging.getLogger(__name__).warning("%s: no model card (%s: %s)", export_dir, type(exc).__name__, exc)
        return
    write_text_atomic(export_dir / MODEL_CARD, text)


def base_model_card(job: dict) -> dict:
    """The base model's `license` and `language` for an export's card: from its model card's front
    matter, else its config, read from its local directory or the local hub cache (nothing is
    downloaded); {} for a tiny model or when neither is at hand."""
    from bdctl.modelcard import parse_front_matter

    role = (job.get("options") or {}).get("model", "teacher") if job["stage"] == "sft" else "student"
    spec = job["recipe"]["models"].get(role) or {}
    path, revision = spec.get("path"), spec.get("revision")
    if not path:
        return {}

    def local(name: str) -> Path | None:
        if Path(path).expanduser().is_dir():
            candidate = Path(path).expanduser() / name
            return candidate if candidate.is_file() else None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, name, revision=revision)
        except Exception:  # a path that is no valid repo id, an unreadable cache: nothing known
            return None
        return Path(cached) if isinstance(cached, str) else None

    found: dict = {}
    for name in ("config.json", "README.md"):  # the card's word counts over the config's
        file = local(name)
        if file is None:
            continue
        try:
            text = file.read_text(encoding="utf-8")
            meta = json.loads(text) if name == "config.json" else parse_front_matter(text)
        except Exception:  # unreadable, not JSON, malformed YAML front matter: a card is documentation
            continue
        found.update({k: meta[k] for k in ("license", "language") if isinstance(meta, dict) and meta.get(k)})
    return found


def save_checkpoint(engine, root: Path, tag: str, client_state: dict, keep: int, rank: int, info: dict) -> None:
    """A DeepSpeed checkpoint plus client state. It counts once its manifest (with `info`) is
    written, after every rank has saved; then only the newest `keep` are kept."""
    import torch.distributed as dist

    if rank == 0:
        shutil.rmtree(root / tag, ignore_errors=True)  # a half-written one, from a killed run
    dist.barrier()
    # Weights, the fp32 master copy and Adam's two moments: about 16 bytes per parameter in all.
    with space_for(root / tag, f"checkpoint {tag}", 16 * _parameter_count(engine.module)):
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0:
        mark_complete(root / tag, tag=tag, step=client_state["train_state"]["step"], **info)
        steps = {p: done["step"] for p in root.iterdir() if p.is_dir() and (done := manifest(p)) is not None}
        finished = sorted(steps, key=steps.__getitem__)
        for old in finished[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
