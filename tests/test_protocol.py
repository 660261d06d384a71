"""The SDL/1 grammar: commands, replies, seals, limits (devices/protocol.py)."""

from __future__ import annotations

import pytest

from devices.protocol import (
    MAX_LINE,
    FrameError,
    format_busy,
    format_command,
    format_data,
    format_err,
    format_ok,
    parse_command,
    parse_data_line,
    parse_identity,
    parse_reply,
    seal,
)


def test_commands_parse_to_name_job_and_payload() -> None:
    cmd = parse_command(b'SYNTH START exp-1 {"candidate": "perov_12"}\n')
    assert (cmd.name, cmd.job_id, cmd.payload, cmd.family, cmd.verb) == (
        "SYNTH START", "exp-1", {"candidate": "perov_12"}, "SYNTH", "START")
    assert parse_command("measure raw m:1").name == "MEASURE RAW"
    assert parse_command("*IDN?").name == "*IDN?"
    assert parse_command("JOB? a.b").job_id == "a.b"
    assert parse_command(format_command("MEASURE START", "x", {"params": {"n": 6}})).payload == {"params": {"n": 6}}


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"", "SYNTAX"),
        (b"FROB 1", "UNKNOWN"),
        (b"SYNTH FLY j1", "UNKNOWN"),
        (b"SYNTH START j1", "SYNTAX"),
        (b"SYNTH START j1 {bad", "BAD_JSON"),
        (b"SYNTH START j1 [1, 2]", "BAD_JSON"),
        (b"SYNTH STATUS bad/id", "SYNTAX"),
        (b"SYNTH STATUS j1 extra", "SYNTAX"),
        (b"*IDN? now", "SYNTAX"),
        ("STATUS? \u00e9".encode(), "NON_ASCII"),
        (b"STATUS?\x00", "NON_ASCII"),
        (b"X" * MAX_LINE, "TOO_LONG"),
        (b"*IDN? *00000000", "SYNTAX"),
    ],
)
def test_malformed_commands_raise_frame_errors_with_codes(line: bytes, code: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_command(line)
    assert info.value.code == code


def test_replies_round_trip() -> None:
    ok = parse_reply(format_ok({"state": "done", "values": {"e_form": 0.62}}))
    assert ok.kind == "OK" and ok.data == {"state": "done", "values": {"e_form": 0.62}}
    idn = parse_identity(parse_reply(format_ok("SDL-Sim,robot,SN1,SDL/1")))
    assert (idn.vendor, idn.model, idn.serial, idn.protocol) == ("SDL-Sim", "robot", "SN1", "SDL/1")
    busy = parse_reply(format_busy("robot busy with job j0"))
    assert busy.kind == "BUSY" and "j0" in busy.text
    err = parse_reply(format_err("NOT_FOUND", "no job 'x'"))
    assert (err.kind, err.code) == ("ERR", "NOT_FOUND")
    stream = parse_reply(format_ok("DATA 3"))
    assert stream.stream_length == 3
    assert parse_data_line(format_data([12.5, 100.0])) == [12.5, 100.0]
    assert parse_data_line(seal("END")) is None


def test_every_single_bit_flip_of_a_reply_is_detected() -> None:
    line = format_ok({"values": {"toughness": 1.14466667}, "quality": "ok"})
    for i in range(len(line) - 1):
        for bit in range(8):
            corrupted = bytearray(line)
            corrupted[i] ^= 1 << bit
            if corrupted[i] == 0x0A:
                continue
            with pytest.raises(FrameError):
                parse_reply(bytes(corrupted))


def test_unsealed_or_unknown_replies_are_rejected() -> None:
    with pytest.raises(FrameError):
        parse_reply(b'OK {"state":"done"}\n')
    with pytest.raises(FrameError):
        parse_reply(seal("MAYBE later"))
    with pytest.raises(FrameError):
        parse_reply(seal("ERR NOPE what"))
    with pytest.raises(FrameError):
        parse_data_line(seal("DATA 1 two"))


def test_format_command_refuses_what_the_instrument_would_refuse() -> None:
    with pytest.raises(FrameError):
        format_command("SYNTH STATUS", "has space")
    with pytest.raises(FrameError):
        format_command("SYNTH START", "j", {"blob": "x" * MAX_LINE})
    # non-ASCII JSON is escaped, so it stays on the wire
    assert format_command("SYNTH START", "j", {"name": "Ålesund"}).isascii()
    # error replies never carry a code outside the table
    assert parse_reply(format_err("WHATEVER", "m")).code == "INTERNAL"
