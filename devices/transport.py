"""A pyserial line transport for SDL/1 instruments: one command in flight, bounded reads, retries.

Any ``serial.serial_for_url`` URL works (``/dev/ttyUSB0``, ``socket://host:port``,
``rfc2217://host:port``). Every reply is checked (printable ASCII, length, CRC seal, grammar), so a
garbled line is detected and never handed to a caller as a value. Retries follow
``devices/PROTOCOL.md``: every SDL/1 command is safe to repeat (queries have no side effect, and
``START`` / ``ABORT`` are idempotent thanks to the client-chosen job id), so a timeout, a garbled
reply or a dropped line is retried up to ``retries`` times after reconnecting; ``BUSY`` is
retried with back-off until ``busy_timeout``; ``ERR`` is never retried.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import serial

from devices.protocol import (
    MAX_LINE,
    FrameError,
    Identity,
    Reply,
    format_command,
    parse_data_line,
    parse_identity,
    parse_reply,
)
from sdl.exceptions import (
    InstrumentBusy,
    InstrumentConnectionError,
    InstrumentError,
    InstrumentProtocolError,
    InstrumentRejected,
    InstrumentTimeout,
)

__all__ = ["LineTransport", "FaultCallback"]

logger = logging.getLogger(__name__)

FaultCallback = Callable[[str, str], None]
"""``on_fault(kind, message)``: told about every fault the transport saw and survived or not.

``kind`` is one of ``timeout``, ``garbled``, ``drop``, ``busy``, ``rejected``, ``connect``."""


class LineTransport:
    """One serial line to one instrument.

    Args:
        url: A ``serial_for_url`` URL.
        instrument: The instrument's name, used in every error message.
        timeout: Seconds to wait for one complete reply line.
        retries: Extra attempts after a timeout, garbled reply or dropped connection.
        busy_timeout: Seconds to keep retrying while the instrument answers ``BUSY``.
        retry_delay: Seconds before the first retry (doubles per retry, capped at 1 s).
        baudrate: For real serial ports; ignored by ``socket://``.
        on_fault: Optional callback told about every fault (e.g. to log it in the repository).
    """

    def __init__(
        self,
        url: str,
        *,
        instrument: str = "instrument",
        timeout: float = 2.0,
        retries: int = 3,
        busy_timeout: float = 30.0,
        retry_delay: float = 0.05,
        baudrate: int = 115200,
        on_fault: FaultCallback | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"{timeout=} must be > 0")
        if retries < 0:
            raise ValueError(f"{retries=} must be >= 0")
        self.url = url
        self.instrument = instrument
        self.timeout = timeout
        self.retries = retries
        self.busy_timeout = busy_timeout
        self.retry_delay = retry_delay
        self.baudrate = baudrate
        self.on_fault = on_fault
        self.faults: Counter[str] = Counter()
        self._port: serial.SerialBase | None = None
        self._buffer = bytearray()
        self._lock = threading.Lock()

    # -- connection -----------------------------------------------------------------------
    def _error(self, cls: type[InstrumentError], message: str) -> InstrumentError:
        return cls(message, instrument=self.instrument, url=self.url)

    def _fault(self, kind: str, message: str) -> None:
        self.faults[kind] += 1
        logger.warning("[%s at %s] %s: %s", self.instrument, self.url, kind, message)
        if self.on_fault is not None:
            try:
                self.on_fault(kind, message)
            except Exception:
                logger.exception("on_fault callback failed")

    def open(self) -> None:
        """Open the line (idempotent).

        Raises:
            InstrumentConnectionError: naming the instrument and the URL.
        """
        if self._port is not None and self._port.is_open:
            return
        try:
            self._port = serial.serial_for_url(self.url, timeout=self.timeout, write_timeout=self.timeout,
                                               baudrate=self.baudrate)
        except (serial.SerialException, OSError, ValueError) as exc:
            self._port = None
            raise self._error(InstrumentConnectionError, f"cannot open: {exc}") from exc

    def close(self) -> None:
        """Close the line (idempotent)."""
        port, self._port = self._port, None
        self._buffer.clear()
        if port is None:
            return
        sock = getattr(port, "_socket", None)
        if sock is not None:
            # pyserial's socket:// close() sleeps 0.3 s "for quick reconnects"; a retrying driver
            # reconnects on purpose, so close the socket directly and skip the sleep.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            port._socket = None  # type: ignore[attr-defined] # socket:// ports keep it private
            port.is_open = False
            return
        with contextlib.suppress(serial.SerialException, OSError):
            port.close()

    def _reconnect(self) -> None:
        self.close()
        self.open()

    def __enter__(self) -> LineTransport:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one exchange ---------------------------------------------------------------------
    def _readline(self, timeout: float | None = None) -> bytes:
        """One reply line within ``timeout`` (bounded to MAX_LINE bytes).

        Reads what has arrived in chunks: pyserial's ``read_until`` does one select+recv per byte.
        """
        assert self._port is not None
        timeout = timeout or self.timeout
        deadline = time.monotonic() + timeout
        buffer = self._buffer
        while True:
            newline = buffer.find(b"\n")
            if 0 <= newline < MAX_LINE:
                line = bytes(buffer[: newline + 1])
                del buffer[: newline + 1]
                return line
            if len(buffer) >= MAX_LINE:
                buffer.clear()
                raise self._error(InstrumentProtocolError, f"reply longer than {MAX_LINE} bytes")
            left = deadline - time.monotonic()
            if left <= 0:
                partial = bytes(buffer[:60])
                buffer.clear()
                raise self._error(InstrumentTimeout, f"no complete reply within {timeout} s (got {partial!r})")
            try:
                self._port.timeout = left
                chunk = self._port.read(1)  # wait for the first byte ...
                if chunk:
                    self._port.timeout = 0  # ... then take whatever else has arrived, without waiting
                    chunk += self._port.read(MAX_LINE)
            except (serial.SerialException, OSError) as exc:
                buffer.clear()
                raise self._error(InstrumentConnectionError, f"line dropped: {exc}") from exc
            buffer.extend(chunk)

    def _parse(self, raw: bytes) -> Reply:
        try:
            return parse_reply(raw)
        except FrameError as exc:
            raise self._error(InstrumentProtocolError, f"bad reply: {exc.message}") from None

    def _exchange(self, line: bytes, timeout: float | None = None) -> Reply:
        self.open()
        assert self._port is not None
        try:
            self._buffer.clear()
            self._port.reset_input_buffer()  # type: ignore[attr-defined] # every concrete port has it
            self._port.write(line)
            self._port.flush()
        except (serial.SerialException, OSError) as exc:
            raise self._error(InstrumentConnectionError, f"line dropped while writing: {exc}") from exc
        return self._parse(self._readline(timeout))

    # -- public API -----------------------------------------------------------------------
    def command(
        self,
        name: str,
        job_id: str | None = None,
        payload: dict[str, Any] | None = None,
        *,
        safe: bool = True,
    ) -> Reply:
        """Send one command and return its ``OK`` reply (retrying as documented).

        Args:
            name: ``*IDN?``, ``STATUS?``, ``JOB?``, ``SYNTH START``, ``MEASURE RESULT``, ...
            job_id: The job id, for job commands.
            payload: The JSON object of ``START`` commands.
            safe: Whether the command may be repeated after an unanswered attempt.

        Raises:
            InstrumentRejected: ``ERR`` reply (never retried).
            InstrumentBusy: still ``BUSY`` after ``busy_timeout``.
            InstrumentTimeout, InstrumentProtocolError, InstrumentConnectionError: after the retries.
        """
        with self._lock:
            reply, _ = self._command_locked(format_command(name, job_id, payload), safe=safe, stream=False)
            return reply

    def stream(self, name: str, job_id: str, *, timeout: float | None = None) -> tuple[Reply, list[list[float]]]:
        """Send a raw-data command (``MEASURE RAW``) and read its ``DATA`` lines up to ``END``.

        Args:
            timeout: Seconds for the first reply line (raw data may be computed on demand);
                default: the line timeout.
        """
        with self._lock:
            reply, rows = self._command_locked(format_command(name, job_id), safe=True, stream=True,
                                               timeout=timeout)
            return reply, rows

    def _read_stream(self, count: int) -> list[list[float]]:
        rows: list[list[float]] = []
        for _ in range(count):
            row = self._data_line()
            if row is None:
                raise self._error(InstrumentProtocolError, f"stream ended after {len(rows)} of {count} lines")
            rows.append(row)
        if self._data_line() is not None:
            raise self._error(InstrumentProtocolError, "stream longer than announced (no END)")
        return rows

    def _data_line(self) -> list[float] | None:
        try:
            return parse_data_line(self._readline())
        except FrameError as exc:
            raise self._error(InstrumentProtocolError, f"bad data line: {exc.message}") from None

    def _command_locked(
        self, line: bytes, *, safe: bool, stream: bool, timeout: float | None = None
    ) -> tuple[Reply, list[list[float]]]:
        what = line.decode("ascii").split(" {", 1)[0].strip()
        attempts = 0
        busy_deadline: float | None = None
        delay = self.retry_delay
        while True:
            try:
                reply = self._exchange(line, timeout)
                rows: list[list[float]] = []
                if reply.kind == "OK" and stream:
                    if reply.stream_length is None:
                        raise self._error(InstrumentProtocolError, f"expected 'OK DATA <n>', got {reply.text[:60]!r}")
                    rows = self._read_stream(reply.stream_length)
            except InstrumentTimeout as exc:
                self._fault("timeout", f"{what}: {exc.message}")
                failure: InstrumentError = exc
                self.close()  # a late reply must not be read as the answer to the next command
            except InstrumentProtocolError as exc:
                self._fault("garbled", f"{what}: {exc.message}")
                failure = exc
                self.close()
            except InstrumentConnectionError as exc:
                self._fault("drop", f"{what}: {exc.message}")
                failure = exc
                self.close()
            else:
                if reply.kind == "OK":
                    return reply, rows
                if reply.kind == "ERR":
                    self._fault("rejected", f"{what}: ERR {reply.code} {reply.text}")
                    raise self._error(InstrumentRejected, f"{what} refused: ERR {reply.code} {reply.text}")
                # BUSY: wait and repeat, bounded by busy_timeout
                now = time.monotonic()
                busy_deadline = busy_deadline or now + self.busy_timeout
                self._fault("busy", f"{what}: BUSY {reply.text}")
                if now >= busy_deadline:
                    raise self._error(InstrumentBusy, f"{what}: still BUSY after {self.busy_timeout} s ({reply.text})")
                time.sleep(min(delay, max(0.0, busy_deadline - now)))
                delay = min(delay * 2, 1.0)
                continue
            attempts += 1
            if not safe or attempts > self.retries:
                raise failure
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            try:
                self.open()
            except InstrumentConnectionError as exc:
                self._fault("connect", exc.message)
                if attempts >= self.retries:
                    raise

    def identify(self) -> Identity:
        """Ask ``*IDN?`` and decode vendor, model, serial and protocol version.

        Raises:
            InstrumentProtocolError: when the instrument speaks another protocol version.
        """
        reply = self.command("*IDN?")
        try:
            identity = parse_identity(reply)
        except FrameError as exc:
            raise self._error(InstrumentProtocolError, exc.message) from None
        if identity.protocol != "SDL/1":
            raise self._error(InstrumentProtocolError, f"instrument speaks {identity.protocol}, driver speaks SDL/1")
        return identity
