"""llama.cpp (through llama-cpp-python's C API) as a `chattui bench` baseline on the same GGUF file.

The loop is ours, on the low-level API (llama_decode on llama_batch_get_one, logits of the last
position, argmax in numpy), so llama.cpp does exactly the work we time for chattui: one prefill of
the prompt ids, then one decode step per greedy token, no sampling chain, no Python-side scores
buffer. llama-cpp-python is the `bench` extra, built from source with native CPU flags (README).
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from engine.errors import EngineError
from engine.gguf.header import open_gguf

INSTALL_HINT = ("--compare-llamacpp needs llama-cpp-python: "
                "CMAKE_ARGS=\"-DGGML_NATIVE=ON\" pip install -e \".[bench]\" --no-binary llama-cpp-python")


def import_llama_cpp():
    """The llama_cpp module, or a one-line EngineError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise EngineError(INSTALL_HINT) from None
    return llama_cpp


def gguf_bytes_per_token(path: Path) -> int:
    """Bytes of the file's tensors one decode step reads: all but an input-only token_embd."""
    tensors = open_gguf(path).tensors
    untied = any(t.name == "output.weight" for t in tensors)
    return sum(int(t.n_bytes) for t in tensors if not (untied and t.name == "token_embd.weight"))


class LlamaCppRunner:
    """One llama.cpp model and context on `path`, sized for prompt + new tokens, on `threads` threads."""

    def __init__(self, path: Path, threads: int, context: int):
        llama_cpp = import_llama_cpp()
        self._api = llama_cpp
        self._silence = llama_cpp.llama_log_callback(lambda level, text, user_data: None)  # kept: C holds it
        llama_cpp.llama_log_set(self._silence, ctypes.c_void_p())
        llama_cpp.llama_backend_init()
        # llama.cpp's AMX weight layout (chosen when it is built with native flags on a CPU with AMX)
        # segfaults in ggml_backend_amx_mul_mat on batches of 2+ tokens in 0.3.36 (llama.cpp#20824;
        # oneDNN's AMX works on the same CPU), so on such CPUs the extra layouts (AMX and CPU repack) are off.
        self.extra_layouts = b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()
        model_params = llama_cpp.llama_model_default_params()
        model_params.use_extra_bufts = self.extra_layouts
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise EngineError(f"{path}: llama.cpp cannot load this file")
        context_params = llama_cpp.llama_context_default_params()
        context_params.n_ctx = context
        context_params.n_batch = context_params.n_ubatch = context  # the prompt is one batch, as in ours
        context_params.n_threads = context_params.n_threads_batch = threads
        context_params.no_perf = True
        self._context = llama_cpp.llama_init_from_model(self._model, context_params)
        if not self._context:
            raise EngineError(f"{path}: llama.cpp cannot make a context of {context} positions")
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self._model))

    def reset(self) -> None:
        """Empty the KV cache: the next greedy_after starts a new sequence at position 0."""
        self._api.llama_memory_clear(self._api.llama_get_memory(self._context), True)

    def greedy_after(self, ids: list[int]) -> int:
        """Feed ids after what the cache holds (one batch); the argmax of the last position's logits."""
        api = self._api
        batch_ids = (api.llama_token * len(ids))(*ids)
        status = api.llama_decode(self._context, api.llama_batch_get_one(batch_ids, len(ids)))
        if status != 0:
            raise EngineError(f"llama.cpp's llama_decode failed with status {status}")
        logits = np.ctypeslib.as_array(api.llama_get_logits_ith(self._context, -1), shape=(self.vocab_size,))
        return int(logits.argmax())

    def close(self) -> None:
        self._api.llama_free(self._context)
        self._api.llama_model_free(self._model)
