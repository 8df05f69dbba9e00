"""Optional: our μP agrees with Microsoft's ``mup`` 1.0.0 where it applies.

Same raw initial weights, same data, four optimizer steps: MuSGD/MuAdam on a model with
``MuReadout`` and ``set_base_shapes`` versus tp.mup on the plain model. Equal outputs at
every step (float64, to rounding) mean equal per-parameter init, forward and
learning-rate multipliers. Hidden layers have no bias here: mup leaves hidden biases at
PyTorch's 1/sqrt(fan_in) init, while tp.mup keeps them at their base-width scale
(documented difference).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tensorprograms.mup as tpmup

mup = pytest.importorskip("mup")
if not hasattr(mup, "MuReadout"):  # tests/mup itself can shadow the name as a namespace package
    pytest.skip("Microsoft's mup 1.0.0 is not installed", allow_module_level=True)


def _layers(width: int, readout: type) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(12, width, bias=False), nn.ReLU(),
        nn.Linear(width, width, bias=False), nn.ReLU(),
        readout(width, 5),
    )


def plain(width: int) -> nn.Module:
    return _layers(width, nn.Linear)


def theirs(width: int) -> nn.Module:
    return _layers(width, mup.MuReadout)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_matches_mup(opt: str) -> None:
    base, width = 16, 128
    x = torch.randn(10, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 5, (10,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    ref = theirs(width)
    mup.set_base_shapes(ref, theirs(base), delta=theirs(2 * base))
    ref = ref.double()
    torch.manual_seed(7)
    ours = tpmup.parametrize(plain, width, base).double()
    lr = 0.3 if opt == "sgd" else 1e-2
    if opt == "sgd":
        o_ref, o_ours = mup.MuSGD(ref.parameters(), lr=lr), tpmup.SGD(ours, lr=lr)
    else:
        o_ref, o_ours = mup.MuAdam(ref.parameters(), lr=lr), tpmup.Adam(ours, lr=lr, eps=1e-8)
    for _ in range(4):
        f_ref, f_ours = ref(x), ours(x)
        torch.testing.assert_close(f_ours, f_ref, rtol=1e-9, atol=1e-12)
        for o, f in ((o_ref, f_ref), (o_ours, f_ours)):
            o.zero_grad()
            F.cross_entropy(f, y).backward()
            o.step()
    assert not torch.allclose(ref(x), f_ref)
