"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class FlexdiffError(Exception):
    """A mistake in what the user gave us (path, file, setting), not a bug in flexdiff."""


def first_line(e: BaseException) -> str:
    """An exception's first line for a one-line user error (its type's name when it says nothing)."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__
