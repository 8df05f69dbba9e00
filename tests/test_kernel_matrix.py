"""tp.kernel_matrix: tiles equal the whole-batch kernels, a SIGKILLed run resumes to the
identical matrix, a Dask cluster gives the local result, bad inputs are refused."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import tensorprograms as tp
from frontend.models import MLP

TESTS = Path(__file__).resolve().parent
FACTORY = functools.partial(MLP, act=torch.relu, d=5, k=3, depth=2)


def points(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def limit():
    return tp.infinite_width(FACTORY, points(4))


def test_tiles_match_the_whole_batch(limit):
    x = points(10)  # tiles of 4, 4 and 2 rows; few distinct batch sizes keep captures cheap
    K, T = limit.kernels(x)
    Kxy, Txy = K[:, 6:], T[:, 6:]
    sym = tp.kernel_matrix(limit, x, block_size=4, progress=False)
    cross = tp.kernel_matrix(limit, x, x[6:], block_size=4, progress=False)
    # tiles group the Gram products differently from one batch: equal to float64 rounding
    # (a few ulps of the largest entry; the kernels here are O(1))
    tol = dict(rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(sym["nngp"], K.numpy(), **tol)
    np.testing.assert_allclose(sym["ntk"], T.numpy(), **tol)
    np.testing.assert_allclose(cross["nngp"], Kxy.numpy(), **tol)
    np.testing.assert_allclose(cross["ntk"], Txy.numpy(), **tol)
    for kind in ("nngp", "ntk"):  # exactly symmetric: mirrored tiles, symmetrized diagonal ones
        assert np.array_equal(sym[kind], sym[kind].T)
    only = tp.kernel_matrix(limit, x, kinds=("nngp",), block_size=4, progress=False)
    assert set(only) == {"nngp"}
    np.testing.assert_allclose(only["nngp"], K.numpy(), **tol)


def test_cross_tiles_evaluate_only_their_block(limit, monkeypatch):
    """An MLP's tiles go through the dense recursion (kernels/dense.py): a tile of rows I and
    columns J evaluates the |I| × |J| pairs (plus vectors of same-example pairs for the
    variances), not the kernel of the stacked 2·block_size inputs."""
    from tensorprograms.kernels import dense

    seen = []
    real = dense.evaluate

    def spy(dp, block, variances, compiled=False):
        seen.append(block.shape())
        return real(dp, block, variances, compiled)

    monkeypatch.setattr(dense, "evaluate", spy)
    x = points(10)
    tp.kernel_matrix(limit, x, block_size=4, progress=False)
    pairs = [s for s in seen if len(s) == 2]
    # 6 tiles on and above the diagonal: 3 diagonal (4², 4², 2²), 3 cross (4·4, 4·2, 4·2);
    # the stacked inputs' kernels would be 8², 6², 6² for the cross tiles
    assert sorted(pairs) == sorted([(4, 4), (4, 4), (2, 2), (4, 4), (4, 2), (4, 2)])


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from test_kernel_matrix import FACTORY, points
    import tensorprograms as tp
    limit = tp.infinite_width(FACTORY, points(4))
    compute = limit.kernels
    def slowed(*args):  # room for the parent to kill the run between and inside tiles
        out = compute(*args)
        time.sleep(0.05)
        return out
    limit.kernels = slowed
    tp.kernel_matrix(limit, points(24), block_size=4, out=sys.argv[1], progress=False)
""")


def test_sigkill_then_resume_is_bit_identical(tmp_path, limit):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(TESTS)), str(out)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    state = out / "state.json"
    deadline = time.monotonic() + 300
    done_before = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if state.exists():
                done_before = len(json.loads(state.read_text())["done"])
                if done_before >= 3:
                    break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the child finished before it could be killed"
    done_before = len(json.loads(state.read_text())["done"])
    total = 21  # 6 × 6 tiles, upper triangle
    assert 3 <= done_before < total

    calls = []
    compute = limit.kernels
    limit.kernels = lambda *a: calls.append(a) or compute(*a)
    try:
        resumed = tp.kernel_matrix(limit, points(24), block_size=4, out=out, progress=False)
        assert len(calls) == total - done_before  # finished tiles are not recomputed
        fresh = tp.kernel_matrix(limit, points(24), block_size=4, out=tmp_path / "fresh", progress=False)
    finally:
        del limit.kernels
    for kind in ("nngp", "ntk"):
        assert np.array_equal(resumed[kind], fresh[kind])
    assert len(json.loads(state.read_text())["done"]) == total


def test_dask_cluster_equals_local(limit):
    distributed = pytest.importorskip("distributed")
    x = points(10)
    y = x[6:]
    local = tp.kernel_matrix(limit, x, y, block_size=4, progress=False)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = tp.kernel_matrix(limit, x, y, block_size=4, progress=False, client=client)
    for kind in ("nngp", "ntk"):
        assert np.array_equal(local[kind], remote[kind])


def test_bad_inputs(tmp_path, limit):
    x = points(6)
    with pytest.raises(ValueError, match=r"x1 has shapes \[\(6, 4\)\]"):
        tp.kernel_matrix(limit, x[:, :4], progress=False)
    with pytest.raises(ValueError, match="x2 has shapes"):
        tp.kernel_matrix(limit, x, torch.zeros(3, 7, dtype=torch.float64), progress=False)
    with pytest.raises(ValueError, match="kinds"):
        tp.kernel_matrix(limit, x, kinds=("nngp", "gram"), progress=False)
    with pytest.raises(ValueError, match="block_size"):
        tp.kernel_matrix(limit, x, block_size=0, progress=False)
    with pytest.raises(TypeError, match="tp.infinite_width"):
        tp.kernel_matrix(lambda a, b: a, x, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        tp.kernel_matrix(limit, torch.full((3, 5), float("nan"), dtype=torch.float64), progress=False)

    out = tmp_path / "run"
    tp.kernel_matrix(limit, x, block_size=4, out=out, progress=False)
    with pytest.raises(ValueError, match=r"different computation .*'x1'"):
        tp.kernel_matrix(limit, points(6, seed=5), block_size=4, out=out, progress=False)
    with pytest.raises(ValueError, match=r"different computation .*'block_size'"):
        tp.kernel_matrix(limit, x, block_size=3, out=out, progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        tp.kernel_matrix(limit, x, out=tmp_path / "file", progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a kernel_matrix output"):
        tp.kernel_matrix(limit, x, out=tmp_path / "other", progress=False)

    local = tp.infinite_width(lambda w: MLP(w, torch.relu, d=5, k=3), points(4))
    with pytest.raises(TypeError, match="does not pickle"):
        tp.kernel_matrix(local, x, progress=False, client=object())
