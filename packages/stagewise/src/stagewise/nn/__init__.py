"""Neural-network building blocks shared by stagewise's recipes."""

from stagewise.nn.transformer import (
    Block,
    CausalSelfAttention,
    RMSNorm,
    SwiGLU,
    TransformerConfig,
    TransformerLM,
    TransformerOptions,
)

__all__ = [
    "Block", "CausalSelfAttention", "RMSNorm", "SwiGLU", "TransformerConfig", "TransformerLM",
    "TransformerOptions",
]
