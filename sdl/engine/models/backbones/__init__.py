"""Pretrained crystal backbones: one small interface, several universal models behind it.

Why a backbone: a lab labels tens to hundreds of crystals, far too few to learn message passing
from scratch. A universal interatomic potential pretrained on ~1.5 million DFT calculations has
already learned what a crystal's local environments mean; its pooled crystal feature (the input
of its energy head) is a descriptor that a small head or a GP can map to a new property with few
labels, and its own energy prediction is a prior that is informative before any label exists.

A backbone turns structures into a :class:`Featurization`: an embedding per crystal, the
backbone's zero-shot *prior* (an intensive number per crystal, for CHGNet its predicted energy
per atom above its own elemental reference energies), and the rows it could not featurise with
a reason each. To plug in another model, write a class with the members of :class:`Backbone`
(a no-argument constructor that loads its weights) and name it in the campaign as
``backbone: "your_package.module:YourBackbone"``, or add it to :data:`BACKBONES`, or pass an
instance to :class:`sdl.engine.Engine`: nothing else in the engine knows which model it is.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from sdl.exceptions import SDLError

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["BACKBONES", "Backbone", "BackboneError", "Featurization", "load_backbone"]

logger = logging.getLogger(__name__)


class BackboneError(SDLError, RuntimeError):
    """A backbone cannot be loaded (missing or corrupt weights, missing package); names the path."""


@dataclass
class Featurization:
    """What a backbone computed for ``N`` structures.

    Attributes:
        embeddings: ``[N, D]`` float32 pooled crystal features (NaN rows where featurising failed).
        prior: ``[N]`` float64 zero-shot prior, intensive (per atom); NaN where it failed.
        errors: Row -> reason, for every row that could not be featurised.
        n_atoms: ``[N]`` atoms per cell (NaN where unknown), so that extensive targets can be
            scaled without parsing the pool again; filled by the featurising code, not the backbone.
    """

    embeddings: np.ndarray
    prior: np.ndarray
    errors: dict[int, str] = field(default_factory=dict)
    n_atoms: np.ndarray = field(default_factory=lambda: np.empty(0))

    def __post_init__(self) -> None:
        n = self.embeddings.shape[0] if self.embeddings.ndim == 2 else -1
        if n < 0 or self.prior.shape != (n,):
            raise ValueError(f"Featurization: embeddings {self.embeddings.shape} and prior {self.prior.shape} differ")
        if self.n_atoms.size == 0 and n > 0:
            self.n_atoms = np.full(n, np.nan)
        elif self.n_atoms.shape != (n,):
            raise ValueError(f"Featurization: n_atoms {self.n_atoms.shape} differs from {n} rows")

    def __len__(self) -> int:
        return int(self.embeddings.shape[0])


@runtime_checkable
class Backbone(Protocol):
    """A pretrained crystal model seen as a featuriser.

    Attributes:
        name: Short name used in YAML (``chgnet``).
        version: Changes whenever the features would change (model version + weights digest): the
            embedding cache is keyed by it.
        dim: Width ``D`` of the embedding.
        prior_name: What the prior is, in words, for reports.
    """

    name: str
    version: str
    dim: int
    prior_name: str

    def featurize(
        self, structures: Sequence[Structure], progress: Callable[[int], None] | None = None
    ) -> Featurization:
        """Embed structures; a structure that fails is reported in ``errors``, never raised."""
        ...


def _chgnet() -> Backbone:
    from sdl.engine.models.backbones.chgnet import CHGNetBackbone

    return CHGNetBackbone()


#: Backbones by their YAML name; each factory loads the weights shipped in its wheel.
BACKBONES: dict[str, Callable[[], Backbone]] = {"chgnet": _chgnet}


def _import_factory(path: str) -> Callable[[], Backbone]:
    """``"package.module:Attr"`` -> the class or factory it names."""
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackboneError(f"backbone {path!r}: cannot import {module_name!r} ({exc})") from exc
    try:
        factory: Callable[[], Backbone] = getattr(module, attr)
    except AttributeError:
        raise BackboneError(f"backbone {path!r}: module {module_name!r} has no {attr!r}") from None
    return factory


def load_backbone(name: str) -> Backbone:
    """The backbone named ``name`` (a key of :data:`BACKBONES` or ``"module:Class"``), weights loaded.

    Raises:
        BackboneError: Unknown name, package not installed, weights missing/corrupt (with the path),
            or an imported class that does not have the :class:`Backbone` members.
    """
    if ":" in name:
        factory = _import_factory(name)
    else:
        try:
            factory = BACKBONES[name]
        except KeyError:
            known = ", ".join(sorted(BACKBONES))
            raise BackboneError(f"unknown backbone {name!r}; known: {known}, scratch, or 'module:Class'") from None
    backbone = factory()
    if not isinstance(backbone, Backbone):
        raise BackboneError(f"backbone {name!r}: {type(backbone).__name__} lacks name/version/dim/prior_name/featurize")
    return backbone


def nan_featurization(n: int, dim: int) -> Featurization:
    """An all-failed featurization of ``n`` rows (filled in by a backbone as rows succeed)."""
    return Featurization(np.full((n, dim), np.nan, dtype=np.float32), np.full(n, np.nan), {})
