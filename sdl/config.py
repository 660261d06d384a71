"""The campaign YAML schema: one frozen pydantic model tree, loaded with file:line errors.

A scientist describes a whole campaign in one YAML file; everything downstream (engine, flow,
repository) reads only the validated :class:`CampaignConfig`. Loading is strict on purpose: a typo
in a key or a bound found after three days of robot time is expensive, so every problem is
reported before anything runs, as one line ``file:line field.path: message``.

YAML is read with ``yaml.SafeLoader`` (no ``!!python/*`` tags), node by node, so that every field
path can be mapped back to its line. ``${VAR}`` (or ``${VAR:-default}``) in any string is replaced by
the environment variable, so no password needs to live in a YAML file.

This module must stay light: it never imports torch or prefect.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import logging
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails

from sdl.csvfiles import READ_ERRORS, open_text
from sdl.exceptions import CampaignConfigError

__all__ = [
    "Acquisition",
    "Budget",
    "CampaignConfig",
    "CampaignConfigError",
    "CandidateSet",
    "CategoricalParameter",
    "Compute",
    "ContinuousParameter",
    "Fidelities",
    "FidelitySource",
    "SimulatedFaults",
    "GNNEnsembleModel",
    "GNNEnsembleOptions",
    "GPModel",
    "GPOptions",
    "InitialDesign",
    "Instrument",
    "IntegerParameter",
    "ObjectiveSpec",
    "OutcomeConstraint",
    "PhaseIdentification",
    "PoolGeneration",
    "RandomModel",
    "RandomOptions",
    "Repository",
    "RetrainPolicy",
    "SearchSpace",
    "SimulatorOptions",
    "ToleranceFactorFailures",
    "StoppingRules",
    "Transfer",
    "campaign_json_schema",
    "config_error",
    "expand_env_vars",
    "load_campaign",
    "missing_data_files",
    "validate_campaign_dict",
]

logger = logging.getLogger(__name__)

_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.\-]*$"
_SERIAL_SCHEMES = ("socket", "rfc2217", "loop", "spy", "alt", "hwgrep", "cp2110")
_MAX_NODES = 100_000
_UNION_TAGS = frozenset({"continuous", "integer", "categorical", "random", "gp", "gnn-ensemble"})
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_BLOCK_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class _Frozen(BaseModel):
    """Base of every config model: unknown keys are errors, values never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _base_dir(info: ValidationInfo) -> Path:
    """The YAML file's directory (from the validation context), against which paths resolve."""
    context = info.context or {}
    return Path(context.get("base_dir") or Path.cwd())


def _resolve(path: Path, info: ValidationInfo) -> Path:
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (_base_dir(info) / path).resolve()


def _data_required(info: ValidationInfo) -> bool:
    """False when only the schema is checked (``sdl validate`` of a campaign whose data live elsewhere)."""
    return bool((info.context or {}).get("require_data", True))


def _check_bounds(low: float, high: float, what: str) -> None:
    if not low < high:
        raise ValueError(f"{what} must be below high, got low={low!r} >= high={high!r}")


def _high_above_low(cls: type, high: float, info: ValidationInfo) -> float:
    """The ``high`` field validator of every model with ``low`` and ``high`` bounds."""
    if "low" in info.data:
        _check_bounds(info.data["low"], high, "low")
    return high


# --------------------------------------------------------------------------- search space


class ContinuousParameter(_Frozen):
    """A real-valued process parameter with inclusive bounds."""

    name: str = Field(pattern=_NAME_PATTERN, description="Parameter name, as sent in the recipe.")
    type: Literal["continuous"] = Field(description="Parameter kind: a real number in [low, high].")
    low: float = Field(description="Lower bound (inclusive), in `unit`.")
    high: float = Field(description="Upper bound (inclusive), in `unit`; must be above `low`.")
    unit: str | None = Field(default=None, description="Unit of the parameter, e.g. 'mm' or 'deg'.")

    _high_above_low = field_validator("high")(_high_above_low)


class IntegerParameter(_Frozen):
    """An integer process parameter (e.g. a count of struts) with inclusive bounds."""

    name: str = Field(pattern=_NAME_PATTERN, description="Parameter name, as sent in the recipe.")
    type: Literal["integer"] = Field(description="Parameter kind: an integer in [low, high].")
    low: int = Field(description="Lower bound (inclusive).")
    high: int = Field(description="Upper bound (inclusive); must be above `low`.")
    unit: str | None = Field(default=None, description="Unit of the parameter, if any.")

    _high_above_low = field_validator("high")(_high_above_low)


class CategoricalParameter(_Frozen):
    """A parameter that takes one of a few unordered values (a solvent, a precursor)."""

    name: str = Field(pattern=_NAME_PATTERN, description="Parameter name, as sent in the recipe.")
    type: Literal["categorical"] = Field(description="Parameter kind: one of `choices`.")
    choices: list[str | int | float] = Field(description="The allowed values (at least two, all different).")
    unit: str | None = Field(default=None, description="Unit of the values, if any.")

    @field_validator("choices")
    @classmethod
    def _distinct_choices(cls, choices: list[str | int | float]) -> list[str | int | float]:
        if len(choices) < 2:
            raise ValueError(f"needs at least 2 choices, got {len(choices)}: {choices!r}")
        if len({str(c) for c in choices}) != len(choices):
            raise ValueError(f"choices must be distinct, got {choices!r}")
        return choices


Parameter = Annotated[
    ContinuousParameter | IntegerParameter | CategoricalParameter, Field(discriminator="type")
]


def _csv_header(path: Path) -> list[str] | None:
    """The column names of a (gzipped) CSV file, or None for other formats."""
    name = path.name.lower()
    if not name.endswith((".csv", ".csv.gz")):
        return None
    try:
        with open_text(path) as handle:
            return next(csv.reader(handle), [])
    except READ_ERRORS as exc:
        raise ValueError(f"cannot read the header of {str(path)!r}: {exc}") from exc


class CandidateSet(_Frozen):
    """A fixed pool of candidates read from a table: rows of parameters, or crystal structures."""

    file: Path = Field(
        description="Table of candidates (CSV, optionally gzipped), relative to this YAML file; must exist."
    )
    id_column: str = Field(default="id", description="Column with a unique id per candidate.")
    structure_column: str | None = Field(
        default=None, description="Column with one crystal structure per row (CIF text or pymatgen JSON)."
    )
    structure_format: Literal["cif", "pymatgen-json"] = Field(
        default="cif", description="How `structure_column` is written: CIF text or pymatgen Structure JSON."
    )
    parameter_columns: list[str] | None = Field(
        default=None, description="Numeric columns used as descriptors / recipe parameters of each row."
    )
    formula_column: str | None = Field(default=None, description="Column with the chemical formula, if any.")

    @field_validator("file")
    @classmethod
    def _file_exists(cls, file: Path, info: ValidationInfo) -> Path:
        resolved = _resolve(file, info)
        if not resolved.is_file() and _data_required(info):
            raise ValueError(f"candidates file {str(file)!r} does not exist (looked for {str(resolved)!r})")
        return resolved

    @model_validator(mode="after")
    def _columns_exist(self) -> CandidateSet:
        if not self.file.is_file():
            return self  # only when the data are not required: nothing to read the columns from
        header = _csv_header(self.file)
        if header is None:
            return self
        wanted = [self.id_column, self.structure_column, self.formula_column, *(self.parameter_columns or [])]
        missing = [c for c in wanted if c is not None and c not in header]
        if missing:
            raise ValueError(f"column(s) {missing} not in {self.file.name}; its columns are {header}")
        if self.structure_column is None and not self.parameter_columns:
            raise ValueError("give structure_column (crystals) or parameter_columns (tabular rows)")
        return self


class PoolGeneration(_Frozen):
    """Grow a crystal pool between rounds: ionic substitution into the best candidates measured so far.

    The options mirror ``sdl generate`` (see :mod:`sdl.generation`); each new crystal is recorded as a
    material with its provenance (parent, substitution, probability) and scored by the engine.
    """

    n_per_round: int = Field(default=8, ge=1, le=10_000, description="New candidates added per growth.")
    max_pool_size: int | None = Field(
        default=None, ge=1, description="Stop growing once the pool holds this many candidates (None: no cap)."
    )
    parents: int = Field(
        default=4, ge=1, le=1_000, description="Best measured candidates (by the objective) substituted into."
    )
    every: int = Field(default=1, ge=1, le=1_000, description="Grow after every this many completed q-batches.")
    energy: Literal["relax", "static", "none"] = Field(
        default="static",
        description="CHGNet work per candidate: 'relax' (StructOptimizer, seconds each on a CPU), 'static' "
        "(one energy of the volume-rescaled cell) or 'none' (rank by substitution probability only).",
    )
    score_top: int | None = Field(
        default=None, ge=1, description="Most probable unique candidates that get a CHGNet energy (default 2x n)."
    )
    threshold: float = Field(
        default=1e-3, gt=0.0, lt=1.0, description="Lowest data-mined substitution probability considered."
    )
    relax_steps: int = Field(default=200, ge=1, le=10_000, description="Most optimiser steps per relaxation.")
    workers: int = Field(default=1, ge=1, le=64, description="Processes for building and scoring candidates.")


class SearchSpace(_Frozen):
    """Where the campaign searches: process parameters with bounds, OR a pool of candidates."""

    parameters: list[Parameter] | None = Field(
        default=None, min_length=1, description="Process parameters (continuous, integer, categorical)."
    )
    candidates: CandidateSet | None = Field(default=None, description="A fixed candidate pool read from a file.")
    generate: PoolGeneration | None = Field(
        default=None, description="Grow the crystal pool between rounds with generated candidates (needs candidates "
        "with a structure_column in CIF)."
    )

    @field_validator("parameters")
    @classmethod
    def _unique_names(cls, parameters: list[Any] | None) -> list[Any] | None:
        names = [p.name for p in parameters or []]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"parameter names must be unique, repeated: {duplicates}")
        return parameters

    @model_validator(mode="after")
    def _exactly_one(self) -> SearchSpace:
        if (self.parameters is None) == (self.candidates is None):
            got = "both" if self.parameters is not None else "neither"
            raise ValueError(f"give exactly one of 'parameters' or 'candidates' (got {got})")
        if self.generate is not None and (
            self.candidates is None or self.candidates.structure_column is None
            or self.candidates.structure_format != "cif"
        ):
            raise ValueError("generate: needs candidates with a structure_column in CIF (it substitutes into crystals)")
        return self


# --------------------------------------------------------------------------- objective, model


class ObjectiveSpec(_Frozen):
    """The measured property the campaign optimises, and in which direction."""

    property: str = Field(min_length=1, description="Name of the measured property, e.g. 'e_form'.")
    unit: str = Field(description="Unit of the property, e.g. 'eV' or 'J' (empty string if unitless).")
    goal: Literal["maximize", "minimize", "target"] = Field(
        description="maximize, minimize, or bring the value into `target_range`."
    )
    target_range: tuple[float, float] | None = Field(
        default=None,
        validate_default=True,
        description="[low, high] window of acceptable values; required with goal 'target', only then.",
    )
    extensive: bool = Field(
        default=False,
        description="True when the property scales with the cell (energy of the cell, heat of formation per "
        "cell): models learn it per atom and scale predictions by each crystal's atoms per cell. False (default) "
        "for intensive properties (band gap, energy per atom, refractive index), which are never scaled.",
    )

    @field_validator("target_range")
    @classmethod
    def _range_matches_goal(
        cls, target_range: tuple[float, float] | None, info: ValidationInfo
    ) -> tuple[float, float] | None:
        goal = info.data.get("goal")
        if goal == "target" and target_range is None:
            raise ValueError("goal 'target' needs target_range: [low, high]")
        if goal in ("maximize", "minimize") and target_range is not None:
            raise ValueError(f"target_range is only used with goal 'target', not {goal!r}")
        if target_range is not None:
            _check_bounds(target_range[0], target_range[1], "target_range low")
        return target_range


_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")


class OutcomeConstraint(_Frozen):
    """A measured property that must stay on one side of a bound (``gap >= 1.5``), whatever is optimised.

    Written in YAML as the string ``"gap_gllbsc >= 1.5"`` or as ``{property, op, value}``.
    """

    property: str = Field(min_length=1, description="Name of the measured property, e.g. 'gap_gllbsc'.")
    op: Literal[">=", "<="] = Field(description="'>=' (at least `value`) or '<=' (at most `value`).")
    value: float = Field(description="The bound, in the property's unit.")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, data: Any) -> Any:
        if not isinstance(data, str):
            return data
        match = _CONSTRAINT.match(data)
        if match is None:
            raise ValueError(f"constraint {data!r} must look like 'PROPERTY >= NUMBER' or 'PROPERTY <= NUMBER'")
        try:
            value = float(match.group(3))
        except ValueError:
            raise ValueError(f"constraint {data!r}: {match.group(3)!r} is not a number") from None
        return {"property": match.group(1), "op": match.group(2), "value": value}

    def __str__(self) -> str:
        return f"{self.property} {self.op} {self.value:g}"


_CONSTRAINT_SCHEMA: dict[str, Any] = {"anyOf": [
    {"type": "string", "pattern": r"^\s*[A-Za-z_][A-Za-z0-9_.\-]*\s*(>=|<=)\s*[-+0-9.eE]+\s*$",
     "description": "'PROPERTY >= NUMBER' or 'PROPERTY <= NUMBER', e.g. 'gap_gllbsc >= 1.5'."},
    {"type": "object", "additionalProperties": False, "required": ["property", "op", "value"],
     "description": "The same, structured.",
     "properties": {"property": {"type": "string", "description": "The measured property."},
                    "op": {"enum": [">=", "<="], "description": "At least (>=) or at most (<=)."},
                    "value": {"type": "number", "description": "The bound, in the property's unit."}}},
]}


class RandomOptions(_Frozen):
    """The random baseline has no options."""


class RandomModel(_Frozen):
    """Uniform random proposals: the baseline every benchmark reports beside the models."""

    name: Literal["random"] = Field(description="Model kind.")
    options: RandomOptions = Field(default_factory=RandomOptions, description="No options.")


class GPOptions(_Frozen):
    """Options of the Gaussian-process baseline (BoTorch SingleTaskGP)."""

    kernel: Literal["matern52", "rbf"] = Field(default="matern52", description="Covariance kernel.")
    descriptors: Literal["auto", "parameters", "composition"] = Field(
        default="auto",
        description="GP inputs: the process parameters, composition features of the formula, or "
        "'auto' (parameters if any, else composition).",
    )
    priors: Literal["lognormal", "gamma"] = Field(
        default="lognormal",
        description="Hyperpriors: 'lognormal' (default; BoTorch's dimension-scaled LogNormal lengthscale and noise "
        "priors, whose heavy tails switch off irrelevant inputs) or 'gamma' (BayBE 0.15's dimension-scaled "
        "Gamma lengthscale prior with the same mode and a light tail, for a few recipe parameters that all matter; "
        "see sdl.engine.models.gp.gamma_prior_modules).",
    )


class GPModel(_Frozen):
    """Gaussian process over parameters or composition descriptors."""

    name: Literal["gp"] = Field(description="Model kind.")
    options: GPOptions = Field(default_factory=GPOptions, description="GP options.")


class GNNEnsembleOptions(_Frozen):
    """The crystal model: a pretrained backbone with heads, or a graph-network ensemble from scratch.

    With ``backbone: chgnet`` (default) the pretrained network is frozen and only the heads learn
    (``members``, ``head``, ``use_prior``); the graph-network fields (hidden ... warm_start) apply
    to ``backbone: scratch``.
    """

    backbone: str = Field(
        default="chgnet",
        pattern=r"^(chgnet|scratch|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="Pretrained crystal model whose frozen embeddings the heads learn from: 'chgnet' (weights "
        "ship in its wheel), 'package.module:Class' for your own (see sdl.engine.models.backbones.Backbone), or "
        "'scratch' for a CGCNN-style ensemble trained from the labels alone.",
    )
    head: Literal["auto", "gp", "mlp"] = Field(
        default="auto",
        description="On a pretrained backbone: 'mlp' = an ensemble of small networks (bootstrap, recalibrated "
        "spread), 'gp' = a Gaussian process on the embeddings, 'auto' = the GP up to 1,000 labels, then the "
        "ensemble.",
    )
    use_prior: bool = Field(
        default=True,
        description="Give the heads the backbone's zero-shot prediction (CHGNet: energy per atom above its "
        "elemental references) as an input; useful for energy-like targets, harmless otherwise.",
    )
    featurize_workers: int = Field(
        default=1, ge=1, le=64, description="Processes that compute embeddings the cache lacks."
    )
    members: int = Field(default=5, ge=1, le=64, description="Number of independently trained networks.")
    hidden: int = Field(default=64, ge=1, le=1024, description="Width of node features.")
    layers: int = Field(default=3, ge=1, le=12, description="Number of message-passing layers.")
    cutoff: float = Field(default=6.0, gt=0.0, le=20.0, description="Neighbour cutoff radius, Å.")
    max_neighbors: int = Field(default=12, ge=1, le=64, description="Nearest neighbours kept per atom.")
    rbf: int = Field(default=40, ge=1, le=256, description="Gaussian basis functions for edge distances.")
    epochs: int = Field(default=150, ge=1, description="Maximum training epochs per member.")
    patience: int = Field(default=20, ge=1, description="Early-stopping patience, epochs.")
    learning_rate: float = Field(default=2e-3, gt=0.0, lt=1.0, description="Adam learning rate.")
    batch_size: int = Field(default=64, ge=1, description="Graphs per training batch.")
    validation_fraction: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Share of training data held out for early stopping."
    )
    bootstrap: bool = Field(default=True, description="Train each member on a bootstrap resample.")
    warm_start: bool = Field(default=True, description="Start each round from the previous round's weights.")


class GNNEnsembleModel(_Frozen):
    """Ensemble of crystal-graph neural networks, exposed to BoTorch as an EnsembleModel."""

    name: Literal["gnn-ensemble"] = Field(description="Model kind.")
    options: GNNEnsembleOptions = Field(default_factory=GNNEnsembleOptions, description="Ensemble options.")


ModelConfig = Annotated[RandomModel | GPModel | GNNEnsembleModel, Field(discriminator="name")]


class Acquisition(_Frozen):
    """How the next batch is chosen from the model's predictions.

    The one default is ``qlognei``, the right choice for the GP; for the GNN ensemble use ``qucb``
    (its members are few samples, so expected-improvement estimates are coarse).
    """

    function: Literal["qlogei", "qlognei", "qucb", "max-variance", "thompson"] = Field(
        default="qlognei",
        description="Acquisition function (default qlognei; qucb is recommended for gnn-ensemble).",
    )
    batch_size: int = Field(default=1, ge=1, le=1024, description="Experiments proposed per round (q).")
    mode: Literal["batch", "asynchronous"] = Field(
        default="batch",
        description="batch (default): propose batch_size experiments as one q-batch once the previous batch has "
        "ended; asynchronous: propose one experiment whenever a robot is free, the others in flight as pending.",
    )
    beta: float = Field(default=2.0, gt=0.0, description="Exploration weight of qUCB (mean + sqrt(beta)·std).")
    feasibility: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Unknown constraints: weight the acquisition by a classifier's probability that the synthesis "
        "succeeds, learnt from the failed experiments (sdl.engine.feasibility). auto (default): once an experiment "
        "failed, falling back to the plain acquisition when the classifier cannot be fitted; on: the same, but a "
        "classifier that cannot be fitted is an error; off: failures only leave the candidates.",
    )
    approval: Literal["none", "required"] = Field(
        default="none",
        description="none (default): proposals run at once; required: each proposed batch waits for a person "
        "(sdl approve CAMPAIGN [--drop ID], or the paused flow run's form in the Prefect UI).",
    )


class FidelitySource(_Frozen):
    """A cheap source of the objective's property: a computation that runs without an instrument.

    Its values are never counted as experiments; the multi-fidelity model learns how far they track
    the measured property (:mod:`sdl.engine.fidelity`).
    """

    name: str = Field(pattern=_NAME_PATTERN, description="Source name, recorded with each computed value.")
    kind: Literal["column", "pretrained"] = Field(
        description="column: a computed column of the candidates table (e.g. another database's DFT value); "
        "pretrained: the zero-shot prior of a pretrained backbone (CHGNet's energy per atom)."
    )
    column: str | None = Field(default=None, description="kind column: the column of search_space.candidates.file.")
    backbone: str = Field(default="chgnet", description="kind pretrained: the backbone (as in model.options).")
    cost: float = Field(gt=0.0, description="Cost of one computed value, in the units of fidelities.measured_cost.")

    @model_validator(mode="after")
    def _column_for_kind(self) -> FidelitySource:
        if self.kind == "column" and not self.column:
            raise ValueError(f"source {self.name!r}: kind 'column' needs column: <a column of the candidates>")
        if self.kind != "column" and self.column is not None:
            raise ValueError(f"source {self.name!r}: column is only used with kind 'column'")
        return self


class Fidelities(_Frozen):
    """Cheap sources beside the measured property, each with a cost, for a cost-aware campaign."""

    measured_cost: float = Field(gt=0.0, description="Cost of one measurement of the objective (an experiment).")
    sources: list[FidelitySource] = Field(min_length=1, description="The computed sources and their costs.")
    compute_batch: int = Field(
        default=16, ge=1, le=10_000, description="Most computations proposed per round (they run at once)."
    )

    @field_validator("sources")
    @classmethod
    def _unique_sources(cls, sources: list[FidelitySource]) -> list[FidelitySource]:
        names = [s.name for s in sources]
        duplicates = sorted({n for n in names if names.count(n) > 1} | ({"measured"} & set(names)))
        if duplicates:
            raise ValueError(f"source names must be unique and not 'measured', got {duplicates}")
        return sources


class InitialDesign(_Frozen):
    """Experiments chosen without a model, before the first training round."""

    strategy: Literal["random", "sobol", "prior"] = Field(
        default="random",
        description="How to pick them: random, sobol (parameter spaces), or prior (crystal pools with a "
        "pretrained backbone: the best candidates by the backbone's zero-shot prediction, for energy-like "
        "targets).",
    )
    size: int = Field(default=2, ge=1, description="How many initial experiments.")


class Budget(_Frozen):
    """Hard limits of the campaign."""

    experiments: int = Field(gt=0, description="Maximum number of experiments, initial design included.")
    max_failures: int | None = Field(
        default=None,
        ge=0,
        description="Fail the campaign when more experiments than this failed (material failures, plus abandoned "
        "ones unless max_abandoned is set; none: never).",
    )
    max_abandoned: int | None = Field(
        default=None,
        ge=0,
        description="Fail the campaign when more experiments than this were abandoned to instrument faults "
        "(none: they count toward max_failures).",
    )


class StoppingRules(_Frozen):
    """Optional early stops; the campaign ends at the first rule that fires or at the budget."""

    goal_value: float | None = Field(
        default=None, description="Stop once a measured value reaches this (in the goal's direction)."
    )
    patience: int | None = Field(
        default=None, ge=1,
        description="Stop after this many rounds without improvement (with `objectives`: without a larger "
        "hypervolume of the measured Pareto front).",
    )
    min_expected_improvement: float | None = Field(
        default=None, ge=0.0, description="Stop when the best expected improvement falls below this."
    )


class RetrainPolicy(_Frozen):
    """When the model is retrained."""

    every: int = Field(default=1, ge=1, description="Number of new measurements before retraining.")


# --------------------------------------------------------------------------- instruments, repository


class SimulatedFaults(_Frozen):
    """Per-command probabilities of the simulated faults, each in [0, 1]."""

    timeout: float = Field(default=0.0, ge=0.0, le=1.0, description="Probability of never answering.")
    garbled: float = Field(default=0.0, ge=0.0, le=1.0, description="Probability of a corrupted reply line.")
    drop: float = Field(default=0.0, ge=0.0, le=1.0, description="Probability of dropping the connection.")
    busy: float = Field(default=0.0, ge=0.0, le=1.0, description="Probability of answering BUSY.")
    failed_synthesis: float = Field(
        default=0.0, ge=0.0, le=1.0, description="Probability that a synthesis fails for a material reason."
    )
    drift: float = Field(default=0.0, ge=0.0, le=1.0, description="Probability of a drifted measurement.")


class ToleranceFactorFailures(_Frozen):
    """Synthesis failures by Goldschmidt's rule (``simulators.synthesis_rules.ToleranceFactorRule``).

    A simulated robot on a crystal world fails the synthesis of an ABX3 perovskite whose tolerance
    factor t = (r_A + r_X) / (sqrt(2) (r_B + r_X)) (Shannon radii, charge-balanced oxidation states)
    lies outside [low, high]; ``sdl benchmark`` replays fail the same candidates.
    """

    low: float = Field(default=0.8, gt=0.0, description="Smallest tolerance factor that forms a perovskite.")
    high: float = Field(default=1.07, gt=0.0, description="Largest tolerance factor that forms a perovskite.")
    unjudged: Literal["succeed", "fail"] = Field(
        default="succeed",
        description="A candidate without a charge-balanced assignment of known oxidation states with Shannon "
        "radii: succeed (left to the recorded data) or fail.",
    )

    _high_above_low = field_validator("high")(_high_above_low)


class SimulatorOptions(_Frozen):
    """How a simulated instrument behaves (used only with ``simulated: true``)."""

    time_scale: float = Field(default=0.01, gt=0.0, description="Factor on the real durations (0.01 = 100× faster).")
    seed: int | None = Field(default=None, description="Seed of the noise and faults (none: the campaign seed).")
    noise_std: float = Field(default=0.0, ge=0.0, description="Extra Gaussian noise on measured values, in its unit.")
    off_table: Literal["nearest", "refuse"] = Field(
        default="nearest", description="For a recipe not in the world's table: use the nearest row, or refuse it."
    )
    faults: SimulatedFaults = Field(default_factory=SimulatedFaults, description="Fault probabilities per command.")
    outage_after_s: float | None = Field(
        default=None, ge=0.0, description="Fault injection: stop answering this many seconds after start."
    )
    outage_s: float | None = Field(
        default=None,
        gt=0.0,
        description="Fault injection: how long the outage lasts (none: for good).",
    )
    impurity_rate: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Characterization station on a crystal world: probability that a sample holds a competing "
        "phase of the target's composition (real structure from `impurity_phases`) as its majority phase; "
        "its XRD pattern shows it and the experiment fails as a material failure.",
    )
    impurity_phases: Path | None = Field(
        default=None,
        description="CSV(.gz) of competing phases (id, formula, cif) the impurities are drawn from, relative to "
        "this YAML file; default: this instrument's phase_identification.competing_phases.",
    )
    xrd_strain: float = Field(
        default=0.0, ge=0.0, le=0.05,
        description="Largest isotropic lattice strain of a measured sample against its recorded structure "
        "(seeded per sample), e.g. 0.005.",
    )
    xrd_intensity_noise: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Relative noise on each XRD reflection's intensity (seeded per sample), e.g. 0.05.",
    )
    tolerance_factor: ToleranceFactorFailures | None = Field(
        default=None,
        description="Synthesis robot on a crystal world: fail syntheses whose Goldschmidt tolerance factor is "
        "outside [low, high] (a material failure: the experiment costs one and returns no value).",
    )

    @field_validator("impurity_phases")
    @classmethod
    def _impurity_phases_exist(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        if path is None:
            return None
        resolved = _resolve(path, info)
        if not resolved.is_file():
            raise ValueError(f"impurity phases file {str(path)!r} does not exist (looked for {str(resolved)!r})")
        return resolved


class PhaseIdentification(_Frozen):
    """XRD phase identification at a characterization station: did the synthesis make the target?"""

    enabled: bool = Field(default=True, description="Analyse every XRD pattern the station streams.")
    competing_phases: Path = Field(
        description="CSV(.gz) of known phases (id, cif; formula and space_group optional), relative to this YAML "
        "file: the phases of a target's composition other than the target are its competitors.",
    )
    threshold: float = Field(
        default=0.5, gt=0.0, le=1.0,
        description="Smallest target share of the diffracted intensity for the target to count as formed.",
    )
    min_fit: float = Field(
        default=0.8, gt=0.0, le=1.0,
        description="Smallest cosine similarity of the fitted phase mixture and the measured pattern; below it "
        "the pattern is unidentified and the target counts as not formed.",
    )
    fwhm_deg: float = Field(default=0.15, gt=0.0, le=2.0, description="Gaussian peak width (FWHM), degrees 2θ.")
    max_strain: float = Field(
        default=0.01, ge=0.0, le=0.1,
        description="Largest isotropic lattice strain a reference may be stretched by to match (0.01 = 1 %).",
    )

    @field_validator("competing_phases")
    @classmethod
    def _phases_exist(cls, path: Path, info: ValidationInfo) -> Path:
        resolved = _resolve(path, info)
        if not resolved.is_file():
            raise ValueError(f"competing phases file {str(path)!r} does not exist (looked for {str(resolved)!r})")
        return resolved


class Instrument(_Frozen):
    """One instrument on the line protocol: a real one at `url`, or a simulator on a world file."""

    name: str = Field(pattern=_NAME_PATTERN, description="Unique instrument name (used in logs and the database).")
    role: Literal["synthesis", "characterization"] = Field(description="What the instrument does.")
    driver: str = Field(
        default="sdl-line",
        pattern=r"^(sdl-line|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="Device class: 'sdl-line' (the SDL/1 robot or station of devices/) or 'package.module:Class', "
        "an Ophyd device that implements the instrument port of sdl.lab.instruments.",
    )
    url: str | None = Field(
        default=None,
        description="Connection, e.g. 'socket://127.0.0.1:5000' or '/dev/ttyUSB0'; for a simulator, where it serves.",
    )
    simulated: bool = Field(default=False, description="Start a simulator for this instrument on `world`.")
    world: Path | None = Field(
        default=None, description="Data file the simulator answers from, relative to this YAML file."
    )
    measures: list[str] = Field(default_factory=list, description="Properties this instrument measures.")
    timeout_s: float = Field(default=10.0, gt=0.0, description="Reply timeout per command, seconds.")
    outage_window_s: float = Field(
        default=60.0,
        ge=0.0,
        description="How long work waits for this instrument when it cannot be reached or stops answering "
        "(retried with back-off) before the campaign fails.",
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Driver-specific options (e.g. baudrate).")
    simulator: SimulatorOptions = Field(default_factory=SimulatorOptions, description="Simulator behaviour.")
    phase_identification: PhaseIdentification | None = Field(
        default=None,
        description="Characterization only: identify the phases of each streamed XRD pattern; a sample in which "
        "the target did not form fails the experiment as a material failure.",
    )

    @field_validator("url")
    @classmethod
    def _serial_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if not url or any(ch.isspace() for ch in url):
            raise ValueError(f"url must be non-empty without spaces, got {url!r}")
        if "://" in url:
            scheme, _, rest = url.partition("://")
            if scheme not in _SERIAL_SCHEMES:
                raise ValueError(f"url scheme {scheme!r} is not one of {list(_SERIAL_SCHEMES)} (got {url!r})")
            if scheme in ("socket", "rfc2217") and not re.fullmatch(r"[^:/]+:\d{1,5}(/.*|\?.*)?", rest):
                raise ValueError(f"url must look like '{scheme}://HOST:PORT', got {url!r}")
        elif not (url.startswith("/") or re.fullmatch(r"COM\d+", url)):
            raise ValueError(f"url must be a device path (/dev/...), COMn or SCHEME://..., got {url!r}")
        return url

    @field_validator("world")
    @classmethod
    def _world_exists(cls, world: Path | None, info: ValidationInfo) -> Path | None:
        if world is None:
            return None
        resolved = _resolve(world, info)
        if not resolved.is_file() and _data_required(info):
            raise ValueError(f"world file {str(world)!r} does not exist (looked for {str(resolved)!r})")
        return resolved

    @model_validator(mode="after")
    def _connection(self) -> Instrument:
        if self.simulated and self.world is None:
            raise ValueError(f"instrument {self.name!r}: simulated: true needs a world file")
        if not self.simulated and self.world is not None:
            raise ValueError(f"instrument {self.name!r}: world is only used with simulated: true")
        if not self.simulated and self.url is None:
            raise ValueError(f"instrument {self.name!r}: give url, or simulated: true with a world file")
        if self.role == "characterization" and not self.measures:
            raise ValueError(f"characterization instrument {self.name!r} must list what it measures")
        if self.role != "characterization" and self.phase_identification is not None:
            raise ValueError(f"instrument {self.name!r}: phase_identification is for characterization instruments")
        sim = self.simulator
        if sim.impurity_rate > 0 or sim.xrd_strain > 0 or sim.xrd_intensity_noise > 0:
            if self.role != "characterization":
                raise ValueError(f"instrument {self.name!r}: simulator.impurity_rate and xrd_* act where the "
                                 "sample's phases show (its XRD pattern): set them on the characterization instrument")
            if sim.impurity_rate > 0 and self.impurity_phases is None:
                raise ValueError(f"instrument {self.name!r}: simulator.impurity_rate needs simulator.impurity_phases "
                                 "or phase_identification.competing_phases (the phases an impurity is drawn from)")
        if sim.tolerance_factor is not None and self.role != "synthesis":
            raise ValueError(f"instrument {self.name!r}: simulator.tolerance_factor decides whether a synthesis "
                             "fails: set it on the synthesis instrument")
        return self

    @property
    def impurity_phases(self) -> Path | None:
        """The table the simulator draws impurities from (its own, else the phase identification's)."""
        if self.simulator.impurity_phases is not None:
            return self.simulator.impurity_phases
        return self.phase_identification.competing_phases if self.phase_identification is not None else None


def _notification_target(target: str) -> str:
    """An apprise URL or a Prefect block slug (apprise is imported only when a campaign has alerts)."""
    if "://" not in target:
        if _BLOCK_SLUG.fullmatch(target):
            return target
        raise ValueError(f"{target!r} is neither an apprise URL (scheme://...) nor a Prefect notification "
                         "block slug (block-type/block-name)")
    try:
        expanded = expand_env_vars(target)
    except KeyError as exc:
        raise ValueError(f"environment variable {exc.args[0]!r} is not set") from None
    import apprise

    if apprise.Apprise.instantiate(expanded) is None:
        scheme = expanded.partition("://")[0]
        raise ValueError(f"apprise cannot use a {scheme}:// URL like {target!r} (see its list of services)")
    return target


_DASK_ADDRESS = re.compile(r"^(local|((tcp|tls|ucx|inproc)://)?[A-Za-z0-9_.\-\[\]:]+:[0-9]{1,5})$")


class Compute(_Frozen):
    """Where a large candidate pool is featurised and scored (``sdl.engine.distributed``)."""

    dask: str = Field(
        default="local",
        description="'local' = a Dask LocalCluster of worker processes on this machine; or the address of a "
        "running scheduler ('tcp://host:8786', started with `dask scheduler`, its workers with `dask worker "
        "tcp://host:8786`). Overridden by --dask and SDL_DASK_ADDRESS.",
    )
    workers: int = Field(default=2, ge=1, le=256, description="Worker processes of the local cluster "
                         "(one thread each); a scheduler brings its own workers.")
    chunk: int = Field(default=8192, ge=64, le=1_000_000, description="Candidates scored per task.")

    @field_validator("dask")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if not _DASK_ADDRESS.match(value):
            raise ValueError(f"must be 'local' or a scheduler address like 'tcp://host:8786', got {value!r}")
        return value


class Repository(_Frozen):
    """Where the knowledge repository lives (SQLAlchemy URL)."""

    url: str | None = Field(
        default=None,
        description="SQLAlchemy URL, e.g. 'sqlite:///sdl.db' or '${SDL_DATABASE_URL}'; "
        "overridden by --db and SDL_DATABASE_URL; default sqlite:///sdl.db.",
    )


class Transfer(_Frozen):
    """Warm start: measurements of earlier campaigns in the repository seed the model.

    They are a related task of a multi-task GP, never experiments of this campaign (budget, design,
    best so far, stopping rules and ``sdl status`` count only this campaign's own). Checked against
    the repository when ``sdl run`` / ``sdl submit`` start: every named campaign must exist and
    have measured ``property`` in the objective's unit.
    """

    campaigns: Annotated[list[Annotated[str, Field(pattern=_NAME_PATTERN)]], Field(min_length=1)] | Literal["all"] = (
        Field(description="Earlier campaigns whose measurements seed the model, or 'all': every other campaign "
              "in the repository that measured `property`.")
    )
    property: str | None = Field(
        default=None, min_length=1,
        description="Property of the source measurements (default: the objective's property; same unit).",
    )
    mode: Literal["multitask"] = Field(
        default="multitask",
        description="How they seed the model: 'multitask' (ICM multi-task GP; task = source campaign vs this one).",
    )
    skip_measured: bool = Field(
        default=False,
        description="Never propose a candidate a source campaign measured (default: they stay proposable; "
        "this campaign measures them itself if the model wants them).",
    )

    @field_validator("campaigns")
    @classmethod
    def _distinct(cls, campaigns: list[str] | str) -> list[str] | str:
        if isinstance(campaigns, list):
            repeated = sorted({c for c in campaigns if campaigns.count(c) > 1})
            if repeated:
                raise ValueError(f"campaigns listed twice: {repeated}")
        return campaigns


# --------------------------------------------------------------------------- campaign


class CampaignConfig(_Frozen):
    """A whole closed-loop campaign: what to search, what to optimise, with which model and lab."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra={
        "oneOf": [{"required": ["objective"]}, {"required": ["objectives"]}]})

    name: str = Field(pattern=_NAME_PATTERN, max_length=100, description="Campaign name (unique per repository).")
    description: str = Field(default="", description="Free text for humans.")
    seed: int = Field(default=0, description="Seed of every random choice, for reproducible campaigns.")
    search_space: SearchSpace = Field(description="Process parameters or a candidate pool.")
    objective: ObjectiveSpec = Field(  # type: ignore[assignment] # None only until _one_objective_form
        default=None,
        description="The property to optimise (or give `objectives`, a list, for several; exactly one of the two).",
    )
    objectives: list[ObjectiveSpec] | None = Field(
        default=None, min_length=1, validate_default=True,
        description="Several properties optimised together (a Pareto front, qLogNEHVI); the first one is the "
        "'primary' property that single-value views (best so far) show. Exclusive with `objective`.",
    )
    reference_point: list[float] | None = Field(
        default=None,
        description="With `objectives`: one value per objective, in its unit, the worst value still worth having "
        "(for goal 'target': the largest acceptable distance from the range); the hypervolume is measured "
        "from it. Default: inferred from the measurements (BoTorch infer_reference_point).",
    )
    constraints: list[Annotated[OutcomeConstraint, WithJsonSchema(_CONSTRAINT_SCHEMA)]] = Field(
        default_factory=list,
        description="With `objectives`: outcome constraints every wanted candidate meets, e.g. ['gap_gllbsc >= 1.5'] "
        "or [{property: gap_gllbsc, op: '>=', value: 1.5}]; only feasible measurements count on the Pareto front.",
    )
    model: ModelConfig = Field(description="Surrogate model: random, gp or gnn-ensemble, with its options.")
    acquisition: Acquisition = Field(default_factory=Acquisition, description="Acquisition function and batch size.")
    initial_design: InitialDesign = Field(
        default_factory=InitialDesign, description="Experiments before the first model."
    )
    budget: Budget = Field(description="Maximum number of experiments and failures.")
    stopping: StoppingRules = Field(default_factory=StoppingRules, description="Optional early stopping rules.")
    retrain: RetrainPolicy = Field(default_factory=RetrainPolicy, description="When to retrain the model.")
    fidelities: Fidelities | None = Field(
        default=None, description="Cheap computed sources of the objective's property, with costs (multi-fidelity)."
    )
    instruments: list[Instrument] = Field(
        default_factory=list,
        description="The lab: at least one synthesis and one characterization instrument, or none "
        "(then the campaign can be validated and benchmarked, not run).",
    )
    repository: Repository = Field(default_factory=Repository, description="The knowledge repository.")
    compute: Compute | None = Field(
        default=None,
        description="Featurise and score the candidate pool on a Dask cluster (absent: in the campaign's process).",
    )
    transfer: Transfer | None = Field(
        default=None,
        description="Warm start from earlier campaigns' measurements (never counted as experiments of this one).",
    )
    notifications: list[Annotated[str, AfterValidator(_notification_target)]] = Field(
        default_factory=list,
        description="Where alerts go (campaign failed, instrument down past its window, goal reached, budget "
        "spent, stopped): apprise URLs ('json://host:port/path', 'mailto://...', 'slack://...') or Prefect "
        "notification block slugs ('slack-webhook/lab-alerts'). Secrets only as ${ENV_VAR}: checked at "
        "load, expanded when an alert is sent, stored unexpanded.",
    )

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: Path | None = PrivateAttr(default=None)

    def model_post_init(self, context: Any) -> None:
        """Keep the YAML's location (not a field: it is no part of the campaign's identity)."""
        context = context or {}
        self._base_dir = Path(context.get("base_dir") or Path.cwd()).resolve()
        self._source = Path(context["source"]) if context.get("source") else None

    @property
    def base_dir(self) -> Path:
        """Directory of the YAML file; relative paths in it resolve against this."""
        return self._base_dir

    @property
    def source(self) -> Path | None:
        """The YAML file this config was loaded from, if any."""
        return self._source

    @model_validator(mode="before")
    @classmethod
    def _an_objective(cls, data: Any) -> Any:
        """Neither ``objective`` nor ``objectives``: the one-objective form is what is missing."""
        if isinstance(data, dict) and data.get("objective") is None and data.get("objectives") is None:
            raise ValidationError.from_exception_data(
                cls.__name__, [InitErrorDetails(type="missing", loc=("objective",), input=data)])
        return data

    @field_validator("objectives")
    @classmethod
    def _one_objective_form(
        cls, objectives: list[ObjectiveSpec] | None, info: ValidationInfo
    ) -> list[ObjectiveSpec] | None:
        if "objective" not in info.data:
            return objectives  # `objective` itself was invalid: that error is the one to report
        given = info.data["objective"] is not None
        if given == (objectives is not None):
            got = "both" if given else "neither"
            raise ValueError(f"give exactly one of 'objective' (one property) or 'objectives' (a list), got {got}")
        if objectives is not None:
            names = [o.property for o in objectives]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"each property may be one objective only, repeated: {repeated}")
            space = info.data.get("search_space")
            if space is not None and space.generate is not None:
                raise ValueError("search_space.generate (growing the pool) is not supported with several "
                                 "objectives yet")
        return objectives

    @field_validator("reference_point")
    @classmethod
    def _reference_point_per_objective(cls, point: list[float] | None, info: ValidationInfo) -> list[float] | None:
        if point is None:
            return None
        objectives = info.data.get("objectives")
        if objectives is None:
            raise ValueError("reference_point is used with 'objectives' (a list), not with one 'objective'")
        if len(point) != len(objectives):
            raise ValueError(f"needs one value per objective ({len(objectives)}: "
                             f"{[o.property for o in objectives]}), got {len(point)}: {point}")
        return point

    @field_validator("constraints")
    @classmethod
    def _constraints_with_objectives(
        cls, constraints: list[OutcomeConstraint], info: ValidationInfo
    ) -> list[OutcomeConstraint]:
        if constraints and info.data.get("objectives") is None and info.data.get("objective") is not None:
            raise ValueError("constraints are used with 'objectives' (a list; one entry is fine), not with "
                             "'objective'")
        return constraints

    @field_validator("stopping")
    @classmethod
    def _stopping_with_objectives(cls, stopping: StoppingRules, info: ValidationInfo) -> StoppingRules:
        if info.data.get("objectives") is not None and len(info.data["objectives"]) > 1:
            for name in ("goal_value", "min_expected_improvement"):
                if getattr(stopping, name) is not None:
                    raise ValueError(f"{name} needs one objective; with several, stop on the hypervolume "
                                     "(patience) or the budget")
        return stopping

    @model_validator(mode="after")
    def _primary_objective(self) -> CampaignConfig:
        """With ``objectives``, ``objective`` is the first one (what single-value views show)."""
        if self.objectives is not None:
            object.__setattr__(self, "objective", self.objectives[0])
        return self

    @property
    def all_objectives(self) -> list[ObjectiveSpec]:
        """Every objective: the ``objectives`` list, or the one ``objective``."""
        return list(self.objectives) if self.objectives is not None else [self.objective]

    @property
    def modelled_properties(self) -> list[str]:
        """The properties the engine learns: each objective's, then each constrained one not already there."""
        names = [o.property for o in self.all_objectives]
        for constraint in self.constraints:
            if constraint.property not in names:
                names.append(constraint.property)
        return names

    @field_validator("budget")
    @classmethod
    def _budget_covers_initial_design(cls, budget: Budget, info: ValidationInfo) -> Budget:
        design = info.data.get("initial_design")
        if design is not None and design.size > budget.experiments:
            raise ValueError(
                f"experiments ({budget.experiments}) must be >= initial_design.size ({design.size})"
            )
        return budget

    @field_validator("fidelities")
    @classmethod
    def _fidelities_fit_the_pool(cls, fidelities: Fidelities | None, info: ValidationInfo) -> Fidelities | None:
        if fidelities is None:
            return None
        space = info.data.get("search_space")
        cand = space.candidates if space is not None else None
        if cand is None:
            raise ValueError("fidelities need a candidate pool (search_space.candidates): sources are per candidate")
        header = _csv_header(cand.file) if cand.file.is_file() else None
        for s in fidelities.sources:
            if s.kind == "column" and header is not None and s.column not in header:
                raise ValueError(f"source {s.name!r}: column {s.column!r} not in {cand.file.name}; its columns are "
                                 f"{header}")
            if s.kind == "pretrained" and cand.structure_column is None:
                raise ValueError(f"source {s.name!r}: kind 'pretrained' needs candidates with a structure_column")
        model = info.data.get("model")
        if model is not None and model.name != "gp":
            raise ValueError(f"fidelities need model gp (a multi-task GP over the sources), not {model.name!r}")
        acquisition = info.data.get("acquisition")
        if acquisition is not None and acquisition.function == "thompson":
            raise ValueError("fidelities rank candidates by an acquisition value; thompson has none")
        return fidelities

    @field_validator("instruments")
    @classmethod
    def _lab_is_complete(cls, instruments: list[Instrument], info: ValidationInfo) -> list[Instrument]:
        if not instruments:
            return instruments
        names = [i.name for i in instruments]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"instrument names must be unique, repeated: {duplicates}")
        roles = {i.role for i in instruments}
        for role in ("synthesis", "characterization"):
            if role not in roles:
                raise ValueError(f"needs at least one {role} instrument (roles listed: {sorted(roles)})")
        objective = info.data.get("objective")
        measured = {m for i in instruments if i.role == "characterization" for m in i.measures}
        if objective is not None and objective.property not in measured:
            raise ValueError(
                f"no characterization instrument measures the objective {objective.property!r} "
                f"(measured: {sorted(measured)})"
            )
        for what, items in (("objective", info.data.get("objectives") or []),
                            ("constrained property", info.data.get("constraints") or [])):
            for item in items:
                if item.property not in measured:
                    raise ValueError(f"no characterization instrument measures the {what} {item.property!r} "
                                     f"(measured: {sorted(measured)})")
        space = info.data.get("search_space")
        crystals = space is not None and space.candidates is not None and space.candidates.structure_column
        for inst in instruments:
            if inst.phase_identification is not None and inst.phase_identification.enabled and not crystals:
                raise ValueError(f"instrument {inst.name!r}: phase_identification needs a crystal candidate pool "
                                 "(search_space.candidates with structure_column)")
        return instruments

    @field_validator("transfer")
    @classmethod
    def _transfer_fits(cls, t: Transfer | None, info: ValidationInfo) -> Transfer | None:
        if t is None:
            return t
        name, model = info.data.get("name"), info.data.get("model")
        if isinstance(t.campaigns, list) and name in t.campaigns:
            raise ValueError(f"campaigns names this campaign itself ({name!r}); list earlier ones")
        learns = model is None or model.name == "gp" or (
            isinstance(model, GNNEnsembleModel) and model.options.backbone != "scratch" and model.options.head != "mlp")
        if not learns and model is not None:
            raise ValueError(f"model {model.name!r} cannot learn from earlier campaigns (use model gp, or "
                             "gnn-ensemble with a pretrained backbone and head gp or auto)")
        return t

    def snapshot(self) -> dict[str, Any]:
        """JSON-able dump for the repository: paths relative to :attr:`base_dir`, passwords masked.

        Relative paths keep the snapshot (and the hash) the same wherever the project is checked out.
        """
        data = self.model_dump(mode="json")
        if self.objectives is None:  # absent, as before several objectives existed: old hashes hold
            for key in ("objectives", "reference_point", "constraints"):
                data.pop(key, None)
        else:
            data.pop("objective", None)  # the first of `objectives`, not a field of its own
        if data.get("fidelities", 0) is None:
            del data["fidelities"]  # absent, as before the option existed: old hashes hold
        if data["search_space"].get("generate", 0) is None:
            del data["search_space"]["generate"]  # absent, as before the option existed: old hashes hold
        if data.get("compute", 0) is None:
            del data["compute"]
        if data.get("transfer", 0) is None:
            del data["transfer"]  # likewise
        if data["model"].get("options", {}).get("priors") == "lognormal":
            del data["model"]["options"]["priors"]  # the default, as before the option existed
        if data["acquisition"].get("feasibility") == "auto":
            del data["acquisition"]["feasibility"]  # the default, as before the option existed
        for dumped in data["instruments"]:
            if dumped.get("simulator", {}).get("tolerance_factor", 0) is None:
                del dumped["simulator"]["tolerance_factor"]
        candidates = data["search_space"].get("candidates")
        if candidates is not None:
            candidates["file"] = self._relative(self.search_space.candidates.file)  # type: ignore[union-attr]
        for dumped, instrument in zip(data["instruments"], self.instruments, strict=False):
            if instrument.world is not None:
                dumped["world"] = self._relative(instrument.world)
            if instrument.simulator.impurity_phases is not None:
                dumped["simulator"]["impurity_phases"] = self._relative(instrument.simulator.impurity_phases)
            if instrument.phase_identification is not None:
                phases = instrument.phase_identification.competing_phases
                dumped["phase_identification"]["competing_phases"] = self._relative(phases)
        if data["repository"]["url"]:
            data["repository"]["url"] = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", data["repository"]["url"])
        return data

    def config_hash(self) -> str:
        """sha256 of the canonical JSON snapshot, without the repository (where results go is no
        part of what the campaign does, and its URL may differ between machines)."""
        data = self.snapshot()
        data.pop("repository", None)
        data.pop("notifications", None)  # who is told is no part of what the campaign does
        data.pop("compute", None)  # nor where its pool is scored: the same proposals either way
        canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def _relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self._base_dir)).as_posix()


def expand_env_vars(text: str) -> str:
    """``text`` with ``${VAR}`` / ``${VAR:-default}`` replaced from the environment.

    Raises:
        KeyError: A variable without default is not set (its name is ``args[0]``).
    """

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None:
            if default is None:
                raise KeyError(name)
            return default
        return found

    return _ENV_PATTERN.sub(replace, text)


def missing_data_files(cfg: CampaignConfig) -> list[tuple[str, int | None, Path]]:
    """``(field path, line, resolved path)`` of each data file the campaign names that is not here.

    Empty after a normal :func:`load_campaign` (which refuses missing data); with
    ``require_data=False`` it lists what ``sdl run`` would need (e.g. a pool kept outside the repository).
    """
    found: list[tuple[_Path, Path]] = []
    candidates = cfg.search_space.candidates
    if candidates is not None and not candidates.file.is_file():
        found.append((("search_space", "candidates", "file"), candidates.file))
    for index, instrument in enumerate(cfg.instruments):
        if instrument.world is not None and not instrument.world.is_file():
            found.append((("instruments", index, "world"), instrument.world))
    lines: dict[_Path, int] = {}
    if found and cfg.source is not None:  # read again for the lines (the config keeps no YAML)
        try:
            lines = _compose(cfg.source.read_text(encoding="utf-8"), str(cfg.source))[1]
        except (OSError, UnicodeDecodeError, CampaignConfigError):
            lines = {}
    return [(_format_path(path), _line_of(path, lines) if lines else None, file) for path, file in found]


def campaign_json_schema() -> dict[str, Any]:
    """JSON Schema of the campaign YAML (editors use it for completion and checks)."""
    schema = CampaignConfig.model_json_schema()
    return {**schema, "$schema": "https://json-schema.org/draft/2020-12/schema", "title": "SDL campaign"}


# --------------------------------------------------------------------------- loading

_Path = tuple[str | int, ...]


def _format_path(path: _Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _compose(text: str, file: str) -> tuple[Any, dict[_Path, int]]:
    """Parse YAML safely; return the data and a map field path → 1-based line."""
    loader = yaml.SafeLoader(text)
    lines: dict[_Path, int] = {}
    try:
        node = loader.get_single_node()
        if node is not None:
            size = _tree_size(node, {})
            if size > _MAX_NODES:
                raise CampaignConfigError(
                    f"document expands to {size} values through aliases (more than {_MAX_NODES})", file=file, line=1
                )
            _walk(node, (), lines, file)
        try:
            data = loader.construct_document(node) if node is not None else None
        except yaml.constructor.ConstructorError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else None
            tag = re.search(r"tag '([^']*)'", exc.problem or "")
            field = next((p for p, n in sorted(lines.items(), key=lambda kv: len(kv[0])) if n == line and p), None)
            what = f"tag {tag.group(1).replace('tag:yaml.org,2002:', '!!')!r}" if tag else (exc.problem or "value")
            raise CampaignConfigError(
                f"unsafe or unknown YAML {what} (only plain YAML is allowed)",
                file=file,
                line=line,
                field=_format_path(field) if field else None,
            ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem:
            where = f" started at line {exc.context_mark.line + 1}" if exc.context_mark else ""
            what = f"{exc.problem} ({exc.context}{where})"
        raise CampaignConfigError(
            f"YAML syntax error: {what}", file=file, line=mark.line + 1 if mark else None
        ) from None
    finally:
        loader.dispose()
    return data, lines


def _tree_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """Number of values once aliases are expanded (guards against 'billion laughs' documents)."""
    if id(node) not in memo:
        memo[id(node)] = 1  # a recursive alias counts once instead of looping
        children: list[yaml.Node] = []
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        memo[id(node)] = 1 + sum(min(_tree_size(c, memo), _MAX_NODES + 1) for c in children)
    return memo[id(node)]


def _walk(node: yaml.Node, path: _Path, lines: dict[_Path, int], file: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = str(key_node.value)
            if key in seen:
                raise CampaignConfigError(
                    f"duplicate key {key!r}",
                    file=file,
                    line=key_node.start_mark.line + 1,
                    field=_format_path((*path, key)),
                )
            seen.add(key)
            lines[(*path, key)] = key_node.start_mark.line + 1
            _walk(value_node, (*path, key), lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*path, index)] = item.start_mark.line + 1
            _walk(item, (*path, index), lines, file)


def _expand_env(value: Any, path: _Path, lines: dict[_Path, int], file: str | None) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string; an unset variable is an error."""
    if isinstance(value, dict):
        return {k: _expand_env(v, (*path, str(k)), lines, file) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*path, i), lines, file) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = os.environ.get(name)
        if found is None:
            if default is not None:
                return default
            raise CampaignConfigError(
                f"environment variable {name!r} is not set (referenced as ${{{name}}})",
                file=file,
                line=_line_of(path, lines),
                field=_format_path(path),
            )
        return found

    return _ENV_PATTERN.sub(replace, value)


def _line_of(path: _Path, lines: dict[_Path, int]) -> int | None:
    """Line of the deepest node along ``path`` that exists in the YAML."""
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return None


def _data_path(loc: tuple[Any, ...], data: Any) -> _Path:
    """Turn a pydantic error loc into a path in the YAML data.

    Drops the union tags pydantic inserts (``model.gp.options`` → ``model.options``) and the type
    labels after a scalar; a missing key ends the path.
    """
    path: list[str | int] = []
    current = data
    for part in loc:
        if isinstance(current, dict):
            if part in current:
                path.append(part)
                current = current[part]
                continue
            if part in _UNION_TAGS and part in (current.get("type"), current.get("name")):
                continue  # discriminated-union tag
            path.append(part)
            return tuple(path)
        if isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
            continue
        break  # a scalar: the rest are type labels of a plain union
    return tuple(path)


def _model_at(path: _Path, data: Any) -> type[BaseModel] | None:
    """The config model class that validates the mapping at ``path`` (for 'allowed keys' hints)."""
    candidates: list[type[BaseModel]] = [CampaignConfig]
    current = data
    for part in path:
        if isinstance(part, int):
            current = current[part] if isinstance(current, list) and 0 <= part < len(current) else None
            continue
        model = _pick_model(candidates, current)
        if model is None or not isinstance(current, dict) or part not in model.model_fields:
            return None
        candidates = _models_in(model.model_fields[part].annotation)
        current = current.get(part)
    return _pick_model(candidates, current)


def _pick_model(candidates: list[type[BaseModel]], value: Any) -> type[BaseModel] | None:
    if len(candidates) == 1:
        return candidates[0]
    if not isinstance(value, dict):
        return None
    for candidate in candidates:
        for key in ("type", "name"):
            field = candidate.model_fields.get(key)
            if field is not None and value.get(key) in typing.get_args(field.annotation):
                return candidate
    return None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType, list, Annotated):
        return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]
    return []


def _error_message(error: ErrorDetails, data: Any, path: _Path) -> str:
    kind = error["type"]
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        model = _model_at(path[:-1], data)
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(str(path[-1]), allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {path[-1]!r}{hint}" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    message = str(error["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        expected = error.get("ctx", {}).get("expected_tags", "")
        tag = error.get("ctx", {}).get("tag")
        return f"must be one of {expected}" + (f" (got {tag!r})" if tag is not None else "")
    if kind != "value_error" and not isinstance(error.get("input"), (dict, list)):
        message += f" (got {error.get('input')!r})"
    return message


def _config_error(exc: ValidationError, data: Any, lines: dict[_Path, int], file: str | None) -> CampaignConfigError:
    """The first error (in file order) of a pydantic ValidationError, as one ``file:line field`` line."""
    found = []
    for error in exc.errors():
        path = _data_path(tuple(error["loc"]), data)
        if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path = (*path, str(error.get("ctx", {}).get("discriminator", "")).strip("'"))
        found.append((_line_of(path, lines) or 0, path, error))
    # Problems at nodes that exist first (a typo in a key beats the 'missing' it causes), then file order.
    found.sort(key=lambda item: (item[2]["type"] == "missing", item[0]))
    line, path, error = found[0]
    message = _error_message(error, data, path)
    others = len({p for _, p, _ in found}) - 1
    if others > 0:
        message += f" (and {others} more error{'s' if others > 1 else ''})"
    return CampaignConfigError(message, file=file, line=line or None, field=_format_path(path) or None)


def validate_campaign_dict(
    data: Any,
    file: str | Path | None = None,
    *,
    base_dir: str | Path | None = None,
    require_data: bool = True,
    _lines: dict[_Path, int] | None = None,
) -> CampaignConfig:
    """Validate already-parsed campaign data (e.g. a snapshot read back from the repository).

    Args:
        data: The mapping, as ``yaml.safe_load`` would return it.
        file: The file it came from, for error messages and as the base of relative paths.
        base_dir: Directory relative paths resolve against (default: the file's directory, else cwd).
        require_data: False: data files that do not exist are no error (see :func:`missing_data_files`).

    Raises:
        CampaignConfigError: ``file:line field.path: message`` for the first problem.
    """
    name = str(file) if file is not None else None
    lines = _lines or {}
    if not isinstance(data, dict):
        got = "an empty document" if data is None else f"a {type(data).__name__}"
        raise CampaignConfigError(f"a campaign must be a mapping of keys, got {got}", file=name,
                                  line=_line_of((), lines))
    # Alerts keep their ${VAR} references (expanded when sent, never stored expanded); unset ones fail now.
    notifications = data.get("notifications")
    data = _expand_env({k: v for k, v in data.items() if k != "notifications"}, (), lines, name)
    if notifications is not None:
        _expand_env(notifications, ("notifications",), lines, name)
        data["notifications"] = notifications
    if base_dir is None:
        base_dir = Path(file).resolve().parent if file is not None else Path.cwd()
    context = {"base_dir": Path(base_dir), "source": Path(file).resolve() if file is not None else None,
               "require_data": require_data}
    try:
        return CampaignConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise _config_error(exc, data, lines, name) from None


def config_error(cfg: CampaignConfig, field: str, message: str) -> CampaignConfigError:
    """A ``file:line field: message`` error found after loading (e.g. against the repository).

    The line is looked up again in the YAML the config came from (none when it is gone or the
    config was not loaded from a file).
    """
    name = str(cfg.source) if cfg.source is not None else None
    line = None
    if cfg.source is not None:
        try:
            _, lines = _compose(cfg.source.read_text(encoding="utf-8"), str(cfg.source))
            path: _Path = tuple(int(p) if p.isdigit() else p for p in field.split("."))
            line = _line_of(path, lines)
        except (OSError, UnicodeDecodeError, CampaignConfigError):
            line = None
    return CampaignConfigError(message, file=name, line=line, field=field)


def load_campaign(path: str | Path, *, require_data: bool = True) -> CampaignConfig:
    """Read and validate a campaign YAML file.

    Args:
        path: The YAML file; relative paths inside it resolve against its directory.
        require_data: False: check the schema only; data files that do not exist here are listed by
            :func:`missing_data_files` instead of being an error.

    Raises:
        CampaignConfigError: ``file:line field.path: message`` for the first problem found.
    """
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CampaignConfigError(f"cannot read the file: {reason}", file=name) from None
    data, lines = _compose(text, name)
    config = validate_campaign_dict(data, name, require_data=require_data, _lines=lines)
    logger.debug("loaded campaign %r from %s (hash %s)", config.name, name, config.config_hash()[:12])
    return config
