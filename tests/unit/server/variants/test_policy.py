"""The serving policy's decision rule: latency tables and queue depth in, the answering variant out."""

from __future__ import annotations

import pytest

from server.variants.policy import LatencyTable, Reason, ServingPolicy, predicted_latency_s

ORIGINAL, COMPRESSED = "original", "int8"


def adaptive(**fields: object) -> ServingPolicy:
    settings: dict = {"policy": "adaptive", "slo_s": 0.040, "return_below": 0.7, "min_hold_s": 1.0}
    return ServingPolicy(**{**settings, **fields}, original=ORIGINAL)


def test_latency_table_measures_interpolates_and_scales() -> None:
    table = LatencyTable()
    assert table.forward_s(4) is None
    table.record(1, 0.010)
    table.record(8, 0.050)
    assert table.forward_s(1) == 0.010
    assert table.forward_s(4) == pytest.approx(0.010 + 3 / 7 * 0.040)
    assert table.forward_s(16) == pytest.approx(0.100)  # beyond the largest size: proportional
    table.record(1, 0.020)
    assert table.forward_s(1) == pytest.approx(0.012)  # EWMA: one slow batch moves it a fifth of the way


def test_predicted_latency_grows_with_the_queue() -> None:
    table = LatencyTable({1: 0.010, 8: 0.040})
    assert predicted_latency_s(table, 1, max_batch_size=8, busy=False) == pytest.approx(0.010)  # idle: its own pass
    alone = predicted_latency_s(table, 1, max_batch_size=8, busy=True)
    assert alone == pytest.approx(0.020)  # the batch running now (assumed like its own), then its own
    behind_a_batch = predicted_latency_s(table, 8, max_batch_size=8, busy=True)
    behind_two = predicted_latency_s(table, 20, max_batch_size=8, busy=True)
    assert alone < behind_a_batch < behind_two  # type: ignore[operator]
    assert behind_two == pytest.approx(0.040 + 2 * 0.040 + table.forward_s(4))  # type: ignore[operator]
    assert predicted_latency_s(LatencyTable(), 3, max_batch_size=8, busy=False) is None


def test_fixed_policies_and_the_guardrail() -> None:
    assert ServingPolicy("compressed", None, 0.7, 1.0, ORIGINAL).choose(0, COMPRESSED, False, 1.0).variant == COMPRESSED
    assert ServingPolicy("original", None, 0.7, 1.0, ORIGINAL).choose(0, COMPRESSED, False, 0.001).variant == ORIGINAL
    for policy in ("compressed", "adaptive"):
        rule = ServingPolicy(policy, 0.040, 0.7, 1.0, ORIGINAL)
        assert rule.choose(0, None, False, 1.0).reason is Reason.NO_COMPRESSED
        held = rule.choose(0, COMPRESSED, True, 1.0)
        assert (held.variant, held.reason) == (ORIGINAL, Reason.GUARDRAIL)


def test_adaptive_prefers_the_original_and_shifts_under_load() -> None:
    rule = adaptive()
    quiet = rule.choose(0.0, COMPRESSED, False, 0.020)
    assert (quiet.variant, quiet.reason) == (ORIGINAL, Reason.SLO_OK)
    busy = rule.choose(0.1, COMPRESSED, False, 0.060)
    assert (busy.variant, busy.reason) == (COMPRESSED, Reason.SLO_RISK)


def test_adaptive_returns_only_with_margin_and_after_the_hold() -> None:
    rule = adaptive()
    rule.choose(0.0, COMPRESSED, False, 0.060)  # -> compressed at t=0
    within_but_no_margin = rule.choose(2.0, COMPRESSED, False, 0.035)
    assert (within_but_no_margin.variant, within_but_no_margin.reason) == (COMPRESSED, Reason.HOLD)
    too_soon = rule.choose(0.5, COMPRESSED, False, 0.010)
    assert (too_soon.variant, too_soon.reason) == (COMPRESSED, Reason.HOLD)
    back = rule.choose(1.2, COMPRESSED, False, 0.010)
    assert (back.variant, back.reason) == (ORIGINAL, Reason.SLO_OK)
    again = rule.choose(1.3, COMPRESSED, False, 0.050)  # shifting away from the original is never delayed
    assert again.variant == COMPRESSED


def test_adaptive_does_not_flap_around_the_objective() -> None:
    rule = adaptive()
    latencies = [0.039, 0.041, 0.039, 0.041, 0.038, 0.042, 0.039]
    answered = [rule.choose(0.01 * i, COMPRESSED, False, latency).variant for i, latency in enumerate(latencies)]
    assert answered == [ORIGINAL] + [COMPRESSED] * 6  # once shifted it stays until the original fits with margin


def test_adaptive_without_measurements_serves_the_original() -> None:
    assert adaptive().choose(0, COMPRESSED, False, None).variant == ORIGINAL
