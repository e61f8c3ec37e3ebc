"""`bemerc extract`: fill the store with text, audio, behaviour and visual features."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from bemerc.cli.common import DEFAULT_STORE, PrecisionOption, choices, ProfileOption, StoreOption, console, err_console, fail, open_store
from bemerc.store.schema import MODALITIES


Modality = choices("Modality", (*MODALITIES, "all"))


Device = choices("Device", ("auto", "cpu", "cuda"))  # extract.base.DEVICES (not imported: --help loads no stage)


EngineName = choices("EngineName", ("local", "ray"))


def register(app: typer.Typer) -> None:
    @app.command("extract")
    def extract(
        modality: Annotated[Modality, typer.Option(help="Which features to extract; `all` runs audio (transcripts), text, behavior, visual in that order.")] = Modality.all,
        profile: ProfileOption = None,
        limit: Annotated[int | None, typer.Option(help="Only the first N utterances in dialogue order (for a quick look).")] = None,
        batch_size: Annotated[int | None, typer.Option(help="Utterances per extractor call (default: 256 for text, 8 for media).")] = None,
        retry_failures: Annotated[bool, typer.Option("--retry-failures", help="Try again the utterances that failed in an earlier run.")] = False,
        strict: Annotated[bool, typer.Option("--strict", help="Exit non-zero when any utterance fails.")] = False,
        threads: Annotated[int | None, typer.Option(help="torch threads (default: all cores).")] = None,
        engine: Annotated[EngineName, typer.Option(help="Where the models run: `local` (this process) or `ray` (Ray Data actors on a Ray cluster; this process writes the store).")] = EngineName.local,
        ray_address: Annotated[str | None, typer.Option(help="With --engine ray: `auto` (the cluster of this node), `ray://HEAD:10001`, or none for a Ray on this machine.")] = None,
        workers: Annotated[int, typer.Option(min=1, help="With --engine ray: actors, each with the extractor loaded once.")] = 1,
        device: Annotated[Device, typer.Option(help="Where text, audio and visual models (and a profile's behaviour describer) run: `auto` (CUDA when torch sees a GPU), `cpu` or `cuda`. MediaPipe and FER run on CPUs. Never changes the feature set. Default: $BEMERC_DEVICE or auto.", show_default=False)] = None,
        precision: PrecisionOption = None,
        worker_gpus: Annotated[float | None, typer.Option(min=0, help="With --engine ray: GPUs per actor. Default: 1 for text, audio, visual (and behaviour with a describer) when the cluster has GPUs (unless --device cpu), else 0.", show_default=False)] = None,
        store: StoreOption = DEFAULT_STORE,
    ) -> None:
        """Extract features for every utterance in the store that lacks them.

        Rows already stored with the same extractor and configuration are skipped, so a re-run does
        no model work and a run stopped midway finishes the rest. Each row records the digest of the
        inputs it was computed from (text; media sha256 and span): a row whose text, media file or span
        changed since (re-ingested) is stale and extracted again, counted as "N stale, re-extracted".
        On a terminal a bar shows progress; in a log file or a pipe, a plain line every 30 s. Unreadable media, no audio stream,
        silence or no face become rows in the `failures` table; the run goes on and prints a summary.
        It exits non-zero only with --strict or when nothing could be extracted.

        Example: `bemerc extract --modality behavior --limit 50`;
        on a cluster: `bemerc extract --engine ray --ray-address auto --workers 32 --store s3://bucket/store`
        """
        from bemerc.extract.base import DEVICES, MODALITY_ORDER, feature_set_id, resolve_device, uses_gpu
        from bemerc.extract.factory import build_extractor
        from bemerc.precision import DEFAULT_PRECISION
        from bemerc.models.profiles import ProfileError, load_profile
        from bemerc.store.summary import recall, remember, tables_state

        if threads:  # else each extractor uses every core; torch loads only when a modality has work
            import torch

            torch.set_num_threads(threads)
        modalities = MODALITY_ORDER if modality == Modality.all else (modality.value,)
        try:
            chosen = load_profile(profile)
            # Cheap: an extractor knows its feature set from the profile; its model loads on first use.
            device_name = device.value if device else os.environ.get("BEMERC_DEVICE") or None
            if device_name not in (None, *DEVICES):
                raise ValueError(f"BEMERC_DEVICE={device_name!r}: expected one of {', '.join(DEVICES)}")
            precision_name = precision.value if precision else DEFAULT_PRECISION
            extractors = {name: build_extractor(name, chosen, device_name, precision_name) for name in modalities}
        except (ProfileError, OSError, ValueError) as e:
            fail(str(e))
        if engine == EngineName.local and device_name == "cuda" and any(uses_gpu(e) for e in extractors.values()):
            try:  # before any work: a machine without CUDA is one line, not a traceback mid-run
                resolve_device("cuda")
            except RuntimeError as e:
                fail(str(e))
        # What a re-run would print is remembered until the store changes, so a re-run on an unchanged
        # store answers without opening LanceDB (see bemerc.store.summary and the end of this command).
        keys = {name: f"extract {feature_set_id(e)} limit={limit}" for name, e in extractors.items()}
        done_before = [] if retry_failures else [recall(store, key) for key in keys.values()]
        if done_before and all(done_before):
            for line in done_before:
                console.print(line)
            return

        from bemerc.extract.run import RunSummary, Terminated, run_extractor
        from bemerc.store import StoreLockedError

        db = open_store(store)
        if db.count("utterances") == 0:
            fail(f"{store}: no utterances yet; ingest first (`bemerc ingest manifest FILE`, `bemerc ingest meld DIR`, or `make features`)")
        summaries = []
        before = tables_state(store)
        for name in modalities:
            extractor = extractors.pop(name)  # dropped after its run: its model's memory goes with it
            try:
                runner = None
                if engine == EngineName.ray:
                    from bemerc.extract.ray_engine import ExtractorRecipe, RayEngine

                    resolved = getattr(extractor, "precision", precision_name)  # the driver's: every worker computes one feature set
                    runner = RayEngine(ExtractorRecipe(name, chosen, device_name, resolved), workers=workers, address=ray_address,
                                       gpus_per_worker=worker_gpus)
                summary = run_extractor(db, extractor, limit=limit, batch_size=batch_size, retry_failures=retry_failures,
                                        console=console, engine=runner)
            except StoreLockedError as e:
                fail(str(e))
            except Terminated:
                fail("stopped by SIGTERM; what was extracted is stored: run the same command to do the rest", code=143)
            summaries.append(summary)
            console.print(summary.line())
            if summary.reasons:
                console.print("  failures: " + json.dumps(summary.reasons))
            del extractor
        # Every utterance is now stored or failed for each feature set run. Unless another process
        # changed a table these runs did not write (new utterances, say), remember what a re-run prints.
        after = tables_state(store)
        written = {"failures", "feature_sets", *(db.feature_set(s.feature_set).table_name for s in summaries)}

        def unwritten(state: dict[str, list[str]]) -> dict[str, list[str]]:
            return {table: versions for table, versions in state.items() if table not in written}

        if before is not None and after is not None and unwritten(before) == unwritten(after):
            remember(store, {keys[name]: RunSummary(s.feature_set, already=s.already + s.done + s.stale, not_applicable=s.not_applicable,
                                                    skipped_failed=s.skipped_failed + s.failed).line()
                             for name, s in zip(modalities, summaries)}, after)
        failed = sum(s.failed for s in summaries)
        done = sum(s.done + s.stale + s.already for s in summaries)
        if failed:
            err_console.print(f"{failed} utterance(s) failed; see `bemerc query where` on the failures table or `bemerc store info`")
        if (strict and failed) or (done == 0 and failed):
            raise typer.Exit(1)
