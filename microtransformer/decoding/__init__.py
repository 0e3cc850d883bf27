"""Decoding paths over the model's one-token step (`model.generation.decode_step`).

`step`: `DecodeStep`, a fixed-shape KV cache with per-row columns and the one-token step over
it, optionally compiled (`CompiledOrEager`); the serve engine's continuous batching runs on it.
`aot`: `AOTDecodeStep`, the step compiled ahead of time into an AOTInductor package cached on
disk per model shape, batch and precision, and `AOTDecoder` over it.
`generator`: `AutoPathGenerator`, `MicroTransformer.generate` on the eager decoder or on the
packaged step, whichever `choose_decode_path` (the path rule, a pure function of the request
and measured costs) picks. Precision helpers are in `microtransformer.device`.
"""
