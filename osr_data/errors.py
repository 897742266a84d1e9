"""The one exception type every stage raises for bad input.

The CLI turns it into a single line on stderr and exit status 2; anything else
is a bug and keeps its traceback.
"""
import errno


class BackMixError(Exception):
    """Bad input or state a user can fix: the message names the thing at fault."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread by the commands' handler: it unwinds the command as Ctrl-C's
    KeyboardInterrupt does (every ``finally`` runs, ``except Exception`` does not catch it), and the
    command reports it as an interruption. It is not a KeyboardInterrupt: CPython ends a process with
    SIGINT, whatever exit status it asked for, when a KeyboardInterrupt unwound through code run by
    an extension (pybind11's exec), even one the command caught and reported."""


# A full disk or quota: a state the user fixes by freeing space, so one line like any bad input.
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def no_space(e: OSError, writing=None) -> BackMixError:
    where = writing or e.filename
    return BackMixError(f"no space left on the device{f' writing {where}' if where else ''}; "
                        "free some space and run again")
