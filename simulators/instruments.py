"""Simulated synthesis robot and characterization station: job state machines with a journal.

Jobs are keyed by the *client's* job id (the experiment's idempotency key). A ``START`` with a
known id never starts anything again: it answers with the existing job (or ``ERR DUPLICATE`` when
the recipe differs). Every job transition is appended to a JSONL journal and fsync'd before the
reply leaves, so a restarted simulator reloads its jobs and a crash test can prove from this
"instrument log" that no synthesis ever ran twice. Durations are computed from wall-clock
timestamps, so a job that was running when the simulator stopped finishes on schedule after a
restart.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from devices.protocol import PROTOCOL_VERSION, Command, FrameError, format_busy, format_data, format_ok, seal
from simulators.faults import FaultInjector
from simulators.impurities import ImpurityModel, SamplePhases
from simulators.synthesis_rules import ToleranceFactorRule
from simulators.worlds import CrystalWorld, World, WorldError

__all__ = ["Job", "Journal", "SimulatedInstruments", "SYNTH_SECONDS", "MEASURE_SECONDS"]

logger = logging.getLogger(__name__)

SYNTH_SECONDS = 60.0
"""Unscaled duration of one synthesis (seconds); multiplied by the time scale."""
MEASURE_SECONDS = 20.0
"""Unscaled duration of one measurement (seconds); multiplied by the time scale."""
MATERIAL_FAILURES = (
    "precipitate formed before annealing; sample lost",
    "crucible cracked during calcination; sample lost",
    "precursor did not dissolve; sample lost",
)


@dataclass
class Job:
    """One synthesis or measurement job, as the instrument remembers it."""

    job_id: str
    kind: str  # "synth" | "measure"
    recipe: dict[str, Any]
    started_at: float
    finishes_at: float
    state: str = "running"  # running | done | failed | aborted
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    failure: str | None = None  # "material" for a lost sample
    ended_at: float | None = None

    def summary(self, now: float) -> dict[str, Any]:
        """The job as a ``JOB?`` / ``STATUS`` reply object."""
        total = max(self.finishes_at - self.started_at, 1e-9)
        progress = 1.0 if self.state != "running" else min(1.0, max(0.0, (now - self.started_at) / total))
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "kind": self.kind,
            "state": self.state,
            "progress": round(progress, 4),
            "started_at": self.started_at,
        }
        if self.state == "running":
            out["remaining_s"] = round(max(0.0, self.finishes_at - now), 4)
        if self.ended_at is not None:
            out["ended_at"] = self.ended_at
        if self.error:
            out["error"] = self.error
        if self.failure:
            out["failure"] = self.failure
        return out


class Journal:
    """Append-only JSONL log of job transitions, fsync'd per record.

    Args:
        path: The journal file (created if missing), or ``None`` for no journal.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()

    def load(self) -> list[dict[str, Any]]:
        """All records written so far (a torn last line from a crash is skipped)."""
        if self.path is None or not self.path.exists():
            return []
        records = []
        with self.path.open("r", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    logger.warning("journal %s:%d: unreadable record skipped", self.path, number)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and fsync it before returning."""
        if self.path is None:
            return
        line = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
        with self._lock, self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())


class SimulatedInstruments:
    """The simulated instrument(s) behind one server: a robot, a station, or both.

    Args:
        world: The recorded truth.
        instruments: Which families are served: ``{"robot"}``, ``{"station"}`` or both.
        time_scale: Multiplies every duration (``0.001`` makes a 60 s synthesis take 60 ms).
        seed: Seed of measurement draws (per job id) and of faults.
        noise_std: Gaussian noise added on top of the recorded value (property units).
        faults: The fault injector (material faults and drift are applied here).
        journal: Where job transitions are logged; reloaded at construction.
        serial: Serial number in the identity.
        synth_seconds: Unscaled synthesis duration.
        measure_seconds: Unscaled measurement duration.
        impurities: Which phases each measured sample holds (crystal worlds only); its XRD
            pattern then comes from those phases. ``None``: every sample is its pure target.
        synthesis_rule: A chemical rule that fails syntheses of some crystals (a material
            failure, decided by the target alone); crystal worlds only.
    """

    def __init__(
        self,
        world: World,
        *,
        instruments: frozenset[str] = frozenset({"robot", "station"}),
        time_scale: float = 1.0,
        seed: int = 0,
        noise_std: float = 0.0,
        faults: FaultInjector | None = None,
        journal: Journal | None = None,
        serial: str = "SIM-0001",
        synth_seconds: float = SYNTH_SECONDS,
        measure_seconds: float = MEASURE_SECONDS,
        impurities: ImpurityModel | None = None,
        synthesis_rule: ToleranceFactorRule | None = None,
    ) -> None:
        if time_scale < 0:
            raise ValueError(f"time_scale={time_scale} must be >= 0")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must be >= 0")
        self.world = world
        self.instruments = frozenset(instruments)
        self.time_scale = time_scale
        self.seed = seed
        self.noise_std = noise_std
        self.faults = faults or FaultInjector(seed=seed)
        self.journal = journal or Journal(None)
        self.serial = serial
        self.synth_seconds = synth_seconds
        self.measure_seconds = measure_seconds
        if impurities is not None and not isinstance(world, CrystalWorld):
            raise ValueError(f"impurities need a crystal world, not {world.name}")
        self.impurities = impurities
        if synthesis_rule is not None and not isinstance(world, CrystalWorld):
            raise ValueError(f"a synthesis rule needs a crystal world, not {world.name}")
        self.synthesis_rule = synthesis_rule
        self.jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self._replay(self.journal.load())

    # -- identity -------------------------------------------------------------------------
    @property
    def model(self) -> str:
        """Model name in the identity: which instrument families this server plays."""
        return "+".join(sorted(self.instruments))

    def identity(self) -> str:
        """``vendor,model,serial,protocol`` (the ``*IDN?`` reply text)."""
        return f"SDL-Sim,{self.model},{self.serial},{PROTOCOL_VERSION}"

    # -- journal --------------------------------------------------------------------------
    def _replay(self, records: list[dict[str, Any]]) -> None:
        for number, rec in enumerate(records, 1):
            jid = rec.get("job_id")
            event = rec.get("event")
            if not isinstance(jid, str):
                continue
            if event == "started":
                try:
                    self.jobs[jid] = Job(jid, str(rec["kind"]), dict(rec["recipe"]), float(rec["started_at"]),
                                         float(rec["finishes_at"]))
                except (KeyError, TypeError, ValueError):
                    logger.warning("journal %s record %d: incomplete 'started' record skipped", self.journal.path,
                                   number)
            elif jid in self.jobs and event in ("finished", "failed", "aborted"):
                job = self.jobs[jid]
                job.state = {"finished": "done", "failed": "failed", "aborted": "aborted"}[event]
                job.result = rec.get("result") or {}
                job.error = rec.get("error")
                job.failure = rec.get("failure")
                job.ended_at = rec.get("t")
        if records:
            logger.info("journal: reloaded %d jobs from %s", len(self.jobs), self.journal.path)

    def _log(self, event: str, job: Job, **extra: Any) -> None:
        record = {"t": time.time(), "event": event, "job_id": job.job_id, "kind": job.kind}
        record.update(extra)
        self.journal.append(record)

    # -- time -----------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> None:
        """Finish every job whose time has come (journal first, then state)."""
        now = time.time() if now is None else now
        with self._lock:
            for job in self.jobs.values():
                if job.state == "running" and now >= job.finishes_at:
                    self._finish(job, now)

    def _finish(self, job: Job, now: float) -> None:
        if job.kind == "synth":
            if self.faults.synthesis_fails(job.job_id):
                error = random.Random(f"{self.seed}:{job.job_id}").choice(MATERIAL_FAILURES)
                self._log("failed", job, error=error, failure="material")
                job.state, job.error, job.failure = "failed", error, "material"
            else:
                try:
                    point = self.world.resolve(job.recipe)
                except WorldError as exc:  # checked at START; only a changed world file gets here
                    self._log("failed", job, error=exc.message, failure="instrument")
                    job.state, job.error, job.failure, job.ended_at = "failed", exc.message, "instrument", now
                    return
                reason = self._rule_failure(point)
                if reason is not None:
                    self._log("failed", job, error=reason, failure="material")
                    job.state, job.error, job.failure, job.ended_at = "failed", reason, "material", now
                    return
                result = {"sample": {"id": f"sample-{job.job_id}", "key": point.key}, "note": point.note}
                self._log("finished", job, result=result)
                job.state, job.result = "done", result
        else:
            rng = random.Random(f"{self.seed}:measure:{job.job_id}")
            try:
                m = self.world.measure(job.recipe, rng, self.noise_std)
            except WorldError as exc:  # checked at START; defensive
                self._log("failed", job, error=exc.message, failure="instrument")
                job.state, job.error, job.failure = "failed", exc.message, "instrument"
                job.ended_at = now
                return
            values, quality = dict(m.values), "ok"
            if self.faults.drifts(job.job_id):
                values = {p: v + 3.0 * self.world.scale(p) for p, v in values.items()}
                quality = "drift"
            measured: dict[str, Any] = {
                "key": m.key,
                "values": values,
                "std": m.std,
                "units": dict(self.world.units),
                "quality": quality,
                "note": m.note,
            }
            try:
                truth = self.sample_phases(job)
            except ValueError as exc:  # a CIF of the phase table that does not parse: RAW will say so
                logger.warning("measurement %s: phases of its sample unknown: %s", job.job_id, exc)
                truth = None
            extra = {"phases": truth.as_record()} if truth is not None else {}
            self._log("finished", job, result=measured, **extra)  # the truth stays in the instrument log
            job.state, job.result = "done", measured
        job.ended_at = now

    def _rule_failure(self, point: Any) -> str | None:
        """Why the synthesis rule fails this target (None: it forms)."""
        if self.synthesis_rule is None or not isinstance(self.world, CrystalWorld):
            return None
        try:
            verdict = self.synthesis_rule.judge_cif(self.world.cif(point))
        except ValueError as exc:  # not an ABX3 perovskite: the rule has nothing to say
            logger.info("synthesis rule cannot judge %s: %s", point.key, exc)
            return None
        return verdict.reason

    # -- commands -------------------------------------------------------------------------
    def handle(self, cmd: Command) -> list[bytes]:
        """Execute one parsed command; return the reply line(s).

        Raises:
            FrameError: for every ``ERR`` reply (the server formats it).
        """
        with self._lock:
            now = time.time()
            self.tick(now)
            if cmd.name == "*IDN?":
                return [format_ok(self.identity())]
            if cmd.name == "STATUS?":
                running = [j.job_id for j in self.jobs.values() if j.state == "running"]
                return [format_ok({
                    "instrument": self.model,
                    "state": "busy" if running else "idle",
                    "running": running[:20],
                    "jobs": len(self.jobs),
                    "world": self.world.name,
                    "properties": dict(self.world.units),
                    "protocol": PROTOCOL_VERSION,
                    "time_scale": self.time_scale,
                })]
            if cmd.name == "JOBS?":
                jobs = list(self.jobs.values())
                return [format_ok({"count": len(jobs),
                                   "jobs": [{"job_id": j.job_id, "kind": j.kind, "state": j.state}
                                            for j in jobs[-30:]]})]
            if cmd.name == "JOB?":
                job = self._job(cmd.job_id, None)
                return [format_ok({**job.summary(now), "recipe": job.recipe, "result": job.result})]
            family = cmd.family
            kind = "synth" if family == "SYNTH" else "measure"
            needed = "robot" if kind == "synth" else "station"
            if needed not in self.instruments:
                raise FrameError("UNSUPPORTED", f"this instrument ({self.model}) does not serve {family} commands")
            verb = cmd.verb
            if verb == "START":
                return [self._start(kind, cmd.job_id or "", cmd.payload, now)]
            job = self._job(cmd.job_id, kind)
            if verb == "STATUS":
                return [format_ok(job.summary(now))]
            if verb == "ABORT":
                if job.state == "running":
                    self._log("aborted", job, error="aborted by client")
                    job.state, job.error, job.ended_at = "aborted", "aborted by client", now
                return [format_ok(job.summary(now))]
            if verb == "RESULT":
                if job.state == "running":
                    raise FrameError("STATE", f"job {job.job_id} is still running")
                return [format_ok({**job.summary(now), **job.result})]
            if verb == "RAW":
                if job.state != "done":
                    raise FrameError("STATE", f"job {job.job_id} is {job.state}, no raw data")
                recipe = job.recipe
            else:
                raise FrameError("UNKNOWN", f"unknown command {cmd.name}")
        # Raw data (an XRD pattern) may take a while the first time: compute it outside the lock
        # so that the other instrument served by this process keeps answering.
        try:
            phases = self.sample_phases(job)
            if phases is not None and isinstance(self.world, CrystalWorld) and self.impurities is not None:
                rows: list[tuple[float, ...]] = list(
                    self.impurities.pattern(phases, self.world.cif(self.world.resolve(recipe))))
            else:
                _, rows = self.world.raw(self.world.resolve(recipe))
        except WorldError as exc:
            raise FrameError(exc.code, exc.message) from None
        except ValueError as exc:  # a phase table's CIF that does not parse
            raise FrameError("INTERNAL", f"no XRD pattern for job {job.job_id}: {exc}") from None
        return [format_ok(f"DATA {len(rows)}"), *(format_data(r) for r in rows), format_ok_end()]

    def sample_phases(self, job: Job) -> SamplePhases | None:
        """The phases of the sample a measurement job looked at (``None`` without an impurity model).

        The sample is the recipe's ``sample`` (the robot's sample id, passed on by the lab), or
        the measurement job itself when the recipe names none.
        """
        if self.impurities is None or job.kind != "measure" or not isinstance(self.world, CrystalWorld):
            return None
        point = self.world.resolve(job.recipe)
        sample = str(job.recipe.get("sample") or job.job_id)
        return self.impurities.phases_of(point.key, self.world.cif(point), sample)

    def _job(self, job_id: str | None, kind: str | None) -> Job:
        job = self.jobs.get(job_id or "")
        if job is None or (kind is not None and job.kind != kind):
            raise FrameError("NOT_FOUND", f"no {kind or ''} job {job_id!r}".replace("  ", " "))
        return job

    def _start(self, kind: str, job_id: str, recipe: dict[str, Any], now: float) -> bytes:
        clean = {k: v for k, v in recipe.items() if k != "job_id"}
        existing = self.jobs.get(job_id)
        if existing is not None:
            if existing.kind != kind or existing.recipe != clean:
                raise FrameError("DUPLICATE", f"job id {job_id} is known with a different recipe or kind")
            return format_ok({**existing.summary(now), "duplicate": True})
        running = [j for j in self.jobs.values() if j.kind == kind and j.state == "running"]
        if running:
            return format_busy(f"{'robot' if kind == 'synth' else 'station'} busy with job {running[0].job_id}")
        try:
            point = self.world.resolve(clean)
        except WorldError as exc:
            raise FrameError(exc.code, exc.message) from None
        seconds = (self.synth_seconds if kind == "synth" else self.measure_seconds) * self.time_scale
        job = Job(job_id, kind, clean, now, now + seconds)
        self._log("started", job, recipe=clean, started_at=job.started_at, finishes_at=job.finishes_at)
        self.jobs[job_id] = job
        reply = {**job.summary(now), "duplicate": False}
        if point.note:
            reply["note"] = point.note
        return format_ok(reply)


def format_ok_end() -> bytes:
    """The ``END`` line that closes a raw-data stream."""
    return seal("END")
