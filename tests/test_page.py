"""The browse page in headless Chromium against a real uvicorn on 127.0.0.1: what a person sees
after the page's JavaScript ran (dialogue texts, gold labels, the run's predictions, neighbours)."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from bemerc.serve import create_app
from bemerc.store import query as Q
from conftest import running_server, served_store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (`make setup` installs it with apt)")


class Blocks(HTMLParser):
    """Visible text of every element with a given class (or id), one string per element."""

    VOID = {"br", "img", "input", "meta", "link", "hr", "source", "wbr"}

    def __init__(self, cls: str):
        super().__init__()
        self.cls = cls
        self.depth = 0  # > 0 while inside a matching element
        self.texts: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            return
        if self.depth:
            self.depth += 1
            self.texts[-1] += " "  # elements side by side read as separate words
        elif self.cls in (dict(attrs).get("class") or "").split() or dict(attrs).get("id") == self.cls:
            self.depth = 1
            self.texts.append("")

    def handle_endtag(self, tag):
        if self.depth and tag not in self.VOID:
            self.depth -= 1

    def handle_data(self, data):
        if self.depth:
            self.texts[-1] += data


def blocks(html: str, cls: str) -> list[str]:
    parser = Blocks(cls)
    parser.feed(html)
    return [" ".join(t.split()) for t in parser.texts]


def chromium(url: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=5000",
           "--window-size=1400,900", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def store(tmp_path_factory, meld_dir):
    return served_store(tmp_path_factory.getbasetemp(), meld_dir)


def test_page_shows_a_dialogue_with_labels_predictions_and_neighbours(store, tmp_path):
    dialogue = Q.dialogue(store, "dev", "1")
    with running_server(create_app(store.path)) as url:
        dom = chromium(f"{url}/#dev/1", tmp_path, "--dump-dom").stdout
        shot = chromium(f"{url}/#dev/1", tmp_path, f"--screenshot={tmp_path / 'page.png'}")
    assert shot.returncode == 0 and (tmp_path / "page.png").stat().st_size > 10_000

    assert blocks(dom, "split") == ["train", "dev"]
    listed = blocks(dom, "dialogue-item")
    assert len(listed) == Q.dialogues(store, "dev").height
    assert blocks(dom, "dialogue-id")[:2] == ["#0", "#1"]
    assert blocks(dom, "dialogue-title") == ["Dialogue 1 · dev"]

    cards = blocks(dom, "utterance")
    assert len(cards) == dialogue.height
    for card, row in zip(cards, dialogue.iter_rows(named=True)):
        [prediction] = row["predictions"]
        assert " ".join(row["text"].split()) in card
        assert card.startswith(f"{row['speaker']} turn {row['turn']}")
        assert f"gold {row['label']}" in card
        mark = "✓" if prediction["label"] == row["label"] else "✗"
        assert f"baseline {prediction['label']} " in card and card.endswith(mark)  # the run's prediction, judged

    right = sum(bool(p[0]["correct"]) for p in dialogue["predictions"].to_list())
    assert blocks(dom, "run-tag") == [f"baseline: {right}/{dialogue.height} correct"]

    first = dialogue["uid"][0]  # selected on load: its neighbours are listed
    assert blocks(dom, "uid") == Q.similar(store, first, "text", k=8)["uid"].to_list()


def test_deep_links_open_dialogues_whose_ids_hold_a_slash_or_a_percent_sign(tmp_path):
    """`#SPLIT/DIALOGUE` with each part percent-encoded (as the page writes it); a hand-typed link
    whose `%` is not an escape, and an old unencoded `#dev/a/b`, still open the dialogue they name."""
    from urllib.parse import quote

    from typer.testing import CliRunner

    from bemerc.cli import app
    from conftest import write_csv

    ids = ["a", "a/b", "50%off", "x/y", "x%2Fy"]
    rows = [{"dialogue_id": d, "turn": t, "speaker": "Ann", "text": f"line {t} of {d}", "label": "joy", "split": "dev"}
            for d in ids for t in range(2)]
    store = tmp_path / "store"
    result = CliRunner().invoke(app, ["ingest", "manifest", str(write_csv(tmp_path / "ids.csv", rows)), "--store", str(store)])
    assert result.exit_code == 0, result.output
    links = {f"#dev/{quote(d, safe='')}": d for d in ids}  # what the page writes (encodeURIComponent)
    links |= {"#dev/50%off": "50%off", "#dev/a/b": "a/b"}  # typed by hand; written before the parts were encoded
    with running_server(create_app(store)) as url:
        for link, dialogue in links.items():
            dom = chromium(f"{url}/{link}", tmp_path, "--dump-dom").stdout
            assert blocks(dom, "dialogue-title") == [f"Dialogue {dialogue} · dev"], link
            assert blocks(dom, "utterance")[0].endswith(f"line 0 of {dialogue}"), link
            assert "URI malformed" not in dom, link
