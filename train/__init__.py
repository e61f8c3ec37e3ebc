"""Training and evaluation from the store: tensors, the XGBoost baseline, LLM tuning, metrics, reports.

This package reads what ``bemerc.extract`` stored and never imports it.
"""
