"""Our limit kernels next to neural-tangents', on the same architectures and inputs (float64).

Run: ``make bench-nt`` (or ``.venv/bin/python benchmarks/nt_compare.py``). The first run
creates ``.venv-nt`` (git-ignored) with neural-tangents 0.6.5 and the versions it works
with; the library never imports neural-tangents. Each library runs each case in its own
subprocess (jax with x64 and ``jit``): one warm-up call (capture / compilation), then the
median of ``--repeats`` timed calls; peak memory is the subprocess's maximum resident set
size. The roofline column is the unavoidable work measured on this machine for the MLPs:
the N×N×d Gram product plus one arccos pass over N² entries per layer and kernel.
The "rel. err" column is max |ours − nt| / max |nt| over both kernels, all entries / off
the diagonal.

The "emp" case is one finite MLP's empirical NTK (depth 3, width 512, the same weights in
both; neural-tangents' structured-derivatives implementation).

Options: ``--cases mlp3,mlp10,cnn8,emp`` (default: the issue's cases but the 16×16 CNN),
``--compile auto|on|off`` (our torch.compile'd ReLU passes: the library's rule, which
compiles once a process's work pays for it; always, compiling in the warm-up call as jit does
for neural-tangents; never), ``--threads 1`` (both libraries on one thread each: torch's
OpenMP and XLA's Eigen pool; on a loaded shared machine a 2-thread pool spends its time
waiting for a descheduled thread),
``--n 4000`` (override N of the MLP cases), ``--repeats 3``, ``--scaling 1000,2000,4000,8000``
(our MLP time vs N only).

The ``flat{16,32}-{64,128,256}`` cases are a CNN with a Flatten readout (2 × [conv 3×3 SAME,
ReLU], flatten, dense) on side × side × 3 images, N = 64..256: its kernels need only
same-position covariances (kernels/needed.py); ``flat…-all`` runs our all-pairs recursion
instead (no neural-tangents row); ``poolflat16`` puts an average pool and a third convolution
before the flatten (pairs within each pooling window are needed below it). "rec s" is the
part of our time spent in the batched recursion; the rest of a ``kernels()`` call is
lowering the program for these inputs.
Each row ends with the 1-minute load average when it finished (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NT_VENV = ROOT / ".venv-nt"
NT_PACKAGES = ["neural-tangents==0.6.5", "jax==0.4.25", "jaxlib==0.4.25", "tensorflow==2.15.1",
               "tf2jax==0.3.6", "numpy<2"]
SW2, SB2 = 2.0, 0.05  # weight variance × fan_in, bias variance (both libraries)
WIDTH = 512  # only the finite width of nothing we time: limits do not depend on it

CASES = {
    "mlp3": dict(arch="mlp", depth=3, n=4000, shape=(784,)),
    "mlp10-2000": dict(arch="mlp", depth=10, n=2000, shape=(784,)),
    "mlp10": dict(arch="mlp", depth=10, n=4000, shape=(784,)),
    "cnn8": dict(arch="cnn", n=64, shape=(8, 8, 3)),
    "cnn16": dict(arch="cnn", n=64, shape=(16, 16, 3)),
    # the same with nt.batch (blocks of 16 inputs): neural-tangents' bounded-memory mode
    "cnn16b": dict(arch="cnn", n=64, shape=(16, 16, 3), nt_batch=16),
    # one finite ReLU MLP (depth 3, width 512, NTK parametrization), same weights in both
    "emp": dict(arch="emp", depth=3, n=256, shape=(784,)),
    # 2 × [conv 3×3 SAME, ReLU], flatten, dense: only same-position pairs are needed
    # (kernels/needed.py); "-all" forces our all-pairs recursion (neural-tangents not rerun)
    **{f"flat{s}-{n}": dict(arch="flat", n=n, shape=(s, s, 3)) for s in (16, 32) for n in (64, 128, 256)},
    **{f"flat{s}-{n}-all": dict(arch="flat", n=n, shape=(s, s, 3), pairs="all", nt=False)
       for s in (16, 32) for n in (64, 128, 256)},
    # a pool in the middle, flatten at the end: window pairs below the pool, diagonal above
    "poolflat16": dict(arch="poolflat", n=64, shape=(16, 16, 3)),
    # neural-tangents needs every pair below the pool: plain jit passed 10.8 GB here, so nt.batch
    "poolflat16b": dict(arch="poolflat", n=64, shape=(16, 16, 3), nt_batch=16),
    "poolflat16-all": dict(arch="poolflat", n=64, shape=(16, 16, 3), pairs="all", nt=False),
}
DEFAULT = "mlp3,mlp10-2000,mlp10,cnn8,emp"


# ---------------------------------------------------------------- the nt virtualenv
def nt_python() -> Path:
    py = NT_VENV / "bin" / "python"
    stamp = NT_VENV / ".installed"
    if not stamp.exists() or stamp.read_text() != " ".join(NT_PACKAGES):
        print(f"creating {NT_VENV} with {' '.join(NT_PACKAGES)} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(NT_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "--quiet", *NT_PACKAGES], check=True)
        stamp.write_text(" ".join(NT_PACKAGES))
    return py


# ---------------------------------------------------------------- workers (subprocesses)
def _timed(fn, repeats: int) -> tuple[float, list[float]]:
    t = time.perf_counter()
    fn()
    warm = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return warm, times


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker_ours(case: dict, x_path: str, out: str, repeats: int) -> dict:
    import functools

    import numpy as np
    import torch

    import tensorprograms as tp
    from tensorprograms.frontend.limit import InfiniteWidthLimit
    from tensorprograms.kernels import fused, needed

    fused.COMPILE = {"auto": "auto", "on": True, "off": False}[case.get("compile", "auto")]
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from nt_models import CNN, MLP, FlatCNN, PoolFlatCNN

    x = torch.from_numpy(np.load(x_path))
    if case["arch"] == "mlp":
        factory = functools.partial(MLP, d=x.shape[1], depth=case["depth"], sw2=SW2, sb2=SB2)
    else:
        x = x.permute(0, 3, 1, 2).contiguous()  # NHWC (nt) -> NCHW (torch)
        factory = functools.partial(CNN, cin=x.shape[1], sw2=SW2, sb2=SB2)
        if case["arch"] in ("flat", "poolflat"):
            model = FlatCNN if case["arch"] == "flat" else PoolFlatCNN
            factory = functools.partial(model, cin=x.shape[1], side=x.shape[2], sw2=SW2, sb2=SB2)
    if "pairs" in case:
        needed.MODE = case["pairs"]
    limit = tp.infinite_width(factory, x[:2])
    result = {}
    spent = []  # seconds in the batched recursion (the rest of a call: lowering the program)
    by_recursion = InfiniteWidthLimit._by_recursion

    def timed_recursion(*args, **kwargs):
        t = time.perf_counter()
        try:
            return by_recursion(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - t)

    InfiniteWidthLimit._by_recursion = timed_recursion

    def run():
        spent.clear()
        result["k"] = limit.kernels(x)
        result.setdefault("rec", []).append(sum(spent))

    warm, times = _timed(run, repeats)
    K, T = result["k"]
    np.save(out + ".nngp.npy", K.numpy())
    np.save(out + ".ntk.npy", T.numpy())
    return {"warm": warm, "times": times, "peak_mb": _peak_mb(), "rec": result["rec"][1:]}


def worker_ours_empirical(case: dict, x_path: str, out: str, repeats: int) -> dict:
    """The empirical NTK of one finite MLP; its weights are saved for neural-tangents."""
    import numpy as np
    import torch

    import tensorprograms as tp

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from nt_models import MLP

    x = torch.from_numpy(np.load(x_path))
    torch.manual_seed(0)
    model = MLP(WIDTH, d=x.shape[1], depth=case["depth"], sw2=SW2, sb2=SB2).double()
    variances = {n: (SB2 if n.endswith("bias") else SW2 / p.shape[1]) for n, p in model.named_parameters()}
    np.savez(out + ".weights.npz", **{n: p.detach().numpy() for n, p in model.named_parameters()})
    result = {}

    def run():
        result["k"] = tp.empirical.ntk(model, x, parametrization="ntk", variances=variances)

    warm, times = _timed(run, repeats)
    np.save(out + ".ntk.npy", result["k"].numpy())
    return {"warm": warm, "times": times, "peak_mb": _peak_mb()}


def worker_nt_empirical(case: dict, x_path: str, out: str, repeats: int) -> dict:
    """neural-tangents' empirical NTK (structured derivatives) of the same weights."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import neural_tangents as nt
    import numpy as np
    from neural_tangents import stax

    sw, sb = SW2**0.5, SB2**0.5
    layers = []
    for _ in range(case["depth"]):
        layers += [stax.Dense(WIDTH, W_std=sw, b_std=sb), stax.Relu()]
    layers.append(stax.Dense(1, W_std=sw, b_std=sb))
    _, apply_fn, _ = stax.serial(*layers)
    w = np.load(out.replace(".nt", ".ours") + ".weights.npz")
    names = [f"layers.{i}" for i in range(case["depth"])] + ["out"]
    params = []
    for i, name in enumerate(names):  # ω = W·√fan_in / W_std (stax's NTK parametrization)
        W, b = w[f"{name}.weight"], w[f"{name}.bias"]
        params.append((W.T * np.sqrt(W.shape[1]) / sw, b / sb))
        if i < len(names) - 1:
            params.append(())
    fn = jax.jit(nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,),
                                     implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES))
    x = jax.numpy.asarray(np.load(x_path))
    result = {}

    def run():
        result["k"] = fn(x, None, params).block_until_ready()

    warm, times = _timed(run, repeats)
    np.save(out + ".ntk.npy", np.asarray(result["k"]))
    return {"warm": warm, "times": times, "peak_mb": _peak_mb()}


def worker_nt(case: dict, x_path: str, out: str, repeats: int) -> dict:
    import jax

    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from neural_tangents import stax

    sw, sb = SW2**0.5, SB2**0.5
    if case["arch"] == "mlp":
        layers = []
        for _ in range(case["depth"]):
            layers += [stax.Dense(WIDTH, W_std=sw, b_std=sb), stax.Relu()]
        layers.append(stax.Dense(1, W_std=sw, b_std=sb))
    elif case["arch"] in ("flat", "poolflat"):
        conv = lambda: stax.Conv(WIDTH, (3, 3), padding="SAME", W_std=sw, b_std=sb)  # noqa: E731
        layers = [conv(), stax.Relu(), conv(), stax.Relu()]
        if case["arch"] == "poolflat":
            layers += [stax.AvgPool((2, 2), strides=(2, 2)), conv(), stax.Relu()]
        layers += [stax.Flatten(), stax.Dense(1, W_std=sw, b_std=sb)]
    else:
        conv = lambda: stax.Conv(WIDTH, (3, 3), padding="SAME", W_std=sw, b_std=sb)  # noqa: E731
        layers = [conv(), stax.Relu(), conv(), stax.Relu(), stax.AvgPool((2, 2), strides=(2, 2)),
                  conv(), stax.Relu(), stax.GlobalAvgPool(), stax.Dense(1, W_std=sw, b_std=sb)]
    _, _, kernel_fn = stax.serial(*layers)
    kernel_fn = jax.jit(kernel_fn, static_argnames="get")
    if case.get("nt_batch"):
        import neural_tangents as nt

        kernel_fn = nt.batch(kernel_fn, batch_size=case["nt_batch"], store_on_device=False)
    x = jax.numpy.asarray(np.load(x_path))
    result = {}

    def run():
        k = kernel_fn(x, None, ("nngp", "ntk"))
        result["k"] = (k.nngp.block_until_ready(), k.ntk.block_until_ready())

    warm, times = _timed(run, repeats)
    np.save(out + ".nngp.npy", np.asarray(result["k"][0]))
    np.save(out + ".ntk.npy", np.asarray(result["k"][1]))
    return {"warm": warm, "times": times, "peak_mb": _peak_mb()}


def worker_roofline(case: dict, x_path: str, out: str, repeats: int) -> dict:
    """The floor of an MLP kernel: Gram product + (layers × kernels) arccos passes over N²."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.load(x_path))
    n = x.shape[0]
    rho = torch.rand(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    buf = torch.empty_like(rho)
    _, gram = _timed(lambda: x @ x.T, repeats)
    _, arccos = _timed(lambda: torch.arccos(rho, out=buf), repeats)
    g, a = statistics.median(gram), statistics.median(arccos)
    return {"gram": g, "arccos": a, "roofline": g + 2 * case["depth"] * a, "peak_mb": _peak_mb()}


WORKERS = {"ours": worker_ours, "nt": worker_nt, "roofline": worker_roofline,
           "ours-emp": worker_ours_empirical, "nt-emp": worker_nt_empirical}


# ---------------------------------------------------------------- driver
THREADS: int | None = None  # --threads: one setting for both libraries


def spawn(python: Path, worker: str, case: dict, x_path: str, out: str, repeats: int) -> dict:
    cmd = [str(python), str(Path(__file__).resolve()), "--worker", worker, "--case", json.dumps(case),
           "--x", x_path, "--out", out, "--repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TF_CPP_MIN_LOG_LEVEL": "3"}
    if THREADS is not None:
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
        if THREADS == 1:
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{worker} on {case} failed (exit {proc.returncode}; -9: killed, e.g. out "
                           f"of memory):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_inputs(case: dict, path: str) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((case["n"], *case["shape"]))
    np.save(path, x)


def rel_err(out_a: str, out_b: str) -> tuple[float, float]:
    """max |a − b| / max |b| over both kernels: all entries, and off the diagonal only (on
    it ρ = 1, where arccos turns a rounding of ρ into an error of its square root)."""
    import numpy as np

    err = off = 0.0
    for kind in ("nngp", "ntk"):
        if not os.path.exists(out_a + f".{kind}.npy"):
            continue  # the empirical case has only an NTK
        a, b = np.load(out_a + f".{kind}.npy"), np.load(out_b + f".{kind}.npy")
        b = b.reshape(a.shape)
        d = np.abs(a - b) / np.abs(b).max()
        err = max(err, float(d.max()))
        np.fill_diagonal(d, 0.0)
        off = max(off, float(d.max()))
    return err, off


def run_case(name: str, case: dict, tmp: str, nt: Path | None, repeats: int) -> str:
    """One table row: our subprocess, neural-tangents' subprocess, the roofline (MLPs)."""
    x_path = os.path.join(tmp, f"{name}.x.npy")
    make_inputs(case, x_path)
    ours_out, nt_out = os.path.join(tmp, f"{name}.ours"), os.path.join(tmp, f"{name}.nt")
    emp = "-emp" if case["arch"] == "emp" else ""
    ours = spawn(Path(sys.executable), "ours" + emp, case, x_path, ours_out, repeats)
    t_ours = statistics.median(ours["times"])
    nt_s = ratio = nt_mb = err = roof = roof_ratio = ""
    rec = f"{statistics.median(ours['rec']):.3f}" if ours.get("rec") and case["arch"] != "mlp" else ""
    if not case.get("nt", True):
        nt = None
    if nt is not None:
        try:
            theirs = spawn(nt, "nt" + emp, case, x_path, nt_out, repeats)
        except RuntimeError as exc:  # keep our row; say why theirs is missing
            print(str(exc).splitlines()[0], file=sys.stderr)
            theirs = None
    if nt is not None and theirs is not None:
        t_nt = statistics.median(theirs["times"])
        nt_s, ratio, nt_mb = f"{t_nt:.3f}", f"{t_ours / t_nt:.2f}", f"{theirs['peak_mb']:.0f}"
        err = "{:.1e} / {:.1e}".format(*rel_err(ours_out, nt_out))
    if case["arch"] == "mlp":
        r = spawn(Path(sys.executable), "roofline", case, x_path, "", repeats)
        roof, roof_ratio = f"{r['roofline']:.3f}", f"{t_ours / r['roofline']:.1f}"
    return (f"{name:<15} {case['n']:>5} {t_ours:8.3f} {rec:>7} {nt_s:>8} {ratio:>8} {roof:>10} "
            f"{roof_ratio:>9} {ours['peak_mb']:8.0f} {nt_mb:>8} {err:>17} {ours['warm']:9.1f}  "
            f"load {os.getloadavg()[0]:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=DEFAULT)
    ap.add_argument("--n", type=int, default=None, help="N for the MLP cases")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scaling", default="", help="comma-separated N for our depth-3 MLP alone")
    ap.add_argument("--no-nt", action="store_true", help="skip neural-tangents (our times only)")
    ap.add_argument("--threads", type=int, default=None, help="threads of both libraries (default: theirs)")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                    help="our torch.compile'd ReLU passes: the library's rule (auto), always, never")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--x", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.case), args.x, args.out, args.repeats)))
        return

    global THREADS
    THREADS = args.threads
    nt = None if args.no_nt else nt_python()
    threads = "default threads" if THREADS is None else f"{THREADS} thread(s) each"
    print(f"load average {os.getloadavg()}, {os.cpu_count()} cores, {threads}; "
          f"median of {args.repeats} after warm-up; our compile: {args.compile}")
    head = (f"{'case':<15} {'N':>5} {'ours s':>8} {'rec s':>7} {'nt s':>8} {'ours/nt':>8} {'roofline s':>10} "
            f"{'ours/roof':>9} {'ours MB':>8} {'nt MB':>8} {'rel. err all/off':>17} {'ours 1st':>9}")
    print(head)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            case = dict(CASES[name], compile=args.compile)
            if args.n and case["arch"] == "mlp":
                case["n"] = args.n
            print(run_case(name, case, tmp, nt, args.repeats), flush=True)
        if args.scaling:
            print("\nscaling, our depth-3 MLP NNGP+NTK (d = 784)")
            print(f"{'N':>6} {'seconds':>9} {'s / N² ×1e6':>12} {'peak MB':>8}")
            for n in (int(v) for v in args.scaling.split(",")):
                case = dict(CASES["mlp3"], n=n)
                x_path = os.path.join(tmp, f"scale{n}.x.npy")
                make_inputs(case, x_path)
                r = spawn(Path(sys.executable), "ours", case, x_path, os.path.join(tmp, f"scale{n}"), 1)
                t = statistics.median(r["times"])
                print(f"{n:>6} {t:9.3f} {t / n**2 * 1e6:12.4f} {r['peak_mb']:8.0f}", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
