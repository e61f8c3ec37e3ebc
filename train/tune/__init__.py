"""BeMERC's model: an instruction-tuned causal LLM (LoRA through peft) that reads the dialogue, the
speaker's behaviour description and soft tokens projected from stored audio and behaviour features,
and names the emotion by scoring every label.

- :mod:`~bemerc.train.tune.prompt`: templates as data (``configs/prompts/*.toml``) and their encoding;
- :mod:`~bemerc.train.tune.model`: LLM + LoRA + projectors, adapter saving and loading;
- :mod:`~bemerc.train.tune.score`: label scoring (one batched pass for all labels);
- :mod:`~bemerc.train.tune.loop`: config, data, the training loop, checkpoints, evaluation.

>>> from bemerc.train.tune import TuneConfig, tune
>>> result = tune(Store("store"), TuneConfig(model="/models/smollm2", train_limit=1500))  # doctest: +SKIP
"""

from bemerc.train.tune.loop import TuneConfig, TuneError, show_prompt, tune
from bemerc.train.tune.model import load_tuned
from bemerc.train.tune.prompt import Prompter, PromptError, load_template
from bemerc.train.tune.score import label_probabilities, label_scores

__all__ = ["PromptError", "Prompter", "TuneConfig", "TuneError", "label_probabilities", "label_scores", "load_template",
           "load_tuned", "show_prompt", "tune"]
