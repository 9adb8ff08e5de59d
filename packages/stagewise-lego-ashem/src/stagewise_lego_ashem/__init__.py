"""stagewise-lego-ashem: LEGO blocks trained in phases, ASHEM per-token hard-example mining,
and routed early exit that really skips the upper layers' work for tokens that exit.

Imports nothing heavy: the components live in ``model``, ``router``, ``mining``, ``routed``,
``evaluation``, ``metrics``, ``timing``, ``probe``, ``rows`` and ``stages`` and are registered
by ``plugin``; ``load_router`` (a finished run's calibrated router, from ``load``) loads on
first access.
"""

from __future__ import annotations

from stagewise.lazy import lazy_attributes

__version__ = "0.1.0"

__all__ = ["__version__", "load_router"]

_LAZY = {"load_router": "stagewise_lego_ashem.load"}


__getattr__ = lazy_attributes(__name__, _LAZY)
