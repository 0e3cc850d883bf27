"""One module per CLI subcommand; see `microtransformer.cli` for the contract."""
