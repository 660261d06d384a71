"""An ensemble of M crystal GNNs: seeds, bootstrap resamples, early stopping, warm start.

Why an ensemble: the spread of M independently trained networks is the uncertainty the
acquisition spends experiments on (Tran et al. 2020 found it the best-ranked cheap UQ for
CGCNN). Members differ by seed (init, shuffling, validation split) and by a bootstrap resample
of the training rows. Each member stops early on its own validation split and keeps its best
weights. On a re-fit (new measurements in a campaign) each member starts from its previous
weights *and keeps its previous target normaliser* (the weights only mean something with it),
which reaches the same loss in far fewer epochs; the validation split and bootstrap resample of
a member depend only on ``(seed, member, N)``, so a re-fit on the same data sees the same split.

Shapes and units: :meth:`GNNEnsemble.predict_members` returns ``[M, N]`` float64 in target
units; this matrix is what the BoTorch ``EnsembleModel`` looks up. The network mean-pools its
atoms, so it models an intensive target; an extensive one is divided by the atoms per cell by
the caller (:mod:`sdl.engine.models.extensive`). The members' spread is scaled by one factor fitted on
their out-of-bag predictions (:func:`sdl.engine.models.pretrained.oob_calibration`), which are also
the held-out predictions the round's uncertainty metrics come from.
Everything is deterministic under ``seed`` on CPU (``index_add_`` on CPU is deterministic).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from sdl.engine.graphs import CrystalGraph, CrystalGraphConverter, PackedGraphs
from sdl.engine.models.gnn import CrystalGNN
from sdl.engine.models.pretrained import HeldOut, oob_calibration, scale_spread

__all__ = ["EnsembleOptions", "FitReport", "GNNEnsemble"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "sdl.gnn-ensemble/2"  # 2: intensive outputs (no per-atom scaling inside)


@dataclass(frozen=True)
class EnsembleOptions:
    """Hyperparameters of :class:`GNNEnsemble` (mirrors ``sdl.config.GNNEnsembleOptions``)."""

    members: int = 5
    hidden: int = 64
    layers: int = 3
    cutoff: float = 6.0
    max_neighbors: int = 12
    rbf: int = 40
    epochs: int = 150
    patience: int = 20
    learning_rate: float = 2e-3
    batch_size: int = 64
    validation_fraction: float = 0.1
    bootstrap: bool = True
    warm_start: bool = True

    @classmethod
    def from_any(cls, options: Any | None) -> EnsembleOptions:
        """Read the known fields from any object (pydantic model, namespace, dict); defaults otherwise."""
        if options is None:
            return cls()
        if isinstance(options, EnsembleOptions):
            return options
        values: dict[str, Any] = {}
        for name in cls.__dataclass_fields__:
            if isinstance(options, dict):
                if name in options:
                    values[name] = options[name]
            elif hasattr(options, name):
                values[name] = getattr(options, name)
        opts = cls(**values)
        if opts.members < 1:
            raise ValueError(f"GNNEnsemble: members must be >= 1, got {opts.members=}")
        if not 0.0 <= opts.validation_fraction < 1.0:
            raise ValueError(f"GNNEnsemble: validation_fraction must be in [0, 1), got {opts.validation_fraction=}")
        return opts


@dataclass
class FitReport:
    """What :meth:`GNNEnsemble.fit` did, per member (for logs and the model version's metrics)."""

    n: int
    warm_start: bool
    seconds: float
    graph_seconds: float
    epochs_run: list[int] = field(default_factory=list)
    best_epoch: list[int] = field(default_factory=list)
    best_val_mae: list[float] = field(default_factory=list)
    initial_val_mae: list[float] = field(default_factory=list)
    stopped_by_time: list[bool] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able copy."""
        return asdict(self)


class GNNEnsemble:
    """M :class:`~sdl.engine.models.gnn.CrystalGNN` members over periodic crystal graphs.

    Args:
        options: ``sdl.config.GNNEnsembleOptions`` or any object with its fields; None = defaults.
        seed: Base seed; member m uses a seed derived from ``(seed, m)``.
        converter: Graph converter to share (its cache); built from ``options`` when None.
    """

    def __init__(
        self, options: Any | None = None, seed: int = 0, converter: CrystalGraphConverter | None = None
    ) -> None:
        self.options = EnsembleOptions.from_any(options)
        self.seed = int(seed)
        self.converter = converter or CrystalGraphConverter(
            cutoff=self.options.cutoff, max_neighbors=self.options.max_neighbors, num_rbf=self.options.rbf
        )
        self.members: list[CrystalGNN] = []
        self.mu = 0.0
        self.sigma = 1.0
        self.n_fits = 0
        self.spread_scale = 1.0
        self.held_out: HeldOut | None = None

    def __repr__(self) -> str:
        o = self.options
        return (
            f"GNNEnsemble(members={o.members}, hidden={o.hidden}, layers={o.layers}, seed={self.seed}, "
            f"fitted={bool(self.members)}, {self.converter!r})"
        )

    @property
    def is_fitted(self) -> bool:
        """True once :meth:`fit` (or :meth:`from_state`) gave the members weights."""
        return bool(self.members)

    def _new_member(self, member_seed: int) -> CrystalGNN:
        o = self.options
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(member_seed)
            return CrystalGNN(hidden=o.hidden, layers=o.layers, cutoff=o.cutoff, num_rbf=o.rbf)

    def _member_seed(self, m: int) -> int:
        # Fixed per member across re-fits: the same data give the same split and resample.
        return self.seed * 1_000_003 + 7919 * (m + 1)

    def graphs(self, structures: Sequence[Any], keys: Sequence[Hashable] | None = None) -> list[CrystalGraph]:
        """Graphs for structures (cached per key)."""
        return self.converter.convert_many(structures, keys)

    def fit(
        self,
        structures: Sequence[Any],
        y: Any,
        keys: Sequence[Hashable] | None = None,
        *,
        epochs: int | None = None,
        time_budget_s: float | None = None,
    ) -> FitReport:
        """Train (or warm-start re-train) every member.

        Args:
            structures: pymatgen Structures or :class:`CrystalGraph` objects, ``N`` of them.
            y: ``[N]`` targets (tensor, array or list), in target units (e.g. eV per cell).
            keys: Candidate ids for the graph cache.
            epochs: Override ``options.epochs`` for this fit.
            time_budget_s: Wall-clock budget for the whole fit, shared equally by the members;
                a member that runs out stops and keeps its best weights so far.
        """
        o = self.options
        y_t = torch.tensor(np.asarray(y, dtype=np.float64)).reshape(-1)
        if y_t.shape[0] != len(structures):
            raise ValueError(f"GNNEnsemble.fit: {len(structures)=} but y has {y_t.shape[0]} values")
        if y_t.shape[0] < 2:
            raise ValueError(f"GNNEnsemble.fit: need at least 2 training points, got {y_t.shape[0]}")
        if not torch.isfinite(y_t).all():
            raise ValueError("GNNEnsemble.fit: y contains NaN or infinite values")
        t0 = time.perf_counter()
        packed = PackedGraphs(self.graphs(structures, keys))
        graph_s = time.perf_counter() - t0
        warm = bool(o.warm_start and self.members)
        if not warm:
            self.mu = float(y_t.mean())
            self.sigma = float(y_t.std()) if y_t.shape[0] > 1 and float(y_t.std()) > 1e-8 else 1.0
        target = ((y_t - self.mu) / self.sigma).float()
        n_epochs = int(epochs if epochs is not None else o.epochs)
        report = FitReport(n=int(y_t.shape[0]), warm_start=warm, seconds=0.0, graph_seconds=graph_s)
        budget = None if time_budget_s is None else max(0.0, time_budget_s - graph_s) / o.members
        new_members: list[CrystalGNN] = []
        n = y_t.shape[0]
        oob = torch.zeros(o.members, n, dtype=torch.bool)
        for m in range(o.members):
            if warm and m < len(self.members):
                net = copy.deepcopy(self.members[m])
            else:
                net = self._new_member(self._member_seed(m))
            trained_on = self._train_member(net, m, packed, target, y_t, n_epochs, budget, report)
            oob[m] = True
            oob[m, trained_on] = False
            new_members.append(net)
        self.members = new_members
        train_preds = self._raw_predictions(packed, 1024)
        self.spread_scale, self.held_out = oob_calibration(y_t, train_preds, oob)
        self.n_fits += 1
        report.seconds = time.perf_counter() - t0
        logger.info(
            "fit %d members on %d crystals in %.1f s (graphs %.1f s), epochs %s, best val MAE %s",
            o.members, report.n, report.seconds, graph_s, report.epochs_run,
            [round(v, 4) for v in report.best_val_mae],
        )
        return report

    def _train_member(
        self,
        net: CrystalGNN,
        m: int,
        packed: PackedGraphs,
        target: torch.Tensor,
        y: torch.Tensor,
        n_epochs: int,
        budget: float | None,
        report: FitReport,
    ) -> torch.Tensor:
        """Train one member; returns the rows it trained on (the rest are its out-of-bag rows)."""
        o = self.options
        n = target.shape[0]
        gen = torch.Generator().manual_seed(self._member_seed(m))
        perm = torch.randperm(n, generator=gen)
        n_val = round(o.validation_fraction * n) if n >= 10 else 0
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        if o.bootstrap and train_idx.shape[0] > 1:
            train_idx = train_idx[torch.randint(train_idx.shape[0], (train_idx.shape[0],), generator=gen)]
        if n_val == 0:
            val_idx = torch.unique(train_idx)
        val_batch = packed.batch(val_idx)
        opt = torch.optim.AdamW(net.parameters(), lr=o.learning_rate, weight_decay=1e-5)
        best = float("inf")
        best_state = copy.deepcopy(net.state_dict())
        best_epoch = 0
        epochs_run = 0
        by_time = False
        t_start = time.perf_counter()
        bs = max(1, int(o.batch_size))
        initial = self._val_mae(net, val_batch, y[val_idx])
        report.initial_val_mae.append(initial)
        if report.warm_start:
            best = initial  # a warm start keeps its previous weights unless training beats them
        for epoch in range(1, n_epochs + 1):
            # Cosine decay over the run; with a time budget, over whichever ends first (epochs or
            # time), so a budget-limited fit still anneals. (Time-aware = not bit-reproducible.)
            progress = (epoch - 1) / n_epochs
            if budget is not None and budget > 0:
                progress = max(progress, (time.perf_counter() - t_start) / budget)
            lr = o.learning_rate * (0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))
            for group in opt.param_groups:
                group["lr"] = lr
            net.train()
            order = train_idx[torch.randperm(train_idx.shape[0], generator=gen)]
            for start in range(0, order.shape[0], bs):
                idx = order[start : start + bs]
                batch = packed.batch(idx)
                loss = torch.nn.functional.l1_loss(net(batch), target[idx])
                opt.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                opt.step()
            epochs_run = epoch
            val = self._val_mae(net, val_batch, y[val_idx])
            logger.debug("member %d epoch %d: val MAE %.4f, lr %.2e", m, epoch, val, opt.param_groups[0]["lr"])
            if val < best - 1e-7:
                best, best_epoch = val, epoch
                best_state = copy.deepcopy(net.state_dict())
            if epoch - best_epoch >= o.patience:
                break
            if budget is not None and time.perf_counter() - t_start > budget:
                by_time = True
                break
        net.load_state_dict(best_state)
        net.eval()
        report.epochs_run.append(epochs_run)
        report.best_epoch.append(best_epoch)
        report.best_val_mae.append(float(best))
        report.stopped_by_time.append(by_time)
        logger.info("member %d: %d epochs, best %d, val MAE %.4f, %.1f s", m, epochs_run, best_epoch, best,
                    time.perf_counter() - t_start)
        trained_on: torch.Tensor = torch.unique(train_idx)
        return trained_on

    def _val_mae(self, net: CrystalGNN, batch: Any, y: torch.Tensor) -> float:
        net.eval()
        with torch.no_grad():
            pred = self.mu + self.sigma * net(batch).double()
        return float((pred - y).abs().mean())

    def predict_members(
        self, structures: Sequence[Any], keys: Sequence[Hashable] | None = None, batch_size: int = 1024
    ) -> torch.Tensor:
        """Every member's prediction, ``[M, N]`` float64 in target units.

        Args:
            structures: Structures or graphs, ``N`` of them.
            keys: Candidate ids for the graph cache.
            batch_size: Crystals per forward pass (bounds memory for large pools).
        """
        if not self.members:
            raise RuntimeError("GNNEnsemble.predict_members called before fit()")
        return scale_spread(self._raw_predictions(PackedGraphs(self.graphs(structures, keys)), batch_size),
                            self.spread_scale)

    def _raw_predictions(self, packed: PackedGraphs, batch_size: int) -> torch.Tensor:
        n = len(packed)
        out = torch.empty(len(self.members), n, dtype=torch.float64)
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = torch.arange(start, min(n, start + batch_size))
                batch = packed.batch(idx)
                for m, net in enumerate(self.members):
                    net.eval()
                    out[m, start : start + idx.shape[0]] = self.mu + self.sigma * net(batch).double()
        return out

    def predict(
        self, structures: Sequence[Any], keys: Sequence[Hashable] | None = None, batch_size: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ensemble mean and standard deviation (over members, unbiased), each ``[N]`` float64."""
        preds = self.predict_members(structures, keys, batch_size)
        std = preds.std(dim=0) if preds.shape[0] > 1 else torch.zeros(preds.shape[1], dtype=preds.dtype)
        return preds.mean(dim=0), std

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint: constructor arguments + normaliser + every member's weights."""
        return {
            "format": CHECKPOINT_FORMAT,
            "options": asdict(self.options),
            "seed": self.seed,
            "converter": self.converter.as_dict(),
            "normalizer": {"mu": self.mu, "sigma": self.sigma, "spread_scale": self.spread_scale},
            "n_fits": self.n_fits,
            "model_args": self.members[0].model_args if self.members else None,
            "members": [net.state_dict() for net in self.members],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> GNNEnsemble:
        """Rebuild an ensemble saved by :meth:`state_dict`."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"GNNEnsemble.from_state: unknown checkpoint format {state.get('format')!r}")
        ens = cls(
            EnsembleOptions(**state["options"]),
            seed=state["seed"],
            converter=CrystalGraphConverter(**state["converter"]),
        )
        ens.mu = float(state["normalizer"]["mu"])
        ens.sigma = float(state["normalizer"]["sigma"])
        ens.spread_scale = float(state["normalizer"].get("spread_scale", 1.0))
        ens.n_fits = int(state.get("n_fits", 1))
        for sd in state["members"]:
            net = ens._new_member(0)
            net.load_state_dict(sd)
            net.eval()
            ens.members.append(net)
        return ens
