"""Per-layer pruning ratios from a sensitivity scan: the allocation keeps the mean ratio and prunes less where
pruning hurt more; the scan finds every prunable group of a net with depthwise and transposed convolutions;
``channel_prune`` with ``sensitivity_scan`` prunes by the allocated ratios."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.techniques import pruning_sensitivity
from compression.techniques.pruning_sensitivity import GroupSensitivity, allocate
from compression.techniques.registry import apply, config_from_dict
from compression.techniques.structured_pruning import ChannelPruneConfig
from tests.unit.compression.techniques.test_techniques import _ctx, _tiny

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

GROUPS = [
    GroupSensitivity("a", 64, 0.01),
    GroupSensitivity("b", 64, 0.04),
    GroupSensitivity("c", 128, 0.16),
    GroupSensitivity("d", 256, 0.0),
]


def _mean(ratios: dict[str, float], groups: list[GroupSensitivity]) -> float:
    return sum(g.channels * ratios[g.root] for g in groups) / sum(g.channels for g in groups)


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5])
def test_the_allocation_keeps_the_channel_weighted_mean_ratio(target: float) -> None:
    ratios = allocate(GROUPS, target, cap=0.9)
    assert _mean(ratios, GROUPS) == pytest.approx(target, abs=1e-3)
    assert ratios["a"] > ratios["b"] > ratios["c"]  # more sensitive, less pruned
    assert all(0 <= r <= 0.9 for r in ratios.values())


def test_the_cap_holds_and_the_rest_makes_up_the_mean() -> None:
    ratios = allocate(GROUPS, 0.6, cap=0.7)
    assert ratios["d"] == 0.7  # insensitive: capped
    assert _mean(ratios, GROUPS) == pytest.approx(0.6, abs=1e-3)


def test_equal_sensitivities_give_uniform_ratios() -> None:
    groups = [GroupSensitivity(name, 32, 0.05) for name in "abc"]
    assert set(allocate(groups, 0.4, cap=0.9).values()) == {0.4}


def test_the_scan_measures_every_group_and_leaves_the_model_unchanged() -> None:
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ctx = _ctx(model)
    lines: list[str] = []
    ctx.progress = lines.append
    pruned = apply(
        model,
        config_from_dict(
            {"technique": "channel_prune", "ratio": 0.5, "sensitivity_scan": True, "distillation": {"epochs": 0}}
        ),
        ctx,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any("sensitivity scan" in line for line in lines)
    with torch.no_grad():
        assert pruned(ctx.calibration_inputs[:2]).shape == (2, 5)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_the_scan_reports_each_groups_root_and_channels() -> None:
    model = _tiny()
    ctx = _ctx(model)
    head = [model.head]

    def make(copy: nn.Module, ratios: dict[nn.Module, float]):  # type: ignore[no-untyped-def]
        import torch_pruning as tp

        return tp.pruner.BasePruner(
            copy,
            ctx.example_inputs[:1],
            importance=tp.importance.MagnitudeImportance(),
            pruning_ratio=0.0,
            pruning_ratio_dict=ratios,
            ignored_layers=[copy.head],
            root_module_types=pruning_sensitivity.ROOT_TYPES,
        )

    found = pruning_sensitivity.scan(model, ctx.example_inputs[:1], ctx.calibration_inputs, 0.5, head, make)
    roots = {g.root: g.channels for g in found}
    assert roots and "head" not in roots
    assert roots.get("pw.0") == 32 and roots.get("up.0") == 16  # pointwise and transposed convs are groups
    assert all(g.sensitivity >= 0 for g in found)


def test_global_pruning_and_the_scan_are_exclusive() -> None:
    with pytest.raises(ValueError, match="choose one"):
        ChannelPruneConfig(global_pruning=True, sensitivity_scan=True)


@pytest.mark.parametrize(
    "allocation", [{}, pytest.param({"sensitivity_scan": True}, marks=pytest.mark.slow)], ids=["uniform", "scan"]
)
def test_a_depthwise_network_prunes_and_stays_depthwise(allocation: dict) -> None:
    """mobilenet_v3_small (depthwise convs, squeeze-excitation, hardswish): channels removed, every depthwise
    conv still one filter per channel, the forward pass intact."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    images = torch.randn(64, 3, 32, 32)
    ctx = _ctx(model)
    ctx.calibration_inputs, ctx.example_inputs = images, images[:1]
    step = {"technique": "channel_prune", "ratio": 0.3, "distillation": {"epochs": 0}, **allocation}
    pruned = apply(model, config_from_dict(step), ctx)
    depthwise = [m for m in pruned.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert sum(p.numel() for p in pruned.parameters()) < 0.7 * sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        assert pruned(images[:2]).shape == (2, 10)
