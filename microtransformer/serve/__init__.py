"""Serving trained runs: an OpenAI-compatible HTTP API with continuous batching.

The engine (`engine`, one thread per model) in three parts: `scheduler` (admission, slot
packing, buckets; pure), `runner` (the model step on `decoding.step.DecodeStep`), and `sampler`
(batched sampling) with `output` (incremental detokenization by `detokenizer`, stop strings,
logprobs); `choice` holds what they share. The HTTP side: `app` (assembles the FastAPI app),
`routes` (one module per endpoint), `responses` (OpenAI formats, SSE), `errors`, `middleware`,
`state`, `protocol` (request bodies), `chat` (the plain chat template), `metrics`
(Prometheus), `loading` (run directory -> served model), `server` (uvicorn with a graceful
drain). The command is `microtransformer serve`; see docs/SERVING.md.
"""
