"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class FlexdiffError(Exception):
    """A mistake in what the user gave us (path, file, setting), not a bug in flexdiff."""
