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


REPAIR = "rerun ecviz trace with the same arguments to repair it"


def sample_ranges(samples, sep: str = ", ") -> str:
    """[0, 1, 2, 3, 8] -> '0-3, 8' (`sep` between the runs)."""
    out, run = [], []
    for s in sorted(set(int(s) for s in samples)):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [s]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return sep.join(out)


class DamagedTraceError(TraceError):
    """Samples of a trace store whose chunks are missing, truncated or fail their checksum; `samples` lists them
    (sorted indices) and the message names them and the remedy: rerun `ecviz trace` with the same arguments."""

    def __init__(self, path, samples, detail: str = "", variable: str | None = None):
        self.path, self.samples, self.variable = str(path), sorted(int(s) for s in samples), variable
        what = f"cannot read `{variable}`, the store is damaged" if variable else "the store is damaged"
        n = len(self.samples)
        super().__init__(f"{path}: {what}: sample{'s' if n != 1 else ''} {sample_ranges(self.samples)}"
                         + (f" ({detail})" if detail else "") + f"; {REPAIR}")


class BusyError(EcvizError):
    """A trace store or run directory that another live process is writing (ecviz.lock)."""
