"""The language: building, printing, validation and bad input."""

import math

import pytest
import torch

import tensorprograms as tp
from tensorprograms import functions as F


def mlp_program():
    P = tp.Program()
    W = P.matrix("W", variance=2.0)
    x = P.vector("x", shape=(3,))
    h = W @ x
    y = P.nonlin(F.relu, h, name="y")
    t = P.moment(lambda u: u**2, y, name="t")
    return P, W, x, h, y, t


def test_program_prints_one_instruction_a_line():
    P, *_ = mlp_program()
    text = str(P)
    lines = text.splitlines()
    assert lines[0].startswith("Program (netsor, 5 instructions)")
    assert len(lines) == 6
    assert "g1 = W @ x" in text or "= W @ x" in text
    assert "y = relu(" in text
    assert "Moment" in lines[-1]


def test_variable_kinds_and_shapes():
    P, W, x, h, y, t = mlp_program()
    assert (x.kind, h.kind, y.kind) == ("init", "G", "H")
    assert h.shape == (3,) and y.shape == (3,) and t.shape == (3,)
    assert P["y"] is y
    assert P.vectors == [x, h, y] and P.scalars == [t] and P.matrices == [W]


def test_lincomb_of_gaussians_is_gvar_and_of_hvars_is_nonlin():
    P = tp.Program()
    W = P.matrix()
    x = P.vector(shape=(2,))
    b = P.vector()
    g = W @ x
    s = 2.0 * g + b
    assert s.kind == "G" and s.shape == (2,)
    y = P.nonlin(torch.tanh, s)
    z = y + s
    assert z.kind == "H"


def test_elementwise_detection():
    P = tp.Program()
    x = P.vector(shape=(4,))
    assert P.nonlin(torch.tanh, x).instruction.elementwise
    assert P.nonlin(lambda u: u * torch.sigmoid(u), x).instruction.elementwise
    assert not P.nonlin(lambda u: torch.softmax(u, -1), x).instruction.elementwise
    assert not P.nonlin(lambda u: u - u.mean(-1, keepdim=True), x).instruction.elementwise
    # position-dependent scaling is local but not the same function at every index
    scale = torch.arange(1.0, 5.0)
    assert not P.nonlin(lambda u: u * scale, x).instruction.elementwise
    assert P.nonlin(lambda u: u.roll(1, -1), x).shape == (4,)
    assert not P.nonlin(lambda u: u.roll(1, -1), x).instruction.elementwise


def test_validate_rejects_transpose_in_netsor_and_names_instruction():
    P = tp.Program()
    W = P.matrix("W")
    x = P.vector("x")
    h = W @ x
    W.T @ h
    assert P.language == "netsor_transpose"
    with pytest.raises(tp.ProgramError, match=r"instruction 4 \(g\d+ = W.T @ .*\).*transposed"):
        P.validate("netsor")


def test_declared_language_checked_on_append():
    P = tp.Program(language="netsor")
    W = P.matrix("W")
    y = P.vector("y")
    with pytest.raises(tp.ProgramError, match="instruction 3.*Netsor does not allow"):
        W.T @ y


def test_netsorT_backprop_program_accepted():
    # forward h = W x, y = tanh(h); backward dy = v (readout), dh = tanh'(h) dy, dx = W.T dh
    P = tp.Program()
    W = P.matrix("W")
    x = P.vector("x", shape=(2,))
    v = P.vector("v")
    h = W @ x
    y = P.nonlin(torch.tanh, h)
    P.moment(lambda a, b: a * b, y, v)
    dh = P.nonlin(lambda hh, d: (1 - torch.tanh(hh) ** 2) * d, h, v)
    W.T @ dh
    assert P.language == "netsorT"
    P.validate("netsorT")


def test_netsorT_rejects_forward_use_of_backward_vector_and_non_odd_backward():
    P = tp.Program()
    W = P.matrix("W")
    x = P.vector("x")
    h = W @ x
    g = W.T @ h  # transposing a forward vector: not backprop-like
    with pytest.raises(tp.ProgramError, match="forward vector"):
        P.validate("netsorT")
    P2 = tp.Program()
    W2 = P2.matrix("W")
    v = P2.vector("v")
    d = W2.T @ v
    P2.nonlin(lambda u: u**2, d)  # even in the backward vector
    with pytest.raises(tp.ProgramError, match="not odd"):
        P2.validate("netsorT")
    assert g.kind == "G"


def test_width_class_mismatch():
    P = tp.Program()
    W = P.matrix("W", out_ratio=2.0, in_ratio=1.0)
    x = P.vector("x", ratio=2.0)
    with pytest.raises(tp.ProgramError, match="width classes do not match"):
        W @ x
    y = W @ P.vector("z")
    assert y.ratio == 2.0
    with pytest.raises(tp.ProgramError, match="different width classes"):
        P.nonlin(lambda a, b: a * b, y, P.vector("u"))


def test_variable_from_another_program_is_undefined():
    P1, P2 = tp.Program(), tp.Program()
    x = P1.vector("x")
    W = P2.matrix("W")
    with pytest.raises(tp.ProgramError, match="not defined in this program"):
        W @ x


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_variances(bad):
    P = tp.Program()
    with pytest.raises(ValueError, match="variance"):
        P.matrix(variance=bad)
    with pytest.raises(ValueError, match="variance"):
        P.vector(variance=bad)


def test_bad_covariances():
    P = tp.Program()
    with pytest.raises(ValueError, match="NaN or Inf"):
        P.vector(shape=(2,), cov=torch.tensor([[1.0, math.nan], [math.nan, 1.0]]))
    with pytest.raises(ValueError, match="positive semidefinite"):
        P.vector(shape=(2,), cov=torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="shape"):
        P.vector(shape=(2,), cov=torch.eye(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        P.input_layer(torch.tensor([[1.0, math.nan]]))


def test_bad_shapes_and_ratios():
    P = tp.Program()
    with pytest.raises(tp.ProgramError, match="positive sizes"):
        P.vector(shape=(3, 0))
    with pytest.raises(ValueError, match="ratio must be positive"):
        P.matrix(out_ratio=0.0)
    with pytest.raises(tp.ProgramError, match="already used"):
        P.vector("x")
        P.vector("x")


def test_nonlin_that_does_not_run_on_tensors():
    P = tp.Program()
    x = P.vector("x")
    with pytest.raises(tp.ProgramError, match="could not be evaluated on torch tensors"):
        P.nonlin(math.tanh, x)
    with pytest.raises(tp.ProgramError, match="not a torch.Tensor"):
        P.nonlin(lambda u: 3, x)
    with pytest.raises(tp.ProgramError, match="leading"):
        P.nonlin(lambda u: u.sum(0), x)


def test_nonlinear_lincomb_rejected():
    P = tp.Program()
    x = P.vector("x")
    with pytest.raises(tp.ProgramError, match="not linear"):
        P.linear(lambda u: u + 1.0, x)
    y = P.nonlin(torch.tanh, x)
    with pytest.raises(tp.ProgramError, match="Gaussian vectors only"):
        P.linear(lambda u: 2 * u, y)


def test_scalar_cannot_be_matmul_input_or_vector_arg():
    P = tp.Program()
    W = P.matrix()
    x = P.vector()
    t = P.moment(lambda u: u**2, x)
    with pytest.raises(tp.ProgramError, match="not a vector"):
        W @ t
    with pytest.raises(tp.ProgramError, match="params="):
        P.nonlin(torch.tanh, t)


def test_simulate_shapes_and_matrix_variance():
    P = tp.Program()
    W = P.matrix("W", variance=3.0, out_ratio=2.0, in_ratio=1.0)
    x = P.vector("x", shape=(2, 3))
    h = W @ x
    run = tp.simulate(P, 64, seed=1, keep_matrices=True)
    assert run[x].shape == (64, 2, 3) and run[h].shape == (128, 2, 3)
    w = run[W]
    assert w.shape == (128, 64)
    # entries N(0, 3/64): sample variance within 4 standard errors (var of s² is 2σ⁴/m)
    m = w.numel()
    assert abs(w.var().item() - 3 / 64) < 4 * math.sqrt(2 / m) * 3 / 64
    with pytest.raises(ValueError, match="positive integer"):
        tp.simulate(P, 0)


def test_elementwise_detection_tolerates_nan_on_random_probes():
    """sqrt(θ - 1) is NaN for some probe values; the function is still elementwise."""
    P = tp.Program()
    x = P.vector("x", shape=(4,))
    t = P.moment(lambda u: u**2, x)
    y = P.nonlin(lambda u, s: u / torch.sqrt(s - 1.0), x, params=(t,))
    assert y.instruction.elementwise


def test_selections_are_taken_without_probes(monkeypatch):
    """A Gather (what a Flatten lowers to, one per position) is linear with a known output
    shape by construction: LinComb and Nonlin take it without running it, and its values are
    the selection's."""
    from tensorprograms.program import calling

    index = torch.tensor([5, 1, 1, 0])
    sel = calling.Gather(index, (2, 3), (2, 2), "position")
    u = torch.randn(7, 2, 3, dtype=torch.float64)
    assert torch.equal(sel(u), u.reshape(7, 6)[:, index].reshape(7, 2, 2))
    P = tp.Program()
    g = P.vector("g", shape=(2, 3))
    h = P.nonlin(torch.tanh, g)

    def no_probe(*args, **kwargs):
        raise AssertionError("probed")

    monkeypatch.setattr("tensorprograms.program.program.probe_output_shape", no_probe)
    monkeypatch.setattr("tensorprograms.program.program.check_linear", no_probe)
    monkeypatch.setattr("tensorprograms.program.program.is_linear", no_probe)
    a, b = P.linear(sel, g), P.nonlin(sel, h)
    assert a.shape == b.shape == (2, 2) and a.is_gaussian
    assert b.instruction.linear and not b.instruction.elementwise
    with pytest.raises(ValueError, match="4 indices for an output of shape"):
        calling.Gather(index, (2, 3), (3,))
