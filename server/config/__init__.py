"""The deploy config: YAML -> validated settings, before anything listens."""
