"""The embedded demo: short labelled dialogues shipped with bemerc, with speech and face clips made locally.

>>> from bemerc.demo import make_demo
>>> make_demo(Path("demo_data"))  # doctest: +SKIP
PosixPath('demo_data/manifest.jsonl')
"""

from bemerc.demo.media import LABELS, load_dialogues, make_demo

__all__ = ["LABELS", "load_dialogues", "make_demo"]
