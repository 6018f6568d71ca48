"""The deploy-time search: config -> candidates -> measure (latency, fidelity) -> choose -> cache and report."""
