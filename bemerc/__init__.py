"""bemerc: multimodal emotion recognition in conversation with behaviour, speech and text.

The stage packages are ``bemerc.store`` (LanceDB feature store, ingest), ``bemerc.extract``
(feature extractors), ``bemerc.train`` (baseline, LLM tuning, evaluation) and ``bemerc.serve``
(queries, HTTP API). Data flows one way: media -> store -> train -> serve.
"""

__version__ = "0.1.0"
