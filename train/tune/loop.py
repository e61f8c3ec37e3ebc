"""Instruction tuning of the MERC model, in the order it happens: config, data, model, optimiser,
loop, checkpoint/resume, evaluation, saving.

Stage 1 (``align``) trains the behaviour projector (LoRA too with ``align_lora``) to make the LLM
generate an utterance's stored behaviour description from its behaviour tokens. Stage 2 (``merc``)
trains LoRA and every projector on the emotion answer, with the loss on the answer tokens only.
Evaluation scores every label (see :mod:`bemerc.train.tune.score`), and the run is recorded like the
baseline's (:func:`bemerc.train.runs.save_run`, kind ``tune``).

A checkpoint (``RUN_DIR/checkpoint.pt``: adapter and projector weights, optimiser, scheduler, RNG
state, position in the data) is written every ``checkpoint_every`` steps; resuming from it gives the
same weights and losses as a run that was never interrupted (data order is a function of the seed
and epoch, and the RNG state is restored).

>>> result = tune(Store("store"), TuneConfig(model="/models/smollm2", train_limit=1000, eval_limit=300))  # doctest: +SKIP
>>> result["metrics"]["dev"]["weighted_f1"]                                                              # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from bemerc.store import Store
from bemerc.store.schema import LABEL_SETS
from bemerc.train.metrics import classification_metrics
from bemerc.train.runs import default_run_dir, new_run_id, save_run
from bemerc.train.tensors import Corpus, load_corpus
from bemerc.train.tune.model import LoraSettings, MercModel, SoftInput, build_model, collate, load_llm, save_adapter
from bemerc.train.tune.prompt import Encoded, Prompter, Turn
from bemerc.train.tune.score import label_probabilities, label_scores

STAGES = {"align": ["align"], "merc": ["merc"], "all": ["align", "merc"]}
SOFT_MODALITIES = ("audio", "behavior")  # projected by default when the store has them


class TuneError(ValueError):
    """A tuning request that cannot run (no data, unknown modality, bad option); one-line message."""


# -- config ------------------------------------------------------------------------------------
@dataclass
class TuneConfig:
    """Everything that defines a tuning run (saved in the run's config and checkpoint)."""

    model: str  # a local Hugging Face folder or a hub id
    stage: str = "merc"  # align | merc | all
    run_dir: str | None = None  # default runs/<run_id>
    dataset: str | None = None  # needed when the store holds several datasets
    modalities: list[str] | None = None  # projected to soft tokens; None = audio and behavior when stored
    context: int = 3  # previous utterances shown in the prompt
    train_limit: int | None = None  # first N train utterances (whole dialogues)
    eval_limit: int | None = None  # first N utterances of the eval split (whole dialogues)
    eval_split: str = "dev"
    epochs: int = 1
    align_epochs: int = 1
    batch_size: int = 4
    lr: float = 1e-3
    align_lr: float = 1e-3
    warmup: float = 0.05  # share of the steps with a linear warm-up, then cosine decay to 10%
    weight_decay: float = 0.0
    balance: float = 0.5  # class-balanced loss: example weight (class share * n_classes) ** -balance
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_layers: int | None = None  # LoRA on the top N decoder blocks only (None = all)
    align_lora: bool = False
    max_len: int = 512  # prompt tokens; context turns are dropped, oldest first, beyond it
    normalize_scores: bool = False  # label score = mean instead of sum of token log-probs
    zero_shot: bool = False  # no training: score labels with the base model (no LoRA, no soft tokens)
    seed: int = 0
    threads: int = 1  # torch CPU threads (one is fastest for small LLMs)
    gradient_checkpointing: bool | None = None  # None = on when a GPU is used
    checkpoint_every: int = 50
    stop_after: int | None = None  # stop (with a checkpoint) after this many optimiser steps of the run
    progress: bool = True
    merc_prompt: str = "merc"
    align_prompt: str = "align"

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise TuneError(f"--stage must be one of {', '.join(STAGES)}, found {self.stage!r}")
        for name in ("epochs", "align_epochs", "batch_size", "lora_r", "checkpoint_every"):
            if getattr(self, name) < (0 if "epochs" in name else 1):
                raise TuneError(f"{name} must be positive, found {getattr(self, name)}")


# -- data --------------------------------------------------------------------------------------
@dataclass
class Data:
    """The corpus with what the prompts need: classes, soft inputs and their (N, K*D) features,
    behaviour descriptions, the first row of each utterance's dialogue, and the selected rows."""

    corpus: Corpus
    dataset: str | None
    classes: list[str]
    speakers: list[str]
    texts: list[str]
    labels: list[str | None]
    soft: list[SoftInput]
    features: dict[str, tuple[np.ndarray, np.ndarray]]
    descriptions: list[str | None]
    dialogue_start: np.ndarray
    train_rows: np.ndarray
    eval_rows: np.ndarray

    def context(self, row: int, n: int) -> list[Turn]:
        start = max(self.dialogue_start[row], row - n)
        return [self.turn(r) for r in range(start, row)]

    def turn(self, row: int) -> Turn:
        return Turn(self.speakers[row] or "Speaker", self.texts[row] or "")

    def label(self, row: int) -> str:
        return self.labels[row]


def first_dialogues(rows: np.ndarray, dialogue_start: np.ndarray, limit: int | None) -> np.ndarray:
    """The longest prefix of ``rows`` (in order) made of whole dialogues with at most ``limit`` rows
    (at least one dialogue)."""
    if limit is None or len(rows) <= limit:
        return rows
    starts = dialogue_start[rows]
    cut = next((i for i in range(limit, 0, -1) if starts[i] != starts[i - 1]), None)
    if cut is None:  # the first dialogue alone is longer than the limit
        cut = int(np.argmax(starts != starts[0])) or len(rows)
    return rows[:cut]


def _soft_input(store: Store, fs, modality: str) -> SoftInput:
    """Behaviour with ``tokens`` (K from the feature set's ``tokens_k``) gives K soft tokens; any
    other feature set its ``vector`` as one."""
    schema = store.table(fs.table_name).schema
    k = fs.config.get("tokens_k")
    if modality == "behavior" and "tokens" in schema.names and k:
        return SoftInput(modality, "tokens", int(k), schema.field("tokens").type.list_size // int(k), fs.id)
    return SoftInput(modality, "vector", 1, fs.dim, fs.id)


def load_data(store: Store, config: TuneConfig) -> Data:
    """Read the store once: utterances, the soft modalities' features and behaviour descriptions."""
    utterances = store.read("utterances", ["dataset"])
    if utterances.height == 0:
        raise TuneError(f"{store.path}: the store has no utterances; run `bemerc ingest` first")
    datasets = sorted(set(utterances["dataset"].to_list()))
    dataset = config.dataset or (datasets[0] if len(datasets) == 1 else None)
    if dataset is None or dataset not in datasets:
        raise TuneError(f"{store.path}: choose a dataset with --dataset (the store holds {', '.join(datasets)})")

    stored = {fs.modality: fs for fs in store.feature_sets()}
    if config.zero_shot:
        modalities = []
    elif config.modalities is None:
        modalities = [m for m in SOFT_MODALITIES if m in stored]
    else:
        modalities = list(config.modalities)
    unknown = [m for m in modalities if m not in stored]
    if unknown:
        raise TuneError(f"{store.path}: no feature set for modality {', '.join(unknown)} "
                        f"(stored: {', '.join(sorted(stored)) or 'none'}); run `bemerc extract` or change --modalities")
    soft = [_soft_input(store, stored[m], m) for m in modalities]
    behavior = stored.get("behavior")
    has_description = behavior is not None and "description" in store.table(behavior.table_name).schema.names
    refs = sorted({s.feature_set for s in soft} | ({behavior.id} if has_description else set()))
    extra: dict[str, list[str]] = {}
    for s in soft:
        if s.column != "vector":
            extra.setdefault(s.feature_set, []).append(s.column)
    if has_description:
        extra.setdefault(behavior.id, []).append("description")
    corpus = load_corpus(store, refs, extra, dataset)

    features = {}
    for s in soft:
        arrays = corpus.modalities[s.modality]
        if s.column == "vector":
            values = arrays.vectors
        else:
            values = np.zeros((corpus.utterances.height, s.n_tokens * s.dim), dtype=np.float32)
            for i, v in enumerate(arrays.extras[s.column]):
                if v is not None:
                    values[i] = v
        features[s.modality] = (values, arrays.present)
    descriptions = corpus.modalities["behavior"].extras["description"] if has_description else [None] * corpus.utterances.height

    u = corpus.utterances
    key = (u["split"] + "\x00" + u["dialogue_id"]).to_list()
    dialogue_start = np.zeros(u.height, dtype=np.int64)
    for i in range(1, u.height):
        dialogue_start[i] = dialogue_start[i - 1] if key[i] == key[i - 1] else i
    labelled = u["label"].is_not_null().to_numpy()
    train = np.flatnonzero(corpus.split_mask("train") & labelled)
    evaluation = np.flatnonzero(corpus.split_mask(config.eval_split) & labelled)
    if len(evaluation) == 0:
        raise TuneError(f"{store.path}: dataset {dataset!r} has no labelled {config.eval_split!r} utterances")
    if len(train) == 0 and not config.zero_shot:
        raise TuneError(f"{store.path}: dataset {dataset!r} has no labelled train utterances")
    classes = list(LABEL_SETS.get(dataset) or sorted(set(u["label"].drop_nulls().to_list())))
    return Data(corpus, dataset, classes, u["speaker"].to_list(), u["text"].to_list(), u["label"].to_list(),
                soft, features, descriptions, dialogue_start,
                first_dialogues(train, dialogue_start, config.train_limit),
                first_dialogues(evaluation, dialogue_start, config.eval_limit))


def merc_examples(prompter: Prompter, data: Data, rows: np.ndarray, labelled: bool) -> list[Encoded]:
    return [prompter.merc(data.context(r, prompter.context), data.turn(r), data.descriptions[r],
                          data.label(r) if labelled else None) for r in rows]


def class_weights(labels: list[str], balance: float) -> np.ndarray:
    """(N,) loss weights, (share of the example's class * number of classes) ** -balance scaled to
    mean 1: 0 weighs all examples alike, 0.5 by inverse square-root class frequency, 1 by inverse
    frequency (every class then weighs the same in total).

    >>> class_weights(["a", "a", "a", "b"], 1.0).round(2).tolist()
    [0.67, 0.67, 0.67, 2.0]
    """
    counts = Counter(labels)
    shares = np.array([counts[label] / len(labels) * len(counts) for label in labels])
    weights = shares ** -balance
    return weights / weights.mean()


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
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise TuneError(f"{path}: no checkpoint to resume from")
    return torch.load(path, map_location="cpu", weights_only=True)


# -- training ----------------------------------------------------------------------------------
class Bar:
    """A rich progress bar with loss and tokens/s (nothing when disabled)."""

    def __init__(self, enabled: bool):
        self.progress = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("{task.description:<6}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())

    def __enter__(self) -> "Bar":
        if self.progress:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def task(self, name: str, total: int, done: int = 0):
        return self.progress.add_task(name, total=total, completed=done, info="") if self.progress else None

    def advance(self, task, info: str = "", n: int = 1) -> None:
        if self.progress:
            self.progress.update(task, advance=n, info=info)


def _trainable(model: MercModel, stage: str, config: TuneConfig) -> list[torch.nn.Parameter]:
    """Set requires_grad for the stage and return the parameters it trains."""
    for name, p in model.named_parameters():
        if name.startswith("projectors."):
            p.requires_grad_(stage == "merc" or name.startswith("projectors.behavior."))
        elif "lora_" in name:
            p.requires_grad_(stage == "merc" or config.align_lora)
    return [p for p in model.parameters() if p.requires_grad]


def train_stage(stage: str, model: MercModel, examples: list[Encoded], rows: np.ndarray, weights: np.ndarray,
                data: Data, pad_id: int, config: TuneConfig, accelerator, run_dir: Path, progress: dict,
                resume: dict | None, bar: Bar) -> bool:
    """Run (or finish) one stage on ``examples`` (of corpus ``rows``, with loss ``weights``); False
    when ``stop_after`` interrupted it (a checkpoint was written)."""
    epochs = config.align_epochs if stage == "align" else config.epochs
    lengths = [len(e) for e in examples]
    world, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = len(examples) // (config.batch_size * world) + bool(len(examples) % (config.batch_size * world))
    total = max(1, per_epoch * epochs)
    params = _trainable(model, stage, config)
    optimizer = torch.optim.AdamW(params, lr=config.align_lr if stage == "align" else config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, config.warmup))
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    checkpoint = run_dir / "checkpoint.pt"
    seed_offset = 1 if stage == "align" else 2

    task = bar.task(stage, per_epoch * epochs, progress["epoch"] * per_epoch + progress["batch"])
    wrapped.train()
    for epoch in range(progress["epoch"], epochs):
        batches = epoch_batches(lengths, config.batch_size * world, config.seed * 1000 + 10 * epoch + seed_offset)
        for b in range(progress["batch"], len(batches)):
            index = batches[b][rank::world]
            start = time.perf_counter()
            batch = collate([examples[i] for i in index], rows[index].tolist(), data.features, pad_id,
                            weights=weights[index].tolist()).to(accelerator.device)
            with accelerator.autocast():
                loss = wrapped(batch)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            seconds, value = time.perf_counter() - start, loss.item()
            progress["history"].append({"stage": stage, "epoch": epoch, "batch": b, "loss": value,
                                        "lr": scheduler.get_last_lr()[0], "tokens": batch.tokens, "seconds": seconds})
            progress["batch"] = b + 1
            bar.advance(task, f"loss {value:.3f}  {batch.tokens / seconds:.0f} tok/s")
            stop = config.stop_after is not None and len(progress["history"]) >= config.stop_after
            if (len(progress["history"]) % config.checkpoint_every == 0 or stop) and accelerator.is_main_process:
                save_checkpoint(checkpoint, model, progress, config, optimizer, scheduler)
            if stop and not (epoch == epochs - 1 and b == len(batches) - 1):
                accelerator.wait_for_everyone()
                return False
        progress["epoch"], progress["batch"] = epoch + 1, 0
    return True


# -- evaluation --------------------------------------------------------------------------------
def evaluate(model: MercModel, prompter: Prompter, data: Data, rows: np.ndarray, config: TuneConfig,
             accelerator, bar: Bar) -> tuple[np.ndarray, dict]:
    """(N, C) label probabilities of ``rows`` and timing; prompts are scored shortest first (less
    padding), twice the training batch size at a time, and put back in order."""
    examples = merc_examples(prompter, data, rows, labelled=False)
    label_ids = prompter.label_ids()
    order = np.argsort([len(e) for e in examples], kind="stable")
    probabilities = np.zeros((len(rows), len(data.classes)), dtype=np.float32)
    model.eval()
    task = bar.task("eval", len(rows))
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(order), 2 * config.batch_size):
        index = order[i: i + 2 * config.batch_size]
        batch = collate([examples[j] for j in index], rows[index].tolist(), data.features,
                        prompter.tokenizer.pad_token_id, with_answer=False).to(accelerator.device)
        with accelerator.autocast():
            scores = label_scores(model, batch, label_ids, config.normalize_scores)
        probabilities[index] = label_probabilities(scores)
        tokens += batch.tokens
        bar.advance(task, f"{tokens / (time.perf_counter() - start):.0f} tok/s", len(index))
    seconds = time.perf_counter() - start
    return probabilities, {"seconds": seconds, "prompt_tokens": tokens, "tokens_per_s": tokens / max(seconds, 1e-9)}


def majority_metrics(data: Data, rows: np.ndarray) -> dict:
    """Metrics of always answering the most frequent training label (or eval label without train rows)."""
    source = data.train_rows if len(data.train_rows) else rows
    majority = Counter(data.label(r) for r in source).most_common(1)[0][0]
    gold = np.array([data.classes.index(data.label(r)) for r in rows])
    return classification_metrics(gold, np.full(len(rows), data.classes.index(majority)), data.classes)


# -- the run -----------------------------------------------------------------------------------
def _timing(history: list[dict]) -> dict:
    merc = [h for h in history if h["stage"] == "merc"] or history
    if not merc:
        return {}
    seconds = sum(h["seconds"] for h in merc)
    return {"steps": len(merc), "step_s_median": statistics.median(h["seconds"] for h in merc),
            "train_seconds": seconds, "train_tokens_per_s": sum(h["tokens"] for h in merc) / max(seconds, 1e-9),
            "final_loss": statistics.fmean(h["loss"] for h in merc[-10:])}


def tune(store: Store, config: TuneConfig, resume: bool = False) -> dict:
    """Run the stages of ``config`` (or resume ``config.run_dir``), evaluate, save the adapter and
    record the run; returns ``{"run_id", "run_dir", "metrics", "majority", "timing", ...}`` or, when
    ``stop_after`` interrupted training, ``{"stopped": True, ...}``."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if resume:
        if not config.run_dir:
            raise TuneError("--resume needs --run-dir (the folder of the interrupted run)")
        checkpoint = load_checkpoint(Path(config.run_dir) / "checkpoint.pt")
        saved = {k: v for k, v in checkpoint["config"].items() if k not in ("stop_after", "progress")}
        config = replace(config, **saved)
    else:
        checkpoint = None
    if not cuda:
        torch.set_num_threads(config.threads)
    run_id = (checkpoint or {}).get("progress", {}).get("run_id") or new_run_id("tune")
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir(run_id)
    config = replace(config, run_dir=str(run_dir))
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)

    data = load_data(store, config)
    torch.manual_seed(config.seed)
    llm, tokenizer = load_llm(config.model)
    lora = None if config.zero_shot else LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_layers)
    model = build_model(llm, data.soft, lora)
    if config.gradient_checkpointing if config.gradient_checkpointing is not None else cuda:
        model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(accelerator.device)
    prompter = Prompter(tokenizer, data.classes, config.context, {s.modality: s.n_tokens for s in data.soft},
                        config.merc_prompt, config.align_prompt, config.max_len)

    progress = {"run_id": run_id, "done": [], "stage": None, "epoch": 0, "batch": 0, "history": []}
    if checkpoint is not None:
        model.load_adapter_state(checkpoint["adapter"])
        progress = checkpoint["progress"]
        _set_rng_state(checkpoint["rng"])

    stages = [] if config.zero_shot else list(STAGES[config.stage])
    notes = []
    align_rows = np.array([r for r in data.train_rows if data.descriptions[r]], dtype=np.int64)
    if "align" in stages and ("behavior" not in model.soft or len(align_rows) == 0):
        reason = ("the model has no behaviour projector (no behavior feature set)" if "behavior" not in model.soft
                  else "no training utterance has a behaviour description")
        if config.stage == "align":
            raise TuneError(f"{store.path}: cannot run the align stage: {reason}")
        stages.remove("align")
        notes.append(f"align stage skipped: {reason}")

    run_dir.mkdir(parents=True, exist_ok=True)
    with Bar(config.progress and accelerator.is_main_process) as bar:
        for stage in stages:
            if stage in progress["done"]:
                continue
            if stage == "align":
                rows = align_rows
                examples = [prompter.align(data.descriptions[r]) for r in rows]
                weights = np.ones(len(rows))
            else:
                rows = data.train_rows
                examples = merc_examples(prompter, data, rows, labelled=True)
                weights = class_weights([data.label(r) for r in rows], config.balance)
            mid_stage = checkpoint is not None and progress["stage"] == stage and checkpoint["optimizer"] is not None
            progress["stage"] = stage
            if not train_stage(stage, model, examples, rows, weights, data, tokenizer.pad_token_id, config, accelerator, run_dir, progress,
                               checkpoint if mid_stage else None, bar):
                return {"stopped": True, "run_id": run_id, "run_dir": str(run_dir), "steps": len(progress["history"])}
            progress.update(done=progress["done"] + [stage], stage=None, epoch=0, batch=0)
            if accelerator.is_main_process:
                save_checkpoint(run_dir / "checkpoint.pt", model, progress, config)
        _write_log(run_dir, progress["history"])

        meta = {"base_model": str(config.model), "classes": data.classes, "context": config.context,
                "max_len": config.max_len, "normalize_scores": config.normalize_scores, "dataset": data.dataset}
        templates = {"merc": prompter.merc_template.source, "align": prompter.align_template.source}
        if stages and accelerator.is_main_process:
            save_adapter(model, run_dir / "adapter", meta, templates)
        if "merc" not in stages and not config.zero_shot:
            return {"run_id": run_id, "run_dir": str(run_dir), "notes": notes, "timing": _timing(progress["history"])}

        probabilities, eval_timing = evaluate(model, prompter, data, data.eval_rows, config, accelerator, bar)

    rows = data.eval_rows
    gold = [data.label(r) for r in rows]
    metrics = {config.eval_split: classification_metrics(np.array([data.classes.index(g) for g in gold]),
                                                         probabilities.argmax(1), data.classes)}
    majority = majority_metrics(data, rows)
    timing = {**_timing(progress["history"]), "eval": eval_timing}
    summary = {"train_utterances": len(data.train_rows), "eval_utterances": len(rows), "notes": notes,
               "majority": {"weighted_f1": majority["weighted_f1"], "accuracy": majority["accuracy"]}, "timing": timing}
    if accelerator.is_main_process:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        u = data.corpus.utterances
        save_run(store, run_id=run_id, kind="tune", run_dir=run_dir, classes=data.classes,
                 feature_sets=[s.feature_set for s in data.soft], config={**asdict(config), "summary": summary},
                 metrics=metrics, uids=u["uid"].gather(rows).to_list(), splits=u["split"].gather(rows).to_list(),
                 gold=gold, probabilities=probabilities, dataset=data.dataset)
    return {"run_id": run_id, "run_dir": str(run_dir), "metrics": metrics, "probabilities": probabilities, **summary}


def _write_log(run_dir: Path, history: list[dict]) -> None:
    """``RUN_DIR/log.jsonl``: one line per optimiser step (stage, epoch, batch, loss, lr, tokens, seconds)."""
    (run_dir / "log.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))


def show_prompt(store: Store, config: TuneConfig, uid: str) -> str:
    """The MERC prompt (and expected answer) of utterance ``uid`` as the model sees it."""
    data = load_data(store, config)
    uids = data.corpus.utterances["uid"].to_list()
    if uid not in uids:
        raise TuneError(f"{store.path}: no utterance {uid!r} in dataset {data.dataset!r}")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model)
    prompter = Prompter(tokenizer, data.classes, config.context, {s.modality: s.n_tokens for s in data.soft},
                        config.merc_prompt, config.align_prompt, config.max_len)
    row = uids.index(uid)
    encoded = prompter.merc(data.context(row, config.context), data.turn(row), data.descriptions[row], data.label(row))
    return prompter.show(encoded) + f"\n[{len(encoded.prompt_ids)} prompt tokens, {len(encoded.answer_ids)} answer tokens]"
