"""The one exception type users see: a one-line message that says what is wrong and what to do."""


class CamelidError(Exception):
    """A user-facing error. The CLI prints `camelid: error: <message>` and exits with code 2,
    without a traceback. Raise it for bad input (files, flags, data), never for bugs."""
