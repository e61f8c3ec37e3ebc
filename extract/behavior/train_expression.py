"""Rebuild bemerc's expression network from labelled real faces (``bemerc models train-expression``).

Read top to bottom:

1. **Faces.** Parquet face sets in the shared format (columns ``file``, ``label``, ``image``: the
   original JPEG/PNG bytes): RAF-DB train (colour, aligned) and FER2013 train (grey). RAF-DB train is
   split by :func:`dev_split` into train and a held-out dev set (stratified by label, 20%, fixed by a
   hash of the file name, so the same faces are dev on every machine and in every run).
2. **Crops through the pipeline.** Every image becomes a still frame (:func:`~bemerc.extract.media.
   still_frame`), the pipeline's face finder and mesh find the face (:func:`pipeline_face_box`), and a
   square around the mesh box is cut (:func:`~bemerc.extract.behavior.face.square_crop`) a little wider
   than the network's crop, so training can jitter it. A face the finder misses is cut from the whole
   image instead (for training only; the dev score counts it wrong). The crops are cached (npz).
3. **Training.** AdamW with a one-cycle schedule, label smoothing, class weights (inverse square root of
   the class frequency: rare disgust and fear count more), flips, small rotations, shifts and zooms,
   brightness/contrast, random grey and erasing, CutMix in half the batches; bf16 autocast in training where the CPU has bf16 matrix units (dev is scored in fp32 after every epoch);
   the network kept is the moving average of the weights (EMA), scored on dev after every epoch.
4. **Out.** ``expression_net.safetensors`` (the PyTorch weights; dims and training facts in its
   metadata), ``expression_net.fp32.onnx`` (the same network for onnxruntime), ``expression_net.onnx``
   (its int8 copy, :func:`~bemerc.extract.behavior.expression_net.quantize_onnx`: what extraction runs,
   about twice as fast, scored on dev again) and ``metrics.json`` (dev accuracy, F1 and recall per class
   for every epoch, and the int8 network's as ``deployed_dev``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from bemerc.extract.behavior.expression import CROP_MARGIN, CUT_SIDE, centre_of_cut, cut_face
from bemerc.extract.behavior.expression_net import (
    EXPRESSIONS, ExpressionNet, ExpressionNetDims, export_onnx, quantize_onnx, save_expression_net,
)
from bemerc.precision import cpu_has_bf16

DEV_FRACTION = 0.2
CALIBRATION_FACES = 256  # training faces whose activations set the int8 network's ranges
DEFAULT_EPOCHS = 90  # the shipped model's
DEFAULT_CUTMIX = 0.5  # the shipped model's share of CutMix batches (docs/expression.md: run H against G)
# Training crops come from the face finder without its lenient mesh tries (a photo only they find is trained
# on whole, as before they existed), so the rebuild still gives the shipped network; trained on their crops
# (0.3% of the faces), two rebuilds read dev 0.812-0.818 (docs/expression.md, "Finding the face in a photo").
TRAIN_LENIENT_CONFIDENCE = None  # FaceFinder's lenient_confidence for training crops: no lenient tries


def decode_image(data: bytes, name: str = "image") -> np.ndarray:
    """RGB uint8 (H, W, 3) from JPEG/PNG bytes (grey images become three equal channels)."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{name}: not a readable JPEG or PNG image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_faces(path: str | Path, limit: int | None = None) -> dict[str, list]:
    """``{"file": [...], "label": [...], "image": [bytes, ...]}`` of a face-set Parquet file (``limit``:
    that many rows, evenly spread over the file); one line naming the file when it is missing or lacks
    a column."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such face set (Parquet with columns file, label, image)")
    table = pq.read_table(path)
    missing = {"file", "label", "image"} - set(table.column_names)
    if missing:
        raise ValueError(f"{path}: face set lacks column(s) {', '.join(sorted(missing))}")
    if limit is not None and limit < table.num_rows:  # evenly spread rows: the sets are sorted by label
        table = table.take(np.unique(np.linspace(0, table.num_rows - 1, limit).round().astype(int)))
    faces = table.select(["file", "label", "image"]).to_pydict()
    unknown = sorted(set(faces["label"]) - set(EXPRESSIONS))
    if unknown:
        raise ValueError(f"{path}: labels {unknown[:5]} are not among {', '.join(EXPRESSIONS)}")
    return faces


def dev_split(files: list[str], labels: list[str], fraction: float = DEV_FRACTION) -> np.ndarray:
    """Boolean mask of the held-out dev faces: within each label, the files whose sha1 ranks in the
    lowest ``fraction`` (stratified, the same on every machine, independent of row order)."""
    files, labels = np.asarray(files), np.asarray(labels)
    mask = np.zeros(len(files), dtype=bool)
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        keys = np.array([hashlib.sha1(f.encode()).hexdigest() for f in files[index]])
        chosen = index[np.argsort(keys, kind="stable")[: int(round(fraction * len(index)))]]
        mask[chosen] = True
    return mask


def face_subset(faces: dict[str, list], subset: str = "all", limit: int | None = None) -> np.ndarray:
    """Row indices of a face set: ``all``, or its ``dev``/``train`` part (:func:`dev_split`), at most
    ``limit`` of them spread evenly (the benches' ``--subset`` and ``--limit``)."""
    keep = np.ones(len(faces["file"]), dtype=bool)
    if subset != "all":
        dev = dev_split(faces["file"], faces["label"])
        keep = dev if subset == "dev" else ~dev
    index = np.flatnonzero(keep)
    if limit and limit < len(index):
        index = index[np.unique(np.linspace(0, len(index) - 1, limit).round().astype(int))]
    return index


def pipeline_face_box(finder, frame: np.ndarray) -> np.ndarray | None:
    """The face mesh box (x0, y0, x1, y1) the behaviour stage would read in a one-frame video: its
    speaker rule on one frame picks the largest face, then the most central."""
    from bemerc.extract.behavior.face import pick_speaker, track_faces

    speaker = pick_speaker(track_faces([finder.find(frame)]), frame.shape[:2])
    return None if speaker is None else speaker.faces[0].box


def cut_crops(images: list[bytes], box_scale: float,
              progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cuts uint8 (N, CUT_SIDE, CUT_SIDE, 3), found bool (N,)): each image through the pipeline's still
    frame, face finder and mesh, then the pipeline's cut (:func:`~bemerc.extract.behavior.expression.cut_face`:
    ``CROP_MARGIN`` times wider than the network's crop)."""
    from bemerc.extract.behavior.face import FaceFinder, square_crop
    from bemerc.extract.media import still_frame

    finder = FaceFinder(max_faces=4, lenient_confidence=TRAIN_LENIENT_CONFIDENCE)
    crops = np.zeros((len(images), CUT_SIDE, CUT_SIDE, 3), dtype=np.uint8)
    found = np.zeros(len(images), dtype=bool)
    for i, data in enumerate(images):
        image = decode_image(data)
        frame = still_frame(image)
        box = pipeline_face_box(finder, frame)
        if box is None:  # train on the whole image instead (the aligned original, unpadded: already about the face box)
            h, w = image.shape[:2]
            centre = np.array([frame.shape[1] / 2, frame.shape[0] / 2])
            crops[i], _ = square_crop(frame, centre, CROP_MARGIN * max(h, w), CUT_SIDE)
        else:
            found[i] = True
            crops[i] = cut_face(frame, box, box_scale)
        if progress and (i + 1) % 500 == 0:
            progress(i + 1)
    finder.close()
    return crops, found


def _cut_part(args: tuple) -> tuple[np.ndarray, np.ndarray]:
    return cut_crops(*args)


def cached_crops(path: str | Path, cache_dir: Path, box_scale: float, limit: int | None, workers: int,
                 say: Callable[[str], None]) -> dict:
    """Faces of one Parquet set with their pipeline crops, cached in ``cache_dir`` by file content,
    crop settings and limit (a rerun reads the cache)."""
    from bemerc.extract.behavior.face import FaceFinder

    faces = read_faces(path, limit)
    key = hashlib.sha256(json.dumps([Path(path).name, Path(path).stat().st_size, box_scale, CROP_MARGIN,
                                     CUT_SIDE, limit, len(faces["file"]), FaceFinder.settings(TRAIN_LENIENT_CONFIDENCE)]).encode()).hexdigest()[:16]
    cache = cache_dir / f"crops-{Path(path).stem}-{key}.npz"
    if cache.is_file():
        saved = np.load(cache)
        say(f"{path}: {len(faces['file'])} faces, crops from {cache}")
        return {**faces, "crops": saved["crops"], "found": saved["found"]}
    start = time.monotonic()
    say(f"{path}: finding {len(faces['file'])} faces with the pipeline's face finder ({workers} processes)")
    images = faces["image"]
    if workers > 1 and len(images) > 200:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        parts = np.array_split(np.arange(len(images)), workers)
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(_cut_part, [([images[i] for i in part], box_scale) for part in parts]))
        crops = np.concatenate([r[0] for r in results])
        found = np.concatenate([r[1] for r in results])
    else:
        crops, found = cut_crops(images, box_scale, progress=lambda n: say(f"  {n}/{len(images)} faces"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, crops=crops, found=found)
    tmp.replace(cache)
    say(f"{path}: face found in {found.mean():.1%} of {len(found)} images ({time.monotonic() - start:.0f} s)")
    return {**faces, "crops": crops, "found": found}


def augment(model_input_side: int, crops, generator, train: bool):
    """uint8 crops (N, S, S, 3) of side CUT_SIDE -> float (N, 3, side, side) in [0, 1]: the centre
    (the pipeline's crop) for eval; for training, a random flip, rotation (+-12 deg), zoom (0.9-1.1) and
    shift (+-6%), brightness/contrast jitter, grey (p 0.2) and one erased rectangle (p 0.5)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float().div_(255.0)
    n = x.shape[0]
    base = 1.0 / CROP_MARGIN
    if train:
        angle = (torch.rand(n, generator=generator) * 2 - 1) * math.radians(12)
        zoom = base * (0.9 + 0.2 * torch.rand(n, generator=generator))
        shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * 0.06 * 2 * base
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    else:
        angle, zoom, shift, flip = torch.zeros(n), torch.full((n,), base), torch.zeros(n, 2), torch.ones(n)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 3, model_input_side, model_input_side), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if train:
        brightness = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * 0.3
        contrast = 1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * 0.3
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean * brightness).clamp_(0, 1)
        grey = torch.rand(n, generator=generator) < 0.2
        x[grey] = x[grey].mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
        erase = torch.rand(n, generator=generator) < 0.5
        side = model_input_side
        for i in torch.nonzero(erase).flatten().tolist():
            h, w = (torch.randint(side // 8, side // 3, (2,), generator=generator)).tolist()
            y0, x0 = torch.randint(0, side - h, (1,), generator=generator).item(), torch.randint(0, side - w, (1,), generator=generator).item()
            x[i, :, y0 : y0 + h, x0 : x0 + w] = torch.rand(3, 1, 1, generator=generator)
    return x


def cut_mix(x, generator):
    """CutMix in place: one random rectangle of every face in the batch ``x`` (N, C, H, W) is replaced by
    the same rectangle of face ``mixed[i]``; returns ``mixed`` and the share of each face left its own."""
    import torch

    n, _, h, w = x.shape
    mixed = torch.randperm(n, generator=generator)
    keep = torch.rand(1, generator=generator).item()  # Beta(1, 1)
    ch, cw = int(h * math.sqrt(1 - keep)), int(w * math.sqrt(1 - keep))
    y0, x0 = torch.randint(0, h - ch + 1, (1,), generator=generator).item(), torch.randint(0, w - cw + 1, (1,), generator=generator).item()
    x[:, :, y0 : y0 + ch, x0 : x0 + cw] = x[mixed, :, y0 : y0 + ch, x0 : x0 + cw].clone()
    return mixed, 1.0 - ch * cw / (h * w)


def scores(labels: np.ndarray, predicted: np.ndarray) -> dict:
    """accuracy, weighted and macro F1, recall per class and the confusion matrix (rows: true) of
    class indices; a prediction of -1 (no face found) is wrong for every score, and left out of the matrix."""
    from sklearn.metrics import confusion_matrix, f1_score

    confusion = confusion_matrix(labels, predicted, labels=list(range(len(EXPRESSIONS))))
    support = np.bincount(labels, minlength=len(EXPRESSIONS))  # every face of a class, found or not (-1)
    recall = np.divide(np.diag(confusion), support, out=np.zeros(len(support)), where=support > 0)
    return {
        "accuracy": float((labels == predicted).mean()) if len(labels) else 0.0,
        "weighted_f1": float(f1_score(labels, predicted, average="weighted", labels=list(range(len(EXPRESSIONS))), zero_division=0)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", labels=list(range(len(EXPRESSIONS))), zero_division=0)),
        "recall": {name: round(float(r), 4) for name, r in zip(EXPRESSIONS, recall)},
        "confusion": confusion.tolist(),
    }


def score_onnx(path: str | Path, cuts: np.ndarray, labels: np.ndarray, found: np.ndarray, input_side: int) -> dict:
    """:func:`scores` of an exported network on labelled faces, run as extraction runs it
    (:class:`~bemerc.extract.behavior.expression.NetExpression`, the pipeline's crop of each cached cut);
    a face the finder missed counts as wrong."""
    from bemerc.extract.behavior.expression import NetExpression

    net = NetExpression(path)
    predicted = np.zeros(len(labels), dtype=int)
    for i in range(0, len(labels), 256):
        crops = np.stack([centre_of_cut(c, input_side) for c in cuts[i : i + 256]])
        predicted[i : i + 256] = net.probabilities_and_embeddings(crops)[0].argmax(1)
    return scores(labels, np.where(found, predicted, -1))


def train_expression(
    rafdb: str | Path,
    out: str | Path,
    fer2013: str | Path | None = None,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    label_smoothing: float = 0.1,
    fer_fraction: float = 0.25,
    ema_decay: float = 0.999,
    cutmix: float = DEFAULT_CUTMIX,
    seed: int = 0,
    limit: int | None = None,
    threads: int = 2,
    dims: ExpressionNetDims | None = None,
    cache_dir: str | Path | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """Train, evaluate on the RAF-DB dev split after every epoch, save the last epoch's weights; returns the metrics.

    ``fer_fraction``: the share of FER2013 train faces drawn (afresh) in each epoch, beside all RAF-DB
    train faces. ``ema_decay``: the scored and saved network is the exponential moving average of the
    trained one's weights (and BatchNorm statistics) over steps. ``cutmix``: the share of batches in which
    a rectangle of each face is replaced by the same rectangle of another face of the batch, the loss
    mixing both labels by area (CutMix). ``limit``: read only N rows of each
    face set, evenly spread (a quick check)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    dims = dims or ExpressionNetDims()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = Path(cache_dir) if cache_dir else out / "cache"
    started = time.monotonic()

    raf = cached_crops(rafdb, cache_dir, dims.box_scale, limit, threads, say)
    raf_labels = np.array([EXPRESSIONS.index(label) for label in raf["label"]])
    is_dev = dev_split(raf["file"], raf["label"])
    raf_x, raf_y = raf["crops"][~is_dev], raf_labels[~is_dev]
    dev_x, dev_y, dev_found = raf["crops"][is_dev], raf_labels[is_dev], raf["found"][is_dev]
    fer_x = fer_y = None
    if fer2013:
        fer = cached_crops(fer2013, cache_dir, dims.box_scale, limit, threads, say)
        fer_x, fer_y = fer["crops"], np.array([EXPRESSIONS.index(label) for label in fer["label"]])
    counts = np.bincount(np.concatenate([raf_y] + ([fer_y] if fer_y is not None else [])), minlength=len(EXPRESSIONS))
    class_weight = torch.tensor((counts.max() / np.maximum(counts, 1)) ** 0.5, dtype=torch.float32)
    class_weight /= (class_weight * torch.tensor(counts / counts.sum(), dtype=torch.float32)).sum()
    say(f"train: {len(raf_y)} RAF-DB + {0 if fer_y is None else int(fer_fraction * len(fer_y))} FER2013 faces per epoch; "
        f"dev: {len(dev_y)} RAF-DB faces ({int((~dev_found).sum())} not found by the face finder)")

    model = ExpressionNet(dims).to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
    optimizer = torch.optim.AdamW(model.param_groups(weight_decay), lr=lr)
    per_epoch = len(raf_y) + (0 if fer_y is None else int(fer_fraction * len(fer_y)))
    steps = epochs * max(1, math.ceil(per_epoch / batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15)
    bf16 = cpu_has_bf16()
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    history, dev = [], None

    def evaluate() -> dict:
        net = ema.module
        net.eval()
        probs = []
        with torch.inference_mode():  # fp32 (a bf16 evaluation read 0.3-0.8 points above the exported network)
            for i in range(0, len(dev_x), 512):
                x = net.standardise(augment(dims.input_side, dev_x[i : i + 512], None, False))
                probs.append(net(x).float().softmax(-1))  # as extraction runs it: the face alone
        probs = torch.cat(probs).numpy() if probs else np.zeros((0, len(EXPRESSIONS)))
        predicted = probs.argmax(1) if len(probs) else np.zeros(0, int)
        predicted = np.where(dev_found, predicted, -1)  # a face the pipeline misses counts as wrong
        return scores(dev_y, predicted)

    for epoch in range(epochs):
        epoch_start = time.monotonic()
        if fer_y is not None:
            pick = rng.choice(len(fer_y), int(fer_fraction * len(fer_y)), replace=False)
            xs, ys = np.concatenate([raf_x, fer_x[pick]]), np.concatenate([raf_y, fer_y[pick]])
        else:
            xs, ys = raf_x, raf_y
        order = rng.permutation(len(ys))
        model.train()
        total, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            index = np.sort(order[i : i + batch_size])
            x = model.standardise(augment(dims.input_side, xs[index], generator, True))
            y = torch.from_numpy(ys[index])
            mixed, share = cut_mix(x, generator) if torch.rand(1, generator=generator).item() < cutmix else (None, 1.0)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = model(x)
            loss = share * torch.nn.functional.cross_entropy(logits.float(), y, weight=class_weight, label_smoothing=label_smoothing)
            if mixed is not None:
                loss = loss + (1 - share) * torch.nn.functional.cross_entropy(
                    logits.float(), y[mixed], weight=class_weight, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            ema.update_parameters(model)
            total += loss.item() * len(index)
            seen += len(index)
        dev = evaluate()
        history.append({"epoch": epoch + 1, "loss": total / max(seen, 1), "seconds": time.monotonic() - epoch_start,
                        **{k: dev[k] for k in ("accuracy", "macro_f1", "weighted_f1", "recall")}})
        say(f"epoch {epoch + 1}/{epochs}: loss {total / max(seen, 1):.3f}, dev accuracy {dev['accuracy']:.3f}, "
            f"macro F1 {dev['macro_f1']:.3f}, min recall {min(dev['recall'].values()):.2f} "
            f"({time.monotonic() - epoch_start:.0f} s; {time.monotonic() - started:.0f} s in all)")

    dev = dev or evaluate()  # the last epoch's scores (0 epochs: the untrained network's)
    facts = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "ema_decay": ema_decay, "cutmix": cutmix,
             "label_smoothing": label_smoothing, "fer_fraction": fer_fraction if fer2013 else 0.0, "limit": limit,
             "train_faces": {"rafdb": int(len(raf_y)), "fer2013": 0 if fer_y is None else int(len(fer_y))},
             "dev": {"set": "rafdb_train dev_split (20%, sha1 of file name, per label)", "faces": int(len(dev_y)),
                     "not_found": int((~dev_found).sum()), **{k: dev[k] for k in ("accuracy", "macro_f1", "weighted_f1", "recall")}},
             "bf16": bf16, "seconds": round(time.monotonic() - started, 1), "torch": torch.__version__}
    save_expression_net(ema.module, out / "expression_net.safetensors", facts)
    export_onnx(ema.module, out / "expression_net.fp32.onnx", facts)
    calibration = raf_x[np.unique(np.linspace(0, len(raf_x) - 1, CALIBRATION_FACES).round().astype(int))]
    quantize_onnx(out / "expression_net.fp32.onnx", out / "expression_net.onnx",
                  np.stack([centre_of_cut(c, dims.input_side) for c in calibration]).astype(np.float32))
    deployed = score_onnx(out / "expression_net.onnx", dev_x, dev_y, dev_found, dims.input_side)
    facts["deployed_dev"] = {"file": "expression_net.onnx (int8)", **{k: deployed[k] for k in ("accuracy", "macro_f1", "weighted_f1", "recall")}}
    metrics = {**facts, "dev_confusion": dev["confusion"], "history": history}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    say(f"wrote {out / 'expression_net.onnx'} (int8; dev accuracy {deployed['accuracy']:.3f}, macro F1 {deployed['macro_f1']:.3f}), "
        f".fp32.onnx and .safetensors (dev accuracy {dev['accuracy']:.3f}, macro F1 {dev['macro_f1']:.3f}; "
        f"{facts['seconds']:.0f} s)")
    return metrics
