"""``tp.kernel_matrix``: NNGP/NTK matrices of any size, block by block, resumable.

The ``[N1, N2]`` matrices are computed in ``block_size × block_size`` tiles, so working
memory is bounded by one tile's computation whatever N is. With ``out=`` the tiles are
streamed into one ``.npy`` file per kernel (a memory map) and a record of finished tiles,
``state.json``, is replaced atomically after each tile's data is flushed: a run killed at
any point resumes where it stopped, and since every tile is a deterministic function of
its inputs, the resumed matrix equals an uninterrupted run's bit for bit.

With a Dask ``distributed.Client`` the tiles are computed on its workers. The limit is
sent as its recipe (``pickle`` of an :class:`~tensorprograms.InfiniteWidthLimit` is the
factory, the example inputs, the settings and the σ² values) and rebuilt once per worker
process; the client writes the tiles as they arrive.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import pickle
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .frontend.limit import InfiniteWidthLimit

KINDS = ("nngp", "ntk")
STATE = "state.json"
FORMAT = 1  # bump when the on-disk layout changes


def _as_inputs(x, name: str) -> tuple[torch.Tensor, ...]:
    xs = (x,) if isinstance(x, torch.Tensor) else x
    if not isinstance(xs, (tuple, list)) or not xs or not all(isinstance(t, torch.Tensor) for t in xs):
        raise TypeError(f"{name} must be a tensor or a tuple of tensors (batch on dim 0)")
    xs = tuple(t.detach().to(torch.float64).contiguous() for t in xs)
    if len({t.shape[0] for t in xs}) != 1:
        raise ValueError(f"{name}: the tensors have different batch sizes {[t.shape[0] for t in xs]}")
    return xs


def _check_inputs(limit: InfiniteWidthLimit, xs: tuple[torch.Tensor, ...], name: str) -> None:
    want = limit.example_inputs
    if len(xs) != len(want) or any(a.shape[1:] != b.shape[1:] for a, b in zip(xs, want)):
        got = [tuple(a.shape) for a in xs]
        shapes = [("N", *b.shape[1:]) for b in want]
        raise ValueError(f"{name} has shapes {got}; the model takes {shapes} (batch first).")
    for t in xs:
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or Inf; clean the inputs first.")


def _digest(xs: Sequence[torch.Tensor] | None) -> str | None:
    if xs is None:
        return None
    h = hashlib.sha256()
    for t in xs:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _fingerprint(limit, xs1, xs2, kinds, block_size) -> dict:
    """What identifies a computation: a state file with another fingerprint is refused."""
    f = limit.factory
    while hasattr(f, "func"):  # functools.partial: name the function (reprs of its args hold addresses)
        f = f.func
    factory = f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"
    hyper = {k: float(v.detach()) for k, v in sorted(limit.hyperparameters.items())}
    return {
        "format": FORMAT, "factory": factory, "parametrization": _text(limit.parametrization),
        "nominal_width": getattr(limit, "nominal_width", None),
        "widths": list(limit.widths), "hyperparameters": hyper, "kinds": list(kinds),
        "block_size": block_size, "x1": _digest(xs1), "x2": _digest(xs2),
        "shape": [xs1[0].shape[0], (xs2 or xs1)[0].shape[0]],
    }


def _text(value) -> str:
    """A JSON-able, process-independent description (a name, or a dataclass's repr)."""
    return value if isinstance(value, str) else repr(value)


def _tiles(n1: int, n2: int, b: int, symmetric: bool) -> list[tuple[int, int]]:
    """Tile indices (i, j); for a symmetric matrix only those on or above the diagonal."""
    t1, t2 = -(-n1 // b), -(-n2 // b)
    return [(i, j) for i in range(t1) for j in range(t2) if not symmetric or j >= i]


def compute_tile(limit, xs1, xs2, i: int, j: int, b: int, kinds: tuple[str, ...]) -> list[np.ndarray]:
    """One tile ``[rows_i, cols_j]`` of each kernel in ``kinds`` (``xs2 is None``: symmetric).

    A diagonal tile of a symmetric matrix is computed as the kernel of its rows with
    themselves and symmetrized, so the whole matrix is exactly symmetric."""
    rows = slice(i * b, (i + 1) * b)
    cols = slice(j * b, (j + 1) * b)
    a = tuple(t[rows] for t in xs1)
    if xs2 is None and i == j:
        c = None
    else:
        c = tuple(t[cols] for t in (xs1 if xs2 is None else xs2))
    a1 = a[0] if len(a) == 1 else a
    c1 = None if c is None else (c[0] if len(c) == 1 else c)
    if "ntk" in kinds:
        K, T = limit.kernels(a1, c1)
        got = {"nngp": K, "ntk": T}
    else:
        got = {"nngp": limit.nngp(a1, c1)}
    tiles = [got[k].detach().numpy().copy() for k in kinds]
    del got
    # a tile's program and limit form reference cycles: free their N² caches now, not when
    # the cyclic collector next runs, so memory stays that of one tile
    gc.collect()
    if c is None:  # the engine's sums are symmetric only to rounding; make the matrix exactly so
        tiles = [(t + t.T) / 2 for t in tiles]
    return tiles


# ---------------------------------------------------------------- on-disk state
def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)  # atomic on POSIX: readers see the old record or the new one


class _Store:
    """Where tiles go: memory maps and a record of finished tiles, or plain arrays."""

    def __init__(self, out, fingerprint: dict, kinds, shape):
        self.kinds = kinds
        self.done: set[tuple[int, int]] = set()
        self.dir = None if out is None else Path(out)
        if self.dir is None:
            self.arrays = {k: np.empty(shape, dtype=np.float64) for k in kinds}
            return
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"out={str(self.dir)!r} is a file; kernel_matrix writes a directory there.")
        self.dir.mkdir(parents=True, exist_ok=True)
        state_path = self.dir / STATE
        self.state = {"fingerprint": fingerprint, "done": []}
        if state_path.exists():
            old = json.loads(state_path.read_text())
            if old.get("fingerprint") != fingerprint:
                diff = sorted(k for k in set(fingerprint) | set(old.get("fingerprint", {}))
                              if old.get("fingerprint", {}).get(k) != fingerprint.get(k))
                raise ValueError(
                    f"out={str(self.dir)!r} holds a different computation (it differs in {diff}); "
                    "pass a new path, or delete the directory to start over."
                )
            self.state = old
            self.done = {tuple(t) for t in old["done"]}
            self.arrays = {k: np.load(self.dir / f"{k}.npy", mmap_mode="r+") for k in kinds}
            return
        ours = {f"{k}.npy" for k in kinds} | {STATE + ".tmp"}  # left by a run killed before its first record
        others = [p.name for p in self.dir.iterdir() if p.name not in ours]
        if others:
            raise ValueError(
                f"out={str(self.dir)!r} contains {others[:5]} but no {STATE}: not a kernel_matrix "
                "output; pass an empty or new directory."
            )
        self.arrays = {
            k: np.lib.format.open_memmap(self.dir / f"{k}.npy", mode="w+", dtype=np.float64, shape=shape)
            for k in kinds
        }
        _write_json_atomic(state_path, self.state)

    def write(self, i: int, j: int, b: int, tiles: list[np.ndarray], symmetric: bool) -> None:
        for k, t in zip(self.kinds, tiles):
            arr = self.arrays[k]
            arr[i * b:i * b + t.shape[0], j * b:j * b + t.shape[1]] = t
            if symmetric and i != j:
                arr[j * b:j * b + t.shape[1], i * b:i * b + t.shape[0]] = t.T
        self.done.add((i, j))
        if self.dir is None:
            return
        for arr in self.arrays.values():
            arr.flush()  # the data is on disk before the record says so
        self.state["done"] = sorted(self.done)
        _write_json_atomic(self.dir / STATE, self.state)

    def result(self) -> dict[str, np.ndarray]:
        if self.dir is None:
            return self.arrays
        return {k: np.load(self.dir / f"{k}.npy", mmap_mode="r") for k in self.kinds}


# ---------------------------------------------------------------- Dask workers
_WORKER_LIMITS: dict[str, tuple[object, threading.Lock]] = {}
_WORKER_LOCK = threading.Lock()


def _worker_tile(blob: bytes, token: str, xs1, xs2, i, j, b, kinds):
    """Runs on a worker: the limit is rebuilt once per process and shared by its threads
    (one tile at a time per limit: the lowering caches are not thread-safe)."""
    with _WORKER_LOCK:
        if token not in _WORKER_LIMITS:
            _WORKER_LIMITS[token] = (pickle.loads(blob), threading.Lock())
        limit, lock = _WORKER_LIMITS[token]
    with lock:
        return compute_tile(limit, xs1, xs2, i, j, b, kinds)


def _run_dask(client, limit, xs1, xs2, todo, b, kinds, on_tile) -> None:
    from distributed import as_completed

    try:
        blob = pickle.dumps(limit)
    except Exception as e:  # pickle raises several types for unpicklable closures
        raise TypeError(
            "kernel_matrix(client=...) sends the limit to the workers as its recipe, but its "
            f"factory does not pickle ({type(e).__name__}: {e}); define the factory at module "
            "level (a class or function) or use functools.partial."
        ) from e
    token = hashlib.sha256(blob).hexdigest()
    blob_f, xs1_f = client.scatter([blob, xs1], broadcast=True, hash=False)
    xs2_f = None if xs2 is None else client.scatter([xs2], broadcast=True, hash=False)[0]
    inflight = max(2, 2 * len(client.scheduler_info().get("workers", {})))
    pending = list(todo)

    def submit(t):
        return client.submit(_worker_tile, blob_f, token, xs1_f, xs2_f, t[0], t[1], b, kinds, pure=False)

    futures: dict[str, tuple[int, int]] = {}
    ac = as_completed()

    def launch():
        t = pending.pop(0)
        f = submit(t)
        futures[f.key] = t
        ac.add(f)

    for _ in range(min(inflight, len(pending))):
        launch()
    for f in ac:
        t = futures.pop(f.key)
        on_tile(t, f.result())  # bounded memory: a tile is written and dropped as it arrives
        f.release()
        if pending:
            launch()


# ---------------------------------------------------------------- public
def kernel_matrix(
    limit: InfiniteWidthLimit,
    x1,
    x2=None,
    kinds: Sequence[str] = KINDS,
    block_size: int = 1024,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    client=None,
) -> dict[str, np.ndarray]:
    """NNGP and/or NTK matrices ``[N1, N2]`` (float64) of ``limit``, computed tile by tile.

    Args:
        limit: from :func:`tp.infinite_width`.
        x1, x2: inputs (a tensor or tuple of tensors, batch on dim 0); ``x2=None`` means
            ``x2 = x1``, and then only tiles on and above the diagonal are computed.
        kinds: which kernels, a subset of ``("nngp", "ntk")``.
        block_size: tile side; working memory grows like its square. Programs within the
            batched recursion (MLPs and CNNs with closed-form activations, see
            docs/frontend.md) compute an off-diagonal tile as its ``b × b`` cross block alone;
            the engine computes it as the kernel of the ``2·block_size`` inputs of its rows
            and columns.
        out: a directory: ``<kind>.npy`` (one float64 ``.npy`` per kernel, written through
            a memory map) and ``state.json`` (the computation's fingerprint and the finished
            tiles). Calling again with the same arguments resumes; a directory holding a
            different computation is refused. ``None`` keeps the result in memory.
        progress: show a tqdm bar over tiles.
        client: a Dask ``distributed.Client``: tiles are computed on its workers (the
            factory must pickle); results are written by this process.

    Returns:
        ``{kind: array [N1, N2]}``: read-only memory maps of the files when ``out`` is
        given, else in-memory arrays.
    """
    if not isinstance(limit, InfiniteWidthLimit):
        raise TypeError(f"limit must come from tp.infinite_width, got {type(limit).__name__}")
    kinds = tuple(kinds) if not isinstance(kinds, str) else (kinds,)
    if not kinds or len(set(kinds)) != len(kinds) or any(k not in KINDS for k in kinds):
        raise ValueError(f"kinds must be distinct names from {KINDS}, got {kinds}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    xs1 = _as_inputs(x1, "x1")
    _check_inputs(limit, xs1, "x1")
    xs2 = None
    if x2 is not None:
        xs2 = _as_inputs(x2, "x2")
        _check_inputs(limit, xs2, "x2")
    symmetric = xs2 is None
    shape = (xs1[0].shape[0], (xs2 or xs1)[0].shape[0])
    b = block_size
    store = _Store(out, _fingerprint(limit, xs1, xs2, kinds, b), kinds, shape)
    tiles = _tiles(*shape, b, symmetric)
    todo = [t for t in tiles if t not in store.done]
    bar = tqdm(total=len(tiles), initial=len(tiles) - len(todo), disable=not progress,
               desc="kernel tiles", unit="tile")

    def on_tile(t, values):
        store.write(t[0], t[1], b, values, symmetric)
        bar.update(1)

    try:
        if client is None:
            for t in todo:
                on_tile(t, compute_tile(limit, xs1, xs2, t[0], t[1], b, kinds))
        else:
            _run_dask(client, limit, xs1, xs2, todo, b, kinds, on_tile)
    finally:
        bar.close()
    return store.result()
