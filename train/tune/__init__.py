"""BeMERC's model: an instruction-tuned causal LLM (LoRA through peft) that reads the dialogue, the
speaker's behaviour description and soft tokens projected from stored audio and behaviour features,
and names the emotion by scoring every label.

- :mod:`~bemerc.train.tune.config`: the run's settings (light: the CLI's --help reads them);
- :mod:`~bemerc.train.tune.data`: the store into examples, windows and batches, once;
- :mod:`~bemerc.train.tune.prompt`: templates as data (``configs/prompts/*.toml``) and their encoding;
- :mod:`~bemerc.train.tune.model`: LLM + LoRA + projectors, what each stage trains (``param_groups``);
- :mod:`~bemerc.train.tune.score`: label scoring (one batched pass for all labels);
- :mod:`~bemerc.train.tune.infer`: the adapter folder (saving, loading) and :class:`TunedModel`'s predictions;
- :mod:`~bemerc.train.tune.loop`: the run: plan, train each stage, checkpoints, score, record.

>>> from bemerc.train.tune import TuneConfig, tune
>>> result = tune(Store("store"), TuneConfig(model="/models/smollm2", train_limit=1500))  # doctest: +SKIP
"""

from __future__ import annotations

import importlib

# name -> the submodule that defines it; imported on first use, so ``bemerc.train.tune.config`` (the CLI's
# --help defaults) loads without torch
_EXPORTS = {"TuneConfig": "config", "TuneError": "config", "show_prompt": "loop", "tune": "loop", "load_tuned": "infer",
            "Prompter": "prompt", "PromptError": "prompt", "load_template": "prompt", "label_probabilities": "score",
            "label_scores": "score"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
