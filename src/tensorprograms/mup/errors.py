"""Errors raised by :mod:`tensorprograms.mup`."""


class MupError(ValueError):
    """A model, factory or argument that μP cannot be applied to; the message says why
    and what to change."""
