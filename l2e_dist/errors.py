"""The one base class for errors a user can cause and fix (a bad config, input file, checkpoint, launch or
environment). Every command-line entry point turns a `UserError` into one line naming the problem and the fix
and exit code 2 (launcher.run_cli); anything else is a bug and keeps its traceback.

Each area keeps its own subclass (ConfigError, DataFileError, CheckpointError, ...) so that code can catch
exactly what it expects; the launchers only need this one.
"""

from __future__ import annotations

import errno
import os

# OS errors that come from the machine, not from our code: a full or read-only disk, missing permissions.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


class UserError(Exception):
    """A problem the user can fix; its message says what is wrong and what to do, in one line.

    `agreed` is set when every rank of a distributed run raises the same error (it was decided on one rank and
    shared, or it comes from the config before any process group exists): then only rank 0 reports it.
    """

    agreed: bool = False


def environment_error_message(exc: BaseException) -> str | None:
    """One line for an OSError caused by the machine (full disk, quota, permissions), else None."""
    while exc is not None and not isinstance(exc, OSError):
        exc = exc.__cause__ or exc.__context__  # torch.save wraps the OSError of a failed write
    if exc is None or exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f" writing {exc.filename}" if exc.filename else ""
    return f"{ENVIRONMENT_ERRNOS[exc.errno]}{where}: free space or fix permissions there, or write elsewhere"


def debug_requested() -> bool:
    """L2E_DEBUG=1 (or --debug on a command line) shows the full traceback of a user error too."""
    return os.environ.get("L2E_DEBUG", "").strip().lower() in ("1", "true", "yes")
