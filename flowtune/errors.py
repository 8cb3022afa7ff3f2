"""User-facing errors.

Every mistake a user can make (a bad recipe key, a missing file, an unknown model family)
raises :class:`FlowtuneError` with a one-line message that says what went wrong, where, and what
to do.  The CLI prints that line and exits with status 2; it never shows a traceback for them.
"""


class FlowtuneError(Exception):
    """An error caused by user input; its message is shown as-is, without a traceback."""

    exit_code: int = 2
