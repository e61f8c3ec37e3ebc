"""Runs at their edges: a train split of one label (baseline and tune agree), `tune --resume` of a
moved run folder, and training in micro-batches under a token budget (the same step, bounded memory).

Real MELD dialogues with cheap real n-gram features (conftest.ngram_store) and the tiny random Llama."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.store.runs import list_runs
from bemerc.train.tune.data import micro_batches
from bemerc.train.tune.loop import TuneConfig, tune
from conftest import ngram_store

runner = CliRunner()


@pytest.fixture(scope="module")
def store(tmp_path_factory, meld_dir) -> Store:
    return ngram_store(tmp_path_factory.mktemp("edge"), meld_dir, n_dialogues=12)


@pytest.fixture(scope="module")
def one_label(tmp_path_factory, meld_dir) -> Store:
    """The n-gram store with every train utterance relabelled 'neutral' (dev and test keep theirs)."""
    s = ngram_store(tmp_path_factory.mktemp("one-label"), meld_dir, n_dialogues=12)
    train = s.read_arrow("utterances", where="split = 'train'")
    s.upsert("utterances", train.set_column(train.schema.get_field_index("label"), "label",
                                            [["neutral"] * train.num_rows]))
    assert set(s.read("utterances", ["label"], where="split = 'train'")["label"]) == {"neutral"}
    assert len(set(s.read("utterances", ["label"], where="split = 'dev'")["label"])) > 1
    return s


def _config(tiny_llm: Path, run_dir: Path, **overrides) -> TuneConfig:
    settings = dict(model=str(tiny_llm), stage="merc", run_dir=str(run_dir), layout="utterance", context=2, epochs=1,
                    batch_size=4, lr=1e-2, checkpoint_every=100, progress=False, modalities=["text"], train_limit=24, eval_limit=12)
    return TuneConfig(**{**settings, **overrides})


def _log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_a_single_train_label_gives_a_model_of_that_label_in_baseline_and_tune(one_label, tiny_llm, tmp_path):
    out = runner.invoke(app, ["baseline", "--store", str(one_label.path), "--feature-set", "text", "--run-dir", str(tmp_path / "b")])
    assert out.exit_code == 0, out.output
    assert "every labelled train utterance of 'meld' is 'neutral'" in out.output and "Traceback" not in out.output
    run = next(r for r in list_runs(one_label) if r["kind"] == "baseline")
    predicted = one_label.read("predictions", ["label"], where=f"run_id = '{run['run_id']}'")["label"]
    assert predicted.len() > 0 and set(predicted) == {"neutral"}
    result = tune(one_label, _config(tiny_llm, tmp_path / "t"))
    assert any("every train utterance is 'neutral'" in n for n in result["notes"])
    assert result["metrics"]["dev"]["n"] > 0


def test_resume_goes_on_in_the_folder_given_after_a_move(store, tiny_llm, tmp_path):
    old, new = tmp_path / "old", tmp_path / "moved"
    stopped = tune(store, _config(tiny_llm, old, stop_after=2))
    assert stopped["stopped"] and (old / "checkpoint.pt").exists()
    first_steps = _log(old)
    shutil.move(old, new)
    result = tune(store, TuneConfig(model="", run_dir=str(new), progress=False), resume=True)
    assert result["run_id"] == stopped["run_id"] and result["run_dir"] == str(new)
    assert not old.exists()  # not re-created
    assert (new / "metrics.json").exists() and (new / "adapter").is_dir()
    assert len(_log(new)) > 2 and _log(new)[:2] == first_steps
    assert torch.load(new / "checkpoint.pt", weights_only=False)["config"]["run_dir"] == str(new)
    run = next(r for r in list_runs(store) if r["run_id"] == result["run_id"])
    assert run["run_dir"] == str(new.resolve())


def test_micro_batches_stay_within_the_token_budget():
    lengths = [700, 300, 1200, 50, 640, 90]
    chunks = micro_batches(lengths, list(range(6)), budget=1300)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    assert all(len(c) * max(lengths[i] for i in c) <= 1300 or len(c) == 1 for c in chunks)
    assert micro_batches(lengths, [3, 5], budget=10) == [[5], [3]]  # each longer than the budget: alone


def test_training_in_micro_batches_takes_the_same_steps(store, tiny_llm, tmp_path):
    # no dropout: its masks are drawn per forward pass, so micro-batches would draw other ones; fp32: bf16
    # rounds each pass's sums at 8 bits, which would hide a wrong step under its rounding
    whole = tune(store, _config(tiny_llm, tmp_path / "whole", micro_batch_tokens=10**6, lora_dropout=0.0, precision="fp32"))
    split = tune(store, _config(tiny_llm, tmp_path / "split", micro_batch_tokens=1, lora_dropout=0.0, precision="fp32"))  # every item alone
    a, b = _log(tmp_path / "whole"), _log(tmp_path / "split")
    assert len(a) == len(b) > 2 and [h["tokens"] for h in a] == [h["tokens"] for h in b]
    assert [h["loss"] for h in a] == pytest.approx([h["loss"] for h in b], rel=1e-4)
    wa, wb = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=False)["adapter"] for r in ("whole", "split"))
    assert wa.keys() == wb.keys()
    worst = max(float((wa[k] - wb[k]).abs().max() / (wa[k].abs().max() + 1e-8)) for k in wa)
    assert worst < 1e-2, worst  # float rounding of sums in another order (Adam magnifies it), not another step
    assert np.allclose(whole["probabilities"], split["probabilities"], atol=1e-4)


def test_micro_batches_under_two_processes_take_the_steps_of_one(store, tiny_llm, tmp_path):
    """DDP on CPU (gloo): 2 processes, each cutting its half of the batch into micro-batches of one
    item (gradients synchronised on the last only), take the steps of 1 process with whole batches."""
    import os
    import subprocess
    import sys

    script = tmp_path / "steps.py"
    script.write_text(
        "import sys\n"
        "from bemerc.store import Store\n"
        "from bemerc.train.tune.loop import TuneConfig, tune\n"
        f"tune(Store({str(store.path)!r}), TuneConfig(model={str(tiny_llm)!r}, stage='merc', run_dir=sys.argv[2], modalities=['text'], layout='utterance', context=2, "
        "train_limit=24, eval_limit=6, batch_size=int(sys.argv[1]), micro_batch_tokens=int(sys.argv[3]), lr=1e-2, lora_dropout=0.0, "
        "threads=1, precision='fp32', progress=False))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, str(script), "4", str(tmp_path / "one"), "1000000"], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          str(script), "2", str(tmp_path / "two"), "1"], env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = ([h["loss"] for h in _log(tmp_path / r)] for r in ("one", "two"))
    assert len(a) == len(b) >= 2 and np.allclose(a, b, rtol=1e-4), (a, b)
