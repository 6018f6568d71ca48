"""``slimserve compress``: run (or reuse) each model's search and print what it chose."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from compression.models.loading import load_model
from compression.search.data import DataError
from compression.search.pipeline import compress
from compression.search.report import HEADERS, PARETO_PNG, REPORT_JSON, REPORT_MD, summary_rows
from compression.search.selection import BudgetUnmet
from server.config.settings import DeployConfig
from server.observability.tracing import process_tracing

log = logging.getLogger("slimserve.compress")

EXIT_FAILED, EXIT_BUDGET_UNMET = 1, 3


def run_compress(config: DeployConfig, only: str | None, out: Path | None) -> int:
    """Search every model with an enabled compression block (or only ``only``); with ``server.tracing`` on, the
    search's spans (one per candidate) are exported too."""
    with process_tracing(config.server.tracing):
        return _run_compress(config, only, out)


def _run_compress(config: DeployConfig, only: str | None, out: Path | None) -> int:
    models = [m for m in config.models if m.compression is not None and m.compression.enabled]
    if only is not None:
        models = [m for m in models if m.name == only]
        if not models:
            log.error("model %r is not in the config or has no enabled compression block", only)
            return EXIT_FAILED
    if not models:
        log.error("no model in the config has an enabled compression block")
        return EXIT_FAILED
    status = 0
    for settings in models:
        loaded = load_model(settings, config.resolved_cache_dir())
        try:
            entry = compress(
                settings, loaded, config.resolved_cache_dir(), max_image_pixels=config.server.max_image_pixels
            )
        except BudgetUnmet as exc:
            log.error("model %r: %s", settings.name, exc)
            status = EXIT_BUDGET_UNMET
            continue
        except DataError as exc:
            log.error("model %r: compression data: %s", settings.name, exc)
            status = EXIT_FAILED
            continue
        print(f"\n{settings.name}: chose {entry.report.chosen} ({entry.report.reason})")
        print(" | ".join(HEADERS))
        for row in summary_rows(entry.report):
            print(" | ".join(row))
        print(f"reports: {entry.folder / REPORT_MD}")
        if out is not None:
            target = out / settings.name
            target.mkdir(parents=True, exist_ok=True)
            for name in (REPORT_JSON, REPORT_MD, PARETO_PNG):
                shutil.copyfile(entry.folder / name, target / name)
            if entry.chosen_artifact is not None:
                shutil.copytree(entry.chosen_artifact, target / "artifact", dirs_exist_ok=True)
            print(f"copied to {target}")
    return status
