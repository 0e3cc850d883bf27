"""Serving trained runs: an OpenAI-compatible HTTP API with continuous batching.

`engine` (the batching loop over `fast_generate.DecodeStep`), `protocol` (request bodies and
errors), `chat` (the plain chat template), `metrics` (Prometheus), `app` (the FastAPI app),
`server` (uvicorn with a graceful drain). The command is `microtransformer serve`; see
docs/SERVING.md.
"""
