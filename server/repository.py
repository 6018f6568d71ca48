"""The model repository: load, replace and unload models on a running server (Triton's explicit mode).

Every model takes one path, whether it comes from the config file at start-up or from a
``RepositoryModelLoad`` call: load, warm up, serve the original, attach the compressed variant (cached,
or searched in the background), with the shadow comparison and guardrail beside it. Loading a name that
is served builds the new model first and swaps it in atomically; requests already queued on the old one
finish there. Unloading refuses new requests for the model, finishes those in flight, then frees it.
Models loaded at run time live in memory only: a restart serves what the config file names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from pathlib import Path

from pydantic import ValidationError

from compression.errors import first_line
from compression.models.images import ImagePreprocessor
from compression.models.loading import LoadedModel, ModelLoadError, load_model
from compression.models.names import ORIGINAL
from compression.models.settings import PickleSource, PythonSource
from protos.errors import InvalidArgument, NotFound, ServingError
from server.batching.batcher import Forward
from server.config.settings import DeployConfig, ModelSettings, format_validation_error, resolve_model_paths
from server.dataplane import DataPlane
from server.observability.metrics import ServerMetrics
from server.process.torch_threads import run_in_passing_thread
from server.variants.compressed import CompressedVariants
from server.variants.guardrail import Guardrail
from server.variants.original import original_predictor
from server.variants.registry import ModelRegistry, ModelState, ServedModel, drain
from server.variants.shadow import ShadowComparer

log = logging.getLogger("slimserve.repository")

WarmUp = Callable[[Forward, tuple[int, int, int], int], dict[int, float]]
REMOTE_SOURCES_REFUSED = (PythonSource, PickleSource)
"""Sources a caller of the repository API may not name: they run code of the caller's choosing."""


class ModelRepository:
    def __init__(
        self,
        config: DeployConfig,
        plane: DataPlane,
        compressed: CompressedVariants,
        metrics: ServerMetrics,
        inference_pool: Executor,
        warm_up: WarmUp,
    ) -> None:
        self._config = config
        self._plane = plane
        self._registry: ModelRegistry = plane.registry
        self._compressed = compressed
        self._metrics = metrics
        self._inference_pool = inference_pool
        self._warm_up = warm_up
        self._locks: dict[str, asyncio.Lock] = {}

    async def load(self, settings: ModelSettings) -> None:
        """Serve ``settings`` (replacing a served model of the same name once the new one is warm)."""
        async with self._lock(settings.name):
            replacing = settings.name in {m.name for m in self._registry.models()}
            if not replacing:
                self._registry.set_status(settings.name, ModelState.LOADING)
            try:
                model, loaded = await self._build(settings)
            except Exception as exc:
                if not replacing:
                    self._registry.set_status(settings.name, ModelState.FAILED, first_line(exc))
                raise
            previous = self._registry.add_model(model)
            if previous is not None:
                await self._retire(previous)
            self._compare_live(model)
            self._registry.set_status(model.name, ModelState.READY)
            await self._compressed.attach(model, loaded, on_search_done=self._compression_done)
            if self._compressed.searching_for(model.name):
                self._registry.set_status(model.name, ModelState.COMPRESSING, "compression search running")

    async def load_json(self, name: str, config_json: str) -> None:
        """``RepositoryModelLoad``: ``config_json`` is one ``models`` entry of the deploy config."""
        settings = self.parse_entry(name, config_json)
        try:
            await self.load(settings)
        except Exception as exc:  # noqa: BLE001 - the caller gets the reason; what was served stays served
            raise load_error_status(exc) from exc

    def parse_entry(self, name: str, config_json: str) -> ModelSettings:
        """A model entry sent by a client, validated like the config file's (InvalidArgument names the field)."""
        if not config_json:
            raise InvalidArgument(
                f"model {name!r}: no model config: send parameter 'config' with a JSON model entry of the deploy "
                "config (name, source, labels, preprocessing, ...)"
            )
        try:
            entry = json.loads(config_json)
        except ValueError as exc:
            raise InvalidArgument(f"model {name!r}: parameter 'config' is not valid JSON: {exc}") from None
        if not isinstance(entry, dict):
            raise InvalidArgument(f"model {name!r}: parameter 'config' must be a JSON object (one model entry)")
        entry.setdefault("name", name)
        if entry["name"] != name:
            raise InvalidArgument(f"model {name!r}: the config names model {entry['name']!r}; the names must agree")
        try:
            settings = ModelSettings.model_validate(entry)
        except ValidationError as exc:
            raise InvalidArgument(format_validation_error(Path(f"(model config of {name!r})"), exc)) from None
        if isinstance(settings.source, REMOTE_SOURCES_REFUSED):
            raise InvalidArgument(
                f"model {name!r}: source format {settings.source.format!r} runs code and cannot be loaded through "
                "the repository API; use torchvision (weights file), torchscript or export, or name the model in "
                "the config file"
            )
        return resolve_model_paths(settings, Path.cwd())

    async def unload(self, name: str) -> None:
        """Refuse new requests for ``name``, finish the ones in flight, then free it."""
        async with self._lock(name):
            if name not in {m.name for m in self._registry.models()}:
                if self._registry.statuses.pop(name, None) is not None:
                    return  # a failed load: nothing is served, forget it
                raise NotFound(f"unknown model {name!r}; nothing to unload")
            self._registry.set_status(name, ModelState.UNLOADING)
            model = self._registry.remove_model(name)
            await self._retire(model)
            del self._registry.statuses[name]
            log.info("model %r unloaded", name)

    async def _build(self, settings: ModelSettings) -> tuple[ServedModel, LoadedModel]:
        started = time.perf_counter()
        loaded = await run_in_passing_thread(load_model, settings, self._config.resolved_cache_dir())
        server = self._config.server
        preprocessor = ImagePreprocessor(settings.preprocessing, server.max_image_pixels, server.allowed_image_formats)
        model = ServedModel(settings, loaded.labels, loaded.input_shape, loaded.num_classes, preprocessor)
        forward = original_predictor(loaded, settings)
        timings = await asyncio.get_running_loop().run_in_executor(
            self._inference_pool, self._warm_up, forward, loaded.input_shape, settings.batching.max_batch_size
        )
        self._registry.add_variant(model, ORIGINAL, forward, warm_timings=timings)
        seconds = time.perf_counter() - started
        self._metrics.load_seconds.labels(model.name, ORIGINAL).set(seconds)
        log.info(
            "model %r variant %r warm after %.2f s (max batch %d)", model.name, ORIGINAL, seconds, model.max_batch_size
        )
        return model, loaded

    async def _retire(self, model: ServedModel) -> None:
        """Stop everything that belongs to a model that no longer receives requests."""
        await self._compressed.cancel(model.name)
        shadow = self._plane.shadows.pop(model.name, None)
        if shadow is not None:
            await shadow.stop()
        await drain(model)

    def _compare_live(self, model: ServedModel) -> None:
        """Shadow comparison and guardrail for ``model``; idle until it has a compressed variant."""
        settings = model.settings
        if settings.compression is not None:
            self._metrics.deploy.record_budget(model.name, settings.compression)
        guardrail = Guardrail(model, settings.guardrail, self._registry, self._metrics.shadow)
        shadow = ShadowComparer(model, settings.shadow, guardrail, self._metrics.shadow, self._inference_pool)
        shadow.start()
        self._plane.shadows[model.name] = shadow

    def _compression_done(self, model: ServedModel, error: str | None) -> None:
        if not any(served is model for served in self._registry.models()):
            return  # NOTE: replaced or unloaded meanwhile
        reason = "" if error is None else f"serving the original: {error}"
        self._registry.set_status(model.name, ModelState.READY, reason)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())


def load_error_status(exc: Exception) -> ServingError:
    """How a failed load reaches the caller: what is wrong with the files it named is its to fix."""
    if isinstance(exc, ServingError):
        return exc
    if isinstance(exc, ModelLoadError):
        return InvalidArgument(str(exc))
    return ServingError(f"loading failed: {type(exc).__name__}: {exc}")
