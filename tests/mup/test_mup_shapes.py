"""Width inference: kinds of parameters and the user's init exponents."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from tp_mup_models import CNN, MHALM, TinyLM, mlp

import tensorprograms.mup as mup


def test_mlp_kinds_and_init_exponents() -> None:
    infos = mup.infer_shapes(mlp, 32)
    kinds = {n: i.kind for n, i in infos.items()}
    assert kinds == {
        "0.weight": "input", "0.bias": "input",
        "2.weight": "hidden", "2.bias": "input",
        "4.weight": "hidden", "4.bias": "input",
        "6.weight": "output", "6.bias": "finite",
    }
    # PyTorch's Linear init: weight and bias scale like fan_in^-1/2.
    k = {n: i.init_exponent for n, i in infos.items()}
    assert k["0.weight"] == 0 and k["0.bias"] == 0  # fan-in 16 at every width
    assert k["2.weight"] == 0.5 and k["2.bias"] == 0.5
    assert k["6.weight"] == 0.5 and k["6.bias"] == 0.5


def test_cnn_and_transformer_kinds() -> None:
    cnn = mup.infer_shapes(CNN, 16)
    assert cnn["conv1.weight"].kind == "input" and cnn["conv2.weight"].kind == "hidden"
    assert cnn["head.weight"].kind == "output"
    lm = mup.infer_shapes(TinyLM, 32)
    assert lm["embed.weight"].kind == "input" and lm["embed.weight"].init_exponent == 0
    assert lm["block.up.weight"].kind == "hidden"  # 4n x n: both infinite
    assert lm["block.ln1.weight"].kind == "input" and lm["block.ln1.weight"].init_exponent == 0
    assert lm["block.ln1.bias"].init_exponent is None  # zeros
    assert lm["readout.weight"].kind == "output"
    mha = mup.infer_shapes(MHALM, 32)
    assert mha["attn.in_proj_weight"].kind == "hidden"  # 3n x n


def test_tied_embedding_readout() -> None:
    infos = mup.infer_shapes(lambda w: TinyLM(w, tied=True), 32)
    assert "readout.weight" not in infos  # the same Parameter as embed.weight
    e = infos["embed.weight"]
    assert e.kind == "input" and e.owners == (("embed", "weight"), ("readout", "weight"))
    assert e.tied_readout_owners == ("readout",)


def test_custom_init_exponent() -> None:
    class Gpt2Init(nn.Module):
        def __init__(self, w: int) -> None:
            super().__init__()
            self.a = nn.Linear(8, w)
            self.b = nn.Linear(w, w)
            self.c = nn.Linear(w, 3)
            for m in (self.a, self.b, self.c):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    infos = mup.infer_shapes(Gpt2Init, 32)
    assert infos["b.weight"].init_exponent == 0  # constant std: not 1/fan_in
    assert infos["b.bias"].init_exponent is None


def test_rng_state_untouched() -> None:
    torch.manual_seed(3)
    want = torch.rand(3)
    torch.manual_seed(3)
    mup.infer_shapes(mlp, 16)
    assert torch.equal(torch.rand(3), want)


def test_no_width_dependence() -> None:
    with pytest.raises(mup.MupError, match="no width-dependent dimension.*uses its width"):
        mup.infer_shapes(lambda w: nn.Linear(4, 4), 16)


def test_not_proportional() -> None:
    with pytest.raises(mup.MupError, match=r"neither constant nor proportional.*4 \* width"):
        mup.infer_shapes(lambda w: nn.Sequential(nn.Linear(4, w + 1), nn.Linear(w + 1, 2)), 16)


def test_kernel_grows() -> None:
    with pytest.raises(mup.MupError, match="neither its fan-in nor its fan-out"):
        mup.infer_shapes(lambda w: nn.Conv1d(w, w, kernel_size=w // 8), 16)


def test_not_a_module() -> None:
    with pytest.raises(mup.MupError, match="not a torch.nn.Module"):
        mup.infer_shapes(lambda w: torch.zeros(w), 16)


def test_architecture_changes() -> None:
    def f(w: int) -> nn.Module:
        return mlp(w, depth=2 if w < 50 else 3)

    with pytest.raises(mup.MupError, match="different parameter names"):
        mup.infer_shapes(f, 16)


def test_bad_base_width() -> None:
    with pytest.raises(mup.MupError, match="base_width must be a positive integer"):
        mup.infer_shapes(mlp, 0)
