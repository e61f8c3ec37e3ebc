"""Compare runs side by side: scores with 95% intervals, per-class F1, confusion matrices, a paired
test between the best two runs and the baseline's modality ablation, as Markdown (with PNG plots
beside it) and as one self-contained HTML page.

Scores are recomputed from each run's rows in ``predictions`` (the one record every kind of run
writes), so a baseline and a tuned LLM are scored the same way on the same utterances.

>>> data = comparison(Store("store"), split="dev")        # doctest: +SKIP
>>> write_report(data, Path("reports"))["html"]          # doctest: +SKIP
PosixPath('reports/report.html')
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from bemerc.store import Store, StoreError
from bemerc.store.schema import sql_quote
from bemerc.train.evaluate import bootstrap_intervals, paired_test
from bemerc.train.metrics import classification_metrics
from bemerc.store.runs import Run, check_run_dir, list_runs, write_run_files
from bemerc.train.runs import BASELINE, FUSION, GROUP, GROUP_METRICS, seed_summary

# The dataset name of the embedded synthetic demo (`make demo` ingests it as `--dataset demo`).
DEMO_DATASET = "demo"
DEMO_NOTE = ("These runs were trained and scored on bemerc's small synthetic demo: the scores show that the "
             "pipeline runs, not how well anything recognises emotion.")


# -- the comparison as data ---------------------------------------------------------------------
def comparison(store: Store, run_ids: list[str] | None = None, split: str = "dev", n_resamples: int = 1000,
               seed: int = 0) -> dict:
    """Scores of runs on one split, as plain data (what ``bemerc compare --json`` prints).

    Returns ``{"store", "split", "runs": [{"run_id", "kind", "created_at", "dataset", "feature_sets",
    "n", "weighted_f1", "ci", "accuracy", "macro_f1", "per_class", "classes", "confusion"}], "skipped":
    [{"run_id", "reason"}], "paired_test": {...} | None, "ablation": {run_id: {...}}, "fusion": {run_id:
    {"weights", "models", "cross_fit_dev_weighted_f1"}}, "demo": bool}``. Runs of every kind (baseline,
    tune, fusion) are listed in the order asked (default: oldest first); ``ci`` holds 95% bootstrap
    intervals over dialogues; ``demo`` says that every scored run is of the synthetic demo.

    A seed group (kind ``group``) is one row: ``weighted_f1``, ``accuracy`` and ``macro_f1`` are the
    means over its finished seeds, with ``std`` (sample standard deviation), ``seeds``, ``per_seed``
    ({seed: {"run_id", metrics}}), ``failed`` ({seed: reason}) and ``seed_mean`` (the score of the
    seeds' mean probabilities, which the paired test uses). Its members are not listed on their
    own unless ``run_ids`` names them.
    """
    runs = list_runs(store)
    if not runs:
        raise StoreError(f"{store.path}: no runs yet; train one with `bemerc baseline`")
    by_id = {r.run_id: r for r in runs}
    if run_ids:
        unknown = [r for r in run_ids if r not in by_id]
        if unknown:
            raise StoreError(f"{store.path}: no run {', '.join(map(repr, unknown))} (runs: {', '.join(by_id)})")
        runs = [by_id[r] for r in run_ids]
    utterances = store.read("utterances", ["uid", "dataset", "split", "dialogue_id"])
    dialogue_of = dict(zip(utterances["uid"].to_list(),
                           (utterances["dataset"] + "/" + utterances["split"] + "/" + utterances["dialogue_id"]).to_list()))
    groups = {r.run_id: r for r in runs if r.kind == GROUP}
    named = set(run_ids or [])
    folded = {m for g in groups.values() for m in g.config.get("members", {}).values()} - named
    scored, skipped, outcomes = [], [], {}
    for run in runs:
        if run.run_id in folded:  # a selected group's member: one of its seeds, not a row of its own
            continue
        entry, outcome = _score_run(store, run, split, dialogue_of, n_resamples, seed)
        if entry is None:
            skipped.append({"run_id": run.run_id, "reason": f"no labelled {split} predictions"})
            continue
        if run.run_id in groups:
            entry["seed_mean"] = {k: entry[k] for k in (*GROUP_METRICS, "ci")}
            entry.update(_group_scores(store, run, by_id, split, dialogue_of))
        scored.append(entry)
        outcomes[run.run_id] = outcome
    ablation = {
        r.run_id: {"ablation": r.metrics.get("ablation", {}), "models": r.metrics.get("models", {}),
                   "fusion_weights": r.metrics.get("fusion_weights", {})}
        for r in runs if r.kind == BASELINE and r.metrics.get("ablation")
    }
    fusion = {
        r.run_id: {"weights": r.config.get("weights", {}), "models": r.metrics.get("models", {}),
                   "cross_fit_dev_weighted_f1": r.config.get("summary", {}).get("cross_fit_dev_weighted_f1")}
        for r in runs if r.kind == FUSION
    }
    return {
        "store": str(store.path),
        "split": split,
        "demo": bool(scored) and all(r["dataset"] == DEMO_DATASET for r in scored),
        "runs": scored,
        "skipped": skipped,
        "paired_test": _best_two_test(scored, outcomes, dialogue_of, seed),
        "ablation": ablation,
        "fusion": fusion,
    }


def _score_run(store: Store, run: Run, split: str, dialogue_of: dict, n_resamples: int = 1000, seed: int = 0,
               intervals: bool = True) -> tuple[dict | None, dict]:
    """A run's scores on ``split`` from its stored predictions (with bootstrap intervals unless
    ``intervals`` is false), and {uid: (gold, predicted)}; (None, {}) when it has no labelled
    prediction there."""
    preds = store.read("predictions", ["uid", "label", "gold"], where=f"run_id = {sql_quote(run.run_id)} AND split = {sql_quote(split)}")
    preds = preds.filter(pl.col("gold").is_not_null() & pl.col("gold").is_in(run.classes)).sort("uid")
    if preds.height == 0:
        return None, {}
    classes = list(run.classes)
    index = {c: i for i, c in enumerate(classes)}
    gold = np.array([index[g] for g in preds["gold"]])
    pred = np.array([index[p] for p in preds["label"]])
    groups = np.array([dialogue_of.get(u, u) for u in preds["uid"]])
    m = classification_metrics(gold, pred, classes)
    ci = bootstrap_intervals(gold, pred, len(classes), n_resamples, groups=groups, seed=seed) if intervals else {}
    entry = {
        "run_id": run.run_id,
        "kind": run.kind,
        "created_at": str(run.created_at),
        "dataset": run.dataset,
        "feature_sets": list(run.feature_sets),
        "n": m["n"],
        "weighted_f1": m["weighted_f1"],
        "ci": {k: {"low": v["low"], "high": v["high"]} for k, v in ci.items()},
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "per_class": {c: v["f1"] for c, v in m["per_class"].items()},
        "classes": classes,
        "confusion": m["confusion"],
    }
    return entry, dict(zip(preds["uid"].to_list(), zip(preds["gold"].to_list(), preds["label"].to_list())))


def _group_scores(store: Store, group: Run, by_id: dict, split: str, dialogue_of: dict) -> dict:
    """What a group's row holds beside its own scores: each finished seed scored from its own
    predictions (``per_seed``), the mean (``weighted_f1``, ``accuracy``, ``macro_f1``) and sample
    standard deviation (``std``) over them, ``seeds`` (how many) and ``failed`` ({seed: reason})."""
    config = group.config
    values, failed = {}, dict(config.get("failed", {}))
    for s, member in config.get("members", {}).items():
        run = by_id.get(member)
        entry = _score_run(store, run, split, dialogue_of, intervals=False)[0] if run else None
        if entry is None:
            failed[s] = f"{member}: no labelled {split} predictions" if run else f"{member}: no longer in the store"
            continue
        values[s] = {"run_id": member, **{k: entry[k] for k in GROUP_METRICS}}
    out = {"member_kind": config.get("member_kind"), "seeds": len(values), "failed": failed, "per_seed": values}
    if values:
        summary = seed_summary(values)
        out.update({k: summary[k] for k in GROUP_METRICS}, std=summary["std"])
    return out


def _best_two_test(scored: list[dict], outcomes: dict, dialogue_of: dict, seed: int) -> dict | None:
    """Paired permutation test of weighted F1 between the two best runs, on the utterances both
    predicted; None with fewer than two runs or no shared utterance."""
    if len(scored) < 2:
        return None
    a, b = sorted(scored, key=lambda r: -r["weighted_f1"])[:2]
    shared = sorted(set(outcomes[a["run_id"]]) & set(outcomes[b["run_id"]]))
    if not shared:
        return None
    labels = sorted({x for uid in shared for run in (a, b) for x in outcomes[run["run_id"]][uid]})
    index = {c: i for i, c in enumerate(labels)}
    gold = np.array([index[outcomes[a["run_id"]][u][0]] for u in shared])
    pred_a = np.array([index[outcomes[a["run_id"]][u][1]] for u in shared])
    pred_b = np.array([index[outcomes[b["run_id"]][u][1]] for u in shared])
    test = paired_test(gold, pred_a, pred_b, len(labels), seed=seed)
    groups = [r["run_id"] for r in (a, b) if r["kind"] == GROUP]
    return {"run_a": a["run_id"], "run_b": b["run_id"], **test, "groups": groups}


# -- plots ----------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def plot_per_class(runs: list[dict], path: Path) -> Path:
    """Grouped bars: F1 of each class (x) for each run (one colour per run)."""
    plt = _pyplot()
    classes = list(dict.fromkeys(c for r in runs for c in r["classes"]))
    width = 0.8 / len(runs)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(classes) + 0.6 * len(runs)), 4.2))
    x = np.arange(len(classes))
    for i, r in enumerate(runs):
        values = [r["per_class"].get(c, np.nan) for c in classes]
        ax.bar(x + (i - (len(runs) - 1) / 2) * width, values, width, label=_short(r["run_id"]))
    ax.set_xticks(x, classes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1")
    ax.set_title("F1 per class")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(run: dict, path: Path) -> Path:
    """Heatmap of the confusion matrix normalised by row (share of each gold class), with counts."""
    plt = _pyplot()
    counts = np.asarray(run["confusion"], dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    classes = run["classes"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(classes), 0.6 + 0.7 * len(classes)))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, f"{share[i, j]:.2f}\n{int(counts[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"{_short(run['run_id'])} (rows sum to 1)", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation(run_id: str, ablation: dict, path: Path) -> Path:
    """Horizontal bars: late-fusion weighted F1 of each modality combination, dev and test."""
    plt = _pyplot()
    names = list(ablation)
    splits = [s for s in ("dev", "test") if any(s in v for v in ablation.values())]
    fig, ax = plt.subplots(figsize=(6.5, 1.2 + 0.55 * len(names) * len(splits)))
    height = 0.8 / len(splits)
    y = np.arange(len(names))
    for i, s in enumerate(splits):
        values = [ablation[n].get(s, {}).get("weighted_f1", np.nan) for n in names]
        bars = ax.barh(y + (i - (len(splits) - 1) / 2) * height, values, height, label=s)
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("weighted F1 (late fusion)")
    ax.set_title(f"modality ablation, {_short(run_id)}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(run_id: str) -> str:
    return run_id if len(run_id) <= 32 else run_id[:29] + "..."


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


# -- the document: one list of blocks rendered as Markdown and as HTML ----------------------------
@dataclass
class Block:
    kind: str  # "h1", "h2", "p", "table", "image"
    text: str = ""
    headers: tuple[str, ...] = ()
    rows: tuple[tuple[str, ...], ...] = ()
    path: Path | None = None


def _blocks(data: dict, out_dir: Path) -> list[Block]:
    runs, split = data["runs"], data["split"]
    blocks = [
        Block("h1", f"bemerc comparison ({split})"),
        *([Block("p", DEMO_NOTE)] if data.get("demo") else []),
        Block("p", f"Store `{data['store']}`; {len(runs)} run(s) scored on their labelled {split} utterances. "
                   "Intervals are 95% bootstrap intervals over dialogues (1,000 resamples)."),
        Block("h2", "Runs"),
        Block("table", headers=RUN_TABLE_HEADERS, rows=tuple(run_table_rows(runs))),
    ]
    groups = [r for r in runs if r["kind"] == GROUP]
    if groups:
        blocks += [
            Block("h2", "Seed groups"),
            Block("p", "A group's row shows the mean ± sample standard deviation (n - 1) over its finished seeds, each "
                       "seed scored from its own predictions. Its per-class F1, confusion matrix and paired test use the "
                       "seeds' mean probabilities (the group's own predictions), scored here as `seed mean`."),
        ]
        for g in groups:
            failed = "; ".join(f"seed {s}: {reason}" for s, reason in g["failed"].items())
            blocks += [
                Block("p", f"{g['run_id']}: {g['seeds']} {g['member_kind'] or ''} seed(s) finished"
                           + (f"; failed: {failed}" if failed else "") + "."),
                Block("table", headers=("seed", "run", "weighted F1", "accuracy", "macro F1"), rows=tuple(
                    [(s, v["run_id"], *(f"{v[k]:.4f}" for k in GROUP_METRICS)) for s, v in g["per_seed"].items()]
                    + [("seed mean", "(mean probabilities)", *(f"{g['seed_mean'][k]:.4f}" for k in GROUP_METRICS))])),
            ]
    if data["skipped"]:
        blocks.append(Block("p", "Not scored: " + "; ".join(f"{s['run_id']} ({s['reason']})" for s in data["skipped"]) + "."))
    test = data["paired_test"]
    blocks.append(Block("h2", "Paired test of the best two runs"))
    if test:
        blocks.append(Block("p", (
            f"{test['run_a']} ({test['a']:.4f}) vs {test['run_b']} ({test['b']:.4f}): weighted F1 difference "
            f"{test['difference']:+.4f} on {test['n']} shared utterances, p = {test['p_value']:.4f} "
            f"(two-sided paired {test['method']} test, {test['n_resamples']} resamples)."
            + (f" {' and '.join(test['groups'])}: tested on the argmax of the seeds' mean probabilities, so every seed "
               "counts." if test.get("groups") else ""))))
    else:
        blocks.append(Block("p", "Needs two runs with predictions on the same utterances."))
    if runs:
        classes = list(dict.fromkeys(c for r in runs for c in r["classes"]))
        blocks += [
            Block("h2", "F1 per class"),
            Block("image", "F1 per class", path=plot_per_class(runs, out_dir / "per_class_f1.png")),
            Block("table", headers=("run", *classes), rows=tuple(
                (r["run_id"], *(f"{r['per_class'][c]:.3f}" if c in r["per_class"] else "-" for c in classes)) for r in runs)),
            Block("h2", "Confusion matrices"),
            Block("p", "Rows are gold classes normalised to sum to 1; each cell also shows its count."),
        ]
        for r in runs:
            blocks.append(Block("image", f"confusion matrix of {r['run_id']}",
                                path=plot_confusion(r, out_dir / f"confusion_{_safe(r['run_id'])}.png")))
    for run_id, entry in data["ablation"].items():
        ablation, models = entry["ablation"], entry["models"]
        blocks += [
            Block("h2", f"Modality ablation of {run_id}"),
            Block("p", "Late fusion over the members of each modality combination, weights fit on dev."),
        ]
        if len(ablation) > 1:
            blocks.append(Block("image", f"ablation of {run_id}", path=plot_ablation(run_id, ablation, out_dir / f"ablation_{_safe(run_id)}.png")))
        blocks += [
            Block("table", headers=("modalities", "dev weighted F1", "test weighted F1", "fusion weights"), rows=tuple(
                (name, _score(v, "dev"), _score(v, "test"),
                 ", ".join(f"{k} {w:.2f}" for k, w in v.get("weights", {}).items() if w > 0) or "-")
                for name, v in ablation.items())),
            Block("p", "Each model of the run alone (a modality model scores the utterances that have its modality):"),
            Block("table", headers=("model", "dev weighted F1", "test weighted F1", "fusion weight"), rows=tuple(
                (name, _score(v, "dev"), _score(v, "test"), f"{entry['fusion_weights'][name]:.2f}" if name in entry["fusion_weights"] else "-")
                for name, v in models.items())),
        ]
    for run_id, entry in data.get("fusion", {}).items():
        honest = entry["cross_fit_dev_weighted_f1"]
        blocks += [
            Block("h2", f"Fusion {run_id}"),
            Block("p", "Late fusion of the runs' stored probabilities, weights fit on dev; the dev score of the fused "
                       "run is therefore optimistic. Cross-fitted dev weighted F1 (weights fit on one half of the dev "
                       f"dialogues, scored on the other): {f'{honest:.4f}' if honest is not None else 'not available'}."),
            Block("table", headers=("member run", "dev weighted F1", "test weighted F1", "fusion weight"), rows=tuple(
                (member, _score(entry["models"].get(member, {}), "dev"), _score(entry["models"].get(member, {}), "test"), f"{w:.2f}")
                for member, w in entry["weights"].items())),
        ]
    return blocks


RUN_TABLE_HEADERS = ("run", "kind", "feature sets", "n", "seeds", "weighted F1", "accuracy", "macro F1")


def run_table_rows(runs: list[dict], per_seed: bool = False) -> list[tuple[str, ...]]:
    """Rows of the runs table (the report's and `bemerc compare`'s): a run's scores with the 95%
    interval of weighted F1; a group's mean ± std over its seeds (and, with ``per_seed``, a row
    per seed after it)."""
    rows = []
    for r in runs:
        base = (r["run_id"], r["kind"], ", ".join(r["feature_sets"]) or "-", str(r["n"]))
        if r["kind"] == GROUP and "std" in r:
            rows.append((*base, str(r["seeds"]) + (f" ({len(r['failed'])} failed)" if r["failed"] else ""),
                         *(f"{r[k]:.4f} ± {r['std'][k]:.4f}" for k in GROUP_METRICS)))
            if per_seed:
                rows += [(f"  {v['run_id']}", f"seed {s}", "", "", "", *(f"{v[k]:.4f}" for k in GROUP_METRICS)) for s, v in r["per_seed"].items()]
        else:
            ci = r["ci"]["weighted_f1"]
            rows.append((*base, "-", f"{r['weighted_f1']:.4f} [{ci['low']:.4f}, {ci['high']:.4f}]", f"{r['accuracy']:.4f}", f"{r['macro_f1']:.4f}"))
    return rows


def _score(entry: dict, split: str) -> str:
    return f"{entry[split]['weighted_f1']:.4f}" if split in entry else "-"


def render_markdown(blocks: list[Block], out_dir: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if b.kind == "h1":
            lines += [f"# {b.text}", ""]
        elif b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "table":
            cell = lambda s: s.replace("|", "\\|")  # noqa: E731
            lines.append("| " + " | ".join(map(cell, b.headers)) + " |")
            lines.append("|" + "---|" * len(b.headers))
            lines += ["| " + " | ".join(map(cell, row)) + " |" for row in b.rows]
            lines.append("")
        elif b.kind == "image":
            lines += [f"![{b.text}]({b.path.relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines)


def render_html(blocks: list[Block]) -> str:
    """One page with the PNGs embedded as base64, so it can be mailed or archived alone."""
    body: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2"):
            body.append(f"<{b.kind}>{html.escape(b.text)}</{b.kind}>")
        elif b.kind == "p":
            text = html.escape(b.text)
            body.append("<p>" + re.sub(r"`([^`]*)`", r"<code>\1</code>", text) + "</p>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.headers)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b.kind == "image":
            data = base64.b64encode(b.path.read_bytes()).decode()
            body.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}"></figure>')
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0;font-size:14px}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}th{background:#f3f3f3}"
        "img{max-width:100%}figure{margin:1em 0}code{background:#f3f3f3;padding:0 3px}"
    )
    title = html.escape(blocks[0].text if blocks else "bemerc comparison")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


REPORT_FILES = ("report.md", "report.html", "*.png")  # what write_report writes: an earlier report may be replaced


def write_report(data: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and the PNG plots into ``out_dir``.

    Returns ``{"markdown": path, "html": path}``. ``out_dir`` must be new, empty or hold only an
    earlier report (:data:`REPORT_FILES`, which this one replaces): a file or a folder of other files
    is refused (:class:`~bemerc.store.runs.RunDirError`), never written into. The report is written
    beside it first and moved in whole (:func:`~bemerc.store.runs.write_run_files`).
    """
    out_dir = Path(out_dir)
    check_run_dir(out_dir, allow=REPORT_FILES, option="--out")

    def write(folder: Path) -> None:  # whole or not at all: a full disk leaves the earlier report (or nothing)
        blocks = _blocks(data, folder)
        (folder / "report.md").write_text(render_markdown(blocks, folder), encoding="utf-8")
        (folder / "report.html").write_text(render_html(blocks), encoding="utf-8")

    write_run_files(out_dir, write, replace=REPORT_FILES)
    return {"markdown": out_dir / "report.md", "html": out_dir / "report.html"}
