"""Instruction tuning of the MERC model, in the order it happens (:func:`tune`): the plan (settings and
accelerator, :func:`start_run`; data, :mod:`bemerc.train.tune.data`; model, :mod:`bemerc.train.tune.model`;
the stages, :func:`plan_stages`), each stage trained (:func:`train_stage`), the adapter saved, every
evaluation split scored, the run recorded.

Stage 1 (``align``) trains the behaviour projector (LoRA too with ``align_lora``) to make the LLM
generate an utterance's stored behaviour description from its behaviour tokens. Stage ``project``
trains the projectors of voice and behaviour (every soft modality but the text embedding, which
says what the words say) with the LLM frozen to answer each train utterance's emotion from their soft
tokens alone (its words and description left out), as LLaVA aligns its projector before tuning the
LLM: trained together from the start, LoRA learns the words and the label prior faster than a new
projector learns to say anything, and the LLM learns to ignore the soft tokens (measured on RAVDESS,
where the words are the same for every emotion: docs/tune.md, Stages). Stage 2 (``merc``) trains LoRA
and every projector on the emotion answer, with the loss on
the answer tokens only, in one of two layouts (:mod:`bemerc.train.tune.prompt`): ``dialogue`` (default: one causal sequence per
dialogue, every turn answered, the system prompt once) or ``utterance`` (one prompt per utterance
with its last N turns). Evaluation scores every label of every labelled evaluation split (dev, and
test when the store has it) through :class:`~bemerc.train.tune.infer.TunedModel`, and the run is
recorded like the baseline's (:func:`bemerc.train.runs.save_run`, kind ``tune``).

A checkpoint (``RUN_DIR/checkpoint.pt``: adapter and projector weights, optimiser, scheduler, RNG
state, position in the data) is written every ``checkpoint_every`` steps; resuming from it gives the
same weights and losses as a run that was never interrupted (data order is a function of the seed
and epoch, and the RNG state is restored).

>>> result = tune(Store("store"), TuneConfig(model="/models/smollm2", train_limit=1000, eval_limit=300))  # doctest: +SKIP
>>> result["metrics"]["dev"]["weighted_f1"]                                                              # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bemerc.precision import resolve as resolve_precision
from bemerc.progress import LOG_EVERY_S, LiveBar, progress_line
from bemerc.store import Store
from bemerc.store.runs import Run, check_run_dir, default_run_dir
from bemerc.train.metrics import classification_metrics
from bemerc.train.runs import TUNE, ZERO_SHOT, Predictions, new_run_id, save_run
from bemerc.train.tune.config import STAGES, TuneConfig, TuneError, project_modalities
from bemerc.train.tune.data import IGNORE, Data, Examples, dialogue_windows, load_data, make_prompter, merc_examples, stage_examples
from bemerc.train.tune.infer import TunedModel, TuneInfo, save_adapter
from bemerc.train.tune.model import LoraSettings, MercModel, new_model

def epoch_batches(lengths: list[int], batch_size: int, seed: int) -> list[np.ndarray]:
    """Shuffled batches (indices into ``lengths``) of similar lengths, to pad little: shuffle, sort
    chunks of 16 batches by length, cut them into batches, shuffle the batches."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    chunk = batch_size * 16
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start: start + chunk]
        part = part[np.argsort([lengths[i] for i in part], kind="stable")]
        batches += [part[i: i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


# -- schedule ----------------------------------------------------------------------------------
def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to 10% at ``total``."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# -- checkpoint --------------------------------------------------------------------------------
def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, model: MercModel, progress: dict, config: TuneConfig, optimizer=None, scheduler=None) -> None:
    """One file, replaced atomically: a crash mid-write leaves the previous checkpoint."""
    state = {
        "adapter": model.adapter_state(),
        "progress": progress,
        "config": asdict(config),
        "rng": _rng_state(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    tmp = path.with_suffix(".tmp")
    try:
        with open(tmp, "wb") as fh:  # Python's file: a full disk is an OSError in the error's chain, not only torch's words
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _os_fault(exc: BaseException) -> int | None:
    """The errno of a file system fault behind ``exc`` (an ``OSError`` in its chain, or a Rust
    library's ``os error N``: safetensors, torch), else None."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno
        found = re.search(r"os error (\d+)", str(exc))
        if found:
            return int(found.group(1))
        exc = exc.__cause__ or exc.__context__
    return None


@contextlib.contextmanager
def _run_folder(run_dir: Path, fresh: bool):
    """Writes into a tuning run's folder (checkpoints, log, adapter, summary): a full disk is an
    ``OSError`` naming the folder (see :func:`_run_files_fault`), whatever library wrote."""
    try:
        yield
    except BaseException as exc:
        fault = _run_files_fault(run_dir, exc, fresh)
        if fault is None:
            raise
        raise fault from exc


def _run_files_fault(run_dir: Path, exc: BaseException, fresh: bool) -> OSError | None:
    """A full disk (a quota, a read-only file system) while writing the run folder, as an ``OSError`` naming
    ``run_dir``; None for any other error. A fresh run's folder goes unless it holds a whole
    checkpoint (then ``--resume`` goes on from it); a resumed run's folder stays as it was, its last
    checkpoint whole (replaced atomically)."""
    code = _os_fault(exc)
    if code not in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EROFS) or not run_dir.is_dir():
        return None
    if fresh and not (run_dir / "checkpoint.pt").is_file():
        shutil.rmtree(run_dir, ignore_errors=True)
    return OSError(code, os.strerror(code), str(run_dir))


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise TuneError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


# -- training ---------------------------------------------------------------------------------
class Progress(LiveBar):
    """Progress of the stages: a rich bar on a terminal; otherwise (output to a file or a pipe) a
    plain line every ``LOG_EVERY_S`` seconds and at the end of each task: stage, step/total, loss,
    utterances/s and the time left. Nothing when disabled."""

    def __init__(self, enabled: bool, log_every_s: float = LOG_EVERY_S):
        self.enabled, self.bar, self.log_every_s = enabled, None, log_every_s
        self.tasks: dict[str, dict] = {}
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn("{task.description:<6}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())

    def task(self, name: str, total: int, done: int = 0) -> str:
        now = time.perf_counter()
        self.tasks[name] = {"total": total, "done": done, "start_done": done, "start": now, "logged": now,
                            "utterances": 0, "id": self.bar.add_task(name, total=total, completed=done, info="") if self.bar else None}
        return name

    def advance(self, name: str, loss: float | None = None, utterances: int = 0, n: int = 1) -> None:
        if not self.enabled:
            return
        t = self.tasks[name]
        t["done"] += n
        t["utterances"] += utterances
        now = time.perf_counter()
        rate = t["utterances"] / max(now - t["start"], 1e-9)
        info = (f"loss {loss:.3f}  " if loss is not None else "") + f"{rate:.1f} utt/s"
        if self.bar:
            self.bar.update(t["id"], advance=n, info=info)
        elif now - t["logged"] >= self.log_every_s or t["done"] >= t["total"]:
            t["logged"] = now
            steps = t["done"] - t["start_done"]
            left = (t["total"] - t["done"]) * (now - t["start"]) / max(steps, 1)
            print(progress_line(name, t["done"], t["total"], now - t["start"], info, left), flush=True)


def accumulate_gradients(wrapped, examples: Examples, items: list[int], budget: int, accelerator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Forward and backward one optimiser step's ``items`` in micro-batches (:meth:`Examples.batches`) of at most
    ``budget`` padded tokens, so memory is bounded by the budget (and the longest item), not by the
    batch; returns (weighted loss sum, global weight, real tokens).

    The gradients are those of the weighted mean over the global batch: each micro-batch's loss sum
    is divided by the weight of the whole global batch (known from the targets before any forward)
    and multiplied by the number of processes, since DDP averages the processes' gradients; DDP
    synchronises on the last micro-batch only."""
    world = accelerator.num_processes
    chunks = examples.batches(items, budget, accelerator.device)
    weight = sum(b.weights[b.targets != IGNORE].sum() for b in chunks).detach().float()
    weight = (accelerator.reduce(weight, "sum") if world > 1 else weight).clamp_min(1e-8)
    total = torch.zeros((), device=accelerator.device)
    for n, batch in enumerate(chunks):
        with accelerator.no_sync(wrapped) if n < len(chunks) - 1 else contextlib.nullcontext():
            with accelerator.autocast():
                loss_sum, _ = wrapped(batch)
            accelerator.backward(loss_sum / weight * world)
        total = total + loss_sum.detach().float()
    return total, weight, sum(b.tokens for b in chunks)


def train_stage(stage: str, model: MercModel, examples: Examples, config: TuneConfig, accelerator, run_dir: Path,
                progress: dict, resume: dict | None, bar: Progress) -> bool:
    """Run (or finish) one stage on ``examples``; False when ``stop_after`` interrupted it (a
    checkpoint was written). Batches are sharded across processes (``accelerate launch``): each
    takes every world-th item of a global batch, gradients are averaged by DDP."""
    epochs = {"align": config.align_epochs, "project": config.project_epochs}.get(stage, config.epochs)
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(examples.lengths)
    per_epoch = n // (config.batch_size * world) + bool(n % (config.batch_size * world))
    total = max(1, per_epoch * epochs)
    lr = config.align_lr if stage == "align" else config.lr
    optimizer = torch.optim.AdamW(model.param_groups(stage, lr, config.projector_lr, config.align_lora), weight_decay=config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]  # what the stage trains, in module order (gradient clipping)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(lr_factor, total=total, warmup=config.warmup))
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    checkpoint = run_dir / "checkpoint.pt"
    seed_offset = {"align": 1, "project": 3}.get(stage, 2)

    task = bar.task(stage, per_epoch * epochs, progress["epoch"] * per_epoch + progress["batch"])
    wrapped.train()
    # project: the projectors learn against the base LLM; LoRA (zero or frozen) is switched off, which
    # also skips its ~50% extra work per token
    off = model.llm.disable_adapter() if stage == "project" and hasattr(model.llm, "disable_adapter") else contextlib.nullcontext()
    with off:
        for epoch in range(progress["epoch"], epochs):
            batches = epoch_batches(examples.lengths, config.batch_size * world, config.seed * 1000 + 10 * epoch + seed_offset)
            for b in range(progress["batch"], len(batches)):
                index = batches[b][rank::world]
                start = time.perf_counter()
                loss_sum, weight, tokens = accumulate_gradients(wrapped, examples, index.tolist(), config.micro_batch_tokens, accelerator)
                accelerator.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                seconds = time.perf_counter() - start
                value = (accelerator.reduce(loss_sum.detach(), "sum") if world > 1 else loss_sum.detach()).item() / weight.item()
                answered = sum(examples.utterances[i] for i in index)
                progress["history"].append({"stage": stage, "epoch": epoch, "batch": b, "loss": value, "lr": scheduler.get_last_lr()[0],
                                            "tokens": tokens, "utterances": answered, "seconds": seconds})
                progress["batch"] = b + 1
                bar.advance(task, value, answered * world)
                stop = config.stop_after is not None and len(progress["history"]) >= config.stop_after
                if (len(progress["history"]) % config.checkpoint_every == 0 or stop) and accelerator.is_main_process:
                    save_checkpoint(checkpoint, model, progress, config, optimizer, scheduler)
                if stop and not (epoch == epochs - 1 and b == len(batches) - 1):
                    accelerator.wait_for_everyone()
                    return False
            progress["epoch"], progress["batch"] = epoch + 1, 0
        return True


# -- evaluation --------------------------------------------------------------------------------
def evaluate(tuned: TunedModel, data: Data, rows: np.ndarray, bar: Progress, name: str = "eval") -> tuple[np.ndarray, dict]:
    """(N, C) label probabilities of ``rows`` and timing (see :meth:`TunedModel.predict_proba`)."""
    task = bar.task(name, len(rows))
    tokens, start = 0, time.perf_counter()

    def advance(done: int, batch_tokens: int) -> None:
        nonlocal tokens
        tokens += batch_tokens
        bar.advance(task, None, done, done)

    probabilities = tuned.predict_proba(data.inputs, rows, advance)
    seconds = time.perf_counter() - start
    return probabilities, {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9),
                           "utterances_per_s": len(rows) / max(seconds, 1e-9)}


def majority_metrics(data: Data, rows: np.ndarray) -> dict:
    """Metrics of always answering the most frequent training label (or eval label without train rows)."""
    source = data.train_rows if len(data.train_rows) else rows
    majority = Counter(data.labels[r] for r in source).most_common(1)[0][0]
    gold = np.array([data.classes.index(data.labels[r]) for r in rows])
    return classification_metrics(gold, np.full(len(rows), data.classes.index(majority)), data.classes)


# -- the run -----------------------------------------------------------------------------------
def _timing(history: list[dict]) -> dict:
    merc = [h for h in history if h["stage"] == "merc"] or history
    if not merc:
        return {}
    seconds = sum(h["seconds"] for h in merc)
    utterances = sum(h.get("utterances", 0) for h in merc)
    return {"steps": len(merc), "step_s_median": statistics.median(h["seconds"] for h in merc),
            "train_seconds": seconds, "train_tokens_per_s": sum(h["tokens"] for h in merc) / max(seconds, 1e-9),
            "train_utterances_per_s": utterances / max(seconds, 1e-9),
            "train_tokens_per_utterance": sum(h["tokens"] for h in merc) / max(utterances, 1),
            "final_loss": statistics.fmean(h["loss"] for h in merc[-10:]),
            "stage_seconds": {stage: sum(h["seconds"] for h in history if h["stage"] == stage)
                              for stage in dict.fromkeys(h["stage"] for h in history)}}


def plan_stages(store: Store, config: TuneConfig, data: Data, soft: list[str]) -> tuple[list[str], list[str]]:
    """(the stages this run trains, notes on those it leaves out and why): ``project`` needs a soft
    modality beyond the words and ``--project-epochs``; ``align`` a behaviour projector and a described
    train utterance. Asked for alone, a stage that cannot run is an error (one line)."""
    stages = [] if config.zero_shot else list(STAGES[config.stage])
    notes = []
    if "project" in stages and (not project_modalities(soft) or not config.project_epochs):
        reason = ("no soft modality" if not soft else "--project-epochs 0" if not config.project_epochs
                  else f"its only soft modality, {', '.join(soft)}, embeds the words the LLM reads")
        if config.stage == "project":
            raise TuneError(f"{store.path}: cannot run the project stage: {reason}")
        stages.remove("project")
        if soft:
            notes.append(f"project stage skipped: {reason}")
    has_description = any(data.inputs.descriptions[r] for r in data.train_rows)
    if "align" in stages and ("behavior" not in soft or not has_description):
        reason = ("the model has no behaviour projector (no behavior feature set)" if "behavior" not in soft
                  else "no training utterance has a behaviour description")
        if config.stage == "align":
            raise TuneError(f"{store.path}: cannot run the align stage: {reason}")
        stages.remove("align")
        notes.append(f"align stage skipped: {reason}")
    trained_labels = {data.labels[r] for r in data.train_rows}
    if stages and len(trained_labels) == 1:  # as the baseline: train anyway, and say what it means
        notes.append(f"every train utterance is {next(iter(trained_labels))!r}: the model learns to predict only that label")
    return stages, notes


def score_splits(data: Data, scored: dict) -> tuple[dict, list, list, list, np.ndarray, dict]:
    """(metrics per split, and the rows as the run records them: uids, splits, gold labels,
    probabilities, timing per split) of ``scored`` (split -> (probabilities, timing))."""
    uids, splits, gold, metrics, eval_timing = [], [], [], {}, {}
    u = data.corpus.utterances
    for split, rows in data.eval_rows.items():
        labels = [data.labels[r] for r in rows]
        metrics[split] = classification_metrics(np.array([data.classes.index(g) for g in labels]),
                                                scored[split][0].argmax(1), data.classes)
        uids += u["uid"].gather(rows).to_list()
        splits += [split] * len(rows)
        gold += labels
        eval_timing[split] = scored[split][1]
    probabilities = np.concatenate([scored[split][0] for split in data.eval_rows])
    return metrics, uids, splits, gold, probabilities, eval_timing


@dataclass
class RunStart:
    """Where a run starts: its settings (a resumed run's as saved), the checkpoint it goes on from,
    its id, kind and folder, the precision it trains in and the accelerator that runs it."""

    config: TuneConfig
    checkpoint: dict | None
    run_id: str
    kind: str
    run_dir: Path
    precision: str
    accelerator: object


def start_run(store: Store, config: TuneConfig, resume: bool) -> RunStart:
    """The run's settings, checkpoint (``resume``), id, folder, precision and accelerator; a new run's
    folder is checked before any work (a taken folder is refused, never written over)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    if resume:
        if not config.run_dir:
            raise TuneError("--resume needs --run-dir (the folder of the interrupted run)")
        checkpoint = load_checkpoint(Path(config.run_dir) / "checkpoint.pt")
        # the run's settings, but the folder given now: a run folder moved since it stopped goes on where it is
        saved = {k: v for k, v in checkpoint["config"].items() if k not in ("stop_after", "progress", "run_dir")}
        saved.setdefault("speaker_norm", False)  # a run checkpointed before speaker normalisation read the vectors as stored
        saved.setdefault("precision", "fp32")  # a run checkpointed before --precision trained in fp32 on a CPU
        config = replace(config, **saved)
    else:
        checkpoint = None
        if config.run_dir:
            check_run_dir(config.run_dir)
    if not cuda:
        torch.set_num_threads(config.threads)
    kind = ZERO_SHOT if config.zero_shot else TUNE  # so `tune:latest` (make compare) is a trained run
    run_id = (checkpoint or {}).get("progress", {}).get("run_id") or new_run_id(kind)
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(store, run_id)
    precision = resolve_precision(config.precision, "cuda" if cuda else "cpu")
    mixed = "bf16" if precision == "bf16" else "no"
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mixed:
        AcceleratorState._reset_state()  # a second run in this process at another precision (the process group stays)
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    return RunStart(replace(config, run_dir=str(run_dir)), checkpoint, run_id, kind, run_dir, precision, accelerator)


def tune(store: Store, config: TuneConfig, resume: bool = False) -> dict:
    """Run the stages of ``config`` (or resume ``config.run_dir``), evaluate, save the adapter and
    record the run; returns ``{"run_id", "run_dir", "metrics", "majority", "timing", ...}`` or, when
    ``stop_after`` interrupted training, ``{"stopped": True, ...}``.

    Top to bottom: the plan (settings, data, model, prompter, the stages), each stage trained,
    the adapter saved, every evaluation split scored, the run recorded."""
    start = start_run(store, config, resume)
    config, checkpoint, run_id, run_dir, accelerator = start.config, start.checkpoint, start.run_id, start.run_dir, start.accelerator
    cuda = torch.cuda.is_available()

    data = load_data(store, config)
    torch.manual_seed(config.seed)
    modules = tuple(config.lora_modules) if config.lora_modules else None
    lora = None if config.zero_shot else LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_layers, modules)
    model, tokenizer = new_model(config.model, data.soft, lora, start.precision, cuda, data.inputs.features, data.train_rows)
    if config.gradient_checkpointing if config.gradient_checkpointing is not None else cuda:
        model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device)
    prompter = make_prompter(tokenizer, data)
    info = TuneInfo(base_model=str(config.model), classes=data.classes, layout=config.layout, context=config.context,
                    max_len=config.max_len, overlap=config.overlap, demos=config.demos,
                    demo_feature_set=data.corpus.modalities["text"].feature_set.id if config.demos else None,
                    normalize_scores=config.normalize_scores, dataset=data.dataset, soft=data.soft, precision=start.precision)
    progress = {"run_id": run_id, "done": [], "stage": None, "epoch": 0, "batch": 0, "history": []}
    if checkpoint is not None:
        model.load_adapter_state(checkpoint["adapter"])
        progress = checkpoint["progress"]
        _set_rng_state(checkpoint["rng"])
    stages, notes = plan_stages(store, config, data, list(model.soft))

    run_dir.mkdir(parents=True, exist_ok=True)
    main = accelerator.is_main_process
    with _run_folder(run_dir, fresh=not resume), Progress(config.progress and main) as bar:
        for stage in stages:
            if stage in progress["done"]:
                continue
            mid_stage = checkpoint is not None and progress["stage"] == stage and checkpoint["optimizer"] is not None
            if not mid_stage:  # from its first batch, even where a checkpoint stopped in a stage no longer run
                progress.update(epoch=0, batch=0)
            progress["stage"] = stage
            if not train_stage(stage, model, stage_examples(stage, prompter, data), config, accelerator, run_dir, progress,
                               checkpoint if mid_stage else None, bar):
                if main:
                    _write_log(run_dir, progress["history"])
                return {"stopped": True, "run_id": run_id, "run_dir": str(run_dir), "steps": len(progress["history"])}
            progress.update(done=progress["done"] + [stage], stage=None, epoch=0, batch=0)
            if main:
                save_checkpoint(run_dir / "checkpoint.pt", model, progress, config)
        if main:
            _write_log(run_dir, progress["history"])

        templates = {"merc": prompter.merc_template.source, "align": prompter.align_template.source}
        if stages and main:
            save_adapter(accelerator.unwrap_model(model), run_dir / "adapter", info, templates, data.norm)
        if "merc" not in stages and not config.zero_shot:
            return {"run_id": run_id, "run_dir": str(run_dir), "notes": notes, "timing": _timing(progress["history"])}

        tuned = TunedModel(model, prompter, info, batch_size=2 * config.batch_size, device=accelerator.device,
                           autocast=accelerator.autocast, retriever=data.retriever, max_tokens=config.micro_batch_tokens,
                           norm=data.norm)
        scored = {split: evaluate(tuned, data, rows, bar, split) for split, rows in data.eval_rows.items()}

    metrics, uids, splits, gold, probabilities, eval_timing = score_splits(data, scored)
    dev = data.eval_rows["dev"]
    majority = majority_metrics(data, dev)
    train_rows = len(data.train_rows) if stages else 0
    timing = {**_timing(progress["history"]), "eval": eval_timing["dev"], "eval_by_split": eval_timing}
    summary = {"train_utterances": train_rows, "eval_utterances": len(dev), "layout": config.layout, "precision": start.precision,
               "eval_splits": {split: len(rows) for split, rows in data.eval_rows.items()}, "notes": notes,
               "majority": {"weighted_f1": majority["weighted_f1"], "accuracy": majority["accuracy"]}, "timing": timing}
    if main:
        with _run_folder(run_dir, fresh=not resume):
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        save_run(store, Run(run_id, start.kind, data.dataset, data.classes, [s.feature_set for s in data.soft],
                            {**asdict(config), "summary": summary}, metrics, str(run_dir)),
                 Predictions(uids, splits, gold, probabilities))
    return {"run_id": run_id, "run_dir": str(run_dir), "metrics": metrics, "probabilities": probabilities,
            "probabilities_by_split": {split: p for split, (p, _) in scored.items()}, **summary}


def _write_log(run_dir: Path, history: list[dict]) -> None:
    """``RUN_DIR/log.jsonl``: one line per optimiser step (stage, epoch, batch, loss, lr, tokens, seconds)."""
    (run_dir / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def show_prompt(store: Store, config: TuneConfig, uid: str) -> str:
    """The MERC prompt of utterance ``uid`` as the model sees it: its prompt and expected answer
    (``utterance`` layout), or the window of its dialogue that answers it, every answer slot marked
    with its label and the first token that stands for it (``dialogue`` layout)."""
    data = load_data(store, config)
    uids = data.corpus.utterances["uid"].to_list()
    if uid not in uids:
        raise TuneError(f"{store.path}: no utterance {uid!r} in dataset {data.dataset!r}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    prompter = make_prompter(tokenizer, data)
    row = uids.index(uid)
    if config.layout == "utterance":
        encoded = merc_examples(prompter, data.inputs, [row], [data.labels[row]])[0]
        return prompter.show(encoded) + f"\n[{len(encoded.prompt_ids)} prompt tokens, {len(encoded.answer_ids)} answer tokens]"
    demos = data.retriever.for_inputs(data.inputs) if data.retriever else None
    window = next(w for w in dialogue_windows(prompter, data.inputs, [row], config.overlap, demos)
                  if row in w.rows and w.new[w.rows.index(row)])
    firsts = ", ".join(f"{c}={tokenizer.decode([t])!r}" for c, t in zip(data.classes, prompter.answer_first_ids()))
    answered = sum(window.new)
    return (prompter.show_window(window, [data.labels[r] for r in window.rows])
            + f"\n[{len(window)} tokens, {answered} answers ({len(window.ids) / max(answered, 1):.0f} tokens per utterance); "
              f"a label's probability is that of its first token: {firsts}]")
