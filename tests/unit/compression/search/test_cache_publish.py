"""Publishing a search result: atomic, readable by every replica sharing the store, nothing left behind."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from compression.search.cache import PUBLISHED_MODE, ArtifactCache


def test_a_published_entry_is_readable_by_other_users_and_staging_is_gone(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    with cache.lock("digits", "abc"), cache.staging("digits", "abc") as staging:
        (staging / "report.json").write_text("{}")
    entry = cache.entry("digits", "abc")
    assert stat.S_IMODE(entry.stat().st_mode) == PUBLISHED_MODE
    assert (entry / "report.json").read_text() == "{}"
    assert not list(entry.parent.glob(".abc.partial-*"))


def test_a_failed_build_publishes_nothing(tmp_path: Path) -> None:
    cache = ArtifactCache(tmp_path)
    with pytest.raises(RuntimeError), cache.lock("digits", "abc"), cache.staging("digits", "abc") as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed mid-search")
    assert not cache.entry("digits", "abc").exists()
    assert not list(cache.entry("digits", "abc").parent.glob(".abc.partial-*"))
