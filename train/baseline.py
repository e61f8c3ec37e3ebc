"""The XGBoost late-fusion baseline: one classifier per modality, probabilities fused with weights
fit on dev, an early-fusion variant and a modality ablation beside it.

Each modality model sees the utterance's vector (PCA-reduced when wide), the mean vector of the
previous ``context`` utterances of its dialogue, and where the utterance sits in its dialogue
(relative position, turn, dialogue length, same speaker as the previous turn). A modality missing
for an utterance is never zero-filled: its vector is NaN (missing to XGBoost) for early fusion and
for its neighbours' context, and late fusion leaves its probabilities out of that utterance's
weighted average. Model selection (early stopping, fusion weights) uses dev only.

>>> result = train_baseline(Store("store"))              # doctest: +SKIP
>>> result.metrics["dev"]["weighted_f1"]                   # doctest: +SKIP
0.55
>>> model = BaselineModel.load(result.run_dir)            # doctest: +SKIP
>>> model.predict_proba(load_corpus(Store("store"), list(model.feature_sets.values()))).shape  # doctest: +SKIP
(11098, 7)
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import polars as pl
import xgboost as xgb  # bemerc/__init__.py has set OMP_WAIT_POLICY=PASSIVE: nthread=2 stays fast on a busy machine

from bemerc.store import Store, StoreError
from bemerc.store.runs import Run, check_run_dir, default_run_dir
from bemerc.store.schema import EVAL_SPLITS, MODALITIES, run_classes
from bemerc.train.evaluate import bootstrap_intervals
from bemerc.train.metrics import class_weights, classification_metrics, weighted_f1
from bemerc.train.runs import BASELINE, Predictions, new_run_id, save_run, split_metrics
from bemerc.train.tensors import SPEAKER_NORMALISED, Corpus, load_corpus, normalise_speakers, speaker_groups



@dataclass(frozen=True)
class BaselineConfig:
    """Settings of a baseline run (stored with it). The defaults were chosen on MELD dev with
    ``bench/baseline.py``."""

    context: int = 3  # previous utterances of the dialogue averaged as context
    max_dim: int = 128  # vectors wider than this are reduced by PCA fit on train
    context_dim: int = 32  # leading PCA components of the context mean given to the model
    class_weight_power: float = 0.5  # sample weight of class c: (N / (C * n_c)) ** power
    max_depth: int = 4
    learning_rate: float = 0.1
    subsample: float = 0.8
    colsample_bytree: float = 0.5
    min_child_weight: float = 1.0
    reg_lambda: float = 1.0
    max_bin: int = 64
    max_rounds: int = 1000
    early_stopping_rounds: int = 40
    logistic: bool = True  # also fit a logistic-regression head per modality as a fusion member
    logistic_c: float = 1.0
    speaker_norm: bool = True  # normalise audio/behaviour/visual vectors per speaker (bemerc.train.tensors.normalise_speakers)
    fusion_steps: int = 25  # greedy fusion-weight selection: weights are multiples of 1/steps
    fusion_objective: str = "log_loss"  # what the fusion weights optimise on dev (or "weighted_f1")
    nthread: int = 2
    seed: int = 0
    bootstrap_resamples: int = 1000

    @classmethod
    def from_dict(cls, values: dict) -> BaselineConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


# -- where each utterance sits in its dialogue ----------------------------------------------------
@dataclass
class Dialogues:
    """Dialogue layout of utterances sorted in dialogue order (as :func:`load_corpus` gives them)."""

    start: np.ndarray  # (N,) row of the first utterance of each row's dialogue
    features: np.ndarray  # (N, 4) relative position, turn, dialogue length, same speaker as previous (NaN: unknown)
    group: np.ndarray  # (N,) dialogue number, for bootstrapping whole dialogues


def dialogue_layout(corpus: Corpus) -> Dialogues:
    """Dialogue starts (:attr:`Corpus.dialogue_start`) and features of a corpus in dialogue order.

    >>> u = pl.DataFrame({"dataset": ["m"] * 3, "split": ["dev"] * 3, "dialogue_id": ["0", "0", "1"],
    ...                   "turn": [0, 1, 0], "speaker": ["A", "A", "B"]})
    >>> d = dialogue_layout(Corpus(u, {})); d.start.tolist(), d.features[:, 3].tolist()
    ([0, 0, 2], [nan, 1.0, nan])
    """
    utterances, start = corpus.utterances, corpus.dialogue_start
    n = len(start)
    new = start == np.arange(n)
    group = np.cumsum(new) - 1
    lengths = np.diff(np.append(np.flatnonzero(new), n))
    index_in_dialogue = np.arange(n) - start
    length = lengths[group].astype(np.float32)
    speaker = utterances["speaker"].fill_null("").to_numpy()
    same = np.full(n, np.nan, dtype=np.float32)
    follows = ~new & (speaker != "")
    follows[1:] &= speaker[:-1] != ""
    same[follows] = (speaker[1:][follows[1:]] == speaker[:-1][follows[1:]]).astype(np.float32)
    features = np.stack(
        [
            index_in_dialogue / np.maximum(length - 1, 1),
            utterances["turn"].to_numpy().astype(np.float32),
            length,
            same,
        ],
        axis=1,
    ).astype(np.float32)
    return Dialogues(start=start, features=features, group=group)


def context_mean(vectors: np.ndarray, present: np.ndarray, dialogues: Dialogues, k: int) -> np.ndarray:
    """Mean of the previous ``k`` utterances' vectors in the same dialogue, over those present.

    vectors: (N, D) in dialogue order; present: (N,) bool. Returns (N, D) float32, NaN where no
    previous utterance within ``k`` turns has the modality (e.g. the first turn).
    """
    n, dim = vectors.shape
    masked = np.where(present[:, None], vectors, 0).astype(np.float64)
    # running sums with a zero row in front: sum of rows [a, b) = cum[b] - cum[a]
    cum = np.zeros((n + 1, dim))
    np.cumsum(masked, axis=0, out=cum[1:])
    cum_count = np.concatenate([[0], np.cumsum(present)])
    rows = np.arange(n)
    lo = np.maximum(rows - k, dialogues.start)
    count = cum_count[rows] - cum_count[lo]
    total = cum[rows] - cum[lo]
    out = np.full((n, dim), np.nan, dtype=np.float32)
    has = count > 0
    out[has] = (total[has] / count[has, None]).astype(np.float32)
    return out


# -- per-modality inputs ------------------------------------------------------------------------
@dataclass
class Projection:
    """Speaker normalisation (optional), centering and (optionally) PCA of one modality's vectors, fit
    on train rows that have it."""

    mean: np.ndarray  # (D,)
    components: np.ndarray | None  # (d, D), None = keep all D dimensions
    speaker_mean: np.ndarray | None = None  # (D,) train mean and std each speaker is normalised to; None = not normalised
    speaker_std: np.ndarray | None = None

    @classmethod
    def fit(cls, vectors: np.ndarray, present: np.ndarray, groups: np.ndarray, train: np.ndarray, max_dim: int,
            speaker_norm: bool) -> Projection:
        """vectors, present, groups: every row (N, D), (N,), (N,) (speaker means use every row of the
        speaker); train: (N,) bool rows to fit on. PCA through the SVD of the centred rows when D > max_dim,
        keeping at most the rank of those rows: with fewer train rows than max_dim, a direction they do
        not span has no train variance, and the logistic head's standardisation would blow up whatever
        other rows put there (measured in docs/baseline.md)."""
        stats = (vectors[train].mean(axis=0), vectors[train].std(axis=0)) if speaker_norm else (None, None)
        x = (normalise_speakers(vectors, present, groups, *stats) if speaker_norm else vectors)[train]
        mean = x.mean(axis=0)
        if x.shape[1] <= max_dim:
            return cls(mean, None, *stats)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        rank = max(1, int((s > s[0] * 1e-4).sum())) if len(s) and s[0] > 0 else 1
        return cls(mean, vt[: min(max_dim, rank)].astype(np.float32), *stats)

    def normalised(self, vectors: np.ndarray, present: np.ndarray, groups: np.ndarray) -> np.ndarray:
        """(N, D) vectors with each speaker normalised (as they are when the run did not normalise them)."""
        if self.speaker_mean is None:
            return vectors
        return normalise_speakers(vectors, present, groups, self.speaker_mean, self.speaker_std)

    def __call__(self, vectors: np.ndarray, present: np.ndarray, groups: np.ndarray) -> np.ndarray:
        centred = self.normalised(vectors, present, groups) - self.mean
        return (centred if self.components is None else centred @ self.components.T).astype(np.float32)


def modality_inputs(vectors: np.ndarray, present: np.ndarray, groups: np.ndarray, projection: Projection,
                    dialogues: Dialogues, config: BaselineConfig) -> np.ndarray:
    """(N, d + c) projected vector and context mean of one modality; NaN where absent.

    The dialogue features are added once per model by :func:`model_inputs`.
    """
    x = projection(vectors, present, groups)
    x[~present] = np.nan
    ctx = context_mean(np.nan_to_num(x), present, dialogues, config.context)[:, : config.context_dim]
    return np.concatenate([x, ctx], axis=1) if config.context > 0 else x


def model_inputs(parts: list[np.ndarray], dialogues: Dialogues) -> np.ndarray:
    """The matrix an XGBoost model sees: modality inputs side by side, then dialogue features."""
    return np.concatenate([*parts, dialogues.features], axis=1)


# -- heads ---------------------------------------------------------------------------------------
def fit_xgboost(x: np.ndarray, y: np.ndarray, x_dev: np.ndarray, y_dev: np.ndarray, n_classes: int,
                config: BaselineConfig) -> xgb.Booster:
    """A softprob booster on (x, y) with class-weighted samples, stopped early on dev's weighted
    log loss and cut to its best round."""
    w = class_weights(y, n_classes, config.class_weight_power)
    train = xgb.DMatrix(x, label=y, weight=w[y], missing=np.nan)
    dev = xgb.DMatrix(x_dev, label=y_dev, weight=w[y_dev], missing=np.nan)
    params = {
        "objective": "multi:softprob",
        "num_class": n_classes,
        "tree_method": "hist",
        "eval_metric": "mlogloss",
        "max_depth": config.max_depth,
        "eta": config.learning_rate,
        "subsample": config.subsample,
        "colsample_bytree": config.colsample_bytree,
        "min_child_weight": config.min_child_weight,
        "lambda": config.reg_lambda,
        "max_bin": config.max_bin,
        "nthread": config.nthread,
        "seed": config.seed,
    }
    booster = xgb.train(params, train, config.max_rounds, evals=[(dev, "dev")],
                        early_stopping_rounds=config.early_stopping_rounds, verbose_eval=False)
    return booster[: booster.best_iteration + 1]


def xgboost_proba(booster: xgb.Booster, x: np.ndarray) -> np.ndarray:
    """(N, C) class probabilities; (0, C) for no rows (XGBoost itself answers shape (0,) then)."""
    if len(x) == 0:
        n_classes = int(json.loads(booster.save_config())["learner"]["learner_model_param"]["num_class"])
        return np.zeros((0, n_classes), dtype=np.float32)
    return booster.predict(xgb.DMatrix(x, missing=np.nan)).reshape(len(x), -1)


@dataclass
class LogisticHead:
    """Multinomial logistic regression on standardised inputs (NaN context -> 0 plus a flag)."""

    mean: np.ndarray  # (F,)
    scale: np.ndarray  # (F,)
    coef: np.ndarray  # (C, F)
    intercept: np.ndarray  # (C,)

    @staticmethod
    def prepare(x: np.ndarray) -> np.ndarray:
        """(N, F) -> (N, F + 1): NaNs (no context, unknown speaker change) become 0, plus a column
        that says whether anything was missing."""
        missing = np.isnan(x)
        return np.concatenate([np.where(missing, 0, x), missing.any(axis=1, keepdims=True)], axis=1)

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, n_classes: int, config: BaselineConfig) -> LogisticHead:
        from sklearn.linear_model import LogisticRegression

        z = cls.prepare(x)
        mean, scale = z.mean(axis=0), z.std(axis=0) + 1e-6
        coef = np.zeros((n_classes, z.shape[1]))
        intercept = np.full(n_classes, -1e9)  # a class absent from train is never predicted
        present = np.unique(y)
        if len(present) == 1:  # one label in train: the model predicts it (as XGBoost and tune do)
            intercept[present] = 0.0
            return cls(mean, scale, coef, intercept)
        w = class_weights(y, n_classes, config.class_weight_power)
        model = LogisticRegression(C=config.logistic_c, max_iter=500)
        model.fit((z - mean) / scale, y, sample_weight=w[y])
        coef[model.classes_], intercept[model.classes_] = model.coef_, model.intercept_
        return cls(mean, scale, coef, intercept)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        logits = ((self.prepare(x) - self.mean) / self.scale) @ self.coef.T + self.intercept
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


# -- late fusion --------------------------------------------------------------------------------
def fuse(probabilities: dict[str, np.ndarray], weights: dict[str, float], prior: np.ndarray) -> np.ndarray:
    """Weighted mean of members' (N, C) probabilities, each utterance over the members it has.

    A member's rows are NaN where its modality is absent; those rows drop out of the average, so an
    utterance without audio gets exactly the fusion of its other members. An utterance with no
    member at all gets ``prior`` (the train class frequencies).
    """
    n, c = next(iter(probabilities.values())).shape
    total = np.zeros((n, c))
    mass = np.zeros(n)
    for name, w in weights.items():
        if w <= 0:
            continue
        p = probabilities[name]
        has = ~np.isnan(p[:, 0])
        total[has] += w * p[has]
        mass[has] += w
    out = np.tile(prior, (n, 1)).astype(np.float64)
    out[mass > 0] = total[mass > 0] / mass[mass > 0, None]
    return out.astype(np.float32)


def select_weights(probabilities: dict[str, np.ndarray], y: np.ndarray, prior: np.ndarray, steps: int,
                   objective: str = "log_loss") -> dict[str, float]:
    """Fusion weights fit on (dev) labels ``y`` by greedy ensemble selection (Caruana et al., 2004):
    start from the best member, add one member at a time (repeats allowed) and keep the best of the
    ``steps`` mixtures. Weights are multiples of 1/steps and sum to 1.

    ``objective`` is ``"log_loss"`` (the default: smooth, so a member that only adds noise does not
    win weight by chance) or ``"weighted_f1"`` (the reported metric itself, which overfits dev more:
    on MELD it gave random stand-in modalities weight).

    >>> p = {"good": np.array([[0.9, 0.1], [0.2, 0.8]]), "noise": np.array([[0.5, 0.5], [0.5, 0.5]])}
    >>> select_weights(p, np.array([0, 1]), np.array([0.5, 0.5]), steps=4)
    {'good': 1.0, 'noise': 0.0}
    """
    if objective not in ("log_loss", "weighted_f1"):
        raise ValueError(f"fusion objective must be 'log_loss' or 'weighted_f1', found {objective!r}")
    names = list(probabilities)
    n_classes = len(prior)
    counts = dict.fromkeys(names, 0)

    def score(candidate: dict[str, int]) -> float:  # higher is better
        fused = fuse(probabilities, candidate, prior)
        if objective == "weighted_f1":
            return weighted_f1(y, fused.argmax(axis=1), n_classes)
        return float(np.log(np.clip(fused[np.arange(len(y)), y], 1e-7, 1)).mean())

    best_counts, best_score = None, -np.inf
    for _ in range(steps):
        trials = {name: score({**counts, name: counts[name] + 1}) for name in names}
        chosen = max(names, key=lambda name: trials[name])  # first of ties: members keep their order
        counts[chosen] += 1
        if trials[chosen] > best_score + 1e-12:
            best_counts, best_score = dict(counts), trials[chosen]
    total = sum(best_counts.values())
    return {name: best_counts[name] / total for name in names}


# -- the model ----------------------------------------------------------------------------------
@dataclass
class BaselineModel:
    """Everything a baseline run saved: projections, per-modality heads, the early-fusion booster
    and the late-fusion weights. Members are named ``{modality}`` (XGBoost) and
    ``{modality}:logistic``."""

    classes: list[str]
    config: BaselineConfig
    feature_sets: dict[str, str]  # modality -> feature set id
    projections: dict[str, Projection]
    boosters: dict[str, xgb.Booster]  # modality or "early_fusion" -> booster
    logistic: dict[str, LogisticHead]  # modality -> head
    weights: dict[str, float] = field(default_factory=dict)  # late-fusion weight per member
    prior: np.ndarray | None = None  # (C,) train class frequencies

    @property
    def modalities(self) -> list[str]:
        return list(self.feature_sets)

    def inputs(self, corpus: Corpus) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], Dialogues]:
        """Per-modality inputs (N, d + c) and presence masks (N,) of a corpus, plus its dialogues."""
        dialogues = dialogue_layout(corpus)
        groups = speaker_groups(corpus.utterances)
        inputs, present = {}, {}
        for m in self.modalities:
            if m not in corpus.modalities:
                raise StoreError(f"the baseline needs modality {m!r} ({self.feature_sets[m]}); the corpus has {sorted(corpus.modalities)}")
            arrays = corpus.modalities[m]
            inputs[m] = modality_inputs(arrays.vectors, arrays.present, groups, self.projections[m], dialogues, self.config)
            present[m] = arrays.present
        return inputs, present, dialogues

    def member_probabilities(self, corpus: Corpus) -> dict[str, np.ndarray]:
        """(N, C) probabilities of every member and of ``early_fusion``; a member's rows are NaN
        where its modality is absent."""
        inputs, present, dialogues = self.inputs(corpus)
        return self._member_probabilities(inputs, present, dialogues)

    def _member_probabilities(self, inputs: dict, present: dict, dialogues: Dialogues) -> dict[str, np.ndarray]:
        n = len(dialogues.start)
        out = {}
        for name in self.member_names():
            modality, _, head = name.partition(":")
            p = np.full((n, len(self.classes)), np.nan, dtype=np.float32)
            rows = present[modality]
            x = model_inputs([inputs[modality][rows]], _rows(dialogues, rows))
            p[rows] = self.logistic[modality](x) if head == "logistic" else xgboost_proba(self.boosters[modality], x)
            out[name] = p
        if "early_fusion" in self.boosters:
            fitted = [m for m in self.modalities if m in self.boosters]
            out["early_fusion"] = xgboost_proba(self.boosters["early_fusion"], model_inputs([inputs[m] for m in fitted], dialogues))
        return out

    def member_names(self) -> list[str]:
        return [m for m in self.modalities if m in self.boosters] + [f"{m}:logistic" for m in self.modalities if m in self.logistic]

    def predict_proba(self, corpus: Corpus) -> np.ndarray:
        """(N, C) late-fusion probabilities of every utterance of ``corpus``."""
        members = self.member_probabilities(corpus)
        return fuse({k: v for k, v in members.items() if k in self.weights}, self.weights, self.prior)

    # -- files ---------------------------------------------------------------------------------
    def save(self, run_dir: Path) -> list[str]:
        """Write ``model_{name}.ubj`` per booster, ``baseline.npz`` (projections, logistic heads)
        and ``baseline.json`` (classes, config, feature sets, fusion weights); returns file names."""
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, booster in self.boosters.items():
            # written by Python, not by XGBoost's own file stream: a full disk is an OSError (ENOSPC) that
            # names the cause, not "FileStream.Write incomplete"
            (run_dir / f"model_{name}.ubj").write_bytes(booster.save_raw(raw_format="ubj"))
        arrays = {}
        for m, proj in self.projections.items():
            arrays[f"projection/{m}/mean"] = proj.mean
            if proj.components is not None:
                arrays[f"projection/{m}/components"] = proj.components
            if proj.speaker_mean is not None:
                arrays[f"projection/{m}/speaker_mean"], arrays[f"projection/{m}/speaker_std"] = proj.speaker_mean, proj.speaker_std
        for m, head in self.logistic.items():
            for key, value in asdict(head).items():
                arrays[f"logistic/{m}/{key}"] = value
        np.savez(run_dir / "baseline.npz", **arrays)
        manifest = {
            "classes": self.classes,
            "config": asdict(self.config),
            "feature_sets": self.feature_sets,
            "boosters": {name: f"model_{name}.ubj" for name in self.boosters},
            "logistic": sorted(self.logistic),
            "fusion_weights": self.weights,
            "prior": self.prior.tolist(),
        }
        (run_dir / "baseline.json").write_text(json.dumps(manifest, indent=2))
        return self.file_names()

    def file_names(self) -> list[str]:
        """The files :meth:`save` writes."""
        return [*(f"model_{name}.ubj" for name in self.boosters), "baseline.npz", "baseline.json"]

    @classmethod
    def load(cls, run_dir: str | Path) -> BaselineModel:
        """Read a baseline run folder written by :meth:`save`."""
        run_dir = Path(run_dir)
        path = run_dir / "baseline.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: not found (expected a baseline run folder written by `bemerc baseline`)")
        manifest = json.loads(path.read_text())
        arrays = np.load(run_dir / "baseline.npz")
        boosters = {}
        for name, file in manifest["boosters"].items():
            boosters[name] = xgb.Booster(model_file=str(run_dir / file))
        projections = {
            m: Projection(*(arrays.get(f"projection/{m}/{k}") for k in ("mean", "components", "speaker_mean", "speaker_std")))
            for m in manifest["feature_sets"]
        }
        logistic = {m: LogisticHead(*(arrays[f"logistic/{m}/{k}"] for k in ("mean", "scale", "coef", "intercept"))) for m in manifest["logistic"]}
        return cls(
            classes=manifest["classes"],
            config=BaselineConfig.from_dict(manifest["config"]),
            feature_sets=manifest["feature_sets"],
            projections=projections,
            boosters=boosters,
            logistic=logistic,
            weights=manifest["fusion_weights"],
            prior=np.asarray(manifest["prior"]),
        )


def _rows(dialogues: Dialogues, rows: np.ndarray) -> Dialogues:
    return Dialogues(start=dialogues.start[rows], features=dialogues.features[rows], group=dialogues.group[rows])


# -- training -----------------------------------------------------------------------------------
@dataclass
class BaselineResult:
    run_id: str
    run_dir: Path
    metrics: dict
    seconds: float


def ablation_sets(modalities: list[str]) -> dict[str, list[str]]:
    """Modality combinations of the ablation: the first alone, the first plus each other, all.

    >>> ablation_sets(["text", "audio", "behavior"])
    {'text': ['text'], 'text+audio': ['text', 'audio'], 'text+behavior': ['text', 'behavior'], 'all': ['text', 'audio', 'behavior']}
    """
    first, rest = modalities[0], modalities[1:]
    sets = {first: [first]}
    for m in rest:
        sets[f"{first}+{m}"] = [first, m]
    if len(modalities) > 2:
        sets["all"] = list(modalities)
    return sets


@dataclass
class BaselineFit:
    """A fitted baseline and its scores, before anything is written."""

    model: BaselineModel
    metrics: dict  # the metrics.json layout
    probabilities: np.ndarray  # (N, C) late fusion of every utterance of the corpus


def fit_baseline(corpus: Corpus, config: BaselineConfig = BaselineConfig(),
                 log: Callable[[str], None] = lambda message: None) -> BaselineFit:
    """Fit the modality models, the early-fusion model and the fusion weights on one dataset's
    corpus, then score them on dev and test (nothing is written).

    Train rows fit the models; labelled dev rows stop the boosting, choose the fusion weights and
    the ablation's weights; test rows are only scored.
    """
    started = time.perf_counter()
    u = corpus.utterances
    datasets = u["dataset"].unique().to_list()
    if len(datasets) != 1:
        raise StoreError(f"the baseline trains on one dataset at a time; found {', '.join(sorted(datasets)) or 'no utterances'}")
    if not corpus.modalities:
        raise StoreError("no feature sets in the store; run `bemerc extract` first")
    dataset = datasets[0]
    classes = run_classes(dataset, u["label"])
    index = {c: i for i, c in enumerate(classes)}
    y = np.array([index.get(label, -1) if label is not None else -1 for label in u["label"].to_list()])
    split = u["split"].to_numpy()
    labelled = {s: (split == s) & (y >= 0) for s in ("train", *EVAL_SPLITS)}
    for s in ("train", "dev"):
        if not labelled[s].any():
            raise StoreError(f"the baseline needs labelled {s} utterances of {dataset!r} (found none with labels in {', '.join(classes)})")
    modalities = sorted(corpus.modalities, key=lambda m: (MODALITIES.index(m) if m in MODALITIES else len(MODALITIES), m))
    n_classes = len(classes)
    prior = np.bincount(y[labelled["train"]], minlength=n_classes) / labelled["train"].sum()
    if np.count_nonzero(prior) == 1:
        log(f"warning: every labelled train utterance of {dataset!r} is {classes[int(prior.argmax())]!r}: "
            "the models can only predict that label")

    model = BaselineModel(
        classes=classes,
        config=config,
        feature_sets={m: corpus.modalities[m].feature_set.id for m in modalities},
        projections={},
        boosters={},
        logistic={},
        prior=prior,
    )
    groups = speaker_groups(u)
    for m in modalities:
        arrays = corpus.modalities[m]
        fit_rows = labelled["train"] & arrays.present
        if not fit_rows.any():
            raise StoreError(f"feature set {arrays.feature_set.id} has no labelled train utterance")
        model.projections[m] = Projection.fit(arrays.vectors, arrays.present, groups, fit_rows, config.max_dim,
                                              config.speaker_norm and m in SPEAKER_NORMALISED)
    inputs, present, dialogues = model.inputs(corpus)

    def matrix(parts: list[np.ndarray], rows: np.ndarray) -> np.ndarray:
        return model_inputs([p[rows] for p in parts], _rows(dialogues, rows))

    for m in modalities:
        tr, dv = labelled["train"] & present[m], labelled["dev"] & present[m]
        if not dv.any():
            log(f"{m}: no labelled dev utterance has this modality; it is left out")
            continue
        t = time.perf_counter()
        model.boosters[m] = fit_xgboost(matrix([inputs[m]], tr), y[tr], matrix([inputs[m]], dv), y[dv], n_classes, config)
        log(f"{m}: XGBoost, {model.boosters[m].num_boosted_rounds()} rounds on {tr.sum():,} utterances ({time.perf_counter() - t:.1f} s)")
        if config.logistic:
            t = time.perf_counter()
            model.logistic[m] = LogisticHead.fit(matrix([inputs[m]], tr), y[tr], n_classes, config)
            log(f"{m}: logistic regression ({time.perf_counter() - t:.1f} s)")
    fitted = [m for m in modalities if m in model.boosters]
    if not fitted:
        raise StoreError("no modality has labelled dev utterances to select the models on")
    if len(fitted) > 1:  # with one modality early fusion would be that modality's model again
        anything = np.logical_or.reduce([present[m] for m in fitted])
        tr, dv = labelled["train"] & anything, labelled["dev"] & anything
        all_inputs = [inputs[m] for m in fitted]
        t = time.perf_counter()
        model.boosters["early_fusion"] = fit_xgboost(matrix(all_inputs, tr), y[tr], matrix(all_inputs, dv), y[dv], n_classes, config)
        log(f"early fusion: XGBoost, {model.boosters['early_fusion'].num_boosted_rounds()} rounds ({time.perf_counter() - t:.1f} s)")

    probabilities = model._member_probabilities(inputs, present, dialogues)
    members = {k: v for k, v in probabilities.items() if k != "early_fusion"}
    dev = labelled["dev"]

    def fit_fusion(names: list[str]) -> dict[str, float]:
        return select_weights({k: members[k][dev] for k in names}, y[dev], prior, config.fusion_steps, config.fusion_objective)

    def scores(p: np.ndarray) -> dict:
        out = {}
        for s in EVAL_SPLITS:
            rows = labelled[s] & ~np.isnan(p[:, 0])  # a member scores the utterances it speaks for
            if rows.any():
                m = classification_metrics(y[rows], p[rows].argmax(axis=1), classes)
                out[s] = {k: m[k] for k in ("n", "weighted_f1", "accuracy", "macro_f1")}
        return out

    model.weights = fit_fusion(list(members))
    fused = fuse(members, model.weights, prior)
    log("late fusion weights: " + ", ".join(f"{k} {w:.2f}" for k, w in model.weights.items() if w > 0))
    ablation = {}
    for name, subset in ablation_sets(fitted).items():
        names = [k for k in members if k.partition(":")[0] in subset]
        weights = fit_fusion(names)
        ablation[name] = {"modalities": subset, "weights": weights, **scores(fuse({k: members[k] for k in names}, weights, prior))}

    metrics = {}
    for s in EVAL_SPLITS:
        rows = labelled[s]
        if rows.any():
            predicted = fused[rows].argmax(axis=1)
            metrics[s] = classification_metrics(y[rows], predicted, classes)
            metrics[s]["ci"] = bootstrap_intervals(y[rows], predicted, n_classes, config.bootstrap_resamples,
                                                   groups=dialogues.group[rows], seed=config.seed)
    metrics = split_metrics(metrics)
    metrics["models"] = {**{name: scores(p) for name, p in probabilities.items()}, "late_fusion": scores(fused)}
    metrics["fusion_weights"] = model.weights
    metrics["ablation"] = ablation
    metrics["fit_seconds"] = round(time.perf_counter() - started, 1)
    return BaselineFit(model=model, metrics=metrics, probabilities=fused)


def train_baseline(
    store: Store,
    *,
    feature_sets: list[str] | None = None,
    dataset: str | None = None,
    config: BaselineConfig = BaselineConfig(),
    run_dir: str | Path | None = None,
    run_id: str | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> BaselineResult:
    """Train, evaluate and record a baseline run on the store.

    ``feature_sets``: refs as :func:`bemerc.train.tensors.load_corpus` takes them (default: the
    newest feature set of every modality). Writes the models and ``metrics.json`` in ``run_dir``
    (default ``runs/<run_id>`` inside the store, :func:`~bemerc.store.runs.default_run_dir`), a ``runs`` row of kind ``baseline`` and the late-fusion
    probabilities of every dev and test utterance in ``predictions``.
    """
    started = time.perf_counter()
    if run_dir is not None:
        check_run_dir(run_dir)  # before any work: a taken folder is refused, never written over
    corpus = load_corpus(store, feature_sets, dataset=dataset)
    datasets = corpus.utterances["dataset"].unique().to_list()
    if not datasets:
        raise StoreError(f"{store.path}: no utterances{f' of dataset {dataset!r}' if dataset else ''}; run `bemerc ingest` first")
    if len(datasets) > 1:
        raise StoreError(f"{store.path}: utterances of several datasets ({', '.join(sorted(datasets))}); choose one with --dataset")
    try:
        fit = fit_baseline(corpus, config, log)
    except StoreError as e:
        raise StoreError(f"{store.path}: {e}") from None
    run_id = run_id or new_run_id(BASELINE)
    run_dir = Path(run_dir) if run_dir else default_run_dir(store, run_id)
    files = fit.model.file_names()
    u = corpus.utterances
    evaluated = u["split"].is_in(list(EVAL_SPLITS)).to_numpy()
    fit.metrics["train_seconds"] = round(time.perf_counter() - started, 1)
    run = Run(run_id, BASELINE, datasets[0], fit.model.classes, list(fit.model.feature_sets.values()),
              {**asdict(config), "files": files, "modalities": fit.model.modalities}, fit.metrics, str(run_dir))
    predictions = Predictions(u["uid"].filter(evaluated).to_list(), u["split"].filter(evaluated).to_list(),
                              u["label"].filter(evaluated).to_list(), fit.probabilities[evaluated])
    save_run(store, run, predictions, write_files=fit.model.save)
    return BaselineResult(run_id=run_id, run_dir=run_dir, metrics=fit.metrics, seconds=time.perf_counter() - started)
