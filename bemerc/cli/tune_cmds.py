"""`bemerc tune`: instruction-tune an LLM with LoRA and soft tokens from the store's features."""

from __future__ import annotations

import inspect
import json
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, get_args, get_type_hints

import typer
from rich.table import Table

from bemerc.cli.common import (DEFAULT_STORE, SEEDS_HELP, JsonOption, choices, PrecisionOption, ProfileOption, SpeakerNormOption, StoreOption, console,
                               err_console, fail, open_store)
from bemerc.train.tune.config import TuneConfig

_DEFAULTS = {f.name: f.default for f in fields(TuneConfig) if f.default is not MISSING}
_HINTS = get_type_hints(TuneConfig)


def _default(name: str) -> str:
    """TuneConfig's default for an option, as --help shows it (TuneConfig is the one home of every tuning default).

    >>> _default("epochs") == str(TuneConfig(model="m").epochs)
    True
    """
    value = _DEFAULTS[name]
    return f"{value:g}" if isinstance(value, float) else str(value)


# The options that come from TuneConfig: its fields made with config.option, in field order.
_OPTIONS = [f for f in fields(TuneConfig) if "help" in f.metadata]
_CHOICES = {f.name: choices(f.name.title(), f.metadata["choices"]) for f in _OPTIONS if "choices" in f.metadata}
Stage, Layout = _CHOICES["stage"], _CHOICES["layout"]
_SHARED = {"speaker_norm": SpeakerNormOption, "precision": PrecisionOption}  # the CLI's common options (export, extract, serve)


def _option(f) -> inspect.Parameter:
    """The typer parameter of one TuneConfig field (see :func:`bemerc.train.tune.config.option`): not
    given, it is None and the field keeps its default (``always``: the default itself)."""
    meta, default = f.metadata, _DEFAULTS.get(f.name)
    if f.name in _SHARED:
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=_SHARED[f.name])
    kind = _CHOICES.get(f.name) or meta.get("cli_type") or next(t for t in get_args(_HINTS[f.name]) or [_HINTS[f.name]] if t is not type(None))
    settings = {k: meta[k] for k in ("min", "max") if k in meta}
    if meta.get("always"):
        value = kind(default) if f.name in _CHOICES else default
        return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=value,
                                 annotation=Annotated[kind, typer.Option(help=meta["help"], **settings)])
    show = meta.get("show_default", _default(f.name) if default is not None else True)
    declared = (meta["flag"],) if "flag" in meta else ()
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[kind | None, typer.Option(*declared, help=meta["help"], show_default=show, **settings)])


def _config_values(options: dict) -> dict:
    """The TuneConfig values of the options given (None: not given, the field's default stays)."""
    values = {}
    for f in _OPTIONS:
        value = options[f.name]
        if value is None:
            continue
        if isinstance(value, Enum):
            value = value.value
        elif "parse" in f.metadata:
            value = f.metadata["parse"](value)
        elif isinstance(value, Path):
            value = str(value)
        values[f.name] = value
    if "lora_r" in values:
        values["lora_alpha"] = 2 * values["lora_r"]
    return values


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


def _parameter(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


# the options of `bemerc tune` that are not TuneConfig's, and the field each follows in --help
_BEFORE = [_parameter("store", StoreOption, DEFAULT_STORE)]
_AFTER = {
    "model": [_parameter("profile", ProfileOption, None)],
    "seed": [_parameter("seeds", Annotated[str | None, typer.Option(show_default=False, help=SEEDS_HELP)], None)],
    "stop_after": [
        _parameter("resume", Annotated[bool, typer.Option(help="Continue the run in --run-dir from its checkpoint (its saved settings are used).")], False),
        _parameter("show_prompt", Annotated[str | None, typer.Option(help="Print the prompt of utterance UID (e.g. dev/dia0_utt1) and exit.")], None),
        _parameter("as_json", JsonOption, False),
    ],
}


def _signature() -> inspect.Signature:
    parameters = list(_BEFORE)
    for f in _OPTIONS:
        parameters += [_option(f), *_AFTER.get(f.name, [])]
    return inspect.Signature(parameters)


def register(app: typer.Typer) -> None:
    def tune(**options) -> None:
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

        store, resume, seeds, show_prompt, as_json = (options[k] for k in ("store", "resume", "seeds", "show_prompt", "as_json"))
        if resume and options["run_dir"] is None:
            fail("--resume needs --run-dir (the folder of the interrupted run)")
        if seeds is not None and (options["seed"] is not None or resume or show_prompt or options["stop_after"]):
            fail("--seeds runs every seed to the end: it cannot be combined with --seed, --resume, --show-prompt or --stop-after")
        given = _config_values(options)  # only what the user gave: TuneConfig holds the defaults
        try:
            config = TuneConfig(**{**given, "model": options["model"] or ("" if resume else _default_model(options["profile"]))},
                                progress=not as_json)
            opened = open_store(store)
            if show_prompt:
                console.print(render_prompt(opened, config, show_prompt), highlight=False, markup=False)
                return
            if seeds is not None:
                from dataclasses import replace

                from bemerc.cli.train_cmds import print_group
                from bemerc.train.runs import TUNE, ZERO_SHOT, group_config, parse_seeds, train_group

                log = (lambda message: None) if as_json else (lambda message: console.print(f"  {message}", highlight=False))
                group = train_group(
                    opened, ZERO_SHOT if config.zero_shot else TUNE, parse_seeds(seeds),
                    lambda s, folder: run_tune(opened, replace(config, seed=s, run_dir=str(folder) if folder else None))["run_id"],
                    run_dir=options["run_dir"], config=group_config(config), log=log)
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

    tune.__signature__ = _signature()  # the options: TuneConfig's fields (config.option) and the CLI's own
    tune.__annotations__ = {p.name: p.annotation for p in tune.__signature__.parameters.values()}
    app.command("tune")(tune)


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
