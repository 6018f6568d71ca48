"""What the server tells operators: Prometheus metrics, GPU metrics, KServe inference statistics."""
