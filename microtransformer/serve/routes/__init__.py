"""The server's routes by endpoint: `completions`, `chat`, `models` (health, models, metrics),
`tokenize`, `playground`; what they share (model choice, prompt checks, auth, queueing a
request on the engine) is in `common`."""
