"""The importer turns an exported graph's aten calls back into real layers only where that is exact."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compression.models.graph_import import import_program, training_batch_norms


class Varied(nn.Module):
    """Layer options the lifter must carry over, plus calls it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.same = nn.Conv2d(3, 8, 3, padding="same", dilation=2, bias=True)
        self.shared = nn.Conv2d(8, 8, 1, bias=False)  # called twice
        self.up = nn.ConvTranspose2d(8, 4, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1)
        self.kernel = nn.Parameter(torch.randn(4, 4, 1, 1))  # a functional conv on a root parameter
        self.line = nn.Conv1d(4, 6, 3, stride=2)
        self.norm = nn.BatchNorm1d(6)
        self.head = nn.Linear(6, 5, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.shared(self.shared(self.same(x)))
        x = F.conv2d(self.up(x), self.kernel)
        x = self.norm(self.line(x.flatten(2)))
        return self.head(x.mean(2))


def exported(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=16)
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},))


def test_layers_are_lifted_with_their_options_and_the_rest_is_left_as_it_is() -> None:
    torch.manual_seed(0)
    model = Varied().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    module, lifted = import_program(exported(model, torch.randn(2, 3, 10, 10)))
    kinds = {name: type(m) for name, m in module.named_modules() if name}
    assert kinds == {
        "same": nn.Conv2d,
        "shared": nn.Conv2d,
        "up": nn.ConvTranspose2d,
        "line": nn.Conv1d,
        "norm": nn.BatchNorm1d,
        "head": nn.Linear,
    }
    assert lifted == 7  # both calls of ``shared``; not the functional conv on ``kernel``
    for name in kinds:
        assert module.get_submodule(name).extra_repr() == model.get_submodule(name).extra_repr(), name
    assert module.state_dict().keys() == model.state_dict().keys()
    for rows in (1, 3):
        x = torch.randn(rows, 3, 10, 10)
        with torch.no_grad():
            torch.testing.assert_close(module(x), model(x), rtol=0, atol=0)
    assert training_batch_norms(module) == 0 and not module.training


def test_batch_norm_exported_in_training_mode_is_left_as_it_is_and_counted() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))
    module, lifted = import_program(exported(model.train(), torch.randn(2, 3, 6, 6)))
    assert training_batch_norms(module) == 1
    assert [type(m) for m in module.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))] == [
        nn.Conv2d,
        nn.Linear,
    ]
    assert lifted == 2
