"""limit.hyperparameters: the variances as tensors; kernels differentiable w.r.t. them and
w.r.t. the inputs (torch.autograd.gradcheck in float64), NNGP and NTK."""

import torch

import tensorprograms as tp

from .models import MLP, SB2, SW2


def test_hyperparameters_are_the_code_variances_times_fan_in():
    x = torch.randn(3, 6)
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu), x)
    hp = limit.hyperparameters
    for name in ("inp.weight", "hidden.0.weight", "out.weight"):
        torch.testing.assert_close(hp[name], torch.tensor(SW2), rtol=1e-12, atol=0)
    torch.testing.assert_close(hp["inp.bias"], torch.tensor(SB2), rtol=1e-12, atol=0)
    # the readout σ² scales the kernel minus the readout bias
    K = limit.nngp(x)
    hp["out.weight"] = torch.tensor(2 * SW2)
    torch.testing.assert_close(limit.nngp(x) - SB2, 2 * (K - SB2), rtol=1e-12, atol=0)


def test_gradcheck_kernels_wrt_hyperparameters_and_inputs():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 6, generator=gen)
    limit = tp.infinite_width(lambda w: MLP(w, torch.tanh), x0)
    names = ["hidden.0.weight", "out.weight", "inp.bias"]

    def kernels(a, b, c, x):
        limit.hyperparameters.update(dict(zip(names, (a, b, c))))
        return limit.kernels(x)

    args = tuple(limit.hyperparameters[n].clone().requires_grad_(True) for n in names)
    args += (x0.clone().requires_grad_(True),)
    assert torch.autograd.gradcheck(kernels, args, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_standard_parametrization_ntk():
    """In SP the weights 1/v_p(n₀) are built from σ² too, so the NTK stays differentiable."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 6, generator=gen)
    limit = tp.infinite_width(lambda w: MLP(w, torch.relu), x0, parametrization="standard", nominal_width=50)
    names = ["hidden.0.weight", "inp.weight", "inp.bias"]

    def ntk(a, b, c):
        limit.hyperparameters.update(dict(zip(names, (a, b, c))))
        return limit.ntk(x0)

    args = tuple(limit.hyperparameters[n].clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(ntk, args, eps=1e-6, atol=1e-6, rtol=1e-4)
