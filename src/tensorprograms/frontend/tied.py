"""Parameters that are equal at initialization: deep copies of one layer.

``nn.TransformerEncoder(layer, L)`` (and ``nn.TransformerDecoder``) builds its L layers with
``copy.deepcopy(layer)``: at initialization every layer has the *same* weights, so the
network is a weight-shared one and its limit differs from that of independent layers. The
frontend sees distinct parameters; it recognizes the copies by value (equal at both capture
widths, and not constant) and lowers them as one parameter.
"""

from __future__ import annotations

import torch


def tied_parameters(modules: tuple[torch.nn.Module, torch.nn.Module]) -> dict[str, str]:
    """``{name: name of the first parameter equal to it}`` for parameters that equal an
    earlier one (in ``named_parameters`` order) at both widths; constant tensors (zeros, ones:
    biases and LayerNorm gains) are not ties, their value carries no randomness."""
    small, large = (dict(m.named_parameters()) for m in modules)
    seen: dict[tuple, list[str]] = {}
    tied: dict[str, str] = {}
    for name, p in small.items():
        flat = p.detach().reshape(-1)
        if flat.numel() < 2 or bool((flat == flat[0]).all()):
            continue
        key = (tuple(p.shape), float(flat[0]), float(flat[-1]))
        for other in seen.get(key, []):
            if torch.equal(p, small[other]) and torch.equal(large[name], large[other]):
                tied[name] = other
                break
        else:
            seen.setdefault(key, []).append(name)
    return tied
