"""Named nonlinearities with closed-form Gaussian expectations (``tp.functions``)."""

from .program.functions import (  # noqa: F401
    Affine,
    Elementwise,
    LeakyReLU,
    abs,
    affine,
    cos,
    erf,
    exp,
    identity,
    leaky_relu,
    product,
    relu,
    sin,
    step,
)
