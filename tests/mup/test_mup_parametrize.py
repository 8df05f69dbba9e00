"""tp.mup.parametrize and its optimizers: base-width identity, agreement with an
explicit multiplier implementation of TP V's μP table, attention, tied weights, state."""

from __future__ import annotations

import copy
import io
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tp_mup_models import CNN, MHALM, ExplicitLM, TinyLM, mlp

import tensorprograms.mup as mup
import tensorprograms.parametrization as P

TOK = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
TGT = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(2))


def _lm_loss(model: nn.Module) -> torch.Tensor:
    return F.cross_entropy(model(TOK).reshape(-1, 32), TGT.reshape(-1))


@pytest.mark.parametrize("opt", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("tied", [False, True])
def test_base_width_is_the_users_model(opt: str, tied: bool) -> None:
    factory = partial(TinyLM, tied=tied)
    torch.manual_seed(0)
    ref = factory(32)
    torch.manual_seed(0)
    mp = mup.parametrize(factory, 32, 32, example_inputs=TOK)
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), mp.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert torch.equal(ref(TOK), mp(TOK))
    kw = {"lr": 0.05, "weight_decay": 0.01}
    o_ref = getattr(torch.optim, opt)(ref.parameters(), **kw)
    o_mp = getattr(mup, opt)(mp, **kw)
    for o, m in ((o_ref, ref), (o_mp, mp)):
        o.zero_grad()
        _lm_loss(m).backward()
        o.step()
    # Every μP factor is exactly 1 at base width, so the step is bit-identical.
    for p1, p2 in zip(ref.parameters(), mp.parameters(), strict=True):
        assert torch.equal(p1, p2)
    assert torch.equal(ref(TOK), mp(TOK))


class ExplicitMuP(nn.Module):
    """μP written out by hand from TP V, Table 3 (readout multiplier 1/m), in
    "multiplier form": the reference that parametrize()'s folded form must match.

    Biases of layers with fan-in n keep their base-width scale (this library's
    convention, documented in docs/mup.md)."""

    def __init__(self, raw: nn.Sequential, m: float) -> None:
        super().__init__()
        self.m = m
        self.lin = nn.ModuleList(copy.deepcopy([raw[0], raw[2], raw[4], raw[6]]))
        with torch.no_grad():
            for layer in self.lin[1:]:
                layer.bias.mul_(math.sqrt(m))
            self.lin[3].weight.mul_(math.sqrt(m))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for layer in self.lin[:3]:
            h = F.relu(layer(h))
        return self.lin[3](h / self.m)

    def groups(self, lr: float, wd: float, opt: str) -> list[dict]:
        m = self.m
        out = []
        for i, layer in enumerate(self.lin):
            if opt == "sgd":
                w_mult = {0: m, 1: 1.0, 2: 1.0, 3: m}[i]
                b_mult = 1.0 if i == 3 else m
            else:
                w_mult = {0: 1.0, 1: 1 / m, 2: 1 / m, 3: 1.0}[i]
                b_mult = 1.0
            for p, mult in ((layer.weight, w_mult), (layer.bias, b_mult)):
                # mup's convention for coupled weight decay: lr * wd is width-independent;
                # AdamW's decoupled decay is left as is.
                g_wd = wd if opt == "adamw" else wd / mult
                out.append({"params": [p], "lr": lr * mult, "weight_decay": g_wd})
        return out


@pytest.mark.parametrize(
    "opt, lr, extra",
    [
        ("sgd", 0.2, {"momentum": 0.9}),
        ("adam", 3e-3, {"eps": 1e-3}),  # a large eps, so that its scaling matters
        ("adamw", 3e-3, {"eps": 1e-3}),
    ],
)
def test_matches_explicit_multiplier_mup(opt: str, lr: float, extra: dict) -> None:
    base, width, wd = 16, 64, 0.1
    m = width / base
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    raw = mlp(width).double()
    ref = ExplicitMuP(raw, m)
    torch.manual_seed(5)
    ours = mup.parametrize(mlp, width, base).double()
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[opt]
    o_ref = cls(ref.groups(lr, wd, opt), lr=lr, **extra)
    o_ours = {"sgd": mup.SGD, "adam": mup.Adam, "adamw": mup.AdamW}[opt](
        ours, lr=lr, weight_decay=wd, **extra
    )
    for _ in range(4):
        f_ref, f_ours = ref(x), ours(x)
        # Folding multipliers into parameters only reorders float operations.
        torch.testing.assert_close(f_ours, f_ref, rtol=1e-10, atol=1e-12)
        for o, f in ((o_ref, f_ref), (o_ours, f_ours)):
            o.zero_grad()
            F.cross_entropy(f, y).backward()
            o.step()
    assert not torch.allclose(ref(x), f_ref)  # training moved the function


def test_sdpa_logits_scaled_by_one_over_d() -> None:
    seen: list[float] = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                d = args[0].shape[-1]
                s = kwargs.get("scale")
                seen.append((1 / math.sqrt(d) if s is None else s) * d)
            return func(*args, **kwargs)

    model = mup.parametrize(TinyLM, 128, 32, example_inputs=TOK)
    with Spy():
        model(TOK)
    # heads = 4: head dim 8 at base, 32 here; μP logit scale sqrt(8)/32, i.e. d * scale
    # equals sqrt(d_base) = sqrt(8) at every width.
    assert seen == [pytest.approx(math.sqrt(8), rel=1e-12)]


def test_multihead_attention_logits() -> None:
    torch.manual_seed(0)
    model = mup.parametrize(MHALM, 64, 16)
    weights = []
    model.attn.register_forward_hook(lambda m, i, o: weights.append(o[1]))
    model(TOK)
    h = model.embed(TOK)
    a = model.attn
    q, k, _ = F.linear(h, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
    heads, d, d_base = a.num_heads, a.head_dim, 16 // a.num_heads
    q = q.view(4, 8, heads, d).transpose(1, 2)
    k = k.view(4, 8, heads, d).transpose(1, 2)
    want = torch.softmax(q @ k.transpose(-1, -2) * math.sqrt(d_base) / d, dim=-1).mean(1)
    torch.testing.assert_close(weights[0], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", ["div", "mul"])
def test_hand_written_attention(style: str) -> None:
    factory = partial(ExplicitLM, style=style)
    torch.manual_seed(0)
    model = mup.parametrize(factory, 64, 16, example_inputs=TOK)
    h = model.embed(TOK)
    d, d_base = 16, 4  # head dims at width 64 and 16, 4 heads
    q, k, v = (z.view(4, 8, 4, d).transpose(1, 2) for z in model.qkv(h).chunk(3, -1))
    att = torch.softmax(q @ k.transpose(-2, -1) * math.sqrt(d_base) / d, dim=-1) @ v
    want = model.readout(h + att.transpose(1, 2).reshape(4, 8, 64))
    torch.testing.assert_close(model(TOK), want, rtol=1e-5, atol=1e-6)
    # and at base width nothing changes
    torch.manual_seed(0)
    ref = factory(16)
    torch.manual_seed(0)
    same = mup.parametrize(factory, 16, 16, example_inputs=TOK)
    assert torch.equal(ref(TOK), same(TOK))


def test_hand_written_attention_needs_example_inputs() -> None:
    with pytest.raises(mup.MupError, match="hand-written attention.*example_inputs"):
        mup.parametrize(ExplicitLM, 64, 16)


def test_sdpa_without_example_inputs_is_an_error() -> None:
    with pytest.raises(mup.MupError, match="pass example_inputs=.*1/d"):
        mup.parametrize(TinyLM, 64, 32)


def test_tied_readout_gets_activation_multiplier() -> None:
    torch.manual_seed(0)
    model = mup.parametrize(partial(TinyLM, tied=True), 128, 32, example_inputs=TOK)
    assert model.readout.weight is model.embed.weight
    assert not hasattr(model, "tp_mup_readout")
    assert float(model.readout.tp_mup_readout) == pytest.approx(32 / 128)
    h = model.ln(model.block(model.embed(TOK)))
    torch.testing.assert_close(model(TOK), h @ model.embed.weight.T * (32 / 128))


def _roundtrip_models(model: nn.Module) -> list[nn.Module]:
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    fresh = mup.parametrize(partial(TinyLM, tied=True), 64, 32, example_inputs=TOK)
    fresh.load_state_dict(model.state_dict())
    return [copy.deepcopy(model), loaded, fresh]


def _groups(model: nn.Module) -> list[tuple]:
    return [(g["lr"], g["eps"], len(g["params"])) for g in mup.Adam(model, 1e-3).param_groups]


def test_state_survives_save_load_deepcopy_state_dict() -> None:
    torch.manual_seed(0)
    model = mup.parametrize(partial(TinyLM, tied=True), 64, 32, example_inputs=TOK)
    want = model(TOK)
    want_groups = _groups(model)
    for other in _roundtrip_models(model):
        torch.testing.assert_close(other(TOK), want, rtol=0, atol=0)
        assert _groups(other) == want_groups


class Wrapper(nn.Module):
    """Stands in for FSDP-style wrappers that keep the original module inside."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *a):
        return self.inner(*a)


@pytest.mark.parametrize("wrap", [nn.DataParallel, Wrapper])
def test_wrappers(wrap) -> None:
    torch.manual_seed(0)
    model = mup.parametrize(TinyLM, 64, 32, example_inputs=TOK)
    wrapped = wrap(model)
    torch.testing.assert_close(wrapped(TOK), model(TOK), rtol=0, atol=0)
    g1 = sorted((g["lr"], len(g["params"])) for g in mup.SGD(model, lr=0.1).param_groups)
    g2 = sorted((g["lr"], len(g["params"])) for g in mup.SGD(wrapped, lr=0.1).param_groups)
    assert g1 == g2 and len(g1) > 1


def test_cnn_rules() -> None:
    model = mup.parametrize(CNN, 64, 16)
    lr = {id(p): g["lr"] for g in mup.Adam(model, lr=1.0).param_groups for p in g["params"]}
    assert lr[id(model.conv1.weight)] == 1.0
    assert lr[id(model.conv2.weight)] == pytest.approx(1 / 4)
    assert lr[id(model.head.weight)] == pytest.approx(1 / 4)  # folded readout multiplier


def test_param_groups_for_other_optimizers() -> None:
    model = mup.parametrize(mlp, 64, 16)
    groups = mup.param_groups(model, 0.01, "adam")
    opt = torch.optim.NAdam(groups)
    assert {round(g["lr"], 12) for g in opt.param_groups} == {0.01, 0.0025}


def test_unsupported_optimizer() -> None:
    model = mup.parametrize(mlp, 64, 16)
    msg = "no known μP rule for optimizer 'RMSprop'; supported: SGD, Adam, AdamW"
    with pytest.raises(mup.MupError, match=msg):
        mup.param_groups(model, 0.1, torch.optim.RMSprop)
    with pytest.raises(mup.MupError, match="no known μP rule for optimizer 'lion'"):
        mup.param_groups(model, 0.1, "lion")


def test_optimizer_on_plain_model() -> None:
    with pytest.raises(mup.MupError, match="not built by tp.mup.parametrize"):
        mup.SGD(mlp(64), lr=0.1)


def test_parameter_added_after_parametrize() -> None:
    model = mup.parametrize(mlp, 64, 16)
    model.extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(mup.MupError, match=r"\['extra'\] have no μP rule"):
        mup.SGD(model, lr=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 0}, "width must be a positive integer"),
        ({"width": 64.0}, "width must be a positive integer"),
        ({"base_width": -1}, "base_width must be a positive integer"),
        ({"parametrization": "sgd"}, "unknown parametrization 'sgd'"),
        ({"parametrization": P.mup()}, "takes a parametrization by name"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    args = {"factory": mlp, "width": 64, "base_width": 16, **kwargs}
    with pytest.raises(ValueError, match=match):
        mup.parametrize(**args)


def test_width_not_proportional() -> None:
    def factory(w: int) -> nn.Module:
        n = w if w % 16 == 0 else w + 1  # proportional at 16 and 64, not at 24
        return nn.Sequential(nn.Linear(3, n), nn.Linear(n, 2))

    with pytest.raises(mup.MupError, match="size 25 .* not 24 = width/base_width"):
        mup.parametrize(factory, 24, 16)


def test_meanfield_trains_exactly_like_mup_with_sgd() -> None:
    # MF is μP shifted by the abc symmetry: same function, same SGD trajectory.
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(1))
    models = []
    for name in ("mup", "meanfield"):
        torch.manual_seed(3)
        models.append(mup.parametrize(mlp, 128, 16, name).double())
    opts = [mup.SGD(m, lr=0.5) for m in models]
    for _ in range(3):
        outs = [m(x) for m in models]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
        for o, f in zip(opts, outs, strict=True):
            o.zero_grad()
            F.cross_entropy(f, y).backward()
            o.step()


def test_ntk_lr_factors() -> None:
    model = mup.parametrize(mlp, 64, 16, "ntk")
    lr = {id(p): g["lr"] for g in mup.SGD(model, lr=1.0).param_groups for p in g["params"]}
    # NTP: hidden and readout weights carry n^-1/2 multipliers, so their folded SGD
    # learning rate falls like 1/m; input weights and biases keep theirs.
    assert lr[id(model[0].weight)] == 1.0 and lr[id(model[2].bias)] == 1.0
    assert lr[id(model[2].weight)] == pytest.approx(0.25)
    assert lr[id(model[6].weight)] == pytest.approx(0.25)


def test_architecture_differs_at_target_width() -> None:
    def factory(w: int) -> nn.Module:
        return mlp(w, depth=3 if w % 16 == 0 else 2)

    with pytest.raises(mup.MupError, match="same architecture at every width"):
        mup.parametrize(factory, 24, 16)


def test_example_forward_leaves_buffers_alone() -> None:
    class WithBN(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(32, w)
            self.bn = nn.BatchNorm1d(8)
            self.block = TinyLM(w).block

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.block(self.bn(self.embed(t)))

    torch.manual_seed(0)
    ref = WithBN(32)
    torch.manual_seed(0)
    ours = mup.parametrize(WithBN, 32, 32, example_inputs=TOK)
    assert torch.equal(ours.bn.running_mean, ref.bn.running_mean)
    assert int(ours.bn.num_batches_tracked) == 0
