"""Where proposals live: a parameter space (continuous / integer / categorical) or a finite candidate pool.

Why two kinds: process recipes are points of a box that an optimiser can move through
(:class:`ParameterSpace`, encoded to the unit cube, categoricals one-hot), while recorded datasets
and crystal libraries are finite tables whose rows are the only things that can be made or
looked up (:class:`CandidatePool`). Both give every candidate a *key*, a stable string used to
de-duplicate proposals, pending experiments and measurements.

Keys: in a space, ``key_of(params)`` is ``name=value`` pairs in declaration order, values rounded
(6 significant digits for continuous, int for integer, str for categorical). In a pool, the key is
the id column; rows that repeat a parameter setting (replicates, e.g. the crossed-barrel table's
3 prints per design) collapse into one candidate keyed by its first row's id, or by ``key_of``
when the table has no id column.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import pandas as pd
import torch

if TYPE_CHECKING:
    from pymatgen.core import Structure

__all__ = ["Parameter", "ParameterSpace", "CandidatePool", "format_value"]

logger = logging.getLogger(__name__)

ParamType = Literal["continuous", "integer", "categorical"]


def format_value(value: Any, ptype: ParamType) -> str:
    """Canonical text of one parameter value (what keys are made of)."""
    if ptype == "integer":
        return str(round(float(value)))
    if ptype == "continuous":
        v = float(value)
        text = format(v, ".6g")
        return "0" if text in ("-0", "0") else text
    return str(value)


@dataclass(frozen=True)
class Parameter:
    """One search-space dimension.

    Args:
        name: Parameter name (the recipe field).
        type: ``continuous``, ``integer`` or ``categorical``.
        low: Lower bound (not categorical).
        high: Upper bound (not categorical).
        choices: Allowed values (categorical only).
        unit: Unit text, for humans.
    """

    name: str
    type: ParamType
    low: float | None = None
    high: float | None = None
    choices: tuple[Any, ...] | None = None
    unit: str | None = None

    def __post_init__(self) -> None:
        if self.type not in ("continuous", "integer", "categorical"):
            raise ValueError(f"parameter {self.name!r}: unknown type {self.type!r}")
        if self.type == "categorical":
            if not self.choices:
                raise ValueError(f"parameter {self.name!r}: categorical needs choices")
        elif self.low is None or self.high is None or not float(self.low) < float(self.high):
            raise ValueError(f"parameter {self.name!r}: needs low < high, got {self.low=}, {self.high=}")

    @classmethod
    def from_any(cls, obj: Any) -> Parameter:
        """Build from a config object (``sdl.config`` parameter), a dict or a Parameter."""
        if isinstance(obj, Parameter):
            return obj

        def get(key: str, default: Any = None) -> Any:
            return obj.get(key, default) if isinstance(obj, Mapping) else getattr(obj, key, default)

        choices = get("choices", None)
        return cls(
            name=str(get("name")),
            type=cast(ParamType, str(get("type"))),  # checked in __post_init__
            low=None if get("low", None) is None else float(get("low")),
            high=None if get("high", None) is None else float(get("high")),
            choices=None if choices is None else tuple(choices),
            unit=get("unit", None),
        )

    @property
    def width(self) -> int:
        """Columns taken in the encoding (one-hot for categoricals)."""
        return len(self.options) if self.type == "categorical" else 1

    @property
    def options(self) -> tuple[Any, ...]:
        """The choices of a categorical parameter (ValueError for the other types)."""
        if self.choices is None:
            raise ValueError(f"parameter {self.name!r}: a {self.type} parameter has no choices")
        return self.choices

    @property
    def span(self) -> tuple[float, float]:
        """``(low, high)`` of a continuous or integer parameter (ValueError for categoricals)."""
        if self.low is None or self.high is None:
            raise ValueError(f"parameter {self.name!r}: a {self.type} parameter has no bounds")
        return self.low, self.high


class ParameterSpace:
    """A box of continuous / integer / categorical parameters, encoded to ``[0, 1]^d``.

    Encoding: continuous and integer values are scaled by ``(v - low) / (high - low)``;
    categoricals are one-hot blocks. Decoding rounds integers and takes the arg-max of each
    one-hot block, so any point of the cube decodes to a valid recipe.

    Args:
        parameters: Parameters (or config objects / dicts with their fields), in order.
    """

    def __init__(self, parameters: Sequence[Any]) -> None:
        self.parameters = [Parameter.from_any(p) for p in parameters]
        if not self.parameters:
            raise ValueError("ParameterSpace: no parameters")
        names = [p.name for p in self.parameters]
        if len(set(names)) != len(names):
            raise ValueError(f"ParameterSpace: duplicate parameter names in {names}")
        self.slices: list[slice] = []
        start = 0
        for p in self.parameters:
            self.slices.append(slice(start, start + p.width))
            start += p.width
        self.dim = start

    @classmethod
    def from_config(cls, parameters: Sequence[Any]) -> ParameterSpace:
        """Build from ``cfg.search_space.parameters``."""
        return cls(parameters)

    def __repr__(self) -> str:
        return f"ParameterSpace({', '.join(f'{p.name}:{p.type}' for p in self.parameters)}; dim={self.dim})"

    @property
    def names(self) -> list[str]:
        """Parameter names in order."""
        return [p.name for p in self.parameters]

    @property
    def bounds(self) -> torch.Tensor:
        """``2 x d`` bounds of the encoding (the unit cube)."""
        return torch.stack([torch.zeros(self.dim, dtype=torch.float64), torch.ones(self.dim, dtype=torch.float64)])

    @property
    def is_continuous(self) -> bool:
        """True when every parameter is continuous (no rounding needed)."""
        return all(p.type == "continuous" for p in self.parameters)

    def cardinality(self) -> int | None:
        """Number of distinct recipes, or None when a parameter is continuous."""
        n = 1
        for p in self.parameters:
            if p.type == "continuous":
                return None
            if p.type == "categorical":
                n *= len(p.options)
            else:
                low, high = p.span
                n *= int(high) - math.ceil(low) + 1
        return n

    def canonical(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Validated, rounded copy of ``params`` (only this space's names, in order).

        Raises:
            ValueError: Naming the parameter that is missing, out of bounds or not a choice.
        """
        out: dict[str, Any] = {}
        for p in self.parameters:
            if p.name not in params:
                raise ValueError(f"parameter {p.name!r} missing from {dict(params)}")
            v = params[p.name]
            if p.type == "categorical":
                matches = [c for c in p.options if c == v or str(c) == str(v)]
                if not matches:
                    raise ValueError(f"parameter {p.name!r}: {v!r} is not one of {list(p.options)}")
                out[p.name] = matches[0]
                continue
            fv = float(v)
            low, high = p.span
            tol = 1e-9 * max(1.0, abs(high - low))
            if not (low - tol <= fv <= high + tol):
                raise ValueError(f"parameter {p.name!r}: {fv} outside [{p.low}, {p.high}]")
            out[p.name] = round(fv) if p.type == "integer" else float(format_value(fv, "continuous"))
        return out

    def key_of(self, params: Mapping[str, Any]) -> str:
        """Canonical string of the rounded values, e.g. ``"n=6;theta=0;r=1.5;t=0.7"``."""
        c = self.canonical(params)
        return ";".join(f"{p.name}={format_value(c[p.name], p.type)}" for p in self.parameters)

    def encode(self, rows: Sequence[Mapping[str, Any]]) -> torch.Tensor:
        """``n x d`` float64 encoding of recipes."""
        X = torch.zeros(len(rows), self.dim, dtype=torch.float64)
        for i, row in enumerate(rows):
            c = self.canonical(row)
            for p, sl in zip(self.parameters, self.slices, strict=True):
                if p.type == "categorical":
                    X[i, sl.start + [str(x) for x in p.options].index(str(c[p.name]))] = 1.0
                else:
                    low, high = p.span
                    X[i, sl.start] = (float(c[p.name]) - low) / (high - low)
        return X

    def decode(self, X: torch.Tensor) -> list[dict[str, Any]]:
        """Recipes of ``n x d`` encoded points (rounded onto the valid set)."""
        X = X.detach().reshape(-1, self.dim).to(torch.float64).clamp(0.0, 1.0)
        out = []
        for row in X:
            params: dict[str, Any] = {}
            for p, sl in zip(self.parameters, self.slices, strict=True):
                block = row[sl]
                if p.type == "categorical":
                    params[p.name] = p.options[int(block.argmax())]
                else:
                    low, high = p.span
                    v = low + float(block[0]) * (high - low)
                    params[p.name] = round(v) if p.type == "integer" else float(format_value(v, "continuous"))
            out.append(params)
        return out

    def round_encoded(self, X: torch.Tensor) -> torch.Tensor:
        """Project encoded points onto valid recipes (integers rounded, one-hot blocks hardened)."""
        return self.encode(self.decode(X)).reshape(X.shape).to(X)

    def sample(self, n: int, seed: int, method: Literal["random", "sobol"] = "sobol") -> list[dict[str, Any]]:
        """``n`` recipes, reproducible under ``seed`` (scrambled Sobol or uniform)."""
        ndim = len(self.parameters)
        if method == "sobol":
            U = torch.quasirandom.SobolEngine(ndim, scramble=True, seed=int(seed)).draw(n, dtype=torch.float64)
        else:
            U = torch.rand(n, ndim, dtype=torch.float64, generator=torch.Generator().manual_seed(int(seed)))
        out = []
        for u in U:
            params: dict[str, Any] = {}
            for p, ui in zip(self.parameters, u.tolist(), strict=True):
                if p.type == "categorical":
                    params[p.name] = p.options[min(int(ui * len(p.options)), len(p.options) - 1)]
                elif p.type == "integer":
                    low, high = p.span
                    lo, hi = math.ceil(low), math.floor(high)
                    params[p.name] = min(lo + int(ui * (hi - lo + 1)), hi)
                else:
                    low, high = p.span
                    params[p.name] = float(format_value(low + ui * (high - low), "continuous"))
            out.append(params)
        return out

    @classmethod
    def infer(cls, frame: pd.DataFrame, columns: Sequence[str]) -> ParameterSpace:
        """Space spanned by table columns: integers, floats (min..max) and text (choices)."""
        params = []
        for col in columns:
            s = frame[col]
            if pd.api.types.is_bool_dtype(s) or not pd.api.types.is_numeric_dtype(s):
                params.append(Parameter(col, "categorical", choices=tuple(sorted(s.astype(str).unique()))))
                continue
            lo, hi = float(s.min()), float(s.max())
            if hi <= lo:
                hi = lo + 1.0
            ptype: ParamType = "integer" if pd.api.types.is_integer_dtype(s) else "continuous"
            params.append(Parameter(col, ptype, low=lo, high=hi))
        return cls(params)


def _records(frame: pd.DataFrame, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of ``frame[columns]`` as dicts keyed by column name."""
    # `to_dict` types its keys as Hashable; these are the str column names just selected.
    return cast("list[dict[str, Any]]", frame[list(columns)].to_dict("records"))


def parse_structure(text: str, fmt: str = "cif") -> Structure:
    """A pymatgen ``Structure`` from CIF or pymatgen-JSON text.

    Raises:
        ValueError: The text does not parse; the message says as what.
    """
    import warnings

    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "fractional coordinates rounded" chatter
            if fmt == "cif":
                return Structure.from_str(str(text), fmt="cif")
            return Structure.from_dict(json.loads(str(text)))
    except Exception as exc:  # any parse failure is bad input
        raise ValueError(f"cannot parse structure as {fmt}: {exc}") from exc


class CandidatePool:
    """A finite table of candidates: ids, rows, parameter columns and/or crystal structures.

    Build with :meth:`from_csv`, :meth:`from_frame` or :meth:`from_config`. Structures are parsed
    lazily (on first use, cached by the CIF / JSON text, so tiled copies parse once).

    Args:
        frame: One row per candidate (representatives of replicate groups).
        keys: One unique key per row.
        replicates: For each candidate, the row numbers of ``source_frame`` it stands for.
        source_frame: The table as read (all replicates).
        parameter_columns: Columns that make up a recipe (None for pure crystal pools).
        structure_column: Column with CIF or pymatgen-JSON text, if any.
        structure_format: ``cif`` or ``pymatgen-json``.
        formula_column: Column with a chemical formula, if any.
        space: Encoding of the parameter columns.
        source: File name (for error messages).
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        keys: Sequence[str],
        replicates: Sequence[Sequence[int]],
        source_frame: pd.DataFrame,
        *,
        parameter_columns: Sequence[str] | None = None,
        structure_column: str | None = None,
        structure_format: str = "cif",
        formula_column: str | None = None,
        space: ParameterSpace | None = None,
        source: str = "<frame>",
    ) -> None:
        self.frame = frame.reset_index(drop=True)
        self.keys = [str(k) for k in keys]
        self.replicates = [list(r) for r in replicates]
        self.source_frame = source_frame
        self.parameter_columns = list(parameter_columns) if parameter_columns else None
        self.structure_column = structure_column
        self.structure_format = structure_format
        self.formula_column = formula_column
        self.space = space
        self.source = source
        self._index = {k: i for i, k in enumerate(self.keys)}
        if len(self._index) != len(self.keys):
            raise ValueError(f"{source}: candidate keys are not unique")
        self._parsed: dict[str, Structure] = {}
        self._param_keys: dict[str, int] | None = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        *,
        id_column: str | None = "id",
        structure_column: str | None = None,
        structure_format: str = "cif",
        parameter_columns: Sequence[str] | None = None,
        formula_column: str | None = None,
        space: ParameterSpace | None = None,
        source: str = "<frame>",
    ) -> CandidatePool:
        """Pool from a DataFrame (see :meth:`from_csv` for the rules)."""
        for col in [structure_column, formula_column, *(parameter_columns or [])]:
            if col is not None and col not in frame.columns:
                raise ValueError(f"{source}: column {col!r} not found (columns: {list(frame.columns)})")
        if structure_format not in ("cif", "pymatgen-json"):
            raise ValueError(f"{source}: structure_format must be 'cif' or 'pymatgen-json', got {structure_format!r}")
        has_id = id_column is not None and id_column in frame.columns
        frame = frame.reset_index(drop=True)
        if parameter_columns:
            if frame[list(parameter_columns)].isna().any().any():
                raise ValueError(f"{source}: empty values in parameter columns {list(parameter_columns)}")
            space = space or ParameterSpace.infer(frame, parameter_columns)
            groups: dict[str, list[int]] = {}
            for i, row in enumerate(_records(frame, parameter_columns)):
                groups.setdefault(space.key_of(row), []).append(i)
            firsts = [rows[0] for rows in groups.values()]
            keys = [str(frame.at[i, id_column]) for i in firsts] if has_id else list(groups)
            replicates = list(groups.values())
        else:
            if not has_id:
                raise ValueError(f"{source}: no id column {id_column!r} and no parameter_columns to key candidates by")
            ids = frame[id_column].astype(str)
            dup = ids[ids.duplicated()]
            if len(dup):
                raise ValueError(f"{source}: duplicate ids in column {id_column!r}, e.g. {dup.iloc[0]!r}")
            firsts = list(range(len(frame)))
            keys = ids.tolist()
            replicates = [[i] for i in firsts]
        rep = frame.iloc[firsts]
        if parameter_columns and len(rep) < len(frame):
            logger.info("%s: %d rows collapse to %d candidates (replicates)", source, len(frame), len(rep))
        return cls(
            rep, keys, replicates, frame,
            parameter_columns=parameter_columns, structure_column=structure_column,
            structure_format=structure_format, formula_column=formula_column, space=space, source=source,
        )

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        *,
        id_column: str | None = "id",
        structure_column: str | None = None,
        structure_format: str = "cif",
        parameter_columns: Sequence[str] | None = None,
        formula_column: str | None = None,
        space: ParameterSpace | None = None,
        max_rows: int | None = None,
    ) -> CandidatePool:
        """Read a CSV (``.csv`` or ``.csv.gz``).

        Rows that repeat a parameter setting collapse into one candidate; its key is the id of
        its first row, or ``ParameterSpace.key_of`` of the setting when there is no id column.

        Raises:
            FileNotFoundError: The file does not exist.
            ValueError: A named column is missing, or ids repeat (naming the file).
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"candidate file not found: {p}")
        frame = pd.read_csv(p, nrows=max_rows)
        return cls.from_frame(
            frame, id_column=id_column, structure_column=structure_column, structure_format=structure_format,
            parameter_columns=parameter_columns, formula_column=formula_column, space=space, source=str(p),
        )

    @classmethod
    def from_config(cls, candidate_set: Any, space: ParameterSpace | None = None) -> CandidatePool:
        """Pool from ``cfg.search_space.candidates`` (``sdl.config.CandidateSet`` or same fields)."""

        def get(key: str, default: Any = None) -> Any:
            return getattr(candidate_set, key, default)

        return cls.from_csv(
            get("file"),
            id_column=get("id_column", "id"),
            structure_column=get("structure_column"),
            structure_format=get("structure_format", "cif") or "cif",
            parameter_columns=get("parameter_columns"),
            formula_column=get("formula_column"),
            space=space,
        )

    # -- access ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.keys)

    def __repr__(self) -> str:
        kind = "parameters" if self.parameter_columns else "structures" if self.structure_column else "rows"
        return f"CandidatePool({len(self)} candidates, {kind}, source={self.source!r})"

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def index_of(self, key: str) -> int:
        """Row number of a candidate key (KeyError naming the pool when unknown)."""
        try:
            return self._index[str(key)]
        except KeyError:
            raise KeyError(f"{self.source}: unknown candidate key {key!r}") from None

    def key_for_params(self, params: Mapping[str, Any]) -> str | None:
        """Key of the candidate with this parameter setting, if any (parameter pools)."""
        if not self.parameter_columns or self.space is None:
            return None
        if self._param_keys is None:
            self._param_keys = {
                self.space.key_of(r): i for i, r in enumerate(_records(self.frame, self.parameter_columns))
            }
        try:
            i = self._param_keys.get(self.space.key_of(params))
        except ValueError:
            return None
        return None if i is None else self.keys[i]

    def params(self, i: int) -> dict[str, Any]:
        """The recipe of candidate ``i``: parameter columns (plus the formula, if known)."""
        out: dict[str, Any] = {}
        if self.parameter_columns:
            for c in self.parameter_columns:
                v: Any = self.frame.at[i, c]  # a numpy scalar (unwrapped below) or a python value
                out[c] = v.item() if hasattr(v, "item") else v
        if self.formula_column:
            out["formula"] = str(self.frame.at[i, self.formula_column])
        return out

    def values(self, column: str, reduce: Literal["mean", "first"] = "mean") -> np.ndarray:
        """One value per candidate from ``column`` (mean over replicates by default)."""
        if column not in self.source_frame.columns:
            raise ValueError(f"{self.source}: column {column!r} not found")
        col = self.source_frame[column].to_numpy(dtype=np.float64)
        if reduce == "first":
            return np.array([col[r[0]] for r in self.replicates])
        return np.array([col[r].mean() for r in self.replicates])

    def parameter_matrix(self) -> torch.Tensor:
        """``N x d`` encoding of the parameter columns (``self.space``)."""
        if not self.parameter_columns or self.space is None:
            raise ValueError(f"{self.source}: pool has no parameter_columns")
        return self.space.encode(_records(self.frame, self.parameter_columns))

    def structures(self, indices: Sequence[int] | None = None) -> list[Structure]:
        """Parsed structures of candidates (all when ``indices`` is None); parsed once per text."""
        if self.structure_column is None:
            raise ValueError(f"{self.source}: pool has no structure column")
        idx = range(len(self)) if indices is None else indices
        col = self.frame[self.structure_column]
        return [self._parse(int(i), col.iat[int(i)]) for i in idx]

    def _parse(self, i: int, text: Any) -> Structure:
        text = str(text)
        digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        s = self._parsed.get(digest)
        if s is not None:
            return s
        try:
            s = parse_structure(text, self.structure_format)
        except ValueError as exc:
            where = f"{self.source}: candidate {self.keys[i]!r}: column {self.structure_column!r}"
            raise ValueError(f"{where}: {exc}") from exc
        self._parsed[digest] = s
        return s

    def structure_texts(self, indices: Sequence[int] | None = None) -> list[str]:
        """The structure column's raw text (CIF or pymatgen JSON) per candidate, unparsed."""
        if self.structure_column is None:
            raise ValueError(f"{self.source}: pool has no structure column")
        col = self.frame[self.structure_column]
        idx = range(len(self)) if indices is None else indices
        return [str(col.iat[int(i)]) for i in idx]

    def n_atoms(self) -> np.ndarray:
        """Atoms per cell of every candidate (``[N]``): from the structures, else from the formulas.

        A structure that does not parse counts as 1 atom: such a candidate is excluded from
        crystal models anyway (and reported there), and one bad row must not stop the pool.
        """
        if self.structure_column is not None:
            col = self.frame[self.structure_column]
            counts = np.ones(len(self), dtype=np.float64)
            for i in range(len(self)):
                with contextlib.suppress(ValueError):
                    counts[i] = len(self._parse(i, col.iat[i]))
            return counts
        from pymatgen.core import Composition

        return np.array([Composition(f).num_atoms for f in self.formulas()], dtype=np.float64)

    def formulas(self, indices: Sequence[int] | None = None) -> list[str]:
        """Chemical formulas (formula column, else from the parsed structures)."""
        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        if self.formula_column:
            col = self.frame[self.formula_column]
            return [str(col.iat[i]) for i in idx]
        if self.structure_column:
            return [s.composition.formula for s in self.structures(idx)]
        raise ValueError(f"{self.source}: pool has neither a formula column nor a structure column")

    @property
    def is_crystal(self) -> bool:
        """True when candidates are materials (structures or formulas) rather than recipes."""
        return not self.parameter_columns and (self.structure_column is not None or self.formula_column is not None)

    def extended(self, keys: Sequence[str], structure_texts: Sequence[str], formulas: Sequence[str],
                 extra: Sequence[Mapping[str, Any]] | None = None) -> CandidatePool:
        """This crystal pool with new candidates appended (existing rows keep their index).

        Args:
            keys: A new, unique key per candidate.
            structure_texts: Its structure, in this pool's ``structure_format``.
            formulas: Its formula (written to the formula column when the pool has one).
            extra: More columns per candidate (e.g. generation provenance); absent columns stay empty.

        Raises:
            ValueError: Not a crystal pool with a structure column, lengths differ, or a key exists.
        """
        if self.structure_column is None or self.parameter_columns:
            raise ValueError(f"{self.source}: only a crystal pool with a structure column can grow")
        if not len(keys) == len(structure_texts) == len(formulas):
            raise ValueError("extended: keys, structure_texts and formulas differ in length")
        clash = [k for k in keys if k in self._index]
        if clash or len(set(keys)) != len(keys):
            raise ValueError(f"{self.source}: candidate key(s) already in the pool: {clash[:3] or list(keys)[:3]}")
        rows = []
        for i, (text, formula) in enumerate(zip(structure_texts, formulas, strict=True)):
            row: dict[str, Any] = dict(extra[i]) if extra is not None else {}
            row[self.structure_column] = text
            if self.formula_column:
                row[self.formula_column] = formula
            rows.append(row)
        added = pd.DataFrame(rows)
        n_src = len(self.source_frame)
        pool = CandidatePool(
            pd.concat([self.frame, added], ignore_index=True), [*self.keys, *keys],
            [*self.replicates, *[[n_src + i] for i in range(len(keys))]],
            pd.concat([self.source_frame, added], ignore_index=True),
            parameter_columns=None, structure_column=self.structure_column, structure_format=self.structure_format,
            formula_column=self.formula_column, space=None, source=self.source,
        )
        pool._parsed = self._parsed
        return pool

    def tiled(self, copies: int) -> CandidatePool:
        """``copies`` copies of this pool with keys ``<key>~<c>`` (latency benchmarks only)."""
        frames, keys, reps = [], [], []
        n_src = len(self.source_frame)
        for c in range(copies):
            frames.append(self.frame)
            keys.extend(self.keys if c == 0 else [f"{k}~{c}" for k in self.keys])
            reps.extend([[j + c * n_src for j in r] for r in self.replicates])
        pool = CandidatePool(
            pd.concat(frames, ignore_index=True), keys, reps,
            pd.concat([self.source_frame] * copies, ignore_index=True),
            parameter_columns=None, structure_column=self.structure_column, structure_format=self.structure_format,
            formula_column=self.formula_column, space=None, source=f"{self.source} x{copies}",
        )
        pool._parsed = self._parsed
        return pool
