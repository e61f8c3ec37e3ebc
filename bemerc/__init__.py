"""bemerc: multimodal emotion recognition in conversation with behaviour, speech and text.

The stage packages are ``bemerc.store`` (LanceDB feature store, ingest), ``bemerc.extract``
(feature extractors), ``bemerc.train`` (baseline, LLM tuning, evaluation) and ``bemerc.serve``
(queries, HTTP API). Data flows one way: media -> store -> train -> serve.
"""

import os

# Before torch loads libgomp: OpenMP threads that spin while waiting collapse when another process
# shares these few cores (measured in docs/pipeline.md, Benchmarks).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
