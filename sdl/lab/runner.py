"""The process's single Bluesky ``RunEngine``, behind a lock, safe to call from worker threads.

Known facts (docs/ARCHITECTURE.md, KNOWN_FACTS.md): ``RunEngine()`` installs signal handlers and
fails outside the main thread, so it is built with ``context_managers=[]``; each RunEngine leaks a
thread, so there is one per process; it is not re-entrant, so calls are serialized by a lock.
A RunEngine is busy for the whole of a plan (a synthesis may take an hour), so a lab with several
instruments working at once may ask for one engine per instrument (``key=<instrument name>``):
the number of engines stays bounded by the number of instruments.
:func:`run_plan` never raises for a failed plan: it reports the outcome (with the *underlying*
exception, e.g. :class:`~sdl.exceptions.MaterialFailure`, unwrapped from ``FailedStatus``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["RunOutcome", "get_run_engine", "run_plan", "warm_up"]

logger = logging.getLogger(__name__)

Subscriber = Callable[[str, dict[str, Any]], Any]

_LOCK = threading.Lock()
_ENGINES: dict[str, tuple[Any, threading.Lock, _Subscribers]] = {}


@dataclass(frozen=True)
class RunOutcome:
    """What became of one plan.

    Attributes:
        run_uids: Start-document uids of every run the plan opened, in order.
        exit_status: ``success``, ``fail`` or ``abort``.
        plan_result: The plan's return value (``None`` on failure).
        exception: The error that ended the plan, unwrapped from ``FailedStatus``.
    """

    run_uids: tuple[str, ...]
    exit_status: str
    plan_result: Any = None
    exception: BaseException | None = None

    @property
    def ok(self) -> bool:
        """Whether the plan succeeded."""
        return self.exit_status == "success" and self.exception is None


def _run_engine_class() -> type[Any]:
    """A RunEngine whose descriptors, events and stops skip event-model's jsonschema check.

    Bluesky composes every document with ``validate=True`` (jsonschema on each event: a fifth of
    an experiment's CPU with zero-latency instruments) and has no switch for it; ``compose_*``
    take ``validate=False``, so the bundler passes it. The documents our plans make are checked
    against the schemas once, in tests/test_plans.py; the start document is still validated.
    """
    import dataclasses
    from functools import partial

    from bluesky import RunEngine
    from bluesky.bundlers import RunBundler

    class UncheckedBundler(RunBundler):
        async def open_run(self, msg: Any) -> Any:
            uid = await super().open_run(msg)
            this: Any = self  # the compose_* callables are typed as event-model's classes
            descriptor: Any = this._compose_descriptor

            def compose_descriptor(*args: Any, **kwargs: Any) -> Any:
                bundle = descriptor(*args, **{**kwargs, "validate": False})
                return dataclasses.replace(bundle, compose_event=partial(bundle.compose_event, validate=False),
                                           compose_event_page=partial(bundle.compose_event_page, validate=False))

            this._compose_descriptor = compose_descriptor
            this._compose_stop = partial(this._compose_stop, validate=False)
            return uid

    class UncheckedRunEngine(RunEngine):
        RunBundler = UncheckedBundler

    return UncheckedRunEngine


class _Subscribers:
    """The callbacks of the plan now running on one engine: subscribed to it once, for good.

    Why: subscribing a plan's callbacks to the RunEngine and unsubscribing them after cost ~0.4 ms
    per callback (bluesky connects one weak-reference proxy per document kind, and a disconnect
    scans them all). An engine runs one plan at a time (its lock), so one permanent callback hands
    each document to the running plan's callbacks, in order. A callback that raises aborts the
    run, as a subscribed one does.
    """

    def __init__(self) -> None:
        self.current: tuple[Subscriber, ...] = ()

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        for callback in self.current:
            callback(name, doc)


def _engine(key: str) -> tuple[Any, threading.Lock, _Subscribers]:
    with _LOCK:
        if key not in _ENGINES:
            engine = _run_engine_class()(context_managers=[], call_returns_result=True)
            subscribers = _Subscribers()
            engine.subscribe(subscribers)
            _ENGINES[key] = (engine, threading.Lock(), subscribers)
        return _ENGINES[key]


def get_run_engine(key: str = "default") -> Any:
    """The process's RunEngine for ``key`` (built on first use, from any thread)."""
    return _engine(key)[0]


def _unwrap(exc: BaseException) -> BaseException:
    from bluesky.utils import FailedStatus
    from ophyd.utils.errors import StatusTimeoutError

    from sdl.exceptions import InstrumentTimeout

    inner: BaseException | None = exc
    if isinstance(exc, FailedStatus) and exc.args:
        status = exc.args[0]
        getter = getattr(status, "exception", None)
        inner = getter() if callable(getter) else None
        if isinstance(inner, StatusTimeoutError):
            device = getattr(getattr(status, "device", None), "name", None)
            url = getattr(getattr(status, "device", None), "url", None)
            wrapped = InstrumentTimeout(f"no result within the status timeout: {inner}", instrument=device, url=url)
            wrapped.__cause__ = inner
            inner = wrapped
    return inner or exc


def run_plan(plan: Iterable[Any], *, subscribers: Iterable[Subscriber] = (), key: str = "default") -> RunOutcome:
    """Run one plan on the process's RunEngine (serialized with every other caller of that engine).

    Args:
        plan: A Bluesky plan (generator).
        subscribers: ``(name, doc)`` callables subscribed for this plan only.
        key: Which engine: ``"default"``, or e.g. an instrument name for one engine per instrument.

    Returns:
        A :class:`RunOutcome`; failures are reported there, not raised.
    """
    engine, lock, current = _engine(key)
    with lock:
        starts: list[str] = []
        stops: list[str] = []

        def collect(name: str, doc: dict[str, Any]) -> None:
            if name == "start":
                starts.append(doc["uid"])
            elif name == "stop":
                stops.append(doc.get("exit_status", ""))

        current.current = (collect, *subscribers)
        try:
            result = engine(plan)
        except BaseException as exc:  # noqa: BLE001 - reported in the outcome
            if engine.state != "idle":
                try:
                    engine.abort(reason=f"plan failed: {exc}")
                except Exception:
                    logger.exception("could not abort the RunEngine after a failure")
            error = _unwrap(exc)
            status = "abort" if "abort" in stops else "fail"
            logger.info("plan ended with %s: %s", status, error)
            return RunOutcome(tuple(starts), status, None, error)
        finally:
            current.current = ()
        exit_status = getattr(result, "exit_status", "success")
        uids = tuple(getattr(result, "run_start_uids", ()) or starts)
        return RunOutcome(uids, exit_status, getattr(result, "plan_result", None), None)


def warm_up(key: str = "default") -> None:
    """Build the engine for ``key`` and run one empty run on it (documents go to no subscriber).

    Why: the first run in a process pays for lazy imports and first-use set-up in bluesky and
    event-model (a few hundred ms); a lab does that when it opens, not in its first experiment.
    """
    from bluesky import plan_stubs as bps
    from bluesky import preprocessors as bpp

    plan = bpp.run_wrapper(bps.null(), md={"purpose": "warm-up"})  # type: ignore[no-untyped-call]
    outcome = run_plan(plan, key=key)
    if not outcome.ok:
        logger.warning("RunEngine %s: warm-up run ended %s: %s", key, outcome.exit_status, outcome.exception)
