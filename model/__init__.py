"""The micro-transformer network: a small GPT-style causal language model.

This package is the network only: no printing, no argument parsing, no process groups, and no
file I/O beyond its own files (`model.io`: config.json and safetensors weights, written
atomically). It imports nothing from `microtransformer`.
"""

from .attention import KVCache, MultiHeadAttention
from .layers import FeedForward, LayerNorm, PositionEmbedding, TokenEmbedding, TransformerBlock
from .transformer import MicroTransformer, ModelConfig

__all__ = [
    "FeedForward",
    "KVCache",
    "LayerNorm",
    "MicroTransformer",
    "ModelConfig",
    "MultiHeadAttention",
    "PositionEmbedding",
    "TokenEmbedding",
    "TransformerBlock",
]
