"""Static assets of the web page `export --format web` writes (`static/`)."""
