"""Model profiles and weight preparation, shared by extraction, tuning and serving.

``bemerc.models.profiles`` reads a profile (which weights each stage uses, pinned by sha256) and
prepares packaged weights into standard local model folders once; ``bemerc.models.weights`` holds
the conversions (CTranslate2 Whisper -> openai-whisper, GGUF -> safetensors). Neither imports a
stage package, so ``extract``, ``train`` and ``serve`` can all use them.
"""
