"""One small error tree for the whole framework.

Every error the framework raises on purpose derives from :class:`SDLError`, and also from the
builtin that describes it best, so callers can catch either. The split that matters most for a
closed loop is between *instrument* faults (retry, reconnect, reconcile) and *material* failures
(the sample is lost for a chemical reason: record it, never retry it).
"""

from __future__ import annotations

__all__ = [
    "SDLError",
    "CampaignConfigError",
    "InstrumentError",
    "InstrumentTimeout",
    "InstrumentConnectionError",
    "InstrumentProtocolError",
    "InstrumentBusy",
    "InstrumentRejected",
    "MaterialFailure",
    "RepositoryError",
    "IllegalTransition",
    "EngineError",
    "CampaignFailed",
]


class SDLError(Exception):
    """Base of every error raised on purpose by the framework."""


class CampaignConfigError(SDLError, ValueError):
    """A campaign YAML is malformed; ``str(err)`` reads ``file:line field.path: message``.

    Args:
        message: What is wrong, in words.
        file: The YAML file, if known.
        line: 1-based line of the offending node, if known.
        field: Dotted field path such as ``objective.goal``, if known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        location = file or "<campaign>"
        if line is not None:
            location = f"{location}:{line}"
        prefix = f"{location} {field}: " if field else f"{location}: "
        super().__init__(prefix + message)


class InstrumentError(SDLError, RuntimeError):
    """An instrument misbehaved (an *instrument* fault: retry or reconcile, the material is fine).

    Args:
        message: What happened.
        instrument: The instrument's name as configured.
        url: The connection URL (``socket://...``, ``/dev/tty...``).
    """

    def __init__(self, message: str, *, instrument: str | None = None, url: str | None = None) -> None:
        self.message = message
        self.instrument = instrument
        self.url = url
        where = ""
        if instrument or url:
            where = f"[{instrument or '?'} at {url or '?'}] "
        super().__init__(where + message)


class InstrumentTimeout(InstrumentError, TimeoutError):
    """No (complete) reply within the timeout."""


class InstrumentConnectionError(InstrumentError, ConnectionError):
    """The line could not be opened, or it dropped and could not be re-opened."""


class InstrumentProtocolError(InstrumentError):
    """A reply that does not follow the protocol (garbled line, wrong version, unknown code)."""


class InstrumentBusy(InstrumentError):
    """The instrument answered BUSY for longer than the caller was willing to wait."""


class InstrumentRejected(InstrumentError):
    """The instrument refused a well-formed command (ERR reply), e.g. a recipe off its table."""


class MaterialFailure(SDLError):
    """The experiment failed for a material reason (the sample is lost): record it, never retry it.

    Args:
        message: The instrument's explanation.
        instrument: The instrument that reported it.
    """

    def __init__(self, message: str, *, instrument: str | None = None) -> None:
        self.message = message
        self.instrument = instrument
        super().__init__(f"[{instrument}] {message}" if instrument else message)


class RepositoryError(SDLError):
    """The knowledge repository refused or failed an operation."""


class IllegalTransition(RepositoryError, ValueError):
    """An experiment state change that the state machine does not allow."""


class EngineError(SDLError):
    """The active-learning engine cannot do what was asked (e.g. the pool is exhausted)."""


class CampaignFailed(SDLError):
    """The campaign cannot go on (an instrument stayed unreachable, the failure budget is spent).

    Its message is the one line a person needs: what failed, and for an instrument its name and URL.
    """
