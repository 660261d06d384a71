"""CHGNet 0.3.0 (Deng et al. 2023, Nat. Mach. Intell. 5, 1031) as a frozen crystal backbone.

The weights ship inside the ``chgnet`` wheel (``chgnet/pretrained/0.3.0/``, 412,525 parameters,
trained on the Materials Project trajectory set), so loading needs no network. The embedding is
CHGNet's pooled crystal feature (64 wide, the input of its energy head) divided by the number of
atoms, so that a cell and its supercell embed alike (CHGNet sums over atoms); the prior is its
zero-shot energy per atom minus its AtomRef elemental reference energies (the part of the
energy that comes from bonding), which tracks formation energies (Pearson 0.84 with CMR
``e_form``) and says nothing about properties CHGNet never saw (band gaps, optical constants).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from sdl.engine.models.backbones import BackboneError, Featurization, nan_featurization

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["CHGNetBackbone", "default_weights_path"]

logger = logging.getLogger(__name__)

MODEL_VERSION = "0.3.0"
MAX_Z = 94  # CHGNet's element embedding covers H..Pu
#: Bumped whenever the features computed from the same weights change (part of the cache key).
FEATURE_REVISION = 2  # 2: mean over atoms (CHGNet's crystal_fea is a sum, so it grew with the cell)


def default_weights_path() -> Path:
    """Where the ``chgnet`` wheel keeps its 0.3.0 weights."""
    try:
        import chgnet
    except ImportError as exc:  # pragma: no cover - chgnet is a core dependency
        raise BackboneError(f"backbone chgnet: package not installed ({exc}); pip install chgnet==0.4.2") from exc
    return Path(chgnet.__file__).parent / "pretrained" / MODEL_VERSION / "chgnet_0.3.0_e29f68s314m37.pth.tar"


class CHGNetBackbone:
    """Frozen CHGNet: structures -> 64-wide crystal features and a formation-energy-like prior.

    Args:
        weights: Checkpoint file; the one in the ``chgnet`` wheel when None.
        batch_size: Graphs per forward pass.

    Raises:
        BackboneError: The weights file is missing or cannot be loaded (the message has its path).
    """

    name = "chgnet"
    dim = 64
    prior_name = "CHGNet energy per atom above its AtomRef elemental references (eV/atom)"

    def __init__(self, weights: Path | None = None, batch_size: int = 64) -> None:
        from chgnet.model import CHGNet

        path = Path(weights) if weights is not None else default_weights_path()
        if not path.is_file():
            raise BackboneError(f"backbone chgnet: weights not found at {path}")
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its parameter count
                self.model = CHGNet.from_file(str(path), mlp_out_bias=False, version=MODEL_VERSION)
        except Exception as exc:
            raise BackboneError(f"backbone chgnet: cannot load weights {path}: {exc}") from exc
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.weights = path
        self.version = f"chgnet-{MODEL_VERSION}-{digest}-f{FEATURE_REVISION}"
        self.batch_size = int(batch_size)

    def __repr__(self) -> str:
        return f"CHGNetBackbone(version={self.version!r})"

    def _graph(self, structure: Structure) -> object:
        bad = sorted({el.symbol for el in structure.composition.elements if el.Z > MAX_Z})
        if bad:
            raise ValueError(f"element(s) {', '.join(bad)} outside CHGNet's table (Z <= {MAX_Z})")
        return self.model.graph_converter(structure)

    def featurize(
        self, structures: Sequence[Structure], progress: Callable[[int], None] | None = None
    ) -> Featurization:
        """Features and prior for every structure; failures land in ``errors`` with the reason."""
        n = len(structures)
        out = nan_featurization(n, self.dim)
        t0 = time.perf_counter()
        for start in range(0, n, self.batch_size):
            rows, graphs = [], []
            for i in range(start, min(n, start + self.batch_size)):
                try:
                    graphs.append(self._graph(structures[i]))
                    rows.append(i)
                except Exception as exc:  # noqa: BLE001 - isolated atoms, odd species: report, go on
                    out.errors[i] = f"cannot build a CHGNet graph: {exc}"
            if graphs:
                self._forward(graphs, rows, out)
            if progress is not None:
                progress(min(n, start + self.batch_size) - start)
        logger.debug("chgnet featurised %d structures in %.1f s (%d failed)", n, time.perf_counter() - t0,
                     len(out.errors))
        return out

    def _forward(self, graphs: list[object], rows: list[int], out: Featurization) -> None:
        try:
            with torch.no_grad():
                comp = self.model.composition_model(graphs)
                pred = self.model(graphs, task="e", return_crystal_feas=True)
        except Exception as exc:  # noqa: BLE001 - one bad graph: retry one by one to find it
            if len(graphs) == 1:
                out.errors[rows[0]] = f"CHGNet forward pass failed: {exc}"
                return
            for g, r in zip(graphs, rows, strict=True):
                self._forward([g], [r], out)
            return
        # crystal_fea sums the atoms' features; per atom it is the same for a cell and its supercell.
        atoms = torch.tensor([len(g.atomic_number) for g in graphs], dtype=torch.float32)  # type: ignore[attr-defined]
        emb = pred["crystal_fea"].detach().cpu() / atoms.unsqueeze(-1)
        out.embeddings[rows] = emb.numpy().astype(np.float32)
        out.prior[rows] = (pred["e"] - comp).detach().cpu().numpy().astype(np.float64)
