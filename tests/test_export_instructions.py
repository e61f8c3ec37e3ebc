"""`bemerc export instructions` on real MELD dialogues with behaviour descriptions: the files load as
Hugging Face datasets (`datasets.load_dataset("json")`, as LLaMA-Factory reads them), LLaMA-Factory's
dataset_info.json points at them, and the prompts are `bemerc tune --show-prompt`'s through a chat
template; `--with-media` on a manifest of real clips; `bemerc export features` against the stored vectors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from bemerc.cli import app
from bemerc.store import Store
from bemerc.store.ingest import read_meld, write_utterances
from bemerc.train.tensors import normalise_speakers, speaker_groups
from conftest import write_csv

runner = CliRunner()
K, D = 2, 3  # behaviour tokens of the test feature set


def _description(row: dict) -> str:
    return f"{row['speaker']} frowns" if "?" in row["text"] else f"{row['speaker']} smiles, {len(row['text'].split())} words"


@pytest.fixture(scope="module")
def store(tmp_path_factory, meld_dir) -> Store:
    """MELD train dialogues 0-3 and dev dialogues 0-2; a behaviour feature set (vector, tokens and a
    description) for every utterance but the third of each dialogue, and audio vectors for every other one."""
    rows = [r for r in read_meld(meld_dir).rows
            if (r["split"] == "train" and int(r["dialogue_id"]) < 4) or (r["split"] == "dev" and int(r["dialogue_id"]) < 3)]
    s = Store(tmp_path_factory.mktemp("export-store"))
    write_utterances(s, rows)
    rng = np.random.default_rng(0)
    behavior = s.register_feature_set("behavior", "stand-in", "b0001", {"tokens_k": K, "tokens_d": D}, [
        pa.field("vector", pa.list_(pa.float32(), D)), pa.field("tokens", pa.list_(pa.float32(), K * D)),
        pa.field("description", pa.string())])
    described = [r for r in rows if not r["uid"].endswith("_utt2")]
    s.write_features(behavior, pa.table({
        "uid": [r["uid"] for r in described], "vector": rng.normal(size=(len(described), D)).astype(np.float32).tolist(),
        "tokens": rng.normal(size=(len(described), K * D)).astype(np.float32).tolist(),
        "description": [_description(r) for r in described]}, schema=s.table(behavior.table_name).schema))
    audio = s.register_feature_set("audio", "stand-in", "a0001", {}, [pa.field("vector", pa.list_(pa.float32(), 4))])
    heard = rows[::2]
    s.write_features(audio, pa.table({"uid": [r["uid"] for r in heard],
                                      "vector": (rng.normal(size=(len(heard), 4)) * 3 + 1).astype(np.float32).tolist()},
                                     schema=s.table(audio.table_name).schema))
    return s


def _export(store: Store, out: Path, *args: str) -> dict:
    result = runner.invoke(app, ["export", "instructions", str(out), "--store", str(store.path), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _dataset(path: str | Path):
    """The exported file as `datasets` loads it (LLaMA-Factory's loader), cached beside the file."""
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train", cache_dir=str(Path(path).parent / ".hf-cache"))


def _records(path: str | Path) -> list[dict]:
    return _dataset(path).to_list()


def _show_prompt(store: Store, tiny_llm: Path, uid: str, layout: str) -> str:
    shown = runner.invoke(app, ["tune", "--store", str(store.path), "--model", str(tiny_llm), "--layout", layout,
                                "--modalities", "none", "--show-prompt", uid])
    assert shown.exit_code == 0, shown.output
    return shown.output.rstrip("\n").rsplit("\n", 1)[0]  # the last line holds token counts


def test_sharegpt_utterance_prompt_is_tunes_prompt_through_the_chat_template(store, tiny_llm, tmp_path):
    from transformers import AutoTokenizer

    done = _export(store, tmp_path, "--layout", "utterance", "--split", "train,dev")
    assert done["utterances"] == done["examples"] and set(done["files"]) == {"train", "dev"}
    info = json.loads((tmp_path / "dataset_info.json").read_text())
    entry = info["meld_utterance_dev"]
    assert entry["formatting"] == "sharegpt" and entry["columns"] == {"messages": "conversations", "system": "system"}
    table = _dataset(tmp_path / entry["file_name"])
    assert {"conversations", "system"} <= set(table.column_names) and table.num_rows == done["utterances"]["dev"]
    first = table[0]
    (human, gpt), uid = first["conversations"], first["uids"][0]
    assert (human["from"], gpt["from"]) == ("human", "gpt") and uid == "dev/dia0_utt0"
    assert "Phoebe's behaviour: Phoebe smiles" in human["value"]  # the stored description travels
    tokenizer = AutoTokenizer.from_pretrained(tiny_llm)
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": first["system"]}, {"role": "user", "content": human["value"]}],
                                             tokenize=False, add_generation_prompt=True) + gpt["value"] + tokenizer.eos_token
    assert rendered == _show_prompt(store, tiny_llm, uid, "utterance")
    second = table[1]  # context turns are shown, as tune shows them
    assert second["uids"] == ["dev/dia0_utt1"] and "Phoebe: Oh my God" in second["conversations"][0]["value"]


def test_dialogue_layout_is_one_conversation_per_dialogue_with_tunes_turns_and_answers(store, tiny_llm, tmp_path):
    done = _export(store, tmp_path, "--split", "dev")
    records = _records(done["files"]["dev"])
    assert len(records) == 3 and sum(len(r["uids"]) for r in records) == done["utterances"]["dev"]
    first = records[0]
    humans = [m["value"] for m in first["conversations"][0::2]]
    answers = [m["value"] for m in first["conversations"][1::2]]
    assert {m["from"] for m in first["conversations"][0::2]} == {"human"} and len(humans) == len(first["uids"])
    window = _show_prompt(store, tiny_llm, first["uids"][-1], "dialogue")  # the dialogue up to its last turn
    assert first["system"] in window
    at = 0
    for human in humans:  # every turn as tune shows it, in order
        at = window.index(human, at) + len(human)
    assert re.findall(r"\[-> (\w+) \(first token", window) == answers


def test_the_three_formats_hold_the_same_messages_and_no_model_library_is_loaded(store, tmp_path):
    formats = {fmt: _records(_export(store, tmp_path / fmt, "--format", fmt, "--split", "dev")["files"]["dev"])
               for fmt in ("sharegpt", "alpaca", "jsonl")}
    for shared, alpaca, plain in zip(*formats.values()):
        turns = [(h["value"], a["value"]) for h, a in zip(shared["conversations"][0::2], shared["conversations"][1::2])]
        assert [tuple(t) for t in alpaca["history"]] + [(alpaca["instruction"], alpaca["output"])] == turns and alpaca["input"] == ""
        assert plain["messages"][0] == {"role": "system", "content": shared["system"]} == {"role": "system", "content": alpaca["system"]}
        assert [(u["content"], a["content"]) for u, a in zip(plain["messages"][1::2], plain["messages"][2::2])] == turns
        assert shared["uids"] == alpaca["uids"] == plain["uids"]
    assert json.loads((tmp_path / "alpaca" / "dataset_info.json").read_text())["meld_dialogue_dev"]["columns"]["history"] == "history"
    assert not (tmp_path / "jsonl" / "dataset_info.json").exists()
    code = ("import sys\nfrom bemerc.store import Store\nfrom bemerc.train.export import export_instructions\n"
            f"export_instructions(Store({str(store.path)!r}), {str(tmp_path / 'sub')!r})\n"
            "print(sorted(m for m in ('transformers', 'peft', 'accelerate', 'llama_cpp') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_an_earlier_dataset_info_keeps_its_entries(store, tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    _export(store, tmp_path, "--split", "dev")
    assert set(json.loads((tmp_path / "dataset_info.json").read_text())) == {"alpaca_en_demo", "meld_dialogue_dev"}


def test_bad_requests_fail_with_one_line(store, tmp_path):
    result = runner.invoke(app, ["export", "instructions", str(tmp_path / "o"), "--store", str(store.path), "--split", "test"])
    assert result.exit_code == 1 and "dataset 'meld' has no labelled test utterances (labelled: train" in result.output
    (tmp_path / "file").write_text("x")
    result = runner.invoke(app, ["export", "instructions", str(tmp_path / "file"), "--store", str(store.path)])
    assert result.exit_code == 1 and "is a file" in result.output
    result = runner.invoke(app, ["export", "instructions", str(tmp_path / "o"), "--store", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1


def test_with_media_puts_each_clip_where_tune_puts_soft_tokens(tmp_path, ravdess_dir):
    video = sorted((ravdess_dir / "video").glob("*.mp4"))[0]
    wav = sorted((ravdess_dir / "audio").glob("*.wav"))[0]
    rows = [{"dialogue_id": "d1", "turn": t, "speaker": s, "text": x, "label": lab, "split": sp, "video": v, "audio": a, "start": b, "end": e}
            for sp in ("train", "dev")
            for t, s, x, lab, v, a, b, e in ((0, "Ann", "Kids are talking by the door.", "neutral", str(video), "", "", ""),
                                             (1, "Bo", "Dogs are sitting by the door!", "anger", "", str(wav), "0.5", "1.5"),
                                             (2, "Ann", "Really?", "surprise", "", "", "", ""))]
    manifest = write_csv(tmp_path / "m.csv", rows)
    assert runner.invoke(app, ["ingest", "manifest", str(manifest), "--store", str(tmp_path / "s")]).exit_code == 0
    out = tmp_path / "out"
    done = _export(Store(tmp_path / "s"), out, "--with-media", "--split", "dev")
    assert done["spans"] == 1
    (record,) = _records(done["files"]["dev"])
    humans = [m["value"] for m in record["conversations"][0::2]]
    assert humans == ['Ann: "Kids are talking by the door." <video>', 'Bo: "Dogs are sitting by the door!" <audio>', 'Ann: "Really?"']
    assert record["videos"] == [str(video)] and record["audios"] == [str(wav)]
    assert [(c["uid"], c["kind"], c["start_s"], c["end_s"]) for c in record["clips"]] == [
        ("dev/d1_0", "video", None, None), ("dev/d1_1", "audio", 0.5, 1.5)]
    entry = json.loads((out / "dataset_info.json").read_text())["m_dialogue_dev"]
    assert entry["columns"]["videos"] == "videos" and entry["columns"]["audios"] == "audios"
    utterance = _records(_export(Store(tmp_path / "s"), out, "--with-media", "--layout", "utterance", "--split", "dev")["files"]["dev"])
    assert [r["conversations"][0]["value"].count("<video>") + r["conversations"][0]["value"].count("<audio>") for r in utterance] == [1, 1, 0]
    assert "Clip of Ann: <video>" in utterance[0]["conversations"][0]["value"]


# -- features -------------------------------------------------------------------------------------
def _index(folder: Path) -> list[dict]:
    import csv

    with open(folder / "index.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_features_as_stored_line_up_with_the_uid_index(store, tmp_path):
    from safetensors.numpy import load_file

    result = runner.invoke(app, ["export", "features", str(tmp_path), "--modality", "audio", "--store", str(store.path), "--json"])
    assert result.exit_code == 0, result.output
    tensors = load_file(str(tmp_path / "features.safetensors"))
    index = _index(tmp_path)
    stored = store.read_features(store.feature_set("audio"), ["uid", "vector"])
    by_uid = dict(zip(stored["uid"].to_pylist(), stored["vector"].to_pylist()))
    assert tensors["features"].shape == (len(index), 4) and tensors["present"].sum() == len(by_uid)
    for row in index:
        i = int(row["row"])
        if row["uid"] in by_uid:
            assert row["present"] == "1" and tensors["present"][i]
            np.testing.assert_array_equal(tensors["features"][i], np.asarray(by_uid[row["uid"]], np.float32))
        else:
            assert row["present"] == "0" and not tensors["present"][i] and not tensors["features"][i].any()
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["feature_set"] == store.feature_set("audio").id and meta["speaker_norm"] is False


def test_speaker_normalised_features_are_the_stored_ones_normalised_to_the_train_rows(store, tmp_path):
    result = runner.invoke(app, ["export", "features", str(tmp_path), "--modality", "audio", "--speaker-norm", "--format", "npy",
                                 "--store", str(store.path)])
    assert result.exit_code == 0 and "normalised per speaker" in result.output
    features, present = np.load(tmp_path / "features.npy"), np.load(tmp_path / "present.npy")
    u = store.utterances(dataset="meld")
    index = _index(tmp_path)
    assert [r["uid"] for r in index] == u["uid"].to_list()  # the index is the corpus order
    stored = store.read_features(store.feature_set("audio"), ["uid", "vector"])
    by_uid = dict(zip(stored["uid"].to_pylist(), stored["vector"].to_pylist()))
    raw = np.array([by_uid.get(uid, [0.0] * 4) for uid in u["uid"].to_list()], dtype=np.float32)
    train = present & (u["split"] == "train").to_numpy() & u["label"].is_not_null().to_numpy()
    expected = normalise_speakers(raw, present, speaker_groups(u), raw[train].mean(axis=0), raw[train].std(axis=0))
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(features[present], raw[present])
    np.testing.assert_allclose(np.load(tmp_path / "train_mean.npy"), raw[train].mean(axis=0), rtol=1e-6)


def test_behaviour_tokens_come_out_as_k_tokens(store, tmp_path):
    from safetensors.numpy import load_file

    result = runner.invoke(app, ["export", "features", str(tmp_path), "--modality", "behavior", "--store", str(store.path)])
    assert result.exit_code == 0, result.output
    assert load_file(str(tmp_path / "features.safetensors"))["features"].shape[1:] == (K, D)
    missing = runner.invoke(app, ["export", "features", str(tmp_path / "v"), "--modality", "visual", "--store", str(store.path)])
    assert missing.exit_code == 1 and "no feature set for modality visual" in missing.output


def test_an_out_that_cannot_be_written_is_one_line_naming_it(store, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    for args in (["instructions", str(blocked / "out")], ["features", str(blocked / "out"), "--modality", "audio"]):
        result = runner.invoke(app, ["export", *args, "--store", str(store.path)])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # no traceback
        assert str(blocked / "out") in result.output and len(result.output.strip().splitlines()) == 1, result.output
