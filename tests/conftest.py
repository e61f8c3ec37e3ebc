"""Shared fixtures: paths to the real data in ../shared/data and small stores on temp dirs."""

from __future__ import annotations

import os

# Before any model library is imported: a hub attempt stalls ~46 s here before failing.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import bemerc  # noqa: E402,F401  (sets the OpenMP wait policy before any test imports torch)

from pathlib import Path

import pytest

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
