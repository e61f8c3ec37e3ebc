"""LLM instruction tuning end to end on a tiny random-weight Llama with SmolLM2's real tokenizer, a
store holding a few real MELD dialogues, and behaviour/audio feature sets computed from them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from typer.testing import CliRunner

from bemerc.store import Store
from bemerc.store.ingest import read_meld, write_utterances
from bemerc.store.runs import list_runs
from bemerc.train.tune.data import dialogue_windows, load_data, make_prompter, merc_examples, stage_examples
from bemerc.train.tune.infer import TunedModel
from bemerc.train.tune.config import parse_names
from bemerc.train.tune.loop import TuneConfig, TuneError, lr_factor, tune
from bemerc.precision import cpu_has_bf16, resolve as resolve_precision
from bemerc.train.tune.data import collate, collate_windows
from bemerc.train.tune.infer import load_tuned
from bemerc.train.tune.model import LoraSettings, base_dtype, build_model, load_llm
from bemerc.train.tune.prompt import DialogueTurn, Prompter, Turn, load_template
from bemerc.train.tune.score import answer_scores, label_probabilities, label_scores

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
K, D = 4, 6  # behaviour tokens of the test feature set


def _text_measures(text: str) -> np.ndarray:
    """(K, D) measures of the K quarters of a text: a stand-in for behaviour over time."""
    words = text.split() or [""]
    quarters = np.array_split(np.array(words, dtype=object), K)
    rows = []
    for q in quarters:
        part = " ".join(q)
        letters = [c for c in part if c.isalpha()] or ["a"]
        rows.append([len(part), len(q), part.count("!"), part.count("?"), sum(c.isupper() for c in letters) / len(letters),
                     sum(c in "aeiou" for c in letters) / len(letters)])
    return np.asarray(rows, dtype=np.float32)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Train dialogues 0-5 and dev dialogues 0, 2, 3 of MELD, with behaviour features (vector, tokens,
    description) for two thirds of the utterances and audio vectors for half of them."""
    rows = [r for r in read_meld(DATA / "meld").rows
            if (r["split"] == "train" and int(r["dialogue_id"]) < 6) or (r["split"] == "dev" and r["dialogue_id"] in ("0", "2", "3"))]
    s = Store(tmp_path_factory.mktemp("store"))
    write_utterances(s, rows)
    behavior = s.register_feature_set("behavior", "text-stand-in", "t0001", {"tokens_k": K, "tokens_d": D}, [
        pa.field("vector", pa.list_(pa.float32(), 2 * D)), pa.field("tokens", pa.list_(pa.float32(), K * D)),
        pa.field("description", pa.string())])
    audio = s.register_feature_set("audio", "text-stand-in", "a0001", {}, [pa.field("vector", pa.list_(pa.float32(), 8))])
    with_behavior = [r for i, r in enumerate(rows) if i % 3]
    measures = [_text_measures(r["text"]) for r in with_behavior]
    s.write_features(behavior, pa.table({
        "uid": [r["uid"] for r in with_behavior],
        "vector": [np.concatenate([m.mean(0), m.std(0)]).tolist() for m in measures],
        "tokens": [m.reshape(-1).tolist() for m in measures],
        "description": [f"{r['speaker']} says {len(r['text'].split())} words" + (" loudly" if "!" in r["text"] else " calmly")
                        for r in with_behavior]}, schema=s.table(behavior.table_name).schema))
    with_audio = rows[::2]
    # a labelled test split: dev dialogue 3 again under split "test" (the real MELD test split is not here)
    write_utterances(s, [{**r, "split": "test", "uid": r["uid"].replace("dev/", "test/", 1)}
                         for r in rows if r["split"] == "dev" and r["dialogue_id"] == "3"])
    s.write_features(audio, pa.table({"uid": [r["uid"] for r in with_audio],
                                      "vector": [np.resize(_text_measures(r["text"]).reshape(-1), 8).tolist() for r in with_audio]},
                                     schema=s.table(audio.table_name).schema))
    return s


def _config(tiny_llm: Path, run_dir: Path, **overrides) -> TuneConfig:
    settings = dict(model=str(tiny_llm), stage="all", run_dir=str(run_dir), layout="utterance", context=2, epochs=2, align_epochs=1,
                    batch_size=4, lr=1e-2, align_lr=1e-2, balance=0.5, checkpoint_every=100, progress=False)
    return TuneConfig(**{**settings, **overrides})


def test_prompt_holds_context_description_soft_tokens_and_labels(tiny_llm):
    _, tokenizer = load_llm(tiny_llm)
    prompter = Prompter(tokenizer, ["neutral", "joy"], context=2, soft_tokens={"audio": 1, "behavior": K})
    context = [Turn("Monica", "There's nothing to tell!"), Turn("Joey", "C'mon, you're going out with the guy!"),
               Turn("Chandler", "All right Joey, be nice.")]
    ex = prompter.merc(context, Turn("Phoebe", "Wait, does he eat chalk?"), "Phoebe says 5 words calmly", label="joy")
    text = prompter.show(ex)
    assert "Monica" not in text and "Joey: C'mon" in text and "Chandler: All right" in text  # the last 2 turns
    assert "Phoebe's behaviour: Phoebe says 5 words calmly" in text
    assert "<behavior x4>" in text and "<audio x1>" in text and "neutral, joy" in text
    assert [len(v) for v in ex.soft_positions.values()] == [1, K]
    assert all(ex.prompt_ids[p] == prompter.placeholder_id for v in ex.soft_positions.values() for p in v)
    assert tokenizer.decode(ex.answer_ids) == "joy<|im_end|>"
    # A short budget drops context turns, oldest first
    short = Prompter(tokenizer, ["neutral", "joy"], context=2, soft_tokens={"audio": 1, "behavior": K},
                     max_len=len(ex.prompt_ids) - 5)
    text = short.show(short.merc(context, Turn("Phoebe", "Wait, does he eat chalk?"), "Phoebe says 5 words calmly"))
    assert "Joey: C'mon" not in text and "Chandler: All right" in text


def test_label_scores_equal_full_sequence_likelihoods_and_give_a_distribution(tiny_llm, store):
    config = _config(tiny_llm, Path("unused"))
    data = load_data(store, config)
    llm, tokenizer = load_llm(tiny_llm)
    torch.manual_seed(1)
    model = build_model(llm, data.soft, LoraSettings(r=4)).eval()
    for name, p in model.named_parameters():  # make LoRA change the outputs (B starts at zero)
        if "lora_B" in name:
            p.data.normal_(std=0.5)
    prompter = Prompter(tokenizer, data.classes, 2, {s.modality: s.n_tokens for s in data.soft})
    rows = data.eval_rows["dev"][:5]
    examples = merc_examples(prompter, data.inputs, rows)
    batch = collate(examples, rows.tolist(), data.features, tokenizer.pad_token_id, with_answer=False)
    scores = label_scores(model, batch, prompter.label_ids())

    assert len({len(e.prompt_ids) for e in examples}) > 1  # padding is exercised
    for i, example in enumerate(examples):
        for c, answer in enumerate(prompter.label_ids()):
            full = example.__class__(example.prompt_ids, example.soft_positions, answer)
            one = collate([full], [int(rows[i])], data.features, tokenizer.pad_token_id)
            n = len(example.prompt_ids)
            with torch.no_grad():  # position n - 1 + j predicts answer token j
                logp = model.lm_head(model.hidden(one)[0, n - 1: n - 1 + len(answer)]).log_softmax(-1)
            expected = sum(float(logp[j, t]) for j, t in enumerate(answer))
            assert scores[i, c].item() == pytest.approx(expected, abs=1e-4)

    probabilities = label_probabilities(scores)
    assert probabilities.shape == (5, len(data.classes))
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5) and (probabilities > 0).all()


def test_all_stages_train_evaluate_and_record_the_run(tiny_llm, store, tmp_path):
    result = tune(store, _config(tiny_llm, tmp_path / "run"))
    run_dir = tmp_path / "run"
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in log] == sorted((h["stage"] for h in log), key=["align", "project", "merc"].index)
    assert {h["stage"] for h in log} == {"align", "project", "merc"}  # in that order
    merc = [h for h in log if h["stage"] == "merc"]
    first, last = (np.mean([h["loss"] for h in merc if h["epoch"] == e]) for e in (0, 1))
    assert last < first  # the answer is learned
    config = _config(tiny_llm, run_dir)
    for stage, base_lr in (("align", config.align_lr), ("project", config.lr), ("merc", config.lr)):  # each stage's own schedule
        steps = [h for h in log if h["stage"] == stage]
        assert [h["lr"] for h in steps] == pytest.approx([base_lr * lr_factor(k + 1, len(steps), config.warmup) for k in range(len(steps))])

    data = load_data(store, _config(tiny_llm, run_dir))
    rows = data.eval_rows["dev"]
    assert result["eval_utterances"] == len(rows) == 11
    assert json.loads((run_dir / "metrics.json").read_text())["dev"]["n"] == len(rows)
    run = next(r for r in list_runs(store) if r["run_id"] == result["run_id"])
    assert run["kind"] == "tune" and sorted(run["feature_sets"]) == sorted(s.feature_set for s in data.soft)
    predictions = store.read("predictions", where=f"run_id = '{result['run_id']}'")
    assert predictions.height == len(rows) + len(data.eval_rows["test"])  # dev and the labelled test split
    assert set(predictions["label"]) <= set(data.classes)
    assert np.allclose([sum(p) for p in predictions["probabilities"].to_list()], 1, atol=1e-5)

    # The saved adapter reproduces the run's probabilities, and loads with peft alone
    from peft import PeftModel

    tuned = TunedModel.load(run_dir / "adapter")
    assert tuned.info.classes == data.classes and tuned.info.layout == "utterance"
    assert tuned.prompter.merc_template.source == load_template("merc").source
    again = tuned.predict_proba(data.corpus, rows)
    assert np.allclose(again, result["probabilities_by_split"]["dev"], atol=1e-4)
    base, _ = load_llm(tiny_llm)
    peft_model = PeftModel.from_pretrained(base, str(run_dir / "adapter"))
    lora = {k: v for k, v in peft_model.state_dict().items() if "lora_B" in k}
    assert lora and any(v.abs().sum() > 0 for v in lora.values())


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 matrix units")
def test_bf16_holds_the_frozen_llm_in_bf16_and_trains_fp32_adapters(tiny_llm, store, tmp_path):
    """--precision bf16 (auto on this CPU): the run records it (summary, run config, tune.json); LoRA
    and projector weights are trained and saved in fp32; the saved adapter loads its base in bf16 and
    reproduces the run's probabilities; fp32 and bf16 runs learn the same task to within rounding."""
    runs = {p: tune(store, _config(tiny_llm, tmp_path / p, stage="merc", precision=p)) for p in ("fp32", "bf16")}
    assert {p: r["precision"] for p, r in runs.items()} == {"fp32": "fp32", "bf16": "bf16"}
    info = json.loads((tmp_path / "bf16" / "adapter" / "tune.json").read_text())
    assert info["precision"] == "bf16"
    adapter = torch.load(tmp_path / "bf16" / "checkpoint.pt", weights_only=False)["adapter"]
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())
    tuned = TunedModel.load(tmp_path / "bf16" / "adapter")
    assert tuned.model.causal_lm.get_input_embeddings().weight.dtype == torch.bfloat16
    data = load_data(store, _config(tiny_llm, tmp_path / "bf16"))
    again = tuned.predict_proba(data.corpus, data.eval_rows["dev"])
    assert np.allclose(again, runs["bf16"]["probabilities_by_split"]["dev"], atol=1e-4)
    fp32, bf16 = (r["probabilities_by_split"]["dev"] for r in runs.values())
    assert not np.array_equal(fp32, bf16) and np.abs(fp32 - bf16).max() < 0.1
    assert (fp32.argmax(1) == bf16.argmax(1)).mean() >= 0.8


def test_bf16_lora_reads_its_inputs_uncast_for_the_same_loss_and_gradients(tiny_llm, store):
    """On a bf16 base (always under bf16 autocast) peft's cast of each LoRA input to fp32 is switched off:
    autocast casts it back to bf16 for LoRA's matmul anyway, so the loss and every gradient are the
    same, bit for bit, without the two copies of the activations per module (docs/tune.md, Precision)."""
    _, data, model, prompter = _dialogue_model(tiny_llm, store, dtype=torch.bfloat16)  # eval mode: no dropout
    layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert layers and not any(m.cast_input_dtype_enabled for m in layers)
    batch = stage_examples("merc", prompter, data).batches([0, 1], 4096, "cpu")[0]  # two training windows
    trained = model.trainable("merc")

    def loss_and_gradients():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model.loss(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in trained]

    uncast = loss_and_gradients()
    for m in layers:
        m.cast_input_dtype_enabled = True  # peft's default
    cast = loss_and_gradients()
    assert torch.isfinite(uncast[0]) and uncast[0].equal(cast[0])
    assert all(a.equal(b) for a, b in zip(uncast[1], cast[1])) and any(g.abs().sum() > 0 for g in uncast[1])
    fp32 = [m for m in _dialogue_model(tiny_llm, store)[2].modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert fp32 and all(m.cast_input_dtype_enabled for m in fp32)  # an fp32 base keeps peft's default


def _untrained(tiny_llm: Path, store: Store, config: TuneConfig):
    """(data, tokenizer, adapter state before training) as ``tune`` builds them for ``config``."""
    data = load_data(store, config)
    llm, tokenizer = load_llm(tiny_llm, base_dtype(resolve_precision(config.precision), cuda=False))  # LoRA starts from the same draw
    torch.manual_seed(config.seed)
    initial = build_model(llm, data.soft, LoraSettings(config.lora_r, config.lora_alpha, config.lora_dropout))
    initial.fit_input_scaling(data.features, data.train_rows)  # as tune does: the projectors' input statistics
    return data, tokenizer, initial.adapter_state()


def test_align_stage_trains_only_the_behaviour_projector(tiny_llm, store, tmp_path):
    config = _config(tiny_llm, tmp_path / "align", stage="align", align_epochs=2)
    tune(store, config)
    data, _, initial = _untrained(tiny_llm, store, config)
    trained, _, _ = load_tuned(tmp_path / "align" / "adapter")
    after = trained.adapter_state()
    changed = {k for k in initial if not torch.equal(initial[k], after[k])}
    assert changed and all(k.startswith("projectors.behavior.") for k in changed)
    assert not (tmp_path / "align" / "metrics.json").exists()  # no emotion evaluation after stage 1 alone


def test_project_stage_trains_every_projector_on_the_soft_tokens_alone(tiny_llm, store, tmp_path):
    """Stage ``project``: the projectors (audio and behaviour) learn with the LLM frozen, from windows
    that hold every train turn's speaker and soft tokens but none of its words or description."""
    config = _config(tiny_llm, tmp_path / "project", stage="project", layout="dialogue", project_epochs=2)
    tune(store, config)
    data, tokenizer, initial = _untrained(tiny_llm, store, config)
    trained, prompter, _ = load_tuned(tmp_path / "project" / "adapter")
    after = trained.adapter_state()
    changed = {k for k in initial if not torch.equal(initial[k], after[k])}
    assert {k.split(".")[1] for k in changed} == {"audio", "behavior"} and all(k.startswith("projectors.") for k in changed)
    log = [json.loads(line) for line in (tmp_path / "project" / "log.jsonl").read_text().splitlines()]
    assert {h["stage"] for h in log} == {"project"} and {h["epoch"] for h in log} == {0, 1}
    assert not (tmp_path / "project" / "metrics.json").exists()  # no emotion evaluation without the merc stage


    prompter = make_prompter(tokenizer, data)
    shown = [tokenizer.decode(item.input_ids[0]) for item in
             (stage_examples("project", prompter, data).batch([i]) for i in range(3))]
    words = [data.inputs.texts[r] for r in data.train_rows if len(data.inputs.texts[r]) > 12]
    assert not any(w in text for w in words for text in shown)
    assert not any("behaviour:" in text for text in shown) and all(" ->" in text for text in shown)
    merc = stage_examples("merc", prompter, data)
    assert any(w in tokenizer.decode(merc.batch([0]).input_ids[0]) for w in words)  # the merc stage reads them


def test_project_stage_leaves_the_text_embedding_to_the_merc_stage(tiny_llm, store, tmp_path):
    """The text soft token embeds the words the LLM reads: the project stage trains the voice's
    projector alone and shows no text tokens; with text the only soft modality it is skipped."""
    import shutil

    copy = Store(shutil.copytree(store.path, tmp_path / "store"))
    text = copy.register_feature_set("text", "text-stand-in", "x0001", {}, [pa.field("vector", pa.list_(pa.float32(), 6))])
    utterances = copy.read("utterances")
    copy.write_features(text, pa.table({"uid": utterances["uid"].to_list(),
                                        "vector": [_text_measures(t).mean(0).tolist() for t in utterances["text"].to_list()]},
                                       schema=copy.table(text.table_name).schema))
    config = _config(tiny_llm, tmp_path / "project", stage="project", layout="dialogue", modalities=["text", "audio"])
    tune(copy, config)
    data, tokenizer, initial = _untrained(tiny_llm, copy, config)
    after = load_tuned(tmp_path / "project" / "adapter")[0].adapter_state()
    assert {k.split(".")[1] for k in initial if not torch.equal(initial[k], after[k])} == {"audio"}


    prompter = make_prompter(tokenizer, data)
    assert set(prompter.soft_tokens) == {"text", "audio"}
    project = stage_examples("project", prompter, data)
    assert all(set(project.batch([i]).soft) == {"audio"} for i in range(len(project.lengths)))
    assert {"text", "audio"} <= set(stage_examples("merc", prompter, data).batch([0]).soft)

    with pytest.raises(TuneError, match="project stage: its only soft modality, text, embeds the words"):
        tune(copy, _config(tiny_llm, tmp_path / "t", stage="project", layout="dialogue", modalities=["text"]))
    result = tune(copy, _config(tiny_llm, tmp_path / "all", layout="dialogue", modalities=["text"], epochs=1))
    log = [json.loads(line) for line in (tmp_path / "all" / "log.jsonl").read_text().splitlines()]
    assert {h["stage"] for h in log} == {"merc"} and any("project stage skipped" in n for n in result["notes"])


def test_resume_gives_the_same_weights_and_losses(tiny_llm, store, tmp_path):
    whole = tune(store, _config(tiny_llm, tmp_path / "whole"))
    stopped = tune(store, _config(tiny_llm, tmp_path / "parts", stop_after=4))
    assert stopped["stopped"] and stopped["steps"] == 4
    resumed = tune(store, TuneConfig(model="", run_dir=str(tmp_path / "parts"), progress=False), resume=True)

    def log(run):
        return [(h["stage"], h["epoch"], h["batch"], h["loss"]) for h in map(json.loads, (tmp_path / run / "log.jsonl").read_text().splitlines())]

    assert len(log("whole")) > 4 and log("parts") == log("whole")
    a, b = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)["adapter"] for run in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert np.array_equal(whole["probabilities"], resumed["probabilities"])


def test_resume_starts_a_stage_at_its_first_batch_when_the_checkpoint_stopped_in_another(tiny_llm, store, tmp_path):
    """A checkpoint stopped inside a stage that is no longer run (older code ran a project stage on
    the text token alone) resumes the next stage from its first batch, not from that position."""
    tune(store, _config(tiny_llm, tmp_path / "run", stage="merc", epochs=1, stop_after=1))
    path = tmp_path / "run" / "checkpoint.pt"
    state = torch.load(path, weights_only=False)
    state["progress"].update(stage="project", epoch=0, batch=3, history=[])
    torch.save(state, path)
    tune(store, TuneConfig(model="", run_dir=str(tmp_path / "run"), progress=False), resume=True)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    batches = [h["batch"] for h in log if h["stage"] == "merc"]
    assert batches == list(range(len(batches))) and len(batches) > 3


def test_bad_requests_fail_with_one_line(tiny_llm, store, tmp_path):
    with pytest.raises(TuneError, match="no feature set for modality visual"):
        tune(store, _config(tiny_llm, tmp_path / "x", modalities=["visual"]))
    with pytest.raises(TuneError, match="align stage.*no behaviour projector"):
        tune(store, _config(tiny_llm, tmp_path / "y", stage="align", modalities=["audio"]))
    with pytest.raises(TuneError, match="project stage: no soft modality"):
        tune(store, _config(tiny_llm, tmp_path / "w", stage="project", modalities=[]))
    with pytest.raises(TuneError, match="project_epochs must be 0 or more, found -1"):
        tune(store, _config(tiny_llm, tmp_path / "v", project_epochs=-1))
    with pytest.raises(TuneError, match="batch_size must be positive, found 0"):
        tune(store, _config(tiny_llm, tmp_path / "u", batch_size=0))
    with pytest.raises(TuneError, match="no checkpoint"):
        tune(store, _config(tiny_llm, tmp_path / "z"), resume=True)
    with pytest.raises(TuneError, match=r"--lora-modules: qkv is not a linear layer of this LLM's blocks \(they are: down_proj, "):
        tune(store, _config(tiny_llm, tmp_path / "t", stage="merc", lora_modules=["q_proj", "qkv"]))
    assert not (tmp_path / "t" / "adapter").exists()
    with pytest.raises(TuneError, match="--lora-modules names no layer"):  # `--lora-modules ,` is not "all"
        _config(tiny_llm, tmp_path / "s", lora_modules=parse_names(","))


def test_lora_on_named_modules_only_is_saved_and_reloaded_as_such(tiny_llm, store, tmp_path):
    """--lora-modules q_proj,v_proj: LoRA on those two layers of every block and nowhere else, in the
    run's checkpoint and in the saved adapter, which reloads to the run's probabilities."""
    result = tune(store, _config(tiny_llm, tmp_path / "qv", stage="merc", lora_modules=["q_proj", "v_proj"]))
    adapter = torch.load(tmp_path / "qv" / "checkpoint.pt", weights_only=False)["adapter"]
    lora = {k for k in adapter if "lora_A" in k}
    assert {k.split(".lora_A")[0].rsplit(".", 1)[-1] for k in lora} == {"q_proj", "v_proj"}
    assert len(lora) == 2 * 2  # two blocks in the tiny LLM
    assert sorted(json.loads((tmp_path / "qv" / "adapter" / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]
    tuned = TunedModel.load(tmp_path / "qv" / "adapter")
    data = load_data(store, _config(tiny_llm, tmp_path / "qv"))
    again = tuned.predict_proba(data.corpus, data.eval_rows["dev"])
    assert np.allclose(again, result["probabilities_by_split"]["dev"], atol=1e-4)


def test_cli_shows_the_prompt_and_runs_zero_shot(tiny_llm, store, tmp_path):
    from bemerc.cli import app

    runner = CliRunner()
    shown = runner.invoke(app, ["tune", "--store", str(store.path), "--model", str(tiny_llm), "--layout", "utterance",
                                "--show-prompt", "dev/dia0_utt1"])
    assert shown.exit_code == 0, shown.output
    assert "Phoebe: Oh my God" in shown.output and 'Now Monica says: "What?"' in shown.output
    assert f"<behavior x{K}>" in shown.output and "<audio x1>" in shown.output and "surprise<|im_end|>" in shown.output
    window = runner.invoke(app, ["tune", "--store", str(store.path), "--model", str(tiny_llm), "--show-prompt", "dev/dia0_utt1"])
    assert window.exit_code == 0, window.output  # dialogue layout: every turn answered, label by its first token
    assert window.output.count("<|im_start|>system") == 1 and window.output.count("[-> ") >= 2
    assert "[-> surprise (first token ' surprise')]" in window.output and "a label's probability is that of its first token" in window.output
    missing = runner.invoke(app, ["tune", "--store", str(store.path), "--model", str(tiny_llm), "--show-prompt", "dev/nope"])
    assert missing.exit_code == 1 and "no utterance 'dev/nope'" in missing.output
    zero = runner.invoke(app, ["tune", "--store", str(store.path), "--model", str(tiny_llm), "--zero-shot", "--eval-limit", "8",
                               "--run-dir", str(tmp_path / "zs"), "--json"])
    assert zero.exit_code == 0, zero.output
    result = json.loads(zero.output)
    assert result["metrics"]["dev"]["n"] == result["eval_utterances"] and not (tmp_path / "zs" / "adapter").exists()
    assert next(r for r in list_runs(store) if r["run_id"] == result["run_id"])["kind"] == "zero-shot"


def _dialogue_model(tiny_llm, store, dtype=torch.float32, **overrides):
    config = _config(tiny_llm, Path("unused"), layout="dialogue", **overrides)
    data = load_data(store, config)
    llm, tokenizer = load_llm(tiny_llm, dtype)
    torch.manual_seed(1)
    model = build_model(llm, data.soft, LoraSettings(r=4)).eval()
    for name, p in model.named_parameters():  # make LoRA and the projectors matter
        if "lora_B" in name:
            p.data.normal_(std=0.5)
    prompter = Prompter(tokenizer, data.classes, 2, {s.modality: s.n_tokens for s in data.soft}, "dialogue",
                        max_len=config.max_len)
    return config, data, model, prompter


def test_one_pass_over_a_dialogue_equals_scoring_each_answer_on_its_own_prefix(tiny_llm, store):
    config, data, model, prompter = _dialogue_model(tiny_llm, store)
    rows = data.eval_rows["dev"]
    windows = dialogue_windows(prompter, data.inputs, rows, overlap=2)
    first_ids = prompter.answer_first_ids()
    batch = collate_windows(windows, data.features, prompter.tokenizer.pad_token_id)
    scores, answered = answer_scores(model, batch, windows, first_ids)
    assert sorted(answered) == sorted(rows.tolist()) and len({len(w) for w in windows}) > 1  # padding exercised
    probabilities = label_probabilities(scores)
    assert np.allclose(probabilities.sum(1), 1, atol=1e-5)
    by_row = dict(zip(answered, scores))
    for w in windows:
        for row, position in zip(w.rows, w.answer_positions):
            prefix = type(w)(w.ids[: position + 1], {m: [(r, p) for r, p in e if p[-1] <= position] for m, e in w.soft.items()},
                             [row], [position], [True])
            alone = collate_windows([prefix], data.features, prompter.tokenizer.pad_token_id)
            one, _ = answer_scores(model, alone, [prefix], first_ids)
            assert torch.allclose(one[0], by_row[row], atol=1e-4)


def test_the_shared_system_prompt_gives_the_same_loss_and_gradients(tiny_llm, store, monkeypatch):
    """Windows that begin alike (the system prompt) share one pass over that beginning, in training
    too: the loss and every gradient equal those of whole sequences."""
    import bemerc.train.tune.model as model_module

    config, data, model, prompter = _dialogue_model(tiny_llm, store)
    model.train()
    for module in model.modules():  # LoRA dropout off: train mode is then deterministic
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name or name.startswith("projectors."))
    windows = dialogue_windows(prompter, data.inputs, data.train_rows, overlap=2)[:3]
    answers = {int(r): prompter.answer_first_ids()[data.classes.index(data.labels[r])] for r in data.train_rows}
    batch = collate_windows(windows, data.features, prompter.tokenizer.pad_token_id, answers)
    assert model_module.shared_prefix(batch) > 40  # the system prompt and the chat template's opening

    def loss_and_gradients():
        model.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared_loss, shared = loss_and_gradients()
    monkeypatch.setattr(model_module, "MIN_SHARED_PREFIX", 10**9)
    assert model_module.shared_prefix(batch) == 0
    whole_loss, whole = loss_and_gradients()
    assert shared_loss == pytest.approx(whole_loss, abs=1e-5)
    assert shared.keys() == whole.keys() and any("projectors.audio" in n for n in shared)
    for name in whole:
        assert torch.allclose(shared[name], whole[name], atol=1e-5, rtol=1e-4), name


def test_long_dialogues_are_split_into_overlapping_windows_and_each_turn_is_scored_once(tiny_llm, store):
    config, data, model, prompter = _dialogue_model(tiny_llm, store, max_len=200)
    rows = data.train_rows
    windows = dialogue_windows(prompter, data.inputs, rows, overlap=2)
    assert max(len(w) for w in windows) <= 200 or all(sum(w.new) == 1 for w in windows if len(w) > 200)
    assert any(not all(w.new) for w in windows)  # some windows repeat earlier turns as context
    new = [r for w in windows for r, n in zip(w.rows, w.new) if n]
    assert sorted(new) == rows.tolist()  # every turn answered exactly once
    for w in windows:  # context turns come first, and are the previous window's last turns
        assert w.new == sorted(w.new) and w.rows == list(range(w.rows[0], w.rows[-1] + 1))
    tuned = TunedModel(model, prompter, TuneInfo_from(data, config))
    p = tuned.predict_proba(data.inputs, rows)
    assert p.shape == (len(rows), len(data.classes)) and np.allclose(p.sum(1), 1, atol=1e-5)


def TuneInfo_from(data, config):
    from bemerc.train.tune.infer import TuneInfo

    return TuneInfo(base_model=config.model, classes=data.classes, layout="dialogue", overlap=config.overlap,
                    max_len=config.max_len, soft=data.soft)


def test_dialogue_layout_trains_scores_dev_and_test_and_logs_progress_off_a_terminal(tiny_llm, store, tmp_path):
    from bemerc.cli import app

    run_dir = tmp_path / "dialogue"
    result = CliRunner().invoke(app, ["tune", "--store", str(store.path), "--model", str(tiny_llm), "--run-dir", str(run_dir),
                                      "--stage", "merc", "--epochs", "3", "--lr", "1e-2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "merc: " in result.output and "utt/s" in result.output and "ETA" in result.output  # plain progress lines
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    first, last = (np.mean([h["loss"] for h in log if h["epoch"] == e]) for e in (0, 2))
    assert last < first
    data = load_data(store, _config(tiny_llm, run_dir, layout="dialogue"))
    assert sum(h["utterances"] for h in log if h["epoch"] == 0) == len(data.train_rows)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics) == {"dev", "test"} and metrics["test"]["n"] == len(data.eval_rows["test"]) > 0
    run = next(r for r in list_runs(store) if r["run_dir"] == str(run_dir.resolve()))
    predictions = store.read("predictions", where=f"run_id = '{run['run_id']}'")
    assert sorted(set(predictions["split"])) == ["dev", "test"]
    # the saved adapter (tune.json says which layout) reproduces the stored dev probabilities
    tuned = TunedModel.load(run_dir / "adapter")
    assert tuned.info.layout == "dialogue" and [s.modality for s in tuned.info.soft] == ["audio", "behavior"]
    assert all(s.speaker_norm for s in tuned.info.soft)  # normalised per speaker (saved train mean and std) as in training
    dev = data.eval_rows["dev"]
    stored = dict(zip(predictions["uid"].to_list(), predictions["probabilities"].to_list()))
    again = tuned.predict_proba(data.corpus, dev)
    expected = np.array([stored[u] for u in data.corpus.utterances["uid"].gather(dev).to_list()])
    assert np.allclose(again, expected, atol=1e-4)


def test_the_speaker_normaliser_is_saved_beside_the_adapter_and_an_old_adapter_still_loads(tiny_llm, store, tmp_path):
    """The train mean and std each speaker is normalised to are ``speaker_norm.safetensors`` (no
    longer projector buffers); an adapter saved before that file, its statistics in
    ``projectors.safetensors``, loads to the same normaliser and the same probabilities."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from bemerc.train.tensors import SpeakerNorm
    from bemerc.train.tune.infer import load_speaker_norm

    run_dir = tmp_path / "run"
    tune(store, _config(tiny_llm, run_dir, stage="merc", epochs=1))
    adapter = run_dir / "adapter"
    data = load_data(store, _config(tiny_llm, run_dir, stage="merc"))
    saved = SpeakerNorm.load(adapter)
    assert sorted(saved.stats) == ["audio", "behavior"]
    for m, (mean, std) in data.norm.stats.items():
        assert np.array_equal(saved.stats[m][0], mean) and np.array_equal(saved.stats[m][1], std)
    projectors = load_file(str(adapter / "projectors.safetensors"))
    assert not [k for k in projectors if "speaker" in k]
    # the old layout: the statistics as projector buffers, no speaker_norm.safetensors
    old = tmp_path / "old"
    shutil.copytree(adapter, old)
    (old / SpeakerNorm.FILE).unlink()
    for m, (mean, std) in saved.stats.items():
        projectors[f"{m}.speaker_mean"], projectors[f"{m}.speaker_std"] = mean, std
    save_file(projectors, str(old / "projectors.safetensors"))
    assert {m: [a.tolist() for a in v] for m, v in load_speaker_norm(old).stats.items()} == \
        {m: [a.tolist() for a in v] for m, v in saved.stats.items()}
    rows = data.eval_rows["dev"]
    new_p = TunedModel.load(adapter).predict_proba(data.corpus, rows)
    old_p = TunedModel.load(old).predict_proba(data.corpus, rows)
    assert np.array_equal(new_p, old_p)


@pytest.fixture(scope="module")
def text_store(tmp_path_factory) -> Store:
    """Train dialogues 0-5 and dev dialogue 0 of MELD with a text feature set (a small stand-in embedding)."""
    rows = [r for r in read_meld(DATA / "meld").rows
            if (r["split"] == "train" and int(r["dialogue_id"]) < 6) or (r["split"] == "dev" and r["dialogue_id"] == "0")]
    s = Store(tmp_path_factory.mktemp("text-store"))
    write_utterances(s, rows)
    text = s.register_feature_set("text", "text-stand-in", "x0001", {}, [pa.field("vector", pa.list_(pa.float32(), K * D))])
    s.write_features(text, pa.table({"uid": [r["uid"] for r in rows],
                                     "vector": [_text_measures(r["text"]).reshape(-1).tolist() for r in rows]},
                                    schema=s.table(text.table_name).schema))
    return s


def test_retrieved_demonstrations_come_from_other_train_dialogues(tiny_llm, text_store):
    from bemerc.train.tune.data import DemoRetriever

    config = _config(tiny_llm, Path("unused"), layout="dialogue", demos=3)
    data = load_data(text_store, config)
    assert [s.modality for s in data.soft] == ["text"]  # text soft tokens by default when stored
    retriever = DemoRetriever(text_store, data.soft[0].feature_set, 3, data.dataset)
    demos = retriever.for_inputs(data.inputs)
    uids = data.corpus.utterances["uid"].to_list()
    by_text = {}
    for r, uid in enumerate(uids):
        by_text.setdefault((data.inputs.texts[r], data.labels[r]), set()).add(uid)
    for rows in data.inputs.dialogues(np.concatenate([data.train_rows[:1], data.eval_rows["dev"]])):
        shown = demos(rows)
        assert len(shown) == 3
        own = data.inputs.dialogue_keys[rows[0]]
        for demo in shown:  # a labelled train utterance of another dialogue
            assert any(u.startswith("train/") and not u.startswith(own.replace("train/", "train/dia") + "_") for u in by_text[demo])
    _, tokenizer = load_llm(tiny_llm)
    prompter = Prompter(tokenizer, data.classes, soft_tokens={"text": 1}, merc="dialogue")
    window = dialogue_windows(prompter, data.inputs, data.eval_rows["dev"], 2, demos)[0]
    text = prompter.show_window(window)
    assert "Labelled examples of similar utterances:" in text and '" <text x1> ->' in text


def test_the_gpu_profile_names_the_papers_llm_and_describer_over_the_hub_extractors():
    from bemerc.models.profiles import load_profile

    gpu, hub = load_profile("gpu"), load_profile("hub")
    assert gpu.stage("llm").source == "hub:Qwen/Qwen2.5-7B-Instruct"
    assert gpu.stage("describer").source == "hub:Qwen/Qwen2-VL-2B-Instruct"
    assert all(gpu.stage(s) == hub.stage(s) for s in ("text", "speech", "face", "pose", "expression", "visual"))


def test_two_processes_under_accelerate_launch_match_one_process(tiny_llm, store, tmp_path):
    """DDP on CPU (gloo): 2 processes with half the batch each take the same steps as 1 process with
    the whole batch: the losses agree, and the run is recorded once."""
    import subprocess
    import sys

    script = tmp_path / "tune_steps.py"
    script.write_text(
        "import sys\n"
        "from bemerc.store import Store\n"
        "from bemerc.train.tune.loop import TuneConfig, tune\n"
        f"tune(Store({str(store.path)!r}), TuneConfig(model={str(tiny_llm)!r}, stage='merc', run_dir=sys.argv[2], "
        "batch_size=int(sys.argv[1]), epochs=1, lr=1e-2, lora_dropout=0.0, threads=1, progress=False))\n")
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    one = subprocess.run([sys.executable, str(script), "4", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    accelerate = Path(sys.executable).parent / "accelerate"
    # --multi_gpu is accelerate's torchrun launcher; without GPUs the processes use gloo on the CPU
    two = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "2", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]

    def losses(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]

    assert len(losses("one")) == len(losses("two")) == 2  # 6 dialogue windows, 4 a step
    assert np.allclose(losses("one"), losses("two"), rtol=1e-4), (losses("one"), losses("two"))
    runs = [r for r in list_runs(store) if r["run_dir"] in (str(tmp_path / "one"), str(tmp_path / "two"))]
    assert sorted(Path(r["run_dir"]).name for r in runs) == ["one", "two"]
