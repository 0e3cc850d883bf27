"""micro-transformer: the toolkit around the `model` package.

Tokenizers, corpus preparation, training, evaluation, generation, export and the CLI live here;
the network itself lives in the top-level `model` package and does no I/O.
"""

__version__ = "0.1.0"
