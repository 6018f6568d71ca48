"""Dynamic batching: requests -> batches -> one forward pass each, on the model's inference thread."""
