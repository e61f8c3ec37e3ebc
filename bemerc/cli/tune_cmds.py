"""`bemerc tune`: instruction-tune an LLM with LoRA and soft tokens from the store's features."""

from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from bemerc.cli.common import (DEFAULT_STORE, SEEDS_HELP, JsonOption, choices, PrecisionOption, ProfileOption, SpeakerNormOption, StoreOption, console,
                               err_console, fail, open_store)
from bemerc.train.tune.config import DEFAULT_MAX_LEN, LAYOUTS, STAGES, TuneConfig

_DEFAULTS = {f.name: f.default for f in fields(TuneConfig) if f.default is not MISSING}


def _default(name: str) -> str:
    """TuneConfig's default for an option, as --help shows it (TuneConfig is the one home of every tuning default).

    >>> _default("epochs") == str(TuneConfig(model="m").epochs)
    True
    """
    value = _DEFAULTS[name]
    return f"{value:g}" if isinstance(value, float) else str(value)


Stage = choices("Stage", STAGES)
Layout = choices("Layout", LAYOUTS)


def _default_model(profile: str | None) -> str:
    """The LLM of the profile (None: the default profile) as a local folder (the offline profile's GGUF
    is converted once, on first use): the default --model."""
    from bemerc.models.profiles import DEFAULT_PROFILE, ProfileError, load_profile, prepare_stage

    profile = profile or DEFAULT_PROFILE
    try:
        path = prepare_stage(load_profile(profile).stage("llm"), lambda stage, message: err_console.print(f"{stage}: {message}"))
    except ProfileError as exc:
        fail(f"cannot prepare the {profile!r} profile's LLM: {exc}; or pass --model DIR_OR_HUB_ID")
    if path is None:
        fail(f"the {profile!r} profile's llm stage has no local weights; pass --model DIR_OR_HUB_ID")
    return str(path)


def register(app: typer.Typer) -> None:
    @app.command("tune")
    def tune(
        store: StoreOption = DEFAULT_STORE,
        model: Annotated[str | None, typer.Option(help="Hugging Face causal LM: a local folder or a hub id. Default: the LLM of --profile.")] = None,
        profile: ProfileOption = None,
        stage: Annotated[Stage, typer.Option(help="align: the behaviour projector learns to describe behaviour; project: the voice and behaviour projectors (not the text embedding's) learn, with the LLM frozen, to answer the emotion from their soft tokens alone; merc: emotion instruction tuning (LoRA and projectors); all: the three in that order (align is skipped without behaviour descriptions, project without a voice or behaviour modality).")] = Stage.all,
        layout: Annotated[Layout | None, typer.Option(help="dialogue: one sequence per dialogue, every turn answered in one pass (labels scored by their first token); utterance: one prompt per utterance with its last --context turns.", show_default=_default("layout"))] = None,
        run_dir: Annotated[Path | None, typer.Option(help="Output folder (default: runs/<run_id> inside the store).")] = None,
        dataset: Annotated[str | None, typer.Option(help="Dataset to use when the store holds several.")] = None,
        modalities: Annotated[str | None, typer.Option(help="Comma-separated modalities projected to soft tokens, or 'none'. Default: text, audio and behavior when stored.")] = None,
        context: Annotated[int | None, typer.Option(help="utterance layout: previous utterances shown in the prompt.", show_default=_default("context"))] = None,
        overlap: Annotated[int | None, typer.Option(help="dialogue layout: turns repeated as context when a long dialogue is split into windows.", show_default=_default("overlap"))] = None,
        demos: Annotated[int | None, typer.Option(help="Show the K nearest labelled train utterances (by stored text embedding, never the same dialogue) before each dialogue.", show_default=_default("demos"))] = None,
        max_len: Annotated[int | None, typer.Option(help=f"Tokens of a prompt (utterance layout, {DEFAULT_MAX_LEN['utterance']}) or a window (dialogue layout, {DEFAULT_MAX_LEN['dialogue']}).")] = None,
        train_limit: Annotated[int | None, typer.Option(help="Train on the first N train utterances (whole dialogues, store order).")] = None,
        eval_limit: Annotated[int | None, typer.Option(help="Evaluate on the first N utterances of each labelled eval split, dev and test (whole dialogues).")] = None,
        epochs: Annotated[int | None, typer.Option(help="Epochs of the merc stage.", show_default=_default("epochs"))] = None,
        align_epochs: Annotated[int | None, typer.Option(help="Epochs of the align stage.", show_default=_default("align_epochs"))] = None,
        project_epochs: Annotated[int | None, typer.Option(help="Epochs of the project stage (0: none).", show_default=_default("project_epochs"))] = None,
        lr: Annotated[float | None, typer.Option(help="Peak learning rate of the merc stage (and of the project stage unless --projector-lr).", show_default=_default("lr"))] = None,
        align_lr: Annotated[float | None, typer.Option(help="Peak learning rate of the align stage.", show_default=_default("align_lr"))] = None,
        projector_lr: Annotated[float | None, typer.Option(help="Peak learning rate of the projectors in every stage. Default: the stage's own (--lr, --align-lr).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Utterances (utterance layout) or dialogue windows (dialogue layout) per optimiser step and device.", show_default=_default("batch_size"))] = None,
        micro_batch_tokens: Annotated[int | None, typer.Option(min=1, help="Padded tokens per forward pass: a batch over it is trained in micro-batches with gradient accumulation (same step, bounded memory; peak memory per window length: docs/tune.md, Tune memory).", show_default=_default("micro_batch_tokens"))] = None,
        balance: Annotated[float | None, typer.Option(help="Class-balanced loss: weight examples by (class share) ** -BALANCE (0 = off, 0.5 = inverse square root, 1 = inverse frequency).", show_default=_default("balance"))] = None,
        lora_r: Annotated[int | None, typer.Option(help="LoRA rank (alpha = 2 * rank).", show_default=_default("lora_r"))] = None,
        lora_dropout: Annotated[float | None, typer.Option(min=0.0, max=0.9, help="Dropout on the LoRA layers' inputs (its masks cost as much as the MLP's bf16 work on a CPU).", show_default=_default("lora_dropout"))] = None,
        lora_layers: Annotated[int | None, typer.Option(help="LoRA on the top N decoder blocks only (faster, but learns much less). Default: all.")] = None,
        speaker_norm: SpeakerNormOption = None,
        normalize_scores: Annotated[bool | None, typer.Option("--normalize-scores", help="utterance layout: score a label by its mean token log-probability instead of the sum.")] = None,
        zero_shot: Annotated[bool, typer.Option(help="No training: evaluate the base model by label scoring (no LoRA, no soft tokens).")] = False,
        seed: Annotated[int | None, typer.Option(help="Seed of initialisation, data order and dropout.", show_default=_default("seed"))] = None,
        seeds: Annotated[str | None, typer.Option(show_default=False, help=SEEDS_HELP)] = None,
        threads: Annotated[int | None, typer.Option(help="Torch CPU threads.", show_default=_default("threads"))] = None,
        precision: PrecisionOption = None,
        checkpoint_every: Annotated[int | None, typer.Option(help="Write RUN_DIR/checkpoint.pt every N optimiser steps.", show_default=_default("checkpoint_every"))] = None,
        stop_after: Annotated[int | None, typer.Option(help="Stop after N optimiser steps with a checkpoint (continue with --resume).")] = None,
        resume: Annotated[bool, typer.Option(help="Continue the run in --run-dir from its checkpoint (its saved settings are used).")] = False,
        show_prompt: Annotated[str | None, typer.Option(help="Print the prompt of utterance UID (e.g. dev/dia0_utt1) and exit.")] = None,
        as_json: JsonOption = False,
    ) -> None:
        """Instruction-tune an LLM with LoRA on the store (BeMERC's model) and evaluate it on dev (and test).

        By default each dialogue is one causal sequence: the system prompt once, then every turn
        (speaker, text, its behaviour description, soft tokens projected from its stored text, audio
        and behaviour features) followed by its emotion; one pass answers every turn from all earlier
        ones. Every label is scored, so each answer is a valid label with a probability per class.
        The adapter (peft format, plus projectors, prompt templates and tune.json) goes to
        RUN_DIR/adapter, the metrics to RUN_DIR/metrics.json and the predictions to the store (see
        `bemerc compare`). Off a terminal, progress is printed as a line every 30 s.

        Example: `bemerc tune --store store --train-limit 2000 --eval-limit 600`
        """
        from bemerc.store import StoreError, StoreLockedError
        from bemerc.train.tune.loop import TuneConfig, TuneError, show_prompt as render_prompt, tune as run_tune
        from bemerc.train.tune.prompt import PromptError

        if resume and run_dir is None:
            fail("--resume needs --run-dir (the folder of the interrupted run)")
        if seeds is not None and (seed is not None or resume or show_prompt or stop_after):
            fail("--seeds runs every seed to the end: it cannot be combined with --seed, --resume, --show-prompt or --stop-after")
        chosen = None if modalities is None else [m.strip() for m in modalities.split(",") if m.strip() and m.strip() != "none"]
        given = {  # only what the user gave: TuneConfig holds the defaults
            "layout": layout.value if layout else None, "context": context, "overlap": overlap, "demos": demos,
            "max_len": max_len, "epochs": epochs, "align_epochs": align_epochs, "project_epochs": project_epochs, "lr": lr, "align_lr": align_lr, "projector_lr": projector_lr,
            "batch_size": batch_size, "micro_batch_tokens": micro_batch_tokens, "balance": balance, "lora_r": lora_r, "lora_alpha": 2 * lora_r if lora_r else None, "lora_dropout": lora_dropout,
            "normalize_scores": normalize_scores, "speaker_norm": speaker_norm, "seed": seed, "threads": threads, "precision": precision.value if precision else None, "checkpoint_every": checkpoint_every,
        }
        try:
            config = TuneConfig(
                model=model or ("" if resume else _default_model(profile)), stage=stage.value,
                run_dir=str(run_dir) if run_dir else None, dataset=dataset, modalities=chosen,
                train_limit=train_limit, eval_limit=eval_limit, lora_layers=lora_layers, zero_shot=zero_shot,
                stop_after=stop_after, progress=not as_json, **{k: v for k, v in given.items() if v is not None},
            )
            opened = open_store(store)
            if show_prompt:
                console.print(render_prompt(opened, config, show_prompt), highlight=False, markup=False)
                return
            if seeds is not None:
                from dataclasses import replace

                from bemerc.cli.train_cmds import print_group
                from bemerc.train.runs import TUNE, ZERO_SHOT, parse_seeds, train_group

                log = (lambda message: None) if as_json else (lambda message: console.print(f"  {message}", highlight=False))
                group = train_group(
                    opened, ZERO_SHOT if zero_shot else TUNE, parse_seeds(seeds),
                    lambda s, folder: run_tune(opened, replace(config, seed=s, run_dir=str(folder) if folder else None))["run_id"],
                    run_dir=run_dir, config={"model": config.model, **{k: v for k, v in given.items() if v is not None and k != "seed"},
                                             "train_limit": train_limit, "eval_limit": eval_limit}, log=log)
                print_group(group, as_json)
                return
            result = run_tune(opened, config, resume=resume)
        except (TuneError, PromptError, StoreError, StoreLockedError, OSError, ValueError) as exc:
            fail(_fault_line(exc, str(store)))
        result.pop("probabilities", None)
        result.pop("probabilities_by_split", None)
        if as_json:
            print(json.dumps(result, indent=2, default=str))
            return
        if result.get("stopped"):
            console.print(f"stopped after {result['steps']} steps; continue with "
                          f"`bemerc tune --resume --run-dir {result['run_dir']}`")
            return
        for note in result.get("notes", []):
            console.print(f"[yellow]{note}[/]")
        timing = result.get("timing", {})
        table = Table(title=f"run {result['run_id']} ({result['run_dir']})")
        for col in ("split", "utterances", "weighted F1", "accuracy", "majority weighted F1 (dev)"):
            table.add_column(col, justify="right")
        for split, m in result.get("metrics", {}).items():
            table.add_row(split, f"{m['n']:,}", f"{m['weighted_f1']:.3f}", f"{m['accuracy']:.3f}",
                          f"{result['majority']['weighted_f1']:.3f}" if split == "dev" else "")
        console.print(table)
        if timing.get("steps"):
            console.print(f"train ({result.get('layout')} layout): {result.get('train_utterances', 0):,} utterances, "
                          f"{timing['steps']} steps, {timing['step_s_median']:.2f} s/step, "
                          f"{timing['train_utterances_per_s']:.1f} utterances/s, {timing['train_tokens_per_s']:.0f} tokens/s")
        if "eval" in timing:
            console.print(f"eval (dev): {timing['eval']['seconds']:.0f} s, {timing['eval']['utterances_per_s']:.1f} utterances/s, "
                          f"{timing['eval']['tokens_per_s']:.0f} tokens/s")


def _fault_line(exc: Exception, store: str) -> str:
    """The one line of a failed ``tune``: a full or read-only disk as every run writer says it (naming
    the run folder); when the folder holds a checkpoint, it stays, and the line says how to go on
    from it."""
    from pathlib import Path

    from bemerc.cli.faults import describe

    line = describe(exc, store) if isinstance(exc, OSError) else None
    if line is None:
        return str(exc)
    folder = Path(exc.filename) if isinstance(exc.filename, str) else None
    if folder is not None and (folder / "checkpoint.pt").is_file():
        line = line.replace("run the same command again",
                            f"continue with `bemerc tune --resume --run-dir {folder}` (its last checkpoint stays)")
    return line
