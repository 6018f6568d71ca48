"""The model layer: what a served model is before any compression (sources, loading, graph import,
image preprocessing, the bundled ``digits`` model). Shared by the compression search and the server."""
