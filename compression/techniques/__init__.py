"""Compression techniques: a frozen config plus a registered transform each (see ``registry``).

Importing this package registers every technique, so ``registry.config_from_dict`` knows them all.
"""

from compression.techniques import bn_folding as bn_folding  # noqa: F401 - registers "bn_fold"
from compression.techniques import clipping as clipping  # noqa: F401 - registers "weight_clip"
from compression.techniques import clustering as clustering  # noqa: F401 - registers "weight_cluster"
from compression.techniques import structured_pruning as structured_pruning  # noqa: F401 - registers "channel_prune"
from compression.techniques import student as student  # noqa: F401 - registers "student"
from compression.techniques import unstructured_pruning as unstructured_pruning  # noqa: F401 - registers "magnitude_prune"
