"""Suite-wide: pytest timeouts scaled by ``SANDRUN_TEST_TIME_SCALE`` (see ``tests/timing``)."""

from __future__ import annotations

import pytest

from tests.timing import TIME_SCALE


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if TIME_SCALE == 1:
        return
    default = float(config.getini("timeout") or 0)
    for item in items:
        marker = item.get_closest_marker("timeout")
        seconds = float(marker.args[0]) if marker is not None and marker.args else default
        if seconds > 0:
            # Prepended, so that it is the closest: pytest-timeout reads only that one.
            item.add_marker(pytest.mark.timeout(seconds * TIME_SCALE), append=False)
