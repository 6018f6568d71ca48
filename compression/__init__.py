"""The compression library, in layers that import downwards only (checked by ``lint-imports``):

``models`` (what a served model is: sources, loading, image preprocessing, the bundled digits model)
-> ``runtimes`` (the :class:`~compression.runtimes.predictor.Predictor` interface and its runtimes)
-> ``techniques`` (transforms: pruning, clustering, clipping, BN folding, students, distillation)
-> ``search`` (candidates, measurement, selection, cache, reports). Nothing here imports ``server``.
"""
