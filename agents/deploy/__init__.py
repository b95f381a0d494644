"""A trained policy outside training: ``export`` writes ``policy.onnx`` and its ``policy.json``
sidecar (torch, the ``train`` extra), ``runtime`` runs them with numpy and onnxruntime alone, and
``vllm_adapter`` puts any servegym policy inside vLLM's scheduler. ``runtime`` and
``vllm_adapter`` need only the base install; import the modules themselves, this package
re-exports nothing."""
