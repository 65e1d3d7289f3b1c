"""The isdgrid exception tree.

Every error the grid raises on purpose derives from :class:`GridError`::

    GridError
     ├── UnknownServiceError      acquire/broadcast/terminate with an id never published
     ├── ServiceReleasedError     a call on a released proxy, or a second release
     ├── PublishError             the object cannot be pickled or fails to load on a host
     ├── RemoteError              a remote exception whose own type cannot be re-raised here
     ├── PayloadTooLargeError     one call (or reply) is larger than the grid's message limit
     ├── CheckpointError          a snapshot could not be taken, saved, read or restored
     ├── HostLostError            a daemon died or stopped answering
     │    └── ServiceUnavailableError   every server of a service is lost
     ├── AuthenticationError      a daemon refused the grid's secret
     ├── GridTerminatedError      use of a grid after terminate()
     ├── LaunchError              a host's daemon could not be started
     └── ConfigError              a bad hosts file or bad grid option

Pyro5, pickle and subprocess errors are converted into these where they cross into the
grid (``raise HostLostError(...) from exc``), so a driver needs to catch only this tree.
A remote method's own exception is re-raised as itself (with the remote traceback as its
``__cause__``) whenever its type can be unpickled in the driver.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CheckpointError",
    "ConfigError",
    "GridError",
    "GridTerminatedError",
    "HostLostError",
    "LaunchError",
    "PayloadTooLargeError",
    "PublishError",
    "RemoteError",
    "RemoteTraceback",
    "ServiceReleasedError",
    "ServiceUnavailableError",
    "UnknownServiceError",
]


class GridError(Exception):
    """Root of every error raised by isdgrid."""


class UnknownServiceError(GridError, KeyError):
    """A service id that was never published on this grid (or was terminated)."""

    def __init__(self, service_id: str, known: list[str] | None = None) -> None:
        self.service_id = service_id
        self.known = list(known or [])
        super().__init__(service_id)

    def __str__(self) -> str:
        known = ", ".join(self.known) if self.known else "none"
        return f"unknown service {self.service_id!r} (published services: {known})"


class ServiceReleasedError(GridError):
    """A call on a proxy that was already released, or a second release of it."""


class PublishError(GridError):
    """An object could not be published.

    Raised when the instance cannot be pickled in the driver (``host`` is None) or fails
    to load on a host; ``remote_traceback`` then holds the traceback printed there, and
    ``hint`` how to fix it (for a module the host cannot import: how to make it importable).
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        slot: int | None = None,
        remote_traceback: str = "",
        hint: str = "",
    ) -> None:
        self.host = host
        self.slot = slot
        self.remote_traceback = remote_traceback
        self.hint = hint
        text = message
        if host is not None:
            text = f"{message} (host {host!r}, slot {slot})"
        if remote_traceback:
            text = f"{text}\n--- remote traceback ---\n{remote_traceback.rstrip()}"
        if hint:
            text = f"{text}\n{hint}"
        super().__init__(text)


class RemoteError(GridError):
    """A remote method raised an exception whose type cannot be re-raised in the driver.

    Also a remote ``SystemExit``, ``KeyboardInterrupt`` or other ``BaseException`` that is
    not an ``Exception``: raised as itself, it would end the driver.

    ``type_name`` is the remote exception's qualified type name, ``remote_traceback``
    the traceback as formatted on the host.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(type_name, message, remote_traceback)

    def __str__(self) -> str:
        text = f"{self.type_name}: {self.message}"
        if self.remote_traceback:
            text += f"\n--- remote traceback ---\n{self.remote_traceback.rstrip()}"
        return text


class PayloadTooLargeError(GridError):
    """One call or one reply is larger than the grid's message limit.

    The call fails alone; its slot stays healthy. ``size`` and ``limit`` are in bytes.
    """

    def __init__(self, message: str, *, size: int = 0, limit: int = 0) -> None:
        self.size = size
        self.limit = limit
        super().__init__(message)


class CheckpointError(GridError):
    """A snapshot of a service could not be taken, saved, read or restored.

    Raised by ``Grid.checkpoint`` when a server's object cannot be pickled on its host
    (``host``, ``slot`` and ``class_name`` say which; ``remote_traceback`` what failed),
    by ``Snapshot.load`` for a file that is not a snapshot, and by ``Grid.restore`` for a
    snapshot that does not fit the service.
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        slot: int | None = None,
        class_name: str = "",
        remote_traceback: str = "",
    ) -> None:
        self.host = host
        self.slot = slot
        self.class_name = class_name
        self.remote_traceback = remote_traceback
        super().__init__(message)


class HostLostError(GridError):
    """A daemon died or stopped answering; every call pending on it fails with this."""

    def __init__(self, message: str, *, host: str | None = None, slot: int | None = None) -> None:
        self.host = host
        self.slot = slot
        super().__init__(message)


class ServiceUnavailableError(HostLostError):
    """Every server of a service is lost, so nothing can serve it any more."""

    def __init__(self, service_id: str, message: str = "") -> None:
        self.service_id = service_id
        super().__init__(message or f"every server of service {service_id!r} is lost")


class AuthenticationError(GridError):
    """A daemon refused the grid's secret (or the secret could not be read)."""


class GridTerminatedError(GridError):
    """The grid (or the service) was terminated and can no longer be used."""


class LaunchError(GridError):
    """A host's daemon could not be started.

    Carries the ``host``, the ``command`` that was run and its ``output``. ``str()`` is one
    line: the host, what went wrong and the last line the host printed; :meth:`details`
    adds the command and the end of the output (the grid logs that at DEBUG).
    """

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        command: list[str] | None = None,
        output: str = "",
    ) -> None:
        self.host = host
        self.message = message
        self.command = list(command or [])
        self.output = output
        text = message if host is None else f"host {host!r}: {message}"
        last = _last_line(output)
        if last and last not in message and message not in last:
            text += f": {last}"
        super().__init__(text)

    def details(self, lines: int = 20) -> str:
        """The one-line message, the command (shell-quoted) and the last ``lines`` lines of output."""
        import shlex

        text = str(self)
        if self.command:
            text += f"\n  command: {shlex.join(self.command)}"
        if self.output.strip():
            tail = "\n".join(self.output.strip().splitlines()[-lines:])
            text += "\n  output:\n    " + tail.replace("\n", "\n    ")
        return text


def _last_line(output: str, limit: int = 300) -> str:
    """The last non-blank line of ``output``, cut to ``limit`` characters."""
    for line in reversed(output.splitlines()):
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


class ConfigError(GridError, ValueError):
    """A bad hosts file or a bad grid option (names the file, line or key)."""


class RemoteTraceback(Exception):  # noqa: N818 - a traceback carrier, as concurrent.futures has
    """Carries a remote traceback text; set as ``__cause__`` of re-raised remote errors."""

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return f"\n--- remote traceback ---\n{self.tb.rstrip()}"
