"""Simulated worlds backed by real recorded data: the *truth* a simulated instrument measures.

A world only answers "what was recorded for this recipe". Noise on top of a recorded value and
instrument faults live elsewhere (``measure`` adds the configured noise last, and
``simulators/faults.py`` owns faults), the way BoTorch's test problems keep ``evaluate_true``
apart from observation noise.

* :class:`TableWorld`: a CSV of process parameters and measured properties; rows with equal
  parameters are real replicates and a measurement draws one of them (real noise, no model).
* :class:`CrystalWorld`: a CSV(.gz) with an ``id`` column, a ``cif`` column and property columns;
  a measurement is the recorded value plus configurable gaussian noise, and the raw data is a
  simulated powder XRD pattern (pymatgen's ``XRDCalculator``, computed once per candidate).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sdl.csvfiles import READ_ERRORS, open_text, read_dict_rows

__all__ = [
    "WorldError",
    "Point",
    "Measurement",
    "World",
    "TableWorld",
    "CrystalWorld",
    "load_world",
    "KNOWN_UNITS",
]

logger = logging.getLogger(__name__)

KNOWN_UNITS: dict[str, str] = {
    "e_form": "eV",
    "gap_gllbsc": "eV",
    "gap": "eV",
    "band_gap": "eV",
    "toughness": "J",
    "theta": "deg",
    "r": "mm",
    "t": "mm",
}
"""Units of the property columns of the shipped worlds (see ``simulators/worlds/SOURCE.md``)."""

OffTable = Literal["nearest", "refuse"]


class WorldError(ValueError):
    """A recipe the world cannot answer; ``code`` is the protocol ERR code to reply with."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class Point:
    """A recorded point of the world that answers a recipe.

    Attributes:
        key: Candidate id, or the canonical JSON of the recorded parameters.
        note: Set when the recipe was off the table and the nearest recorded point answers.
    """

    key: str
    note: str | None = None


@dataclass(frozen=True)
class Measurement:
    """One measured value per property, with its standard uncertainty."""

    key: str
    values: dict[str, float]
    std: dict[str, float]
    note: str | None = None


class World(ABC):
    """A source of recorded truth; subclasses write :meth:`resolve` and :meth:`true_values`."""

    name: str
    properties: tuple[str, ...]
    units: dict[str, str]

    @abstractmethod
    def resolve(self, recipe: dict[str, Any]) -> Point:
        """Find the recorded point that answers a recipe (raises :class:`WorldError`)."""

    @abstractmethod
    def true_values(self, point: Point) -> dict[str, list[float]]:
        """All recorded values per property at a point (the real replicates)."""

    @abstractmethod
    def scale(self, prop: str) -> float:
        """Spread of a property over the world (used to size drift)."""

    def measure(self, recipe: dict[str, Any], rng: random.Random, noise_std: float = 0.0) -> Measurement:
        """Observe a recipe: truth first (a real replicate), configured noise second."""
        point = self.resolve(recipe)
        truth = self.true_values(point)
        values: dict[str, float] = {}
        std: dict[str, float] = {}
        for prop, replicates in truth.items():
            value = rng.choice(replicates)
            spread = _std(replicates)
            if noise_std > 0:
                value += rng.gauss(0.0, noise_std)
            values[prop] = value
            std[prop] = math.sqrt(spread**2 + noise_std**2)
        return Measurement(point.key, values, std, point.note)

    def raw(self, point: Point) -> tuple[str, list[tuple[float, ...]]]:
        """Raw data of a point: ``(description, rows)``; only some worlds have any."""
        raise WorldError("UNSUPPORTED", f"world {self.name} has no raw data")


def _std(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    try:
        columns, rows = read_dict_rows(path)
    except READ_ERRORS as exc:
        raise WorldError("INTERNAL", f"{path}: cannot read world CSV: {exc}") from exc
    if not columns or not rows:
        raise WorldError("INTERNAL", f"{path}: world CSV has no header or no rows")
    return columns, rows


def _float(path: Path, row: int, column: str, text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise WorldError("INTERNAL", f"{path}:{row + 2} column {column!r}: not a number: {text[:40]!r}") from None


def _canon(value: float) -> float:
    return float(f"{value:.9g}")


class TableWorld(World):
    """Process parameters → measured properties, replicates drawn from the table.

    Args:
        path: The CSV file.
        properties: Property columns; default: the last column. All other columns are parameters.
        off_table: ``"nearest"`` answers an off-table recipe from the nearest recorded point (in
            parameters scaled to their recorded range) and says so; ``"refuse"`` rejects it.
    """

    def __init__(self, path: Path, *, properties: list[str] | None = None, off_table: OffTable = "nearest") -> None:
        self.path = Path(path)
        self.name = self.path.name
        columns, rows = _read_csv(self.path)
        props = list(properties) if properties else [columns[-1]]
        for prop in props:
            if prop not in columns:
                raise WorldError("INTERNAL", f"{self.path}: property column {prop!r} not in {columns}")
        self.properties = tuple(props)
        self.parameters = tuple(c for c in columns if c not in props)
        if not self.parameters:
            raise WorldError("INTERNAL", f"{self.path}: no parameter columns left")
        if off_table not in ("nearest", "refuse"):
            raise WorldError("INTERNAL", f"off_table={off_table!r}: use 'nearest' or 'refuse'")
        self.off_table = off_table
        self.units = {p: KNOWN_UNITS.get(p, "") for p in self.properties}
        self._points: dict[tuple[float, ...], dict[str, list[float]]] = {}
        for i, row in enumerate(rows):
            key = tuple(_canon(_float(self.path, i, c, row[c])) for c in self.parameters)
            bucket = self._points.setdefault(key, {p: [] for p in self.properties})
            for prop in self.properties:
                bucket[prop].append(_float(self.path, i, prop, row[prop]))
        self._keys = list(self._points)
        lows = [min(k[j] for k in self._keys) for j in range(len(self.parameters))]
        highs = [max(k[j] for k in self._keys) for j in range(len(self.parameters))]
        self._low = lows
        self._span = [(h - lo) or 1.0 for lo, h in zip(lows, highs, strict=False)]
        self._scale = {p: _std([v for b in self._points.values() for v in b[p]]) or 1.0 for p in self.properties}

    def key_of(self, params: tuple[float, ...]) -> str:
        """Canonical JSON of recorded parameters (the point's key)."""
        return json.dumps(dict(zip(self.parameters, params, strict=False)), sort_keys=True, separators=(",", ":"))

    def _params(self, recipe: dict[str, Any]) -> tuple[float, ...]:
        params = recipe.get("params")
        if not isinstance(params, dict):
            raise WorldError("BAD_RECIPE", f"table world {self.name} needs recipe.params with {list(self.parameters)}")
        missing = [p for p in self.parameters if p not in params]
        if missing:
            raise WorldError("BAD_RECIPE", f"recipe.params lacks {missing} (world {self.name})")
        values = []
        for name in self.parameters:
            value = params[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise WorldError("BAD_RECIPE", f"recipe.params.{name}={value!r} is not a finite number")
            values.append(_canon(float(value)))
        return tuple(values)

    def resolve(self, recipe: dict[str, Any]) -> Point:
        """Exact recorded parameters, or the nearest recorded point (or refusal)."""
        wanted = self._params(recipe)
        if wanted in self._points:
            return Point(self.key_of(wanted))
        if self.off_table == "refuse":
            raise WorldError("OFF_TABLE", f"params {self.key_of(wanted)} are not on the table of {self.name}")

        def distance(key: tuple[float, ...]) -> float:
            return sum(((a - b) / s) ** 2 for a, b, s in zip(key, wanted, self._span, strict=False))

        nearest = min(self._keys, key=distance)
        key = self.key_of(nearest)
        return Point(key, note=f"off-table: answered from nearest recorded point {key}")

    def true_values(self, point: Point) -> dict[str, list[float]]:
        """The recorded replicates at a point."""
        params = tuple(json.loads(point.key)[p] for p in self.parameters)
        return {p: list(v) for p, v in self._points[params].items()}

    def scale(self, prop: str) -> float:
        """Standard deviation of a property over the table."""
        return self._scale[prop]


class CrystalWorld(World):
    """Candidate crystals (id, CIF, recorded properties) with gaussian measurement noise.

    Args:
        path: The CSV or CSV.gz file.
        properties: Property columns; default: every numeric column except id/cif/formula.
        id_column: Column with the candidate ids.
        structure_column: Column with the CIF text.
    """

    def __init__(
        self,
        path: Path,
        *,
        properties: list[str] | None = None,
        id_column: str = "id",
        structure_column: str = "cif",
    ) -> None:
        self.path = Path(path)
        self.name = self.path.name
        columns, rows = _read_csv(self.path)
        for column in (id_column, structure_column):
            if column not in columns:
                raise WorldError("INTERNAL", f"{self.path}: crystal world needs column {column!r}")
        if properties:
            props = list(properties)
            for prop in props:
                if prop not in columns:
                    raise WorldError("INTERNAL", f"{self.path}: property column {prop!r} not in {columns}")
        else:
            skip = {id_column, structure_column, "formula"}
            props = [c for c in columns if c not in skip and _numeric(rows[0].get(c, ""))]
        self.properties = tuple(props)
        self.units = {p: KNOWN_UNITS.get(p, "") for p in self.properties}
        self._values: dict[str, dict[str, float]] = {}
        self._cif: dict[str, str] = {}
        for i, row in enumerate(rows):
            cid = row[id_column]
            self._values[cid] = {p: _float(self.path, i, p, row[p]) for p in self.properties}
            self._cif[cid] = row[structure_column]
        self._scale = {p: _std([v[p] for v in self._values.values()]) or 1.0 for p in self.properties}
        self._xrd: dict[str, list[tuple[float, ...]]] = {}
        self._xrd_lock = threading.Lock()

    def resolve(self, recipe: dict[str, Any]) -> Point:
        """The candidate named by ``recipe["candidate"]``."""
        cid = recipe.get("candidate")
        if not isinstance(cid, str):
            raise WorldError("BAD_RECIPE", f"crystal world {self.name} needs recipe.candidate (an id string)")
        if cid not in self._values:
            raise WorldError("BAD_RECIPE", f"unknown candidate {cid[:64]!r} in {self.name}")
        return Point(cid)

    def true_values(self, point: Point) -> dict[str, list[float]]:
        """The recorded value of each property (one 'replicate')."""
        return {p: [v] for p, v in self._values[point.key].items()}

    def scale(self, prop: str) -> float:
        """Standard deviation of a property over the pool."""
        return self._scale[prop]

    def cif(self, point: Point) -> str:
        """The candidate's structure as CIF text."""
        return self._cif[point.key]

    def raw(self, point: Point) -> tuple[str, list[tuple[float, ...]]]:
        """Powder XRD (Cu K-alpha) of the candidate: rows of (two_theta_deg, intensity_percent)."""
        with self._xrd_lock:
            if point.key not in self._xrd:
                from pymatgen.analysis.diffraction.xrd import XRDCalculator
                from pymatgen.core import Structure

                structure = Structure.from_str(self._cif[point.key], fmt="cif")
                pattern = XRDCalculator(wavelength="CuKa").get_pattern(structure, two_theta_range=(10, 90))
                self._xrd[point.key] = [(float(x), float(y)) for x, y in zip(pattern.x, pattern.y, strict=False)]
            return "xrd two_theta_deg intensity_percent", list(self._xrd[point.key])


def _numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_world(
    path: str | Path,
    *,
    properties: list[str] | None = None,
    off_table: OffTable = "nearest",
) -> World:
    """Open a world file: a crystal world when it has ``id`` and ``cif`` columns, else a table world.

    Raises:
        WorldError: naming the file and the column when the file cannot serve as a world.
    """
    path = Path(path)
    if not path.is_file():
        raise WorldError("INTERNAL", f"{path}: world file not found")
    try:
        with open_text(path) as handle:
            header = next(csv.reader(io.StringIO(handle.readline())), [])
    except (OSError, UnicodeDecodeError) as exc:
        raise WorldError("INTERNAL", f"{path}: cannot read world CSV: {exc}") from exc
    if "id" in header and "cif" in header:
        return CrystalWorld(path, properties=properties)
    return TableWorld(path, properties=properties, off_table=off_table)
