"""stagewise-koopman: a Koopman-operator auxiliary loss on a language model's hidden states.

Per source layer l a lifting φ_l, a linear operator K_l and a decoder ψ_l are trained so that
K_l φ_l(h) predicts the lifted next state (the next layer, or the next position), following
Lusch, Kutz & Brunton 2018. This module imports nothing heavy: the names below load on first
access, so ``stagewise plugins`` never imports torch because of this package.
"""

from __future__ import annotations

from stagewise.lazy import lazy_attributes

__version__ = "0.1.0"

__all__ = ["KoopmanModules", "KoopmanOperator", "KoopmanOptions", "__version__", "dmd_operator",
           "fit_post_hoc", "koopman_forward_logits", "koopman_parts", "load_term"]

_LAZY = {
    "KoopmanModules": "stagewise_koopman.operator",
    "KoopmanOperator": "stagewise_koopman.loss",
    "KoopmanOptions": "stagewise_koopman.loss",
    "koopman_parts": "stagewise_koopman.loss",
    "dmd_operator": "stagewise_koopman.dmd",
    "koopman_forward_logits": "stagewise_koopman.forward_mode",
    "load_term": "stagewise_koopman.forward_mode",
    "fit_post_hoc": "stagewise_koopman.linearity",
}


__getattr__ = lazy_attributes(__name__, _LAZY)
