"""read_initialization: exact per-entry moments read from the user's init calls.

Expected numbers are computed here from the documented formulas (PyTorch docs for each
initializer), never by the code under test. Exact readings are compared to float
rounding (rel 1e-12); the measured fallback within 4 of its own standard errors.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy.stats import truncnorm
from torch import nn

from tensorprograms.frontend import ParamInit, fan_in_scaling, read_initialization

WIDTHS = (16, 32)
REL = 1e-12


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-300)


def _no_warnings(factory, widths=WIDTHS, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_initialization(factory, widths, **kw)


def test_linear_default_init():
    d_in = 7
    r = _no_warnings(lambda n: nn.Sequential(nn.Linear(d_in, n), nn.Linear(n, 3)))
    for idx, fans in (("0", (d_in, d_in)), ("1", WIDTHS)):
        w, b = r[f"{idx}.weight"], r[f"{idx}.bias"]
        for i, fan in enumerate(fans):
            # kaiming_uniform_(a=√5): gain² = 2/(1+5); bound = gain·√(3/fan) → var = bound²/3
            bound_w = math.sqrt(2 / 6) * math.sqrt(3 / fan)
            assert _close(w.variances[i], bound_w**2 / 3)
            assert _close(w.variances[i], 1 / (3 * fan))
            # bias ~ U(±1/√fan): var = (2/√fan)²/12
            assert _close(b.variances[i], (2 / math.sqrt(fan)) ** 2 / 12)
            assert w.means[i] == 0.0 and b.means[i] == 0.0
        assert w.exact and b.exact and w.stderr is None
        assert w.distribution == "uniform" and "kaiming_uniform_" in w.source
    assert r["1.weight"].shapes == ((3, 16), (3, 32))
    sigma2, k = fan_in_scaling(r["1.weight"], WIDTHS)
    assert abs(k - 1) < 1e-12 and _close(sigma2, 1 / 3)


def test_custom_normal_gives_exponent_one():
    sigma = 1.7

    class Net(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.inp = nn.Linear(4, n, bias=False)
            self.hid = nn.Linear(n, n, bias=False)
            for layer in (self.inp, self.hid):
                nn.init.normal_(layer.weight, std=sigma / math.sqrt(layer.in_features))

    r = _no_warnings(Net)
    hid = r["hid.weight"]
    assert hid.distribution == "normal" and hid.exact
    assert _close(hid.variances[0], sigma**2 / 16) and _close(hid.variances[1], sigma**2 / 32)
    sigma2, k = fan_in_scaling(hid, WIDTHS)
    assert abs(k - 1.0) < 1e-12 and _close(sigma2, sigma**2)
    # constant fan-in: the conventional σ²/fan_in reading with k = 1
    sigma2_in, k_in = fan_in_scaling(r["inp.weight"], (4, 4))
    assert k_in == 1.0 and _close(sigma2_in, sigma**2)


def test_tensor_method_on_data_alias():
    def factory(n):
        lin = nn.Linear(n, n)
        lin.weight.data.normal_(0.3, 0.02)  # a different tensor object, same storage
        with torch.no_grad():
            lin.bias.uniform_(-2.0, 1.0)
        return lin

    r = _no_warnings(factory)
    w, b = r["weight"], r["bias"]
    assert w.distribution == "normal" and w.source == "Tensor.normal_(0.3, 0.02)"
    assert _close(w.variances[0], 0.02**2) and _close(w.means[1], 0.3)
    assert b.distribution == "uniform" and _close(b.variances[0], 3.0**2 / 12) and _close(b.means[0], -0.5)


def test_trunc_normal():
    mean, std, a, b = 0.1, 0.02, -0.03, 0.12

    def factory(n):
        lin = nn.Linear(n, n, bias=False)
        nn.init.trunc_normal_(lin.weight, mean=mean, std=std, a=a, b=b)
        return lin

    w = _no_warnings(factory)["weight"]
    alpha, beta = (a - mean) / std, (b - mean) / std
    # textbook truncated-normal moments: Z = Φ(β)-Φ(α), mean shift (φ(α)-φ(β))/Z, and
    # var = 1 + (αφ(α)-βφ(β))/Z - ((φ(α)-φ(β))/Z)²
    phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    cdf = lambda t: 0.5 * (1 + math.erf(t / math.sqrt(2)))  # noqa: E731
    z = cdf(beta) - cdf(alpha)
    shift = (phi(alpha) - phi(beta)) / z
    var = 1 + (alpha * phi(alpha) - beta * phi(beta)) / z - shift**2
    assert w.distribution == "trunc_normal"
    assert math.isclose(w.variances[0], std**2 * var, rel_tol=1e-9)
    assert math.isclose(w.means[0], mean + std * shift, rel_tol=1e-9)
    assert math.isclose(truncnorm.var(alpha, beta), var, rel_tol=1e-9)  # cross-check of the formula


@pytest.mark.parametrize("shape_fn", [lambda n: (n, 3 * n), lambda n: (4 * n, n), lambda n: (n, 2, 3)])
def test_orthogonal(shape_fn):
    gain = 1.3

    class Net(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.w = nn.Parameter(torch.empty(shape_fn(n)))
            nn.init.orthogonal_(self.w, gain=gain)

    w = _no_warnings(Net)["w"]
    for i, n in enumerate(WIDTHS):
        shape = shape_fn(n)
        rows, cols = shape[0], math.prod(shape[1:])
        assert w.distribution == "orthogonal" and _close(w.variances[i], gain**2 / max(rows, cols))


def test_layernorm_and_batchnorm_are_constants():
    r = _no_warnings(lambda n: nn.Sequential(nn.LayerNorm(n), nn.BatchNorm1d(n)))
    for name, value in (("0.weight", 1.0), ("0.bias", 0.0), ("1.weight", 1.0), ("1.bias", 0.0)):
        assert r[name].distribution == "constant" and r[name].variances == (0.0, 0.0)
        assert r[name].means == (value, value) and r[name].exact
    assert fan_in_scaling(r["0.weight"], WIDTHS) == (0.0, 0.0)


def test_embedding_standard_normal():
    e = _no_warnings(lambda n: nn.Embedding(11, n))["weight"]
    assert e.distribution == "normal" and e.variances == (1.0, 1.0) and e.means == (0.0, 0.0)


def test_embedding_padding_row_is_reported():
    with pytest.warns(UserWarning, match=r"'weight'.*width 16: 16 of 176 entries; width 32: 32 of 352"):
        e = read_initialization(lambda n: nn.Embedding(11, n, padding_idx=0), WIDTHS)["weight"]
    assert e.variances == (1.0, 1.0) and "later overwritten" in e.source


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv2d_fan_in_includes_kernel(channels_last):
    kh, kw, out_ch = 3, 2, 5

    def factory(n):
        conv = nn.Conv2d(n, out_ch, (kh, kw))
        if channels_last:
            # exercise Conv's non-contiguous path (init a temporary, then copy_ it in)
            conv = conv.to(memory_format=torch.channels_last)
            conv.reset_parameters()
        return conv

    r = _no_warnings(factory)
    for i, n in enumerate(WIDTHS):
        fan_in = n * kh * kw
        assert _close(r["weight"].variances[i], 1 / (3 * fan_in))
        assert _close(r["bias"].variances[i], (2 / math.sqrt(fan_in)) ** 2 / 12)
    assert r["weight"].exact and r["bias"].exact


def test_rnn_and_attention_read_exactly():
    def factory(n):
        return nn.ModuleDict({
            "rnn": nn.RNN(3, n, num_layers=2),
            "lstm": nn.LSTM(3, n),
            "gru": nn.GRU(3, n),
            "mha": nn.MultiheadAttention(n, 2, add_bias_kv=True),
        })

    r = _no_warnings(factory)
    assert all(p.exact for p in r.values())
    for i, n in enumerate(WIDTHS):
        stdv = 1 / math.sqrt(n)  # RNNs: every parameter ~ U(±1/√hidden_size)
        for name in r:
            if name.split(".")[0] in ("rnn", "lstm", "gru"):
                assert _close(r[name].variances[i], (2 * stdv) ** 2 / 12), name
        # in_proj_weight [3n, n], xavier_uniform_: var = 2/(fan_in + fan_out)
        assert _close(r["mha.in_proj_weight"].variances[i], 2 / (n + 3 * n))
        # bias_k [1, 1, n]: fan_in = 1·n, fan_out = 1·n (receptive field n)
        assert _close(r["mha.bias_k"].variances[i], 2 / (n + n))
        assert _close(r["mha.out_proj.weight"].variances[i], 1 / (3 * n))
    # the last call wins: out_proj.bias got Linear's uniform, then constant_(0)
    assert r["mha.out_proj.bias"].distribution == "constant" and r["mha.in_proj_bias"].means == (0.0, 0.0)


def test_transformer_encoder_deepcopied_layers():
    # nn.TransformerEncoder deep-copies one layer: the copies carry the original's reading
    # (and are identical, which the source says), instead of falling back to measuring.
    def factory(n):
        layer = nn.TransformerEncoderLayer(n, 2, dim_feedforward=2 * n)
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    r = _no_warnings(factory)
    assert all(p.exact for p in r.values())
    for i, n in enumerate(WIDTHS):
        assert _close(r["layers.1.self_attn.in_proj_weight"].variances[i], 2 / (n + 3 * n))
        assert _close(r["layers.1.linear2.weight"].variances[i], 1 / (3 * 2 * n))
    assert "identical values" in r["layers.1.linear1.weight"].source


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rescaling_after_init_is_read_exactly(dtype):
    def factory(n):
        lin = nn.Linear(n, n, bias=False, dtype=dtype)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        lin.weight.data *= 0.5
        return lin

    w = _no_warnings(factory)["weight"]
    # the scale is recovered from values each rounded to the dtype (relative eps/2), so
    # its square is good to about 2·eps; allow 4·eps
    tol = 4 * torch.finfo(dtype).eps
    for i, n in enumerate(WIDTHS):
        assert math.isclose(w.variances[i], 0.25 * 2 / n, rel_tol=tol)
    assert w.exact and "then ×0.5" in w.source


def _randn_factory(scale):
    def factory(n):
        lin = nn.Linear(n, n, bias=False)
        lin.weight = nn.Parameter(torch.randn(n, n) * scale)
        return lin

    return factory


def test_measured_fallback_warns_with_estimate_and_fix():
    scale = 0.1
    with pytest.warns(UserWarning, match=r"'weight'.*measured.*variances=\{'weight'") as rec:
        w = read_initialization(_randn_factory(scale), (64, 96))["weight"]
    assert "±" in str(rec[0].message)
    assert w.distribution == "measured" and not w.exact and w.stderr is not None
    for n, v, se in zip((64, 96), w.variances, w.stderr):
        assert abs(v - scale**2) < 4 * se
        # Gaussian entries: SE(s²) = σ²·√(2/(m-1)). The fourth-moment estimate of it has a
        # relative s.d. of √(96/9/m) ≈ 5% at m = 4096 entries; allow about 5 of those.
        assert 0.75 < se / (scale**2 * math.sqrt(2 / (n * n - 1))) < 1.33
    assert w.stderr[0] > w.stderr[1]  # more entries, smaller error


def test_override_wins_and_silences_the_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = read_initialization(_randn_factory(0.1), WIDTHS, variances={"wei*": 0.01})
    w = r["weight"]
    assert w.variances == (0.01, 0.01) and w.exact and w.source == "user override" and w.stderr is None
    r2 = read_initialization(lambda n: nn.Linear(n, 2), WIDTHS, variances={"bias": (0.5, 0.25)})
    assert r2["bias"].variances == (0.5, 0.25) and r2["weight"].source.startswith("nn.init.kaiming")


def test_constant_parameter_from_values():
    class Net(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.scale = nn.Parameter(torch.full((n,), 0.5))

    s = _no_warnings(Net)["scale"]
    assert s.distribution == "constant" and s.means == (0.5, 0.5) and s.variances == (0.0, 0.0)


def test_fan_in_scaling_rejects_inconsistent_variances():
    init = ParamInit("b", ((2,), (4,)), (0.0, 0.1), (0.0, 0.0), "normal", "x", True, None)
    with pytest.raises(ValueError, match="zero at one width only"):
        fan_in_scaling(init, (2, 4))
    init2 = ParamInit("b", ((2,), (4,)), (0.1, 0.2), (0.0, 0.0), "normal", "x", True, None)
    with pytest.raises(ValueError, match="fan-in 3 at both widths"):
        fan_in_scaling(init2, (3, 3))
    with pytest.raises(ValueError, match="fan_ins must be two positive integers"):
        fan_in_scaling(init2, (0, 3))


# -- errors ------------------------------------------------------------------------------


def test_factory_not_callable():
    with pytest.raises(TypeError, match="factory must be a callable"):
        read_initialization(nn.Linear(2, 2)(torch.zeros(1, 2)), WIDTHS)


def test_factory_returns_non_module():
    with pytest.raises(TypeError, match=r"factory\(16\) returned Tensor, not a torch.nn.Module"):
        read_initialization(lambda n: torch.zeros(n), WIDTHS)


def test_nan_parameter():
    def factory(n):
        lin = nn.Linear(n, 2)
        nn.init.constant_(lin.bias, float("nan"))
        return lin

    with pytest.raises(ValueError, match="parameter 'bias' holds NaN or Inf"):
        read_initialization(factory, WIDTHS)


def test_parameter_names_differ_between_widths():
    def factory(n):
        return nn.Linear(n, 2, bias=n > 20)

    with pytest.raises(ValueError, match=r"only at 32: \['bias'\]"):
        read_initialization(factory, WIDTHS)


@pytest.mark.parametrize("widths", [(16, 16), (0, 8), (8,), (8.0, 16)])
def test_bad_widths(widths):
    with pytest.raises(ValueError, match="two different positive integers"):
        read_initialization(lambda n: nn.Linear(n, 2), widths)


def test_bad_overrides():
    with pytest.raises(ValueError, match=r"overrides \['wieght'\] match no parameter"):
        read_initialization(lambda n: nn.Linear(n, 2), WIDTHS, variances={"wieght": 1.0})
    with pytest.raises(ValueError, match="finite per-entry variance"):
        read_initialization(lambda n: nn.Linear(n, 2), WIDTHS, variances={"weight": -1.0})


def test_patches_are_removed_and_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    read_initialization(lambda n: nn.Linear(n, 2), WIDTHS)
    assert torch.equal(torch.rand(3), expected)
    assert "normal_" not in torch.Tensor.__dict__
    assert not hasattr(nn.init.kaiming_uniform_, "__wrapped__")
