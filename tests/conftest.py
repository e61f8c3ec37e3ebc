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


@pytest.fixture(scope="session")
def demo_manifest(tmp_path_factory) -> Path:
    """The embedded demo corpus (51 utterances with video, audio and text), built once per session."""
    from bemerc.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo-corpus"))


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on a free 127.0.0.1 port with one bucket, ``bemerc-test``.

    The environment gets its endpoint and keys (``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``, ...), as a
    user's shell would, so LanceDB, the store's lease lock and child processes all find it. Yields
    the endpoint URL; the server stops and the environment is restored at the end of the session.
    """
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import boto3

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                pytest.fail(f"the moto S3 server did not start on {endpoint}")
            time.sleep(0.1)
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bemerc-test")
    yield endpoint
    server.terminate()
    server.wait(10)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_store(s3_server, request) -> str:
    """A fresh store URI on the S3 server, one prefix per test: ``s3://bemerc-test/<test name>``."""
    return f"s3://bemerc-test/{request.node.name.replace('[', '-').rstrip(']')}"
