"""User-facing errors: one clear line and a non-zero exit, never a traceback."""


class FmforgeError(Exception):
    """A mistake the user can fix (bad path, bad config, bad data). The CLI prints it as one line."""

    exit_code = 2
