"""The served variants of each model: the registry, the original's predictor, the compressed variant's
hot swap, the shadow comparison between them and the guardrail that rolls back."""
