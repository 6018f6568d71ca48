"""Runtimes: one :class:`~compression.runtimes.predictor.Predictor` interface and the modules that realize it
(eager torch.export, AOTInductor, ONNX Runtime), listed by name in ``registry``."""
