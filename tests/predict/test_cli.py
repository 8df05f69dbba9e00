"""The CLI (`tensorprograms report`) on a tiny model file and a tiny .npz, and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tensorprograms import cli
from tensorprograms.job.data import load_npz
from tensorprograms.job.pieces import limit_accuracy
from tensorprograms.predict import gp_posterior, one_hot

MODEL = '''
import torch
from torch import nn

def make(width):
    return nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
'''


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 6)) * 2
    y_tr, y_te = rng.integers(0, 3, 24), rng.integers(0, 3, 12)
    x_tr = centers[y_tr] + rng.normal(size=(24, 6))
    x_te = centers[y_te] + rng.normal(size=(12, 6))
    np.savez(tmp_path / "tiny.npz", x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    (tmp_path / "tinymodel.py").write_text(MODEL)
    return tmp_path


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for word in ("demo", "report", "basics"):
        assert word in out
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    out = capsys.readouterr().out
    assert "x_train" in out and "MODULE:FACTORY" in out


def test_report_on_tiny_model_and_npz(files, capsys):
    out = files / "rep"
    rc = cli.main(["report", "--model", f"{files / 'tinymodel.py'}:make", "--data", str(files / "tiny.npz"),
                   "--widths", "8", "--epochs", "2", "--convergence-widths", "32",
                   "--convergence-inputs", "4", "--out", str(out), "--quiet", "--threads", "1"])
    assert rc == 0
    md = (out / "report.md").read_text()
    assert "| tiny | make | 24 / 12 | 8:" in md
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "convergence.png").exists()
    assert "| tiny | make | 24 / 12 |" in capsys.readouterr().out


def test_limit_accuracy_is_the_gp_posterior(files):
    """The report's NNGP accuracy is the argmax of the GP posterior mean with the stated
    relative noise, recomputed here from the kernel."""
    import tensorprograms as tp

    data = load_npz(files / "tiny.npz")
    factory = cli.load_factory(f"{files / 'tinymodel.py'}:make")
    res = limit_accuracy(factory, data, noise=1e-3, ntk_data=data.subsample(0, 0))
    K = tp.infinite_width(factory, data.x_train[:2].float()).nngp(torch.cat([data.x_train, data.x_test]))
    Ktr = K[:24, :24]
    pred = gp_posterior(Ktr, one_hot(data.y_train, 3), K[24:, :24], noise=1e-3 * Ktr.diagonal().mean().item())
    assert res.nngp == (pred.classes() == data.y_test).double().mean().item()
    assert res.nngp > 0.8  # three well-separated clusters
    assert res.ntk is None


def test_bad_inputs(files):
    np.savez(files / "bad.npz", x_train=np.zeros((3, 2)), y_train=np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match=r"lacks the keys \['x_test', 'y_test'\]"):
        load_npz(files / "bad.npz")
    np.savez(files / "bad2.npz", x_train=np.zeros((3, 2)), y_train=np.zeros(3), x_test=np.zeros((1, 2)),
             y_test=np.zeros(1, dtype=int))
    with pytest.raises(ValueError, match="integer labels"):
        load_npz(files / "bad2.npz")
    with pytest.raises(FileNotFoundError):
        load_npz(files / "none.npz")
    with pytest.raises(SystemExit, match="MODULE:FACTORY"):
        cli.load_factory("nocolon")
    with pytest.raises(SystemExit, match="no callable 'nothere'"):
        cli.load_factory(f"{files / 'tinymodel.py'}:nothere")
