"""User-facing errors: raised for bad input, printed as one line by train.py (no traceback)."""


class PruneLabError(Exception):
    """A problem with the user's input or environment, explained in one line.

    The message must name the bad value and what is accepted, e.g.
    ``budget=1.2 is outside [0, 1)``.
    """
