"""The error boundary: what counts as bad input.

Everything ecviz raises for input a user can fix derives from `EcvizError` (a ValueError, so existing
`except ValueError` callers keep working). The CLI reports exactly these (and OSError) as one line with exit
status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class EcvizError(ValueError):
    """Bad input from the user; the message is one line naming the problem and, where there is one, the fix."""


class CheckpointError(EcvizError):
    """A checkpoint that cannot be used."""


class TraceError(EcvizError):
    """A trace store that cannot be used as asked."""


class UsageError(EcvizError):
    """A command-line option or combination that makes no sense."""


class BusyError(EcvizError):
    """A trace store or run directory that another live process is writing (ecviz.lock)."""
