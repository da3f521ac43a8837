"""The offline jobs on a Ray cluster (`fer train extract --ray`, `fer eval --ray`): what every job shares.

A job's driver (the `fer` process) joins a cluster, or starts a one-node one, and hands its CPU stage
(decoding) and its model stages to Ray Data: each stage is an actor pool (`map_batches` with an explicit
batch size, `ActorPoolStrategy(size=...)`, `num_gpus`), so every actor loads its model once. Ray is an
optional extra (`pip install -e '.[ray]'`), imported only when a job runs on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from model.settings import ModelSettings

log = logging.getLogger(__name__)

INSTALL_HINT = "--ray needs Ray: pip install -e '.[ray]' (or pip install 'ray[serve,data]>=2.58')"


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide a job runs on Ray."""

    address: str | None = None  # None: RAY_ADDRESS when set, else a one-node cluster on this machine
    actors: int = 1  # actors per model stage (each holds one copy of its model)
    gpus_per_actor: float | None = None  # None: the job's default when the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0  # a model actor's torch threads follow it (Ray sets OMP_NUM_THREADS)
    decoders: int | None = None  # CPU actors decoding inputs; None: two per model actor

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError("--ray-actors must be at least 1")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise ValueError("--ray-gpus must be 0 or more")
        if self.cpus_per_actor <= 0:
            raise ValueError("--ray-cpus must be more than 0")
        if self.decoders is not None and self.decoders < 1:
            raise ValueError("--ray-decoders must be at least 1")

    @property
    def decode_actors(self) -> int:
        return self.decoders or 2 * self.actors

    def gpus(self, share: float) -> float:
        """GPUs per model actor: as asked, else `share` of one when the cluster has GPUs (two model
        stages that would each take a whole GPU would run one after the other on a one-GPU node)."""
        if self.gpus_per_actor is not None:
            return self.gpus_per_actor
        return share if import_ray().cluster_resources().get("GPU", 0) > 0 else 0.0


def import_ray():
    try:
        import ray
        import ray.data  # the jobs' pipelines: a Serve-only install lacks it
    except ImportError:
        raise RuntimeError(INSTALL_HINT) from None
    return ray


@contextmanager
def ray_session(options: RayOptions) -> Iterator[Any]:
    """This process connected to the cluster for the `with` block (the `ray` module as its value).
    A connection that is already there (a notebook, a test) is used and left open; one made here is
    closed after, which stops a one-node cluster started here."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=options.address)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the job's own tqdm bar counts inputs as their results arrive
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def run_remote(fn: Callable, *args, num_gpus: float = 0.0, num_cpus: float = 1.0, **kwargs):
    """`fn(*args, **kwargs)` once, in a Ray task with a model actor's resources (so it sees what the
    actors will see: their device, their files). An error raised by `fn` is raised here as itself, so a
    missing model file is one line at the command, not a remote traceback. (Ray ends the worker of a
    task given a GPU after the task, which gives its GPU memory back before the actors start.)"""
    ray = import_ray()
    task = ray.remote(num_gpus=num_gpus, num_cpus=num_cpus)(fn)
    try:
        return ray.get(task.remote(*args, **kwargs))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, Exception):
            raise cause from None
        raise


def chunk_ranges(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) cut into consecutive ranges of `size` (the last one shorter)."""
    if size < 1:
        raise ValueError("the batch size must be at least 1")
    return [(i, min(i + size, stop)) for i in range(start, stop, size)]


def for_workers(settings: ModelSettings) -> ModelSettings:
    """The settings with their relative paths made absolute: a Ray worker does not run in the driver's
    folder (on a real cluster, the paths must also be the same on every node: a shared mount)."""
    update: dict = {"weights_dir": Path(settings.weights_dir).resolve()}
    for name in ("clip_weights", "projection"):
        value = getattr(settings, name)
        if value and Path(value).is_file():
            update[name] = str(Path(value).resolve())
    return settings.model_copy(update=update)


def ragged(arrays: list[np.ndarray]) -> np.ndarray:
    """One array per row, of different lengths: a column Ray Data keeps as variable-shaped tensors."""
    column = np.empty(len(arrays), dtype=object)
    column[:] = arrays
    return column


def block_rows(columns: dict[str, np.ndarray]) -> list[dict]:
    """A block from `iter_batches(batch_format="numpy")` as one dict per row."""
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
