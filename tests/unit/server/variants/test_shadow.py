"""Shadow comparison arithmetic and its settings (the server side is in tests/integration/test_shadow_guardrail.py)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from compression.models.loading import load_model
from compression.search.pipeline import compression_key
from server.config.settings import GuardrailSettings, ShadowSettings, default_cache_dir, default_config
from server.variants.shadow import agreement_and_divergence


def test_identical_outputs_agree_with_zero_divergence() -> None:
    logits = np.random.default_rng(0).normal(size=(16, 10)).astype(np.float32)
    agree, divergence = agreement_and_divergence(logits, logits.copy())
    assert agree.all()
    np.testing.assert_allclose(divergence, 0, atol=1e-12)


def test_confident_opposite_outputs_disagree_with_divergence_near_one_bit() -> None:
    a = np.array([[30.0, 0.0], [0.0, 30.0]])
    agree, divergence = agreement_and_divergence(a, a[:, ::-1])
    assert not agree.any()
    np.testing.assert_allclose(divergence, 1.0, atol=1e-6)


def test_divergence_is_symmetric_and_bounded() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(scale=5, size=(64, 10)), rng.normal(scale=5, size=(64, 10))
    _, forward = agreement_and_divergence(a, b)
    _, backward = agreement_and_divergence(b, a)
    np.testing.assert_allclose(forward, backward, rtol=1e-9)
    assert ((forward >= 0) & (forward <= 1)).all() and forward.max() > 0.1


def test_guardrail_settings_reject_a_verdict_before_the_window_fills() -> None:
    with pytest.raises(ValidationError, match="min_samples"):
        GuardrailSettings(window=50, min_samples=100)
    with pytest.raises(ValidationError):
        ShadowSettings(fraction=1.5)


def test_serving_only_settings_keep_the_cached_compression() -> None:
    settings = default_config().models[0]
    loaded = load_model(settings, default_cache_dir())
    key, _ = compression_key(settings, loaded)
    serving_changes = {
        "shadow": ShadowSettings(fraction=1.0),
        "guardrail": GuardrailSettings(enabled=False),
        "max_images_per_request": 7,
    }
    assert compression_key(settings.model_copy(update=serving_changes), loaded)[0] == key
    other_crop = settings.preprocessing.model_copy(update={"resize": 32})
    assert compression_key(settings.model_copy(update={"preprocessing": other_crop}), loaded)[0] != key
