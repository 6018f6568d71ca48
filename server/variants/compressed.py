"""Bring a model's compressed variant into service: from the cache at start-up, or after a search.

A cache miss starts ``slimserve compress`` for that model in a child process (its own interpreter,
so the search never holds the serving process's GIL) while the original serves; when the child has
published its result, the chosen artifact is loaded, warmed up, and made the default atomically.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

import yaml

from compression.models.loading import LoadedModel
from compression.runtimes.realization import load_predictor
from compression.search.pipeline import CompressedEntry, cached_entry
from compression.search.runner import VariantReport
from server.batching.batcher import Forward
from server.config.settings import DeployConfig
from server.observability.metrics import DeployFigures
from server.process.torch_threads import run_in_passing_thread
from server.variants.registry import ModelRegistry, ServedModel

log = logging.getLogger("slimserve.variants")

SEARCH_NICENESS = 10

SearchDone = Callable[[ServedModel, "str | None"], None]
"""Called when a background search has ended: with None once its variant serves, else why it does not."""


def _ignore(model: ServedModel, error: str | None) -> None:
    pass


def variant_properties(report: VariantReport, entry: CompressedEntry) -> dict[str, str]:
    """Measured figures shown in ModelConfig parameters."""
    figures = {
        "techniques": " -> ".join(report.techniques),
        "latency_p50_ms": report.latency_p50_ms,
        "latency_p95_ms": report.latency_p95_ms,
        "top1": report.top1,
        "top1_drop": report.top1_drop,
        "agreement": report.agreement,
        "size_bytes": report.size_bytes,
        "params": report.params,
        "macs": report.macs,
        "budget_met": entry.report.budget_met,
        "choice_reason": entry.report.reason,
        "report": str(entry.folder / "report.md"),
    }
    return {key: str(value) for key, value in figures.items() if value is not None}


class CompressedVariants:
    def __init__(
        self,
        config: DeployConfig,
        registry: ModelRegistry,
        figures: DeployFigures,
        executor: Executor,
        warm_up: Callable[[Forward, tuple[int, int, int], int], dict[int, float] | None],
    ) -> None:
        self._config = config
        self._registry = registry
        self._figures = figures
        self._executor = executor
        self._warm_up = warm_up
        self._tasks: dict[str, asyncio.Task[None]] = {}
        """The background search of each model that has one running, by model name."""
        self._children: dict[str, asyncio.subprocess.Process] = {}

    async def attach(self, model: ServedModel, loaded: LoadedModel, on_search_done: SearchDone | None = None) -> None:
        """Serve the cached result now if there is one, else search in the background (and then call
        ``on_search_done(model, None or the reason it failed)``)."""
        compression = model.settings.compression
        if compression is None or not compression.enabled:
            return
        cache_root = self._config.resolved_cache_dir()
        entry = await run_in_passing_thread(cached_entry, model.settings, loaded, cache_root)
        if entry is not None:
            log.info("model %r: compressed result found in the cache (%s)", model.name, entry.folder)
            await self._activate(model, entry)
            return
        await self.cancel(model.name)
        task = asyncio.create_task(
            self._search_then_activate(model, loaded, on_search_done or _ignore), name=f"compress-{model.name}"
        )
        self._tasks[model.name] = task
        task.add_done_callback(
            lambda done: self._tasks.pop(model.name, None) if self._tasks.get(model.name) is done else None
        )

    def _forget(self, model_name: str, task: asyncio.Task[None]) -> None:
        if self._tasks.get(model_name) is task:
            del self._tasks[model_name]

    @property
    def searching(self) -> bool:
        """True while a background search (or the load of its result) is still running."""
        return bool(self._tasks)

    def searching_for(self, model_name: str) -> bool:
        return model_name in self._tasks

    async def wait(self) -> None:
        """Wait for background searches (tests and ``--wait-for-compression`` use this)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    async def cancel(self, model_name: str) -> None:
        """Stop the model's background search, if it has one (it is being replaced or unloaded)."""
        child = self._children.get(model_name)
        if child is not None and child.returncode is None:
            child.terminate()
        task = self._tasks.pop(model_name, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def stop(self) -> None:
        for name in list(self._tasks):
            await self.cancel(name)

    async def _search_then_activate(self, model: ServedModel, loaded: LoadedModel, done: SearchDone) -> None:
        log.info(
            "model %r: no cached compression result; searching in a child process while the original serves", model.name
        )
        try:
            code = await self._run_child(model)
            entry = await run_in_passing_thread(cached_entry, model.settings, loaded, self._config.resolved_cache_dir())
            if code != 0 or entry is None:
                log.error("model %r: compression failed (exit code %s); serving the original", model.name, code)
                done(model, f"compression failed (exit code {code})")
                return
            await self._activate(model, entry)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("model %r: background compression failed; serving the original", model.name)
            done(model, f"compression failed: {exc}")
            return
        done(model, None)

    async def _run_child(self, model: ServedModel) -> int:
        # NOTE: the child reads this server's config with the model's entry as it is served now (it may have
        # been loaded or replaced through the repository API).
        others = [m for m in self._config.models if m.name != model.name]
        config = self._config.model_copy(update={"models": [*others, model.settings]})
        model_name = model.name
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="slimserve-", delete=False) as handle:
            yaml.safe_dump(config.model_dump(mode="json"), handle)
            config_path = Path(handle.name)
        try:
            level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
            command = [sys.executable, "-m", "server.cli", "compress", "--config", str(config_path)]
            # NOTE: the search competes with serving for the same cores; `nice` keeps serving first.
            child = await asyncio.create_subprocess_exec(
                "nice", "-n", str(SEARCH_NICENESS), *command, "--model", model_name, "--log-level", level
            )
            self._children[model_name] = child
            try:
                return await child.wait()
            finally:
                if self._children.get(model_name) is child:
                    del self._children[model_name]
        finally:
            config_path.unlink(missing_ok=True)

    async def _activate(self, model: ServedModel, entry: CompressedEntry) -> None:
        report = entry.report
        artifact = entry.chosen_artifact
        if artifact is None:
            log.warning("model %r: the search chose the original (%s); nothing to swap", model.name, report.reason)
            return
        device = model.settings.device
        predictor = await run_in_passing_thread(load_predictor, artifact, device)
        loop = asyncio.get_running_loop()
        timings = await loop.run_in_executor(
            self._executor, self._warm_up, predictor, model.input_shape, model.max_batch_size
        )
        chosen = report.variant(report.chosen)
        self._figures.record(model.name, "original", report.original)
        self._figures.record(model.name, report.chosen, chosen)
        self._registry.promote_compressed(
            model, report.chosen, predictor, variant_properties(chosen, entry), warm_timings=timings
        )
        if not report.budget_met:
            log.warning("model %r: %s", model.name, report.reason)
        log.info(
            "model %r: serving %r (p95 %.2f ms vs original %.2f ms, top-1 drop %s pt)",
            model.name,
            report.chosen,
            chosen.latency_p95_ms or 0,
            report.original.latency_p95_ms or 0,
            f"{chosen.top1_drop:.2f}" if chosen.top1_drop is not None else "n/a",
        )
