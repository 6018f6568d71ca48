"""Deploy-time compression of one served model, cached: config -> key -> (cached | search) -> entry."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compression.models.loading import LoadedModel
from compression.runtimes.manifest import ArtifactError, read_manifest
from compression.search.cache import REPORT_NAME, ArtifactCache, cache_key
from compression.search.data import load_eval_data
from compression.search.report import write_reports
from compression.search.runner import SearchReport, run_search
from compression.search.settings import CompressibleModel, CompressionSettings

log = logging.getLogger("slimserve.compression")


MODEL_KEY_FIELDS = ("source", "labels", "labels_file", "preprocessing", "device")
"""The :class:`~compression.models.settings.ModelSpec` fields that shape a compressed artifact, and so its cache
key. Named, not derived: a field added to the deploy config must be added here on purpose to change keys."""


@dataclass(frozen=True)
class CompressedEntry:
    folder: Path
    report: SearchReport

    @property
    def chosen_artifact(self) -> Path | None:
        """The chosen variant's artifact folder, or None when the original was chosen."""
        variant = self.report.variant(self.report.chosen)
        return self.folder / variant.artifact if variant.artifact else None


KEY_OMITTED_DEFAULTS = {"budget": ("confidence", "max_class_drop"), "search": ("max_minutes", "student_min_images")}
"""Compression fields added after keys were first published: left out of the key while at their default, so
the keys of existing configs stay what they were (a block left empty is left out too)."""


def compression_key_settings(compression: CompressionSettings) -> dict:
    """The compression settings as the cache key sees them (:data:`KEY_OMITTED_DEFAULTS` left out at default)."""
    dump = compression.model_dump(mode="json")
    defaults = CompressionSettings().model_dump(mode="json")
    for block, fields in KEY_OMITTED_DEFAULTS.items():
        for name in fields:
            if dump[block].get(name) == defaults[block][name]:
                del dump[block][name]
        if not dump[block]:
            del dump[block]
    return dump


def compression_key(settings: CompressibleModel, loaded: LoadedModel) -> tuple[str, dict]:
    compression = settings.compression
    assert compression is not None
    model_part = settings.model_dump(mode="json", include=set(MODEL_KEY_FIELDS))
    return cache_key(
        model_file=loaded.source_file,
        model_settings=model_part,
        compression_settings=compression_key_settings(compression),
        device=compression.target.device,
    )


def cached_entry(settings: CompressibleModel, loaded: LoadedModel, cache_root: Path) -> CompressedEntry | None:
    """The published search result for these exact inputs, if there is one and its files verify.

    The chosen artifact's files are checked against the sha256 in its manifest: an entry that fails
    (edited, truncated, bit rot) is treated as missing, so it is rebuilt, never served.
    """
    key, _ = compression_key(settings, loaded)
    cache = ArtifactCache(cache_root)
    if not cache.is_complete(settings.name, key):
        return None
    folder = cache.entry(settings.name, key)
    try:
        entry = CompressedEntry(folder, SearchReport.from_json((folder / REPORT_NAME).read_text()))
        if entry.chosen_artifact is not None:
            read_manifest(entry.chosen_artifact)
    except (ArtifactError, OSError, ValueError, TypeError, KeyError, StopIteration) as exc:
        log.warning("model %r: cached result %s is unusable, so it will be rebuilt: %s", settings.name, folder, exc)
        return None
    return entry


def compress(
    settings: CompressibleModel,
    loaded: LoadedModel,
    cache_root: Path,
    *,
    max_image_pixels: int = 40_000_000,
    progress: Callable[[str], None] = log.info,
) -> CompressedEntry:
    """Search unless a published result for the same inputs exists; one process searches per key."""
    compression: CompressionSettings | None = settings.compression
    if compression is None or not compression.enabled:
        raise ValueError(f"model {settings.name!r} has no enabled compression block")
    key, key_inputs = compression_key(settings, loaded)
    cache = ArtifactCache(cache_root)
    with cache.lock(settings.name, key):
        entry = cached_entry(settings, loaded, cache_root)
        if entry is not None:
            progress(f"model {settings.name!r}: cached compression result {key} found; no search needed")
            return entry
        progress(f"model {settings.name!r}: searching (cache key {key})")
        data = load_eval_data(compression.data, settings.preprocessing, loaded.input_shape, max_image_pixels)
        with cache.staging(settings.name, key) as staging:
            report = run_search(
                loaded.module,
                compression,
                data,
                staging,
                model_name=settings.name,
                max_batch_size=settings.batching.max_batch_size,
                progress=progress,
            )
            report.cache_key, report.key_inputs = key, key_inputs
            write_reports(report, staging)
    return CompressedEntry(cache.entry(settings.name, key), report)
