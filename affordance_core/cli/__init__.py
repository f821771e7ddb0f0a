"""Console scripts of affordance_core (``affordance-synth``, ``affordance-train``, ...).

Convention: a user error (missing file, bad value) exits with code 2 and ONE line on stderr,
never a traceback: :func:`user_error`.
"""
from __future__ import annotations

import sys
from typing import Any


def user_error(prog: str, message: Any) -> int:
    """Print ``<prog>: error: <message>`` as one line on stderr and return exit code 2."""
    print(f'{prog}: error: {" ".join(str(message).split())}', file=sys.stderr)
    return 2
