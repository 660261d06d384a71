"""Seeded fault injection for simulated instruments.

Line faults (per command: no reply, garbled reply, dropped connection, BUSY) are drawn from one
seeded stream; material faults (failed synthesis) and drift are drawn per job id from a stream
derived from the seed and the id, so a job's fate does not depend on the order of other traffic.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Literal

__all__ = ["FaultRates", "FaultInjector", "LineFault"]

LineFault = Literal["timeout", "garbled", "drop", "busy"]


@dataclass(frozen=True)
class FaultRates:
    """Probabilities in [0, 1]; names match ``sdl.config.SimulatedFaults``.

    Attributes:
        timeout: A command is executed but never answered.
        garbled: The reply is corrupted on the wire (its checksum no longer matches).
        drop: The connection is closed before the command is executed.
        busy: The instrument answers ``BUSY`` without executing the command.
        failed_synthesis: A synthesis ends ``failed`` for a material reason (sample lost).
        drift: A measurement is offset by a calibration drift and flagged ``quality="drift"``.
    """

    timeout: float = 0.0
    garbled: float = 0.0
    drop: float = 0.0
    busy: float = 0.0
    failed_synthesis: float = 0.0
    drift: float = 0.0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"fault rate {name}={value!r} must be within [0, 1]")
        line = self.timeout + self.garbled + self.drop + self.busy
        if line > 1.0:
            raise ValueError(f"line fault rates sum to {line} > 1 (timeout+garbled+drop+busy)")


class FaultInjector:
    """Draws faults from seeded random streams (thread-safe).

    Args:
        rates: The fault probabilities.
        seed: Seed of every stream.
    """

    def __init__(self, rates: FaultRates | None = None, seed: int = 0, *, outage_after_s: float | None = None,
                 outage_s: float | None = None) -> None:
        self.rates = rates or FaultRates()
        self.seed = seed
        self.outage_after_s = outage_after_s
        self.outage_s = outage_s
        self._started = time.monotonic()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def silent(self, now: float | None = None) -> bool:
        """Whether the instrument is in its injected outage (it reads commands and answers nothing)."""
        if self.outage_after_s is None:
            return False
        elapsed = (time.monotonic() if now is None else now) - self._started
        if elapsed < self.outage_after_s:
            return False
        return self.outage_s is None or elapsed < self.outage_after_s + self.outage_s

    def line_fault(self) -> LineFault | None:
        """The fault to apply to the next command, if any."""
        r = self.rates
        if not (r.timeout or r.garbled or r.drop or r.busy):
            return None
        with self._lock:
            u = self._rng.random()
        for name, rate in (("timeout", r.timeout), ("garbled", r.garbled), ("drop", r.drop), ("busy", r.busy)):
            if u < rate:
                return name  # type: ignore[return-value]
            u -= rate
        return None

    def garble(self, line: bytes) -> bytes:
        """Corrupt a reply line the way a noisy wire does (flipped bits, a stray byte)."""
        with self._lock:
            rng = random.Random(self._rng.random())
        body = bytearray(line.rstrip(b"\n"))
        for _ in range(max(1, len(body) // 64)):
            i = rng.randrange(len(body))
            body[i] ^= 1 << rng.randrange(8)
            if body[i] == 0x0A:
                body[i] = 0x0B
        if rng.random() < 0.3:
            body.insert(rng.randrange(len(body) + 1), rng.randrange(0x80, 0x100))
        return bytes(body) + b"\n"

    def _job_stream(self, kind: str, job_id: str) -> random.Random:
        return random.Random(f"{self.seed}:{kind}:{job_id}")

    def synthesis_fails(self, job_id: str) -> bool:
        """Whether this synthesis job loses its sample (decided once per job id)."""
        rate = self.rates.failed_synthesis
        return rate > 0 and self._job_stream("fail", job_id).random() < rate

    def drifts(self, job_id: str) -> bool:
        """Whether this measurement job suffers calibration drift."""
        return self.rates.drift > 0 and self._job_stream("drift", job_id).random() < self.rates.drift
