"""Extraction on a Ray cluster: Ray Data ``map_batches`` over an actor pool, rows written by the driver.

:func:`bemerc.extract.run.run_extractor` decides what to compute (utterances that lack the feature
set), writes rows in flushes and records failures, whatever computes them. With
``engine=RayEngine(...)``:

- the work becomes a Ray Dataset of utterances; ``map_batches`` runs it on a pool of ``workers``
  actors, each of which builds the extractor once (``num_gpus`` per actor when asked) and checks that
  it computes the same feature set (config hash) as the driver;
- results stream back to the driver as they finish; the driver alone commits them to the store, so
  keys are never written twice, whatever the store is (a local folder, ``s3://...``);
- a worker that dies is restarted by Ray and its batch is run again (Ray Data's actor pool retries by
  default); each utterance's result reaches the driver once.

Media are read by the workers: an object URI (``s3://...``) is downloaded by the worker that extracts
it (:func:`bemerc.extract.media.local_media`); a local path must be on a filesystem every node mounts
at the same place (the failure says so when a worker cannot find the file).

>>> engine = RayEngine(ExtractorRecipe("behavior", "offline"), workers=4, address="auto")  # doctest: +SKIP
>>> run_extractor(Store("s3://bucket/store"), build_extractor("behavior"), engine=engine)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import socket
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from bemerc.extract.base import Extractor, UtteranceMedia, config_hash, uses_gpu
from bemerc.extract.media import MediaError
from bemerc.precision import DEFAULT_PRECISION

FIELDS = ("uid", "text", "video_path", "audio_path", "start_s", "end_s")
# Environment the workers need to find models offline and media on object storage, passed to a cluster
# this engine connects to. Secrets (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...) are not: Ray shows a
# job's runtime environment in its dashboard; give the nodes credentials (an instance role, their env).
WORKER_ENV_PREFIXES = ("BEMERC_", "HF_", "TRANSFORMERS_", "OMP_", "KMP_")
WORKER_ENV_NAMES = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ALLOW_HTTP")


@dataclass(frozen=True)
class ExtractorRecipe:
    """How a worker builds the extractor: ``build_extractor(modality, profile, device, precision)`` (a
    profile name, a TOML path or a loaded :class:`~bemerc.models.profiles.Profile`). Small and picklable.
    The driver passes the precision it resolved (``fp32`` or ``bf16``), so every worker computes the
    driver's feature set whatever its own hardware."""

    modality: str
    profile: object = None
    device: str | None = None
    precision: str = DEFAULT_PRECISION

    def __call__(self) -> Extractor:
        from bemerc.extract.factory import build_extractor

        return build_extractor(self.modality, self.profile, self.device, self.precision)


def actor_gpus(gpu_capable: bool, requested: float | None, cluster_gpus: float, device: str | None = None) -> float:
    """GPUs each actor asks Ray for: ``requested`` when given; else (auto) 1 for an extractor whose
    models run on a GPU (:func:`~bemerc.extract.base.uses_gpu`) when the cluster has GPUs and the
    device is not ``cpu``, 0 otherwise.

    >>> actor_gpus(True, None, cluster_gpus=8), actor_gpus(False, None, 8), actor_gpus(True, None, 0)
    (1.0, 0.0, 0.0)
    >>> actor_gpus(True, 0.5, 8), actor_gpus(True, None, 8, device="cpu")
    (0.5, 0.0)
    """
    if requested is not None:
        return float(requested)
    return 1.0 if gpu_capable and cluster_gpus >= 1 and device != "cpu" else 0.0


class ExtractActor:
    """One Ray actor: builds the extractor once, then turns batches of utterances into results.

    Output batch: ``uid`` and ``result`` (pickled ``("row", dict)`` or ``("error", reason)``), so rows
    of any extractor travel as they are and failures stay failures.
    """

    def __init__(self, build: Callable[[], Extractor], feature_set_hash: str):
        import bemerc  # noqa: F401  (the OpenMP wait policy, before any model library loads)

        self.extractor = build()
        self.host = socket.gethostname()
        found = config_hash(self.extractor)
        if found != feature_set_hash:
            raise RuntimeError(
                f"Ray worker on {self.host} builds {self.extractor.modality} extractor {self.extractor.name} with "
                f"config hash {found}, the driver {feature_set_hash}: install the same bemerc, packages and models "
                "on every node"
            )

    def __call__(self, batch: pa.Table) -> pa.Table:
        items = [UtteranceMedia(**row) for row in batch.select(list(FIELDS)).to_pylist()]
        results = []
        for item, result in zip(items, self.extractor.extract(items)):
            if isinstance(result, MediaError):
                reason = result.reason
                if reason == "file not found":
                    reason += f" on Ray worker {self.host} (media on a local path must be on a filesystem every worker mounts)"
                results.append(pickle.dumps(("error", reason)))
            else:
                results.append(pickle.dumps(("row", result)))
        return pa.table({"uid": [i.uid for i in items], "result": pa.array(results, pa.binary())})


class RayEngine:
    """Compute extractor results on Ray: ``engine(extractor, items, batch_size)`` yields lists of
    ``(item, row dict | MediaError)`` as batches finish, in any order.

    ``build`` makes the extractor on each actor (an :class:`ExtractorRecipe`); ``workers`` is the actor
    pool size; each actor asks for ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs (None: see
    :func:`actor_gpus`; an actor with a GPU runs its model on ``cuda``, one without on the CPU). ``address``
    is passed to ``ray.init`` when Ray is not initialised yet (``"auto"``: the cluster this node
    belongs to; ``"ray://head:10001"``: a remote cluster; None: a local one on this machine).
    """

    def __init__(
        self,
        build: Callable[[], Extractor],
        workers: int = 1,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float | None = None,
    ):
        self.build = build
        self.workers = workers
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker

    def connect(self) -> None:
        """``ray.init`` unless Ray is running in this process; workers get the model-related environment."""
        import ray

        if ray.is_initialized():
            return
        env = {k: v for k, v in os.environ.items() if k.startswith(WORKER_ENV_PREFIXES) or k in WORKER_ENV_NAMES}
        with warnings.catch_warnings():  # Ray's processes start with a fork; the driver keeps no LanceDB work in flight
            warnings.filterwarnings("ignore", message="lancedb fork support")
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING,
                     runtime_env={"env_vars": env} if self.address else None)

    def __call__(
        self, extractor: Extractor, items: list[UtteranceMedia], batch_size: int
    ) -> Iterator[list[tuple[UtteranceMedia, dict | MediaError]]]:
        if not items:
            return
        import ray

        self.connect()
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver shows one bar per modality
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        capable = uses_gpu(extractor)
        gpus = actor_gpus(capable, self.gpus_per_worker, ray.cluster_resources().get("GPU", 0.0), getattr(self.build, "device", None))
        build = self.build
        if isinstance(build, ExtractorRecipe) and capable:  # the actor's device follows its GPUs
            build = dataclasses.replace(build, device="cuda" if gpus > 0 else "cpu")
        self.gpus_used = gpus
        by_uid = {item.uid: item for item in items}
        rows = [{field: getattr(item, field) for field in FIELDS} for item in items]
        # One block per batch, and batches small enough that every worker gets some.
        per_batch = max(1, min(batch_size, -(-len(rows) // self.workers)))
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // per_batch))).map_batches(
            ExtractActor,
            fn_constructor_kwargs={"build": build, "feature_set_hash": config_hash(extractor)},
            batch_size=per_batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=self.workers),
            num_cpus=self.cpus_per_worker,
            num_gpus=gpus or None,
        )
        for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            done = []
            for uid, payload in zip(batch["uid"].to_pylist(), batch["result"].to_pylist()):
                kind, value = pickle.loads(payload)
                done.append((by_uid[uid], value if kind == "row" else MediaError(uid, value)))
            yield done
