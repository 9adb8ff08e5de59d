"""stagewise-lego-ashem: LEGO blocks trained in phases, ASHEM per-token hard-example mining,
and routed early exit that really skips the upper layers' work for tokens that exit.

Imports nothing heavy; the components live in ``model``, ``router``, ``mining``, ``routed``,
``evaluation``, ``metrics``, ``timing``, ``probe``, ``rows`` and ``stages`` and are registered
by ``plugin``.
"""

__version__ = "0.1.0"
