"""Decoding paths over the model's one-token step (`model.generation.decode_step`).

`step`: `DecodeStep`, a fixed-shape KV cache with per-row columns and the one-token step over
it, optionally compiled (`CompiledOrEager`); the serve engine's continuous batching runs on it.
`generator`: `AutoPathGenerator`, `MicroTransformer.generate` on the eager decoder or on a
compiled `DecodeStep` (`FixedShapeDecoder`), whichever `choose_decode_path` (the path rule, a
pure function of the request and measured costs) picks. Precision helpers are in
`microtransformer.device`.
"""
