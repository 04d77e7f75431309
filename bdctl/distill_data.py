"""What a distill run trains on, decided once from the recipe and read the same way in the
launching process and on every rank: the method's `Setup`, the training examples (D* from its
cache, or the golden responses with the scoring cache: `load_train_data`), their micro-batches on
the response frame (`collate_examples`) and which transitions a loss counts (`bd_scored`,
`batch_count`; docs/method.md §2). The distill stage (bdctl/stages/distill.py) puts these
together with the loss heads; benchmarks and tests use them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from bdctl.errors import UserError
from bdctl.job import Job
from bdctl.rundir import manifest, stage_command

SCORE_STAGE = "score_train"  # the teacher's sets over the golden training responses: runs/<name>/score_train/cache


# --------------------------------------------------------------------------- what a job needs


@dataclass(frozen=True)
class Setup:
    """What the recipe and the method ask for, decided the same way in prepare() and on every rank."""

    method: str
    variant: str  # bd only
    kd_ratio: float  # kd / seqkd: r of (1 - r) CE + r KD
    sets: str | None  # bd: where A_t comes from: "cache", "live", or None (p = 1: the whole vocabulary)
    kd_teacher: str | None  # kd / seqkd with r > 0: "cache" or "live"
    pretrain: bool
    pt_kd: bool  # the LM term mixes in the live teacher's KD
    init: str
    dstar: str = "generate"  # bd, seqkd: the stage directory of the D* (and cache) trained on
    outside: str = "q_min"  # bd: what an action outside A_t gets (docs/method.md §3.4)
    anchor_coef: float = 0.0  # bd: + anchor_coef x CE of D*'s actions (beyond the paper)
    data: str = "dstar"  # the responses trained on: "dstar" (bd, seqkd) or "golden" (kd)
    divergence: str | None = None  # the menu's methods (docs/method.md §5.1): its name; teacher in kd_teacher

    @property
    def live_teacher(self) -> bool:
        return self.sets == "live" or self.kd_teacher == "live" or self.pt_kd

    @property
    def uses_dstar(self) -> bool:
        return self.data == "dstar"


def make_setup(job: Job) -> Setup:
    from bdctl.methods import METHODS

    config = job.recipe.stages.distill
    method = job.options["method"]
    divergence = METHODS[method].divergence
    live = config.teacher_source == "live"
    corpus = job.recipe.data.pretrain
    if config.pretrain_term is None:  # auto
        pretrain = method == "bd" and corpus is not None and config.lm_coef > 0
    elif config.pretrain_term:
        if corpus is None:
            raise UserError("stages.distill.pretrain_term is true but the recipe has no data.pretrain corpus")
        pretrain = config.lm_coef > 0
    else:
        pretrain = False
    ratio = {"kd": config.kd_ratio, "seqkd": config.seqkd_kd_ratio}.get(method, 0.0)
    teacher = "live" if live else "cache"
    data = {"bd": "dstar", "seqkd": "dstar", "kd": "golden"}.get(method, config.divergence.data)
    return Setup(
        method=method,
        variant=config.variant,
        kd_ratio=ratio,
        sets=(teacher if config.p < 1.0 else None) if method == "bd" else None,
        kd_teacher=teacher if (method != "bd" and ratio > 0) or divergence else None,
        pretrain=pretrain,
        pt_kd=pretrain and config.pt_kd_ratio > 0,
        init=config.init if config.init != "auto" else ("student_sft" if method == "bd" else "base"),
        dstar=config.dstar,
        outside=config.outside if method == "bd" else "q_min",
        anchor_coef=config.anchor_coef if method == "bd" else 0.0,
        data=data,
        divergence=divergence,
    )


def dstar_name(stage: str) -> str:
    """ "D*" for the recipe's first D*, "D* (generate-<variant>)" for a variant of it."""
    return "D*" if stage == "generate" else f"D* ({stage})"


# --------------------------------------------------------------------------- training data


@dataclass(frozen=True)
class Item:
    row: int  # row of data/train.jsonl (the prompt)
    source: int  # index in the D* cache, or in the scoring cache (-1: none)
    length: int  # response tokens used


class TrainData:
    """The training examples of a method: prompt ids, response ids and (when used) the teacher's sets."""

    def __init__(self, prompts, items, responses=None, cache=None, teacher=None, with_sets=False, narrow_to=None):
        self.prompts = prompts  # token ids per row of train.jsonl
        self.items = items
        self.responses = responses  # golden response ids per row (kd), else None (read from the cache)
        self.cache = cache  # the D* cache (bd, seqkd)
        self.teacher = teacher  # the scoring cache (kd from cache)
        self.with_sets = with_sets
        self.narrow_to = narrow_to  # bd with p below the cache's: the cached sets cut to top-p

    def __len__(self) -> int:
        return len(self.items)

    def example(self, i: int):
        item = self.items[i]
        capture = None
        if self.cache is not None:
            cached = self.cache[item.source]
            response = np.asarray(cached.tokens[: item.length], dtype=np.int64)
            if self.with_sets:
                capture = cached.capture.head(item.length)
                if self.narrow_to is not None:
                    capture = capture.narrowed(self.narrow_to)
        else:
            response = np.asarray(self.responses[item.row], dtype=np.int64)
            if self.with_sets:
                capture = self.teacher[item.source].capture
        return self.prompts[item.row], response, capture


def cache_stage_dir(job: Job, stage: str) -> Path:
    """A finished stage's cache directory, or one line naming the command that makes it."""

    directory = job.run.stage(stage)
    if manifest(directory) is None:
        what = (
            "the teacher's scores of the golden responses"
            if stage == SCORE_STAGE
            else f"the teacher data {dstar_name(stage)}"
        )
        command = stage_command(stage, job.recipe_path)
        raise UserError(
            f"distill --method {job.options['method']} needs {what} ({directory} has not finished); "
            f"run it first: {command}"
        )
    return directory / "cache"


def load_train_data(job: Job, tokenizer, setup: Setup, log=None) -> tuple[TrainData, dict]:
    """The method's training examples (and counts of what was cut or skipped), with cache checks."""
    from bdctl.cache import check, open_cache
    from bdctl.data.prepare import read_split
    from bdctl.models import stop_id, tokenizer_hash

    config = job.recipe.stages.distill
    rows = read_split(job.run.data, "train")
    prompts = tokenizer([r["prompt"] for r in rows])["input_ids"]
    digest = tokenizer_hash(tokenizer)
    if not setup.uses_dstar:  # the golden responses (kd, a divergence with data: golden)
        answers = tokenizer([r["output"] for r in rows], add_special_tokens=False)["input_ids"]
        responses = [a + [stop_id(tokenizer)] for a in answers]  # as SFT scores them
        teacher = None
        sources = [-1] * len(rows)
        if setup.kd_teacher == "cache":
            teacher = open_cache(cache_stage_dir(job, SCORE_STAGE))
            check(teacher, digest)
            by_id = {row["id"]: i for i, row in enumerate(rows)}
            for index in range(len(teacher)):
                example = teacher[index]
                row = by_id.get(example.prompt_id)
                if row is None or example.sample_index != 0:
                    continue
                if not np.array_equal(np.asarray(example.tokens), np.asarray(responses[row])):
                    raise UserError(
                        f"cache {teacher.directory}: the scored response of prompt {example.prompt_id} is not "
                        f"the golden response of data/train.jsonl; score it again: "
                        f"{stage_command('score_train', job.recipe_path)}"
                    )
                sources[row] = index
            missing = sum(1 for s in sources if s < 0)
            if missing:
                raise UserError(
                    f"cache {teacher.directory}: {missing} of {len(rows)} training responses were not scored; "
                    f"score them: {stage_command('score_train', job.recipe_path)}"
                )
        items = [Item(row=i, source=sources[i], length=len(responses[i])) for i in range(len(rows))]
        data = TrainData(prompts, items, responses=responses, teacher=teacher, with_sets=teacher is not None)
        return data, {"examples": len(items)}

    cache = open_cache(cache_stage_dir(job, setup.dstar))
    check(cache, digest)  # the tokenizer; p is checked against the cache's below
    narrow_to = None
    if setup.sets == "cache" and abs(config.p - cache.top_p) > 1e-9:
        if config.p > cache.top_p:
            raise UserError(
                f"cache {cache.directory}: holds the teacher's top-p sets for p up to {cache.top_p:g}, "
                f"stages.distill.p is {config.p:g}; generate with stages.generate.cache_top_p >= {config.p:g}"
            )
        narrow_to = config.p  # a top-p set is a prefix of the cached larger one
    by_id = {row["id"]: i for i, row in enumerate(rows)}
    eos = stop_id(tokenizer)  # EOS, or the chat template's end-of-turn token
    items, cut, skipped = [], 0, 0
    for index in range(len(cache)):
        example = cache[index]
        row = by_id.get(example.prompt_id)
        if row is None:
            raise UserError(
                f"cache {cache.directory}: prompt id {example.prompt_id} is not in {job.run.data / 'train.jsonl'}; "
                f"the cache belongs to another data split: {stage_command(setup.dstar, job.recipe_path)} --force"
            )
        room = job.recipe.data.max_length - len(prompts[row])
        length = min(len(example), room)
        cut += length < len(example)
        ends = length > 0 and int(example.tokens[length - 1]) == eos
        transitions = length if ends else length - 1
        if transitions <= 0:
            skipped += 1
            continue
        items.append(Item(row=row, source=index, length=length))
    stats = {
        "examples": len(items),
        "cut_at_max_length": cut,
        "skipped_without_transition": skipped,
        "cache_examples": len(cache),
    }
    with_sets = setup.sets == "cache" or setup.kd_teacher == "cache"
    data = TrainData(prompts, items, cache=cache, with_sets=with_sets, narrow_to=narrow_to)
    return data, stats


# --------------------------------------------------------------------------- batches


def collate_examples(examples, pad_id: int, eos_id: int, with_sets: bool) -> dict[str, Tensor]:
    """Right-padded sequences (prompt + response) and the response frame [B, T] (+ [B, T, K] sets).

    positions[b, t] is the sequence position whose hidden state predicts response token t.
    """
    from bdctl.cache import collate_candidates

    lengths = [len(r) for _, r, _ in examples]
    width = max(len(p) + len(r) for p, r, _ in examples)
    frame = max(lengths)
    batch = len(examples)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    positions = torch.zeros((batch, frame), dtype=torch.long)
    actions = torch.zeros((batch, frame), dtype=torch.long)
    valid = torch.zeros((batch, frame), dtype=torch.bool)
    for row, (prompt, response, _) in enumerate(examples):
        sequence = torch.tensor(list(prompt) + response.tolist(), dtype=torch.long)
        input_ids[row, : len(sequence)] = sequence
        attention_mask[row, : len(sequence)] = 1
        n = len(response)
        positions[row, :n] = torch.arange(n) + len(prompt) - 1
        actions[row, :n] = torch.from_numpy(response)
        valid[row, :n] = True
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "positions": positions,
        "actions": actions,
        "valid": valid,
        "terminal": valid & (actions == eos_id),
    }
    if with_sets:
        sets = collate_candidates([c for _, _, c in examples], width=frame)
        out.update(cand_ids=sets["cand_ids"], cand_probs=sets["cand_probs"], cand_mask=sets["cand_mask"])
    return out


def kept_transitions(valid: Tensor, terminal: Tensor) -> Tensor:
    """docs/method.md §2: valid t that is terminal or has a valid successor."""
    valid_next = torch.zeros_like(valid)
    valid_next[:, :-1] = valid[:, 1:]
    return valid & ((terminal & valid) | valid_next)


def released_valid(batch: dict[str, Tensor]) -> Tensor:
    """The released code's `valid`: its response mask is `token != pad` with pad = EOS, so the
    position that emits EOS is never valid (docs/method.md §4, last paragraph)."""
    return batch["valid"] & ~batch["terminal"]


def in_cached_set(batch: dict[str, Tensor]) -> Tensor:
    """[B, T] whether each action lies in its cached set A_t (all True without sets: p = 1)."""
    if "cand_ids" not in batch:
        return torch.ones_like(batch["valid"])
    return (batch["cand_mask"] & (batch["cand_ids"] == batch["actions"][..., None])).any(dim=-1)


def bd_scored(batch: dict[str, Tensor], setup: Setup) -> Tensor:
    """[B, T] the positions BD's means run over (its N): the released variant's transition starts
    (valid t < T), or the paper's kept transitions, less the out-of-set ones with outside: drop.
    The anchor averages over the same positions, so both terms share one unit."""
    if setup.variant == "released":
        scored = released_valid(batch).clone()
        scored[:, -1] = False
        return scored
    scored = kept_transitions(batch["valid"], batch["terminal"])
    if setup.outside == "drop":
        scored = scored & in_cached_set(batch)
    return scored


def batch_count(batch: dict[str, Tensor], setup: Setup) -> int:
    """The units of a micro-batch's mean: BD's transitions (`bd_scored`), or tokens."""
    if setup.method != "bd":
        return int(batch["valid"].sum())
    return int(bd_scored(batch, setup).sum())
