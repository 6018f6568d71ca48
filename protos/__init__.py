"""Protocol definitions (.proto) and the code generated from them by ``python -m protos.generate``."""

from google.protobuf import descriptor_pool

DESCRIPTOR_POOL = descriptor_pool.DescriptorPool()
"""slimserve's own descriptor pool, so the stock Triton client can share a process with this package."""
