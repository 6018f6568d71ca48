"""The soak test's 20-second variant: concurrency 64, good and bad requests mixed, nothing unexpected."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.soak import soak_new_server

pytestmark = pytest.mark.slow


def test_twenty_seconds_of_mixed_load_lose_nothing(tmp_path: Path) -> None:
    result = soak_new_server(duration_s=20, concurrency=64, warmup_s=5, log_path=tmp_path / "server.log")
    print(result.format())  # resident memory growth is reported, not asserted: 20 s is too short to judge it
    assert not result.unexpected and result.lost_good == 0, result.format()
    assert all(result.sent.values()) and len(result.sent) == 8  # every kind was sent and counted
    assert result.rss_warm_kib > 0 and result.rss_end_kib > 0
