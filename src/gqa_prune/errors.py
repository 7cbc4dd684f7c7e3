"""The one error class for mistakes a user can fix (bad flags, files, settings)."""


class GQAPruneError(ValueError):
    """A user-facing error: the message names the problem and how to fix it.

    The CLI prints it as one line and exits with status 2, without a traceback.
    """
