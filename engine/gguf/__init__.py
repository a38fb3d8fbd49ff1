"""GGUF files (llama.cpp's format) as a second source of models beside Hugging Face checkpoint folders.

`header` (torch-free) opens a file and summarises it for the model picker; `config` turns its
metadata into our model configs, `tensors` maps and dequantizes its weights, `tokenizer` builds
the tokenizer from `tokenizer.ggml.*`. The other way, `writer` writes a model as a GGUF file llama.cpp
loads, with `quantize` (our Q8_0/Q4_0/Q4_1 blocks) and `vocab` (the tokenizer as `tokenizer.*` metadata).
"""

from engine.gguf.header import (
    SUPPORTED_GGUF_ARCHITECTURES,
    GGUFFile,
    GGUFSummary,
    is_gguf_path,
    open_gguf,
    summarize_gguf,
)

__all__ = ["SUPPORTED_GGUF_ARCHITECTURES", "GGUFFile", "GGUFSummary", "is_gguf_path", "open_gguf", "summarize_gguf"]
