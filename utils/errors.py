"""The one exception type for mistakes a user can make (flags, paths, data).

Entry points catch it, print its message as one line and exit with code 2;
anything else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix: a bad flag, a missing file, unreadable data."""


class NonFiniteLoss(Exception):
    """Training diverged (a NaN or infinite loss); the run stops after saving what it finished.

    Entry points print its message as one line and exit with code 1.
    """


class RunStopped(Exception):
    """The run stopped for a signal after saving everything `--resume` needs.

    Entry points print its message as one line and exit with `utils.stopping.EXIT_STOPPED` (3).
    """
