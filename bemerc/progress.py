"""One home for progress lines off a terminal (a log file, a pipe): how often they come and what
they say. ``bemerc extract`` and ``bemerc tune`` both print them; a terminal gets a rich bar instead.

>>> progress_line("audio", 30, 120, 60.0, "0.5 items/s")
'audio: 30/120  0.5 items/s  60 s elapsed, ETA 3 min 00 s'
"""

from __future__ import annotations

LOG_EVERY_S = 30.0  # seconds between two progress lines when the output is not a terminal


class LiveBar:
    """What both progress classes share: ``bar`` (a rich Progress on a terminal, else None) runs while
    the object is used as a context."""

    bar = None

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar:
            self.bar.stop()


def progress_line(name: str, done: int, total: int, elapsed_s: float, info: str, left_s: float | None = None) -> str:
    """``NAME: done/total  INFO  N s elapsed, ETA M min SS s``; the time left defaults to the rate
    so far (a resumed run passes its own: it did not start at 0)."""
    left = (total - done) * elapsed_s / max(done, 1) if left_s is None else left_s
    return f"{name}: {done}/{total}  {info}  {elapsed_s:.0f} s elapsed, ETA {left // 60:.0f} min {left % 60:02.0f} s"
