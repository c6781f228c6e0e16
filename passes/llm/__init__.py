"""The LLM passes: ``substitute-attention`` (the paged inference form), ``quantize`` /
``fuse-quant`` / ``quantize-kv-cache`` and the calibration set they read
(:mod:`.calibration`, ``calibration.txt``)."""
