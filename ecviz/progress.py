"""The one progress-bar setup of every command: tqdm on stderr (stdout stays for results), as wide as the
terminal; tqdm is imported only when a bar is shown."""

from __future__ import annotations

import sys


def progress_bar(total: int, unit: str, desc: str, initial: int = 0):
    """A tqdm bar of `total` `unit`s labelled `desc`, starting at `initial` (a resumed run)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr)
