"""What a comparison script does with the pieces it found missing before anything runs."""

from __future__ import annotations

import sys


def settle(problems: list[tuple[str | None, str]], engines: set[str], skip_missing: bool, prog: str) -> bool:
    """Print each missing piece in one line. With ``skip_missing`` an engine whose pieces are missing
    leaves ``engines`` (said so); a piece every run needs (engine None) still stops. False: run nothing."""
    left_out = {engine: line for engine, line in problems if engine is not None} if skip_missing else {}
    stopping = [line for engine, line in problems if engine not in left_out]
    if stopping:
        for line in stopping:
            print(f"{prog}: missing: {line}", file=sys.stderr)
        print(f"{prog}: nothing was run" + ("" if skip_missing else
                                           " (--skip-missing leaves out the peers that lack pieces)"), file=sys.stderr)
        return False
    for engine, line in left_out.items():
        engines.discard(engine)
        print(f"{prog}: leaving out {engine}: {line}", flush=True)
    return True
