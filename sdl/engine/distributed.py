"""Where pool chunks run: in this process, or on a Dask cluster (dask.distributed).

Why: featurising a crystal pool with a pretrained backbone costs ~35 crystals/s per core, and
scoring it with a head is cheap but grows with the pool; both are embarrassingly parallel over
chunks of candidates. :class:`DaskCompute` sends such chunks to a ``dask.distributed`` cluster: a
``LocalCluster`` of worker processes on this machine (``compute: {dask: local, workers: N}`` in
the campaign YAML), or a running scheduler (``dask: tcp://host:8786``, or ``--dask ADDRESS`` on
``sdl run`` / ``sdl model evaluate`` / ``sdl benchmark``) whose workers run ``dask worker``.

What travels: featurising sends structure texts and the backbone's name (each worker process
loads the backbone once and keeps it); scoring sends the fitted head once per round (a GP as its
cached Cholesky factor, :class:`sdl.engine.models.gp.GPPredictor`, or the MLP members) and the
pool's head inputs once per pool (scattered, then reused by every round). Results come back per
chunk and are merged as they arrive (:func:`score_pool`): the shortlist is a streaming top-k, so
no step holds more than one chunk's posterior at a time.

The engine does not own a :class:`DaskCompute`: whoever makes one (the CLI, a benchmark, a test)
closes it; one made from a campaign's YAML closes itself when it is garbage collected or at exit.
"""

from __future__ import annotations

import concurrent.futures
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

# Worker threads import these lazily otherwise, and scipy's lazy submodule import can race
# between threads ("module 'scipy' has no attribute '_lib'"): import them once, at module load.
import scipy.linalg
import scipy.sparse
import scipy.spatial
import scipy.special
import torch

from sdl.engine.optim import StreamingTopK
from sdl.exceptions import EngineError

if TYPE_CHECKING:
    from distributed import Client

__all__ = ["ComputeError", "DaskCompute", "PoolScores", "check_address", "compute_from_config", "predict_members",
           "score_pool"]

logger = logging.getLogger(__name__)

_PRELOADED = (scipy.linalg, scipy.sparse, scipy.spatial, scipy.special)

LOCAL = "local"
DEFAULT_CHUNK = 8192
CONNECT_TIMEOUT_S = 10.0


class ComputeError(EngineError):
    """The Dask cluster cannot be started or reached; the message names the address."""


class DaskCompute:
    """Pool chunks on a ``dask.distributed`` cluster: a ``LocalCluster`` or a scheduler address.

    Connects (or starts the local cluster) at the first use, not in the constructor, so building
    an engine stays cheap; :meth:`connect` does it now (the CLI calls it to fail early).

    Args:
        address: ``local`` (or None) for a ``LocalCluster`` on this machine, else a scheduler
            address (``tcp://host:8786``; ``host:8786`` means tcp).
        workers: Worker processes of the local cluster (ignored with an address).
        threads_per_worker: Threads per local worker (one: each worker is one core for torch).
        processes: Local workers as processes (True) or threads of this process (tests).
        chunk: Candidates per task.
        connect_timeout: Seconds to wait for a scheduler before giving up.
    """

    def __init__(
        self, address: str | None = None, *, workers: int = 2, threads_per_worker: int = 1, processes: bool = True,
        chunk: int = DEFAULT_CHUNK, connect_timeout: float = CONNECT_TIMEOUT_S,
    ) -> None:
        address = (address or LOCAL).strip()
        if address != LOCAL and "://" not in address:
            address = f"tcp://{address}"
        self.address = address
        self.workers = max(1, int(workers))
        self.threads_per_worker = max(1, int(threads_per_worker))
        self.processes = bool(processes)
        self.chunk = max(1, int(chunk))
        self.connect_timeout = float(connect_timeout)
        self._client: Client | None = None
        self._cluster: Any = None
        self._scattered: dict[int, tuple[Any, list[tuple[int, int, Any]]]] = {}
        self._finalizer: weakref.finalize[Any, DaskCompute] | None = None
        self._lock = threading.Lock()  # the flow's worker threads may be first to use it at once

    def __repr__(self) -> str:
        where = f"LocalCluster(workers={self.workers})" if self.is_local else self.address
        return f"DaskCompute({where}, chunk={self.chunk})"

    def __enter__(self) -> DaskCompute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_local(self) -> bool:
        """True for a ``LocalCluster`` started (and closed) by this object."""
        return self.address == LOCAL

    @property
    def connected(self) -> bool:
        """True while a client is connected (after :meth:`connect` or the first use)."""
        return self._client is not None

    @property
    def client(self) -> Client:
        """The connected ``distributed.Client`` (started or connected on first use)."""
        if self._client is None:
            self.connect()
        assert self._client is not None
        return self._client

    def connect(self) -> DaskCompute:
        """Start the local cluster or connect to the scheduler now.

        Raises:
            ComputeError: The scheduler does not answer within ``connect_timeout`` (names the address),
                or the local cluster cannot start.
        """
        with self._lock:
            if self._client is None:
                self._connect()
        return self

    def _connect(self) -> None:
        from distributed import Client, LocalCluster

        t0 = time.perf_counter()
        try:
            if self.is_local:
                self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=self.threads_per_worker,
                                             processes=self.processes, dashboard_address=":0",
                                             silence_logs=logging.WARNING)
                self._client = Client(self._cluster)
            else:
                _probe(self.address, self.connect_timeout)  # a refused port fails now, not after the timeout
                self._client = Client(self.address, timeout=f"{self.connect_timeout}s")
        except (OSError, TimeoutError, ValueError, RuntimeError) as exc:  # RuntimeError: a nanny did not start
            self.close()
            what = "cannot start a local Dask cluster" if self.is_local else (
                f"cannot reach the Dask scheduler at {self.address}")
            raise ComputeError(f"{what}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
        self._finalizer = weakref.finalize(self, _close, self._client, self._cluster)
        n = len(self._client.scheduler_info(n_workers=-1).get("workers", {}))
        logger.info("dask: %s with %d worker(s) ready in %.1f s", self, n, time.perf_counter() - t0)

    def n_workers(self) -> int:
        """Workers the scheduler knows now."""
        return len(self.client.scheduler_info(n_workers=-1).get("workers", {}))

    def executor(self) -> concurrent.futures.Executor:
        """A ``concurrent.futures`` executor over the cluster (``map`` keeps the input order)."""
        executor: concurrent.futures.Executor = self.client.get_executor()
        return executor

    def close(self) -> None:
        """Close the client (and the local cluster); later use reconnects."""
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None
        else:
            _close(self._client, self._cluster)
        self._client = self._cluster = None
        self._scattered.clear()

    # -- chunks ------------------------------------------------------------------------------
    def _pool_chunks(self, X: torch.Tensor) -> list[tuple[int, int, Any]]:
        """``(start, stop, future)`` of ``X``'s chunks on the workers, scattered once per tensor."""
        held = self._scattered.get(id(X))
        if held is not None and held[0] is X:
            return held[1]
        bounds = [(s, min(s + self.chunk, X.shape[0])) for s in range(0, X.shape[0], self.chunk)]
        futures = self.client.scatter([X[s:e].contiguous() for s, e in bounds], hash=False)
        parts = [(s, e, f) for (s, e), f in zip(bounds, futures, strict=True)]
        self._scattered = {id(X): (X, parts)}  # the latest pool only: an old one is released
        return parts

    def map_pool(self, fn: Callable[[Any, torch.Tensor], Any], shared: Any, X: torch.Tensor) -> Iterator[
            tuple[int, int, Any]]:
        """``(start, stop, fn(shared, X[start:stop]))`` per chunk of ``X``, in the order they finish.

        ``shared`` (a fitted head) is sent to every worker once; ``X`` (the pool's inputs) stays
        on the workers between calls with the same tensor.
        """
        from distributed import as_completed

        client = self.client
        parts = self._pool_chunks(X)
        [model] = client.scatter([shared], broadcast=True, hash=False)
        futures = {client.submit(fn, model, f, pure=False): (s, e) for s, e, f in parts}
        for fut in as_completed(futures):
            s, e = futures[fut]
            yield s, e, fut.result()


def _probe(address: str, timeout: float) -> None:
    """Open and close a TCP connection to a ``tcp://host:port`` scheduler (other schemes: nothing)."""
    from urllib.parse import urlsplit

    parts = urlsplit(address)
    if parts.scheme != "tcp" or parts.hostname is None or parts.port is None:
        return
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout):
        pass


def _close(client: Any, cluster: Any) -> None:
    for thing in (client, cluster):
        if thing is not None:
            try:
                thing.close()
            except Exception as exc:  # noqa: BLE001 - closing at exit must not raise
                logger.debug("dask: closing %r failed: %s", thing, exc)


_SHARED: dict[tuple[str, int, int], DaskCompute] = {}


def compute_from_config(compute: Any, address: str | None = None) -> DaskCompute | None:
    """The process's :class:`DaskCompute` for a ``compute:`` block and an address override, or None.

    One per ``(address, workers, chunk)`` and process: the engines a run builds (the CLI's
    featuriser, then the campaign flow's) share one local cluster instead of starting two.

    Args:
        compute: ``sdl.config.Compute`` (``dask``, ``workers``, ``chunk``) or None.
        address: ``--dask`` / ``SDL_DASK_ADDRESS``: wins over ``compute.dask``.
    """
    where = address or (getattr(compute, "dask", None) if compute is not None else None)
    if not where:
        return None
    key = (str(where), int(getattr(compute, "workers", 2) or 2), int(getattr(compute, "chunk", DEFAULT_CHUNK)
                                                                     or DEFAULT_CHUNK))
    if key not in _SHARED:
        _SHARED[key] = DaskCompute(key[0], workers=key[1], chunk=key[2])
    return _SHARED[key]


def check_address(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Connect to the scheduler at ``address`` and hang up (``local`` needs no check).

    Raises:
        ComputeError: Not reachable within ``timeout`` s; the message names the address.
    """
    probe = DaskCompute(address, connect_timeout=timeout)
    if probe.is_local:
        return
    probe.connect().close()


# -- scoring ------------------------------------------------------------------------------------
Predictor = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ShortlistScore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class PoolScores:
    """Posterior mean and std of every pool row, and the shortlist of the available ones.

    Attributes:
        mean: ``[N]`` posterior mean (raw units). std: ``[N]`` posterior std.
        shortlist: Available rows to run the acquisition on: all of them in row order when they
            are at most ``k``, else the ``k`` best by the shortlist score (best first, ties by row).
    """

    mean: torch.Tensor
    std: torch.Tensor
    shortlist: np.ndarray


def _predict_chunk(predict: Predictor, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's mean and std (runs on a worker; Dask's nanny starts it with one BLAS thread)."""
    return predict(X)


def score_pool(
    predict: Predictor, X: torch.Tensor, avail: np.ndarray, score: ShortlistScore, k: int, *,
    compute: DaskCompute | None = None, chunk: int = DEFAULT_CHUNK,
) -> PoolScores:
    """Score every pool row in chunks (here or on the cluster) and stream the shortlist's top-k.

    Args:
        predict: ``X_chunk -> (mean, std)`` (a :class:`~sdl.engine.models.gp.GPPredictor`, ...).
        X: ``[N, d]`` acquisition inputs of the pool.
        avail: Rows that may be proposed (sorted).
        score: ``(mean, std) -> [c]`` shortlist score of a chunk (higher is better).
        k: Shortlist size.
        compute: The cluster; None scores in this process.
        chunk: Rows per chunk in this process (the cluster uses its own ``chunk``).
    """
    n = X.shape[0]
    mean = torch.empty(n, dtype=torch.float64)
    std = torch.empty(n, dtype=torch.float64)
    mask = np.zeros(n, dtype=bool)
    mask[avail] = True
    top = StreamingTopK(k)
    parts: Iterator[tuple[int, int, Any]]
    if compute is not None:
        parts = compute.map_pool(_predict_chunk, predict, X)
    else:
        parts = ((s, min(s + chunk, n), predict(X[s : s + chunk])) for s in range(0, n, chunk))
    for s, e, (m, sd) in parts:
        mean[s:e], std[s:e] = m, sd
        rows = np.nonzero(mask[s:e])[0]
        if rows.size and avail.size > k:
            t = torch.as_tensor(rows)
            top.add(rows + s, score(m[t], sd[t]))
    shortlist = avail if avail.size <= k else top.rows()
    return PoolScores(mean, std, shortlist)


def _members_chunk(heads: Any, X: torch.Tensor) -> torch.Tensor:
    """``[M, c]`` member predictions of one chunk (runs on a worker)."""
    out: torch.Tensor = heads.predict_members(X)
    return out


def predict_members(heads: Any, X: torch.Tensor, compute: DaskCompute | None) -> torch.Tensor:
    """``[M, N]`` predictions of a fitted head ensemble, in chunks on ``compute`` (here when None)."""
    if compute is None:
        out: torch.Tensor = heads.predict_members(X)
        return out
    parts = sorted(compute.map_pool(_members_chunk, heads, X), key=lambda p: p[0])
    return torch.cat([p[2] for p in parts], dim=1)
