"""Names every layer agrees on: the served tensors' names and the unmodified variant's name."""

INPUT_NAME = "input"
"""The model's one input tensor: float32 (B, C, H, W), preprocessed (KServe v2 and exported graphs)."""
OUTPUT_NAME = "logits"
"""The model's one output tensor: float32 (B, classes)."""
ORIGINAL = "original"
"""The variant that runs the model as loaded; compressed variants are measured against it."""
