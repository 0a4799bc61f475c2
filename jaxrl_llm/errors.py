"""Why a run stopped, as exception types and process exit codes.

Every way a command can end has its own exit code, so a scheduler or a launch script can tell them apart:

====  ==============================================================================================
code  meaning
====  ==============================================================================================
0     finished
1     an unexpected error (a bug, or a failure of the machine): the traceback is printed
2     a user error (:class:`UserError`): one line naming the config key, file or value; nothing ran
3     training diverged (:class:`Diverged`): non-finite or exploding weights; nothing non-finite saved
4     a reward function failed on too many items (:class:`RewardFailure`); its first traceback is shown
75    interrupted (:class:`Interrupted`: SIGTERM, SIGINT or a preemption notice) after a checkpoint was
      saved; the same command resumes the run (75 is ``EX_TEMPFAIL`` of sysexits.h: "try again later")
====  ==============================================================================================

:func:`run_command` turns these exceptions into a message and the exit code; ``debug=True`` re-raises
instead, so the full traceback is shown.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

__all__ = ["UserError", "DataError", "RunStopped", "Diverged", "RewardFailure", "Interrupted", "blame", "run_command",
           "EXIT_OK", "EXIT_CRASH", "EXIT_USER_ERROR", "EXIT_DIVERGED", "EXIT_REWARD_FAILURE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_CRASH = 1
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_REWARD_FAILURE = 4
EXIT_INTERRUPTED = 75


class UserError(ValueError):
    """Something the user can fix in the command, the config or the files it names. The message is one line
    that names the key, file or value (and, where there is a choice, the allowed values). A ``ValueError``, as
    the errors it stands for mostly were."""

    exit_code = EXIT_USER_ERROR


class DataError(UserError):
    """A problem with the prompt data (an empty file, a missing column, a prompt too long for the config)."""


class RunStopped(Exception):
    """The run stopped on purpose before its end; ``exit_code`` says why."""

    exit_code = EXIT_CRASH


class Diverged(RunStopped):
    """Training diverged; the weights in memory are not saved or exported."""

    exit_code = EXIT_DIVERGED


class RewardFailure(RunStopped):
    """A reward function failed on more than ``reward.max_failure_frac`` of its items; ``details`` holds the
    traceback of its first error (or what timed out)."""

    exit_code = EXIT_REWARD_FAILURE

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


class Interrupted(RunStopped):
    """A stop was requested (signal or preemption notice); a checkpoint of ``step`` was saved first."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@contextlib.contextmanager
def blame(key: str, value, errors: tuple[type[BaseException], ...] = (OSError, ValueError)) -> Iterator[None]:
    """Re-raise ``errors`` met inside the block as a :class:`UserError` naming ``key=value`` (the original
    exception stays attached as the cause, which ``--debug`` shows)."""
    try:
        yield
    except UserError:
        raise
    except errors as err:
        raise UserError(f"{key}={value}: {_one_line(err)}") from err


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    first = text.splitlines()[0]
    return first + (" ..." if "\n" in text else "")


def run_command(fn: Callable[[], int], *, debug: bool = False, stderr=None) -> int:
    """Run ``fn`` and return its exit code, turning the exceptions above into a message on ``stderr`` and
    their exit code (``debug``: let them propagate, with the traceback)."""
    stderr = stderr or sys.stderr
    try:
        return int(fn() or 0)
    except UserError as err:
        if debug:
            raise
        print(f"error: {_one_line(err)}  (--debug shows the traceback)", file=stderr)
        return err.exit_code
    except RewardFailure as err:
        if debug:
            raise
        print(f"{err.details.rstrip()}\nstopped: {err}", file=stderr)
        return err.exit_code
    except RunStopped as err:
        if debug and not isinstance(err, Interrupted):
            raise
        print(f"stopped: {err}", file=stderr)
        return err.exit_code
