"""A local Prefect server for watching campaigns (``sdl ui``), isolated from the user's ~/.prefect.

Why a module of its own: the server must be started the same way by the CLI and by the UI test:
its own ``PREFECT_HOME`` (so a lab's runs never mix with other Prefect projects), analytics off,
a free port on 127.0.0.1 (4200 may be taken on a shared machine), and the task-run recorder's batch
sizes raised, because with SQLite behind the server many task runs otherwise give "database is
locked" → HTTP 503 → multi-second client back-off (KNOWN_FACTS). This module never imports prefect:
it runs ``python -m prefect server start`` as a subprocess.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "LOOPBACK",
    "PrefectServer",
    "UnsafeHost",
    "free_port",
    "resolve_ui_host",
    "server_environment",
    "prefect_quiet_environment",
    "prepare_client_environment",
]

logger = logging.getLogger(__name__)

#: Settings every Prefect process of this project gets (server and client side).
QUIET_SETTINGS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_READ_BATCH_SIZE": "200",
    "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_FLUSH_INTERVAL": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


LOOPBACK = "127.0.0.1"
#: Environment variables that may name the interface ``sdl ui`` listens on (first set wins).
HOST_VARIABLES = ("SDL_UI_HOST", "PREFECT_SERVER_API_HOST")


class UnsafeHost(ValueError):
    """The environment asks the UI to listen beyond this machine, but ``--host`` did not say so."""


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_ui_host(cli_host: str | None, environ: dict[str, str] | None = None) -> str:
    """The interface ``sdl ui`` listens on: ``--host``, else a loopback one from the environment.

    Why so strict: the Prefect server has no login; anyone who reaches its port can read every
    campaign and launch flow runs. Listening beyond this machine must be asked for on the command
    line, where a person sees it, never inherited from an environment variable or a config file.

    Raises:
        UnsafeHost: ``SDL_UI_HOST`` / ``PREFECT_SERVER_API_HOST`` names a non-loopback interface
            and ``--host`` was not given.
    """
    if cli_host:
        return cli_host
    env = os.environ if environ is None else environ
    for name in HOST_VARIABLES:
        value = (env.get(name) or "").strip()
        if not value:
            continue
        if not _is_loopback(value):
            raise UnsafeHost(
                f"{name}={value} would open the Prefect UI and API (no login) beyond this machine; "
                f"`sdl ui` does that only with an explicit --host {value}"
            )
        return value
    return LOOPBACK


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def prefect_quiet_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """Return ``environ`` (default ``os.environ``) with the project's Prefect settings added.

    Values already set by the user win, so a person can still tune them.
    """
    env = dict(os.environ if environ is None else environ)
    for key, value in QUIET_SETTINGS.items():
        env.setdefault(key, value)
    return env


def prepare_client_environment(state_dir: Path) -> str:
    """Set this process's Prefect environment before prefect is imported; returns the mode.

    With ``PREFECT_API_URL`` set, runs report to that server (``"server"``). Without it, Prefect
    runs in ephemeral mode (``"ephemeral"``): its home goes under ``state_dir`` (next to the
    database) unless ``PREFECT_HOME`` is set, so nothing lands in ``~/.prefect``. Either way
    analytics are off and the ``sdl`` and ``devices`` loggers reach Prefect's run logs.
    """
    for key, value in QUIET_SETTINGS.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "sdl,devices")
    if os.environ.get("PREFECT_API_URL"):
        return "server"
    home = Path(state_dir) / "prefect"
    if "PREFECT_HOME" not in os.environ:
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)
    return "ephemeral"


def server_environment(home: Path, port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """Environment for a Prefect server process with its own home on ``host:port``."""
    env = prefect_quiet_environment()
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_SERVER_API_HOST"] = host
    env["PREFECT_SERVER_API_PORT"] = str(port)
    # The server process itself must not try to talk to another API.
    env.pop("PREFECT_API_URL", None)
    return env


@dataclass
class PrefectServer:
    """A ``prefect server start`` subprocess on 127.0.0.1 with its own ``PREFECT_HOME``.

    Args:
        home: Directory used as ``PREFECT_HOME`` (its SQLite database and logs live there).
        port: TCP port; ``None`` picks a free one.
        host: Interface to bind; 127.0.0.1 keeps the UI private to this machine.
        log_file: Where the server's output goes (default ``home/server.log``).
    """

    home: Path
    port: int | None = None
    host: str = "127.0.0.1"
    log_file: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        """The UI's address (the API is under ``/api``)."""
        return f"http://{self.host}:{self.port}"

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the server."""
        return _is_loopback(self.host)

    @property
    def api_url(self) -> str:
        """Value for ``PREFECT_API_URL`` in processes that should report to this server."""
        return f"{self.url}/api"

    def start(self, timeout: float = 120.0) -> PrefectServer:
        """Start the server and wait until its health endpoint answers.

        Raises:
            RuntimeError: The server exited or did not become healthy within ``timeout`` seconds;
                the message quotes the end of its log.
        """
        self.home = Path(self.home)
        self.home.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_port(self.host)
        log_path = self.log_file or self.home / "server.log"
        env = server_environment(self.home, self.port, self.host)
        command = [
            sys.executable, "-m", "prefect", "server", "start",
            "--host", self.host, "--port", str(self.port),
        ]
        logger.info("starting Prefect server on %s (PREFECT_HOME=%s)", self.url, self.home)
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Prefect server exited with code {self.process.returncode}: {_tail(log_path)}"
                )
            if self.healthy():
                logger.info("Prefect server ready at %s", self.url)
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Prefect server not healthy after {timeout:.0f} s: {_tail(log_path)}")

    def healthy(self) -> bool:
        """True when the API answers ``/api/health``."""
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                status: int = response.status
                return status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait(self) -> int:
        """Block until the server exits (``sdl ui`` in the foreground); return its exit code."""
        assert self.process is not None, "server not started"
        return self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server and everything it started: SIGTERM to its process group, SIGKILL after ``timeout`` s.

        The server runs in its own session (a Ctrl-C in the terminal reaches ``sdl ui`` only, which
        then stops it here), so its process group holds the server and any worker it spawned.
        """
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the server leads its own group
        if self.process.poll() is None:
            _signal_group(group, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("Prefect server did not stop within %g s of SIGTERM: killing it", timeout)
        _signal_group(group, signal.SIGKILL)  # leftovers of the group, if any
        if self.process.poll() is None:
            self.process.wait(timeout=timeout)

    def __enter__(self) -> PrefectServer:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(group: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(group, signum)


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
