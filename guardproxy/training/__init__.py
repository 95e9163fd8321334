"""Training of the guard model (needs the ``train`` extra: torch, transformers, onnx, scikit-learn).

Modules: ``sources`` (reading the shared data into labelled examples), ``categories`` (source category ->
taxonomy id), ``splits`` (group-aware dev / calibration / train splits), ``model`` (the multi-task encoder),
``loop`` (training and distillation), ``export`` (ONNX int8), ``metrics`` and ``card`` (reports).
Nothing here is imported by the gateway.
"""
