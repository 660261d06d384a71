"""Ionic substitution with the data-mined probabilities that pymatgen ships (Hautier et al. 2011).

pymatgen's ``SubstitutionPredictor.composition_prediction`` enumerates the charge-balanced
substitutions of a composition whose probability (a product of conditional probabilities, one
per species, from ``structure_prediction/data/lambda.json``) exceeds a threshold. It spends about
a second per composition re-evaluating every species pair; :func:`substitutions_from` runs the
same enumeration (same probability model, same pruning on the best case, same threshold, same
distinct-species and charge-balance rules) on per-species tables computed once per process, so
thousands of parent structures take seconds. A test checks it against pymatgen's.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pymatgen.core import Species, Structure
    from pymatgen.core.structure_prediction.substitution_probability import SubstitutionProbability

__all__ = [
    "DEFAULT_THRESHOLD",
    "OxidationStateError",
    "Substitution",
    "apply_substitution",
    "decorate",
    "substitutions_from",
]

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 1e-3
"""pymatgen's default probability threshold for a substitution to be proposed."""


class OxidationStateError(ValueError):
    """pymatgen cannot guess oxidation states of a structure (or a species lies outside the table)."""


@dataclass(frozen=True)
class Substitution:
    """One charge-balanced substitution of a parent structure's species.

    Args:
        parent_id: Id of the parent row.
        mapping: Parent species -> new species, as strings with charges (``"Ca2+" -> "Sr2+"``); only
            the species that change.
        probability: The data-mined probability of the whole substitution (product over species).
        formula: Reduced formula of the new composition.
    """

    parent_id: str
    mapping: tuple[tuple[str, str], ...]
    probability: float
    formula: str

    @property
    def label(self) -> str:
        """``Ca2+->Sr2+, Ti4+->Zr4+`` (what the candidates CSV records)."""
        return ", ".join(f"{a}->{b}" for a, b in self.mapping)


@functools.cache
def _model() -> SubstitutionProbability:
    from pymatgen.core.structure_prediction.substitution_probability import SubstitutionProbability

    return SubstitutionProbability()  # type: ignore[no-untyped-call]


@functools.cache
def _row(source: Species) -> tuple[tuple[Species, float], ...]:
    """``(new species, cond_prob(source, new))`` for every species of the table, most likely first."""
    model = _model()
    pairs = [
        (target, float(model.cond_prob(source, target)))  # type: ignore[no-untyped-call]
        for target in model.species
    ]
    pairs.sort(key=lambda item: -item[1])
    return tuple(pairs)


def decorate(structure: Structure) -> Structure:
    """A copy of ``structure`` with pymatgen's most likely oxidation states per element.

    Raises:
        OxidationStateError: No charge-balanced guess exists.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guesses = structure.composition.oxi_state_guesses()
    if not guesses:
        raise OxidationStateError(f"no charge-balanced oxidation states for {structure.composition.reduced_formula}")
    decorated = structure.copy()
    decorated.add_oxidation_state_by_element(dict(guesses[0]))
    return decorated


def substitutions_from(
    decorated: Structure, parent_id: str, threshold: float = DEFAULT_THRESHOLD
) -> list[Substitution]:
    """Every charge-balanced substitution of ``decorated`` above ``threshold``, most probable first.

    The parent itself (nothing changes) is left out; two species never become the same one.

    Raises:
        OxidationStateError: A species of the structure is not in the probability table.
    """
    from pymatgen.core import Composition

    composition = decorated.composition
    sources = list(composition)
    table = set(_model().species)
    missing = [str(s) for s in sources if s not in table]
    if missing:
        raise OxidationStateError(f"species {', '.join(missing)} not in pymatgen's substitution table")
    rows = [_row(s) for s in sources]
    best = [row[0][1] for row in rows]
    # best_rest[i]: the largest product the species from i on can still contribute
    best_rest = [math.prod(best[i:]) for i in range(len(best) + 1)]
    amounts = [composition[s] for s in sources]
    found: list[Substitution] = []

    def walk(i: int, prob: float, chosen: list[Species]) -> None:
        if i == len(sources):
            charge = sum(float(t.oxi_state or 0) * a for t, a in zip(chosen, amounts, strict=True))
            if abs(charge) > 1e-8 or chosen == sources:
                return
            mapping = tuple((str(s), str(t)) for s, t in zip(sources, chosen, strict=True) if s != t)
            formula = Composition({t.element: a for t, a in zip(chosen, amounts, strict=True)}).reduced_formula
            found.append(Substitution(parent_id, mapping, prob, formula))
            return
        for target, p in rows[i]:
            if prob * p * best_rest[i + 1] <= threshold:
                break  # rows are sorted: nothing further down can pass
            if target in chosen:
                continue
            walk(i + 1, prob * p, [*chosen, target])

    walk(0, 1.0, [])
    found.sort(key=lambda s: (-s.probability, s.formula, s.mapping))
    return found


def apply_substitution(decorated: Structure, substitution: Substitution, *, rescale: bool = True) -> Structure:
    """The parent's structure with the substitution made (no oxidation states on the result).

    Args:
        decorated: The parent with oxidation states (:func:`decorate`).
        substitution: What to replace.
        rescale: Scale the volume by the change of ionic radii (pymatgen's ``RLSVolumePredictor``),
            so that a relaxation starts close and an unrelaxed energy is not dominated by strain.
    """
    from pymatgen.core import Species

    mapping: dict[Any, Any] = {
        Species.from_str(a): Species.from_str(b) for a, b in substitution.mapping
    }
    new = decorated.copy()
    new.replace_species(mapping)
    if rescale:
        try:
            from pymatgen.core.structure_prediction.volume_predictor import RLSVolumePredictor

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                new = RLSVolumePredictor(  # type: ignore[no-untyped-call]
                    check_isostructural=False).get_predicted_structure(new, decorated)
        except Exception as exc:  # noqa: BLE001 - missing radii for some species: keep the parent volume
            logger.debug("volume not rescaled for %s: %s", substitution.formula, exc)
    from pymatgen.core import Structure

    # A fresh structure: no oxidation states, and no site labels left over from the parent ("Ca2+").
    return Structure(new.lattice, [site.specie.symbol for site in new], new.frac_coords)

