"""The ``SDL/1`` line protocol: framing, parsing and formatting only (no I/O).

Both the drivers (``devices/transport.py``) and the simulators (``simulators/server.py``) use this
module, so the two sides cannot disagree on the grammar. ``devices/PROTOCOL.md`` says the same in
words. Every function here is pure and raises :class:`FrameError` (with an ``ERR`` code) on bad
input, so a malformed frame can always be answered with one ``ERR`` line instead of a crash.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PROTOCOL_VERSION",
    "MAX_LINE",
    "ERROR_CODES",
    "FrameError",
    "Command",
    "Reply",
    "Identity",
    "check_frame",
    "parse_command",
    "format_command",
    "format_ok",
    "format_busy",
    "format_err",
    "format_data",
    "seal",
    "unseal",
    "parse_reply",
    "parse_data_line",
    "parse_identity",
    "QUERY_COMMANDS",
]

PROTOCOL_VERSION = "SDL/1"
MAX_LINE = 4096
"""Maximum bytes of one line, terminator included."""

ERROR_CODES: dict[str, str] = {
    "SYNTAX": "the line is not a well-formed command",
    "TOO_LONG": f"the line is longer than {MAX_LINE} bytes",
    "NON_ASCII": "the line contains bytes outside printable ASCII",
    "UNKNOWN": "unknown command",
    "BAD_JSON": "the JSON argument does not parse or is not an object",
    "BAD_RECIPE": "the recipe names no known candidate or parameters",
    "OFF_TABLE": "the requested parameters are not on the world's table (refuse mode)",
    "NOT_FOUND": "no job with this id",
    "DUPLICATE": "the job id is known with a different recipe",
    "STATE": "the job is not in a state that allows this command",
    "UNSUPPORTED": "this instrument does not serve this command",
    "INTERNAL": "the instrument failed internally",
}

_JOB_ID = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_SEAL = re.compile(r"^(?P<body>.*) \*(?P<crc>[0-9A-F]{8})$")

# Verbs with a job id, by command family.
_JOB_VERBS = {"START", "STATUS", "RESULT", "ABORT", "RAW"}
_FAMILIES = {"SYNTH": {"START", "STATUS", "RESULT", "ABORT"}, "MEASURE": _JOB_VERBS}

QUERY_COMMANDS = frozenset({"*IDN?", "STATUS?", "JOBS?", "JOB?", "SYNTH STATUS", "SYNTH RESULT",
                            "MEASURE STATUS", "MEASURE RESULT", "MEASURE RAW"})
"""Commands without side effects: a driver may repeat them freely after a timeout."""


class FrameError(ValueError):
    """A frame (command or reply) that breaks the grammar.

    Args:
        code: One of :data:`ERROR_CODES`.
        message: What is wrong, in words (ASCII).
    """

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


@dataclass(frozen=True)
class Command:
    """A parsed command line.

    Attributes:
        name: ``*IDN?``, ``STATUS?``, ``JOBS?``, ``JOB?``, or ``SYNTH <VERB>`` / ``MEASURE <VERB>``.
        job_id: The client-chosen job id (idempotency key), when the command takes one.
        payload: The JSON object of ``START`` commands.
    """

    name: str
    job_id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str | None:
        """``SYNTH`` or ``MEASURE`` for job commands, else ``None``."""
        head = self.name.split(" ", 1)[0]
        return head if head in _FAMILIES else None

    @property
    def verb(self) -> str:
        """The last word of the name (``START``, ``STATUS``, ...)."""
        return self.name.split(" ")[-1]


@dataclass(frozen=True)
class Reply:
    """A parsed reply line.

    Attributes:
        kind: ``OK``, ``BUSY`` or ``ERR``.
        code: The error code of ``ERR`` replies.
        text: The rest of the line (message, or the OK payload as text).
        data: The decoded JSON object of an ``OK {...}`` reply, else ``None``.
        stream_length: ``n`` for ``OK DATA <n>`` (a raw-data stream follows), else ``None``.
    """

    kind: str
    text: str = ""
    code: str | None = None
    data: dict[str, Any] | None = None
    stream_length: int | None = None


@dataclass(frozen=True)
class Identity:
    """The four fields of an ``*IDN?`` reply."""

    vendor: str
    model: str
    serial: str
    protocol: str


def check_frame(raw: bytes) -> str:
    """Validate one raw line (without its ``\\n``) and return it as text.

    Raises:
        FrameError: ``TOO_LONG`` or ``NON_ASCII``.
    """
    if len(raw) + 1 > MAX_LINE:
        raise FrameError("TOO_LONG", f"line of {len(raw) + 1} bytes exceeds {MAX_LINE}")
    raw = raw.rstrip(b"\r")
    for byte in raw:
        if byte < 0x20 or byte > 0x7E:
            if byte == 0x09:  # tab counts as a space
                continue
            raise FrameError("NON_ASCII", f"byte 0x{byte:02x} is not printable ASCII")
    return raw.decode("ascii")


def _check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise FrameError("SYNTAX", f"bad job id {job_id!r}: use 1-128 of [A-Za-z0-9_.:-]")
    return job_id


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise FrameError("BAD_JSON", f"JSON does not parse: {str(exc)[:200]}") from None
    if not isinstance(value, dict):
        raise FrameError("BAD_JSON", f"expected a JSON object, got {type(value).__name__}")
    return value


def parse_command(raw: bytes | str) -> Command:
    """Parse one command line (terminator stripped or not).

    Raises:
        FrameError: with the code to put in the ``ERR`` reply.
    """
    if isinstance(raw, str):
        if not raw.isascii():
            raise FrameError("NON_ASCII", "the line contains non-ASCII characters")
        raw = raw.encode("ascii")
    text = check_frame(raw.rstrip(b"\n"))
    text = text.strip()
    match = _SEAL.match(text)  # clients may seal commands too; check and strip
    if match:
        body = match.group("body")
        if f"{zlib.crc32(body.encode('ascii')):08X}" != match.group("crc"):
            raise FrameError("SYNTAX", "checksum mismatch")
        text = body.strip()
    if not text:
        raise FrameError("SYNTAX", "empty line")
    words = text.split(None, 1)
    head = words[0].upper()
    rest = words[1].strip() if len(words) > 1 else ""
    if head in {"*IDN?", "STATUS?", "JOBS?"}:
        if rest:
            raise FrameError("SYNTAX", f"{head} takes no argument")
        return Command(head)
    if head == "JOB?":
        if not rest or " " in rest:
            raise FrameError("SYNTAX", "usage: JOB? <job_id>")
        return Command("JOB?", _check_job_id(rest))
    if head not in _FAMILIES:
        raise FrameError("UNKNOWN", f"unknown command {head[:40]!r}")
    parts = rest.split(None, 2)
    if not parts:
        raise FrameError("SYNTAX", f"usage: {head} <VERB> <job_id> ...")
    verb = parts[0].upper()
    if verb not in _FAMILIES[head]:
        raise FrameError("UNKNOWN", f"unknown command {head} {verb[:40]!r}")
    if len(parts) < 2:
        raise FrameError("SYNTAX", f"usage: {head} {verb} <job_id>")
    job_id = _check_job_id(parts[1])
    if verb == "START":
        if len(parts) < 3:
            raise FrameError("SYNTAX", f"usage: {head} START <job_id> <json>")
        return Command(f"{head} START", job_id, _json_object(parts[2]))
    if len(parts) > 2:
        raise FrameError("SYNTAX", f"{head} {verb} takes only a job id")
    return Command(f"{head} {verb}", job_id)


def format_command(name: str, job_id: str | None = None, payload: dict[str, Any] | None = None) -> bytes:
    """Build one command line, terminator included.

    Raises:
        FrameError: when the line would break the grammar (bad job id, too long, non-ASCII).
    """
    parts = [name]
    if job_id is not None:
        parts.append(_check_job_id(job_id))
    if payload is not None:
        parts.append(json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=True))
    line = " ".join(parts).encode("ascii")
    check_frame(line)
    return line + b"\n"


def seal(body: str) -> bytes:
    """Append the CRC-32 of ``body`` (`` *XXXXXXXX``) and the terminator.

    Instruments seal every reply so that a garbled line is *detected*, never read as a value.
    """
    return f"{body} *{zlib.crc32(body.encode('ascii')):08X}\n".encode("ascii")


def unseal(text: str) -> str:
    """Check and strip the CRC of a sealed line.

    Raises:
        FrameError: ``SYNTAX`` when the seal is missing or does not match.
    """
    match = _SEAL.match(text)
    if not match:
        raise FrameError("SYNTAX", f"reply without checksum: {text[:80]!r}")
    body = match.group("body")
    if f"{zlib.crc32(body.encode('ascii')):08X}" != match.group("crc"):
        raise FrameError("SYNTAX", f"checksum mismatch in {text[:80]!r}")
    return body


def _clean(message: str) -> str:
    text = message.encode("ascii", errors="replace").decode("ascii")
    text = "".join(ch if 0x20 <= ord(ch) <= 0x7E else " " for ch in text)
    return text[: MAX_LINE - 200]


def format_ok(data: dict[str, Any] | str | None = None) -> bytes:
    """``OK`` with a JSON object (or plain text such as an identity), sealed."""
    if data is None:
        body = "OK"
    elif isinstance(data, str):
        body = f"OK {_clean(data)}"
    else:
        body = "OK " + json.dumps(data, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    if len(body) + 12 > MAX_LINE:
        return format_err("INTERNAL", "reply too long for one line")
    return seal(body)


def format_busy(message: str) -> bytes:
    """``BUSY <message>``, sealed."""
    return seal(f"BUSY {_clean(message)}")


def format_err(code: str, message: str) -> bytes:
    """``ERR <CODE> <message>``, sealed."""
    if code not in ERROR_CODES:
        code = "INTERNAL"
    return seal(f"ERR {code} {_clean(message)}")


def format_data(values: list[float] | tuple[float, ...]) -> bytes:
    """One ``DATA`` line of a raw-data stream, sealed."""
    return seal("DATA " + " ".join(f"{float(v):.6g}" for v in values))


def parse_reply(raw: bytes) -> Reply:
    """Parse and check one reply line (``OK``/``BUSY``/``ERR``).

    Raises:
        FrameError: on any deviation (bad bytes, bad checksum, unknown kind, bad JSON).
    """
    text = unseal(check_frame(raw.rstrip(b"\n")))
    head, _, rest = text.partition(" ")
    if head == "OK":
        if rest.startswith("{"):
            return Reply("OK", rest, data=_json_object(rest))
        if rest.startswith("DATA "):
            count = rest[5:].strip()
            if not count.isdigit():
                raise FrameError("SYNTAX", f"bad stream length {count!r}")
            return Reply("OK", rest, stream_length=int(count))
        return Reply("OK", rest)
    if head == "BUSY":
        return Reply("BUSY", rest)
    if head == "ERR":
        code, _, message = rest.partition(" ")
        if code not in ERROR_CODES:
            raise FrameError("SYNTAX", f"unknown error code {code[:40]!r}")
        return Reply("ERR", message, code=code)
    raise FrameError("SYNTAX", f"reply starts with {head[:20]!r}, not OK/BUSY/ERR")


def parse_data_line(raw: bytes) -> list[float] | None:
    """Parse one line of a raw-data stream: a list of numbers, or ``None`` for ``END``.

    Raises:
        FrameError: on anything else.
    """
    text = unseal(check_frame(raw.rstrip(b"\n")))
    if text == "END":
        return None
    if not text.startswith("DATA "):
        raise FrameError("SYNTAX", f"expected DATA or END, got {text[:40]!r}")
    try:
        return [float(x) for x in text[5:].split()]
    except ValueError:
        raise FrameError("SYNTAX", f"non-numeric DATA line {text[:80]!r}") from None


def parse_identity(reply: Reply) -> Identity:
    """Decode the text of an ``*IDN?`` reply (``vendor,model,serial,protocol``).

    Raises:
        FrameError: when it does not have four fields.
    """
    fields = [f.strip() for f in reply.text.split(",")]
    if len(fields) != 4 or not all(fields):
        raise FrameError("SYNTAX", f"bad identity {reply.text[:80]!r}")
    return Identity(*fields)
