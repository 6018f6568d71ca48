"""A cached search report written before the ``distillation`` block still loads at server start.

A report's ``steps`` are the technique configs as they were when it was written, kept as plain
dicts for reading: nothing re-parses them into configs, so flat fields from an older release
(``finetune_epochs`` and the like) load as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from compression.models.loading import LoadedModel
from compression.search.cache import REPORT_NAME, ArtifactCache
from compression.search.pipeline import cached_entry, compression_key
from compression.search.runner import SearchReport
from compression.search.settings import CompressionSettings
from server.config.settings import ModelSettings, default_config
from tests import REPO_ROOT

OLD_REPORT = REPO_ROOT / "docs" / "gpu" / "fidelity-search-h100.json"
"""A real report from before the distillation block (raw GPU output, kept as it was written)."""

OLD_STEPS = [
    {
        "technique": "channel_prune",
        "ratio": 0.5,
        "importance": "magnitude",
        "norm": 2,
        "global_pruning": False,
        "ignored_layers": None,
        "round_to": None,
        "finetune_epochs": 10,
        "finetune_time_budget_s": 120.0,
        "temperature": 4.0,
        "alpha": 0.9,
        "lr": 0.002,
    },
    {"technique": "bn_fold"},
]


def _flat_steps(report: SearchReport) -> list[dict]:
    return [step for variant in report.candidates for step in variant.steps if "finetune_epochs" in step]


def test_a_report_written_with_flat_fields_loads() -> None:
    report = SearchReport.from_json(OLD_REPORT.read_text())
    assert _flat_steps(report), "the fixture is a report from before the distillation block"
    assert report.variant(report.chosen).name == report.chosen


def test_a_cached_entry_with_flat_fields_is_served_not_rebuilt(tmp_path: Path) -> None:
    compression = CompressionSettings.model_validate({"target": {"device": "cpu"}})
    settings: ModelSettings = default_config().models[0].model_copy(update={"compression": compression})
    loaded = LoadedModel(nn.Identity(), list("0123456789"), (1, 28, 28), 10, 0.0, source_file=None)
    key, _ = compression_key(settings, loaded)
    data = json.loads(OLD_REPORT.read_text())
    pruned = {**data["candidates"][0], "name": "pruned50", "steps": OLD_STEPS, "artifact": None}
    data.update(model=settings.name, chosen="original", candidates=[pruned])
    folder = ArtifactCache(tmp_path).entry(settings.name, key)
    folder.mkdir(parents=True)
    (folder / REPORT_NAME).write_text(json.dumps(data))

    entry = cached_entry(settings, loaded, tmp_path)

    assert entry is not None and entry.chosen_artifact is None
    assert entry.report.variant("pruned50").steps == OLD_STEPS
