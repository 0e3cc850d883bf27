"""The micro-transformer network: a small GPT-style causal language model.

This package is the network only: no file I/O beyond `utils.save/load_model_config`, no
printing, no argument parsing, no process groups.
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
