"""Lowering rule for ``nn.Embedding`` as the input layer of a sequence model.

An embedding with a finite vocabulary V and a width-sized embedding dim is one-hot(token)
times a V × n matrix: each token's row is an iid Gaussian vector in the limit, with the
per-entry variance of the initialization (``nn.Embedding``'s default N(0, 1) does not
depend on the width, as an input layer's variance must not). In the program the table is
one initial vector of finite shape (V,) with independent entries (``Cov = σ²·I_V``), and
looking tokens up is a gather over that finite index: a LinComb.
"""

from __future__ import annotations

import torch

from .lower import Lowering, _tp_name, rule
from .values import Data, Param, Vec

aten = torch.ops.aten


@rule(aten.embedding.default)
def _embedding(low: Lowering, node, args, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    """nn.Embedding (finite vocabulary, width-sized dim): a gather of iid Gaussian rows."""
    weight, ids = args[0], args[1]
    if not isinstance(weight, Param) or weight.width_axes != (1,):
        raise low.unsupported(
            "an embedding whose table is not (vocabulary, c·width): the vocabulary must be "
            "finite and the embedding dim proportional to the width."
        )
    if not isinstance(ids, Data):
        raise low.unsupported("an embedding looked up with indices computed from activations")
    if low.init_mean(weight) != (0.0, 0.0):
        raise low.unsupported(f"the embedding {weight.name} has a nonzero initial mean")
    V = weight.shape[0]
    if weight.name not in low._columns:
        v = low.input_variance(weight, "nn.Embedding's default N(0, 1) qualifies.")
        low._columns[weight.name] = low.new_vector(weight.name, _tp_name(weight.name), shape=(V,),
                                                   variance=v)
    table = low._columns[weight.name]
    index = ids.value.long()
    if index.numel() and (index.min() < 0 or index.max() >= V):
        raise ValueError(
            f"token ids must lie in [0, {V}) for {weight.name}; got {index.min()}..{index.max()}.")

    def lookup(u, _i=index):
        return u[..., _i]

    lookup.__name__ = "embedding"
    g = low.program.linear(lookup, table, label=f"{table.name}[tokens]")
    return Vec(g, low.shape(node), low.width_axis(node))
