"""How long tests wait, on a machine slower than the one they were written on.

``SANDRUN_TEST_TIME_SCALE`` (default 1) multiplies every pytest timeout (the
``timeout`` markers and the ini default; see ``tests/conftest.py``) and the
waits that use ``scaled``: ``scripts/vm-check.sh`` sets it for a machine under
software emulation, where everything takes 10 to 20 times as long.  Only how
long a test waits before it gives up changes, never what it asserts.
"""

from __future__ import annotations

import os

TIME_SCALE = max(1.0, float(os.environ.get("SANDRUN_TEST_TIME_SCALE", "1") or 1))


def scaled(seconds: float) -> float:
    return seconds * TIME_SCALE
