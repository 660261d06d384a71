"""Hypothesis-fuzzed frames never crash or hang the parser, the simulator or the driver."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from instruments_helpers import crystal_sim  # noqa: F401 - fixture

from devices.protocol import FrameError, parse_command, parse_data_line, parse_reply, seal
from devices.transport import LineTransport
from sdl.exceptions import InstrumentError

WORDS = st.sampled_from(["*IDN?", "STATUS?", "JOBS?", "JOB?", "SYNTH", "MEASURE", "START", "STATUS", "RESULT",
                         "ABORT", "RAW", "j1", '{"candidate":"perov_33"}', '{"params":{"n":6}}', "{", "}", "*0"])
FRAMES = st.one_of(
    st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ")),
    st.lists(WORDS, max_size=5).map(lambda ws: " ".join(ws).encode()),
    st.text(max_size=100).map(lambda t: t.replace("\n", " ").encode("utf-8")),
)


@settings(max_examples=150, deadline=None)
@given(FRAMES)
def test_parse_command_only_raises_frame_errors(frame: bytes) -> None:
    try:
        parse_command(frame)
    except FrameError as exc:
        assert exc.code and exc.message.isascii()


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_parse_reply_only_raises_frame_errors(frame: bytes) -> None:
    for parser in (parse_reply, parse_data_line):
        with contextlib.suppress(FrameError):
            parser(frame + b"\n")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(FRAMES, min_size=1, max_size=4))
def test_simulator_answers_every_frame_and_keeps_serving(crystal_sim, frames: list[bytes]) -> None:  # noqa: F811
    host, port = crystal_sim.url.removeprefix("socket://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        reader = sock.makefile("rb")
        for frame in frames:
            sock.sendall(frame + b"\n")
            line = reader.readline(5000)
            assert line.endswith(b"\n"), f"no reply to {frame!r}"
            reply = parse_reply(line)  # every reply is well-formed and sealed
            if reply.stream_length is not None:
                for _ in range(reply.stream_length + 1):
                    parse_data_line(reader.readline(5000))
        sock.sendall(b"*IDN?\n")
        assert parse_reply(reader.readline(5000)).text.endswith("SDL/1")


def test_overlong_line_gets_too_long_and_the_server_keeps_serving(crystal_sim) -> None:  # noqa: F811
    host, port = crystal_sim.url.removeprefix("socket://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        reader = sock.makefile("rb")
        sock.sendall(b"A" * 10000 + b"\n*IDN?\n")
        assert parse_reply(reader.readline(5000)).code == "TOO_LONG"
        assert parse_reply(reader.readline(5000)).kind == "OK"


class _ReplayInstrument:
    """A TCP peer that answers every line with bytes chosen by the test (a broken instrument)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"socket://127.0.0.1:{self.server.getsockname()[1]}"
        self.reply = b""
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            while reader.readline(5000):
                try:
                    conn.sendall(self.reply)
                except OSError:
                    return

    def close(self) -> None:
        self._stop = True
        self.server.close()


@pytest.fixture(scope="module")
def broken_instrument() -> Iterator[_ReplayInstrument]:
    peer = _ReplayInstrument()
    yield peer
    peer.close()


REPLIES = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda b: b + b"\n"),
    st.sampled_from([b"OK\n", b"BUSY\n", b"OK DATA 2\n", b'OK {"values":{"e_form":"NaN"}}\n']),
    st.text(max_size=80).map(lambda t: seal(t.encode("ascii", "replace").decode().replace("\n", " "))),
    st.sampled_from([seal("OK DATA 3"), seal('OK {"state":"done","values":{}}'), seal("ERR SYNTAX x")]),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reply=REPLIES)
def test_driver_never_returns_garbage_and_never_hangs(broken_instrument: _ReplayInstrument, reply: bytes) -> None:
    broken_instrument.reply = reply
    line = LineTransport(broken_instrument.url, instrument="broken", timeout=0.05, retries=1, busy_timeout=0.05,
                         retry_delay=0.001)
    started = time.monotonic()
    try:
        result = line.command("MEASURE RESULT", "j1")
    except InstrumentError:
        pass
    else:  # only a well-formed, sealed OK line can come back
        assert result.kind == "OK" and reply.startswith(b"OK") and reply.endswith(b"\n")
    finally:
        line.close()
    assert time.monotonic() - started < 3
