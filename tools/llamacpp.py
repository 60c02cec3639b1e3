"""llama.cpp's own runtime, prebuilt, for tests and benchmarks: GGUF load, tokens, logits, greedy, perplexity, quantize.

Why this exists: the reference for a GGUF file is llama.cpp itself, and the usual Python route to it,
llama-cpp-python, ships on PyPI only as a source tarball (it compiles llama.cpp: minutes on 2 cores).
`llama-cpp-cffi==0.4.42` ships a manylinux_2_34 wheel with llama.cpp (March 2025) already compiled as a cffi
extension, `llama/_llama_cpp_cpu.cpython-311-x86_64-linux-gnu.so`, that exposes llama.cpp's C API (llama.h)
as it is. Its Python package needs transformers<5 and imports it from `llama/__init__.py`, so it is installed
with `pip install --no-deps llama-cpp-cffi==0.4.42` (tools/install.sh) and only the CPU extension is loaded
here, from its file, without running the package's `__init__`.

One quirk: the extension was built with GCC 14 and names `__cxa_call_terminate` (GCC 14's libstdc++, absent
from older ones such as Debian 12's). It is called only through the PLT, on the path where an exception leaves
a noexcept function (std::terminate anyway), so the extension is opened with RTLD_LAZY and that symbol is
never bound.

    llm = LlamaCpp("model.gguf", n_ctx=512)       # CPU, 2 threads, float32 KV cache
    ids = llm.tokenize("Hello")                    # special tokens parsed, nothing added
    llm.logits(ids)                                # float32 [len(ids), n_vocab]
    llm.greedy(ids, 16)                            # 16 new tokens (fewer at an end-of-generation token)
    llm.perplexity(stream, n_ctx=512)              # llama-perplexity's scoring: second half of each window
    quantize("model-f16.gguf", "model-q4_k.gguf", "q4_k")   # llama-quantize Q4_K_M

Everything here calls llama.h's functions directly through cffi (`ffi`, `lib` of the extension); signatures
are those of the wheel's cdef (see `signatures()`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WHEEL = "llama-cpp-cffi==0.4.42"
INSTALL = f"pip install --no-deps {WHEEL}"
N_THREADS = 2

QUANT_FTYPES = {
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q4_k": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_k_s": "LLAMA_FTYPE_MOSTLY_Q4_K_S",
}
"""Quant names -> llama.cpp's file types (`llama-quantize in.gguf out.gguf Q8_0|Q4_0|Q4_K_M|Q4_K_S`). q4_k is Q4_K_M,
llama.cpp's usual 4-bit K choice (Q6_K for half of attn_v / ffn_down); `llmhpc convert quant=q4_k` writes Q4_K_S's types
(but Q8_0 for Q6_K)."""

_lock = threading.Lock()
_loaded: tuple | None = None
_log: deque[str] = deque(maxlen=50)


CONVERTER_SDIST = "llama-cpp-python==0.3.36"
"""The PyPI source tarball that carries llama.cpp's own converter (vendor/llama.cpp/convert_hf_to_gguf.py, with its
`conversion` package and gguf-py): the one place it ships on a package registry."""


def converter_script(cache: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, unpacked once under `cache` from CONVERTER_SDIST (pip download); it runs
    with torch, transformers, numpy and sentencepiece (which it imports for every Llama, even a BPE one)."""
    import subprocess
    import tarfile

    root = cache / CONVERTER_SDIST.replace("==", "-")
    script = root / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    download = cache / "download"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    CONVERTER_SDIST, "-d", str(download)], check=True)  # fmt: skip
    tarball = next(download.glob("llama_cpp_python-*.tar.gz"))
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(tarball) as tar:
        prefix = f"{tar.getmembers()[0].name.split('/')[0]}/vendor/llama.cpp/"
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
        for member in members:
            member.name = member.name[len(prefix):]
        tar.extractall(root, members=members, filter="data")
    return script


class LlamaCppError(RuntimeError):
    """A llama.cpp call failed; the message ends with llama.cpp's last log lines."""


def _extension_path() -> Path | None:
    spec = importlib.util.find_spec("llama")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("_llama_cpp_cpu*.so"))
        if found:
            return found[0]
    return None


def unavailable_reason() -> str | None:
    """None when the prebuilt llama.cpp can be loaded, else why not (for pytest.skip)."""
    if _extension_path() is None:
        return f"llama.cpp's prebuilt CPU runtime is not installed ({INSTALL})"
    try:
        load()
    except (ImportError, OSError) as exc:
        return f"llama.cpp's prebuilt CPU runtime ({WHEEL}) does not load here: {exc}"
    return None


def load():
    """(ffi, lib) of the extension: loaded once, llama.cpp's log captured (see `last_log`), backend initialized."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        path = _extension_path()
        if path is None:
            raise ImportError(f"llama.cpp's prebuilt CPU runtime is not installed ({INSTALL})")
        spec = importlib.util.spec_from_file_location("_llama_cpp_cpu", path)
        flags = sys.getdlopenflags()
        sys.setdlopenflags(os.RTLD_LAZY | os.RTLD_LOCAL)  # see the module docstring: __cxa_call_terminate
        try:
            module = importlib.util.module_from_spec(spec)  # dlopen happens here
            spec.loader.exec_module(module)
        finally:
            sys.setdlopenflags(flags)
        ffi, lib = module.ffi, module.lib

        # The wheel declares one `extern "Python"` log callback; llama.cpp writes to stderr without it.
        @ffi.def_extern(name="llama_cpp_cffi_ggml_log_callback")
        def _on_log(level, text, user_data):
            _log.append(ffi.string(text).decode("utf-8", "replace"))

        lib.llama_log_set(lib.llama_cpp_cffi_ggml_log_callback, ffi.NULL)
        lib.llama_backend_init()
        _loaded = (ffi, lib)
        return _loaded


def last_log(n: int = 10) -> str:
    """llama.cpp's last n log lines (it logs in pieces; joined)."""
    return "".join(list(_log)[-n:]).strip()


def _fail(what: str) -> LlamaCppError:
    return LlamaCppError(f"{what}; llama.cpp said:\n{last_log()}")


def signatures(names: Sequence[str] = ()) -> dict[str, str]:
    """The C types of the llama.h functions used here (or of `names`), as the extension's cdef declares them."""
    ffi, lib = load()
    names = names or (
        "llama_backend_init", "llama_model_default_params", "llama_model_load_from_file",
        "llama_context_default_params", "llama_init_from_model", "llama_model_get_vocab", "llama_vocab_n_tokens",
        "llama_vocab_is_eog", "llama_tokenize", "llama_batch_init", "llama_batch_free", "llama_decode",
        "llama_get_logits_ith", "llama_kv_self_clear", "llama_free", "llama_model_free",
        "llama_model_quantize_default_params", "llama_model_quantize", "llama_log_set",
    )  # fmt: skip
    return {name: ffi.typeof(getattr(lib, name)).cname for name in names}


class LlamaCpp:
    """One GGUF model and one context (one sequence) in llama.cpp, on the CPU.

    kv_f32 keeps the KV cache in float32 (llama.cpp's default is float16) so that the only differences left
    against a float32 reference are llama.cpp's own kernels: with float16 or quantized weights, its CPU matmuls
    round the activations to the weight's `vec_dot_type` (float16, or 8-bit blocks for Q8_0 / Q4_0 / Q4_K).
    """

    def __init__(self, path: str | Path, *, n_ctx: int = 512, n_batch: int = 512, n_threads: int = N_THREADS,
                 kv_f32: bool = True):  # fmt: skip
        self.ffi, self.lib = ffi, lib = load()
        self.path = Path(path)
        self.model = self.ctx = self.batch = None
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = lib.llama_model_load_from_file(str(self.path).encode(), params)
        if self.model == ffi.NULL:
            raise _fail(f"llama.cpp could not load {self.path}")
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = cparams.n_ubatch = self.n_batch = min(n_batch, n_ctx)
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.no_perf = True
        if kv_f32:
            cparams.type_k = cparams.type_v = lib.GGML_TYPE_F32
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if self.ctx == ffi.NULL:
            self.close()
            raise _fail(f"llama.cpp could not make a context for {self.path}")
        self.n_ctx = n_ctx
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)

    def close(self) -> None:
        lib = self.lib
        if self.batch is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None and self.ctx != self.ffi.NULL:
            lib.llama_free(self.ctx)
        self.ctx = None
        if self.model is not None and self.model != self.ffi.NULL:
            lib.llama_model_free(self.model)
        self.model = None

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "lib", None) is not None:
            self.close()

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """llama.cpp's tokenization of text; add_special adds BOS/EOS as the file's add_bos/add_eos say."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        out = self.ffi.new("int32_t[]", capacity)
        n = self.lib.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, parse_special)
        if n < 0:
            raise _fail(f"llama_tokenize returned {n}")
        return list(out[0:n])

    def is_end(self, token: int) -> bool:
        """Whether token ends generation (EOS, EOT, ...: llama.cpp's end-of-generation set)."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def reset(self) -> None:
        """Forget the sequence: empty the KV cache."""
        self.lib.llama_kv_self_clear(self.ctx)

    def _decode(self, tokens: Sequence[int], start: int, outputs: Sequence[int]) -> np.ndarray:
        """Feed tokens at positions start.. (continuing the KV cache); float32 [len(outputs), n_vocab], the logits
        after tokens[i] for i in outputs (ascending)."""
        if start + len(tokens) > self.n_ctx:
            raise ValueError(f"{start + len(tokens)} positions do not fit n_ctx={self.n_ctx}")
        batch, wanted, rows = self.batch, set(outputs), []
        for begin in range(0, len(tokens), self.n_batch):
            chunk = tokens[begin : begin + self.n_batch]
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = token
                batch.pos[i] = start + begin + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = begin + i in wanted
            rc = self.lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise _fail(f"llama_decode returned {rc}")
            for i in range(len(chunk)):
                if begin + i in wanted:
                    row = self.lib.llama_get_logits_ith(self.ctx, i)
                    rows.append(np.frombuffer(self.ffi.buffer(row, 4 * self.n_vocab), dtype=np.float32).copy())
        return np.stack(rows) if rows else np.zeros((0, self.n_vocab), np.float32)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), n_vocab]: the logits after each token, from an empty cache."""
        self.reset()
        return self._decode(list(tokens), 0, range(len(tokens)))

    def greedy(self, tokens: Sequence[int], n: int, *, stop_at_end: bool = True) -> list[int]:
        """Up to n tokens after the prompt, argmax each step (the first maximum, as torch.argmax); stops after an
        end-of-generation token when stop_at_end."""
        tokens = list(tokens)
        self.reset()
        last = self._decode(tokens, 0, [len(tokens) - 1])[0]
        out: list[int] = []
        while len(out) < n:
            token = int(np.argmax(last))
            out.append(token)
            if (stop_at_end and self.is_end(token)) or len(out) == n:
                break
            last = self._decode([token], len(tokens) + len(out) - 1, [0])[0]
        return out

    def perplexity(self, tokens: Sequence[int], n_ctx: int | None = None, *, score_from: int | None = None) -> float:
        """exp(mean negative log-likelihood) over consecutive windows of n_ctx tokens, each from an empty cache.

        As llama-perplexity (no BOS added): in each window only the predictions of tokens score_from + 1.. count
        (default score_from n_ctx / 2: every scored token sees more than half a window of context); the stream's
        tail that does not fill a window is dropped.
        """
        n_ctx = n_ctx or self.n_ctx
        first = n_ctx // 2 if score_from is None else score_from
        windows = len(tokens) // n_ctx
        if windows == 0 or not 0 <= first < n_ctx - 1:
            raise ValueError(f"{len(tokens)} tokens, n_ctx={n_ctx}, score_from={first}: nothing to score")
        nll, count = 0.0, 0
        for w in range(windows):
            window = np.asarray(tokens[w * n_ctx : (w + 1) * n_ctx], dtype=np.int64)
            self.reset()
            logits = self._decode(window.tolist(), 0, range(first, n_ctx - 1)).astype(np.float64)
            top = logits.max(axis=-1, keepdims=True)
            logz = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
            nll += float((logz - logits[np.arange(len(logits)), window[first + 1 :]]).sum())
            count += len(logits)
        return float(np.exp(nll / count))


def quantize(src: str | Path, dst: str | Path, quant: str, *, n_threads: int = N_THREADS) -> None:
    """llama.cpp's quantizer (llama-quantize) from a float GGUF: quant is q8_0, q4_0, q4_k (Q4_K_M) or q4_k_s."""
    ffi, lib = load()
    if quant not in QUANT_FTYPES:
        raise ValueError(f"quant must be one of {sorted(QUANT_FTYPES)}, got {quant!r}")
    params = ffi.new("struct llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.nthread = n_threads
    params.ftype = getattr(lib, QUANT_FTYPES[quant])
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise _fail(f"llama_model_quantize({src} -> {dst}, {quant}) returned {rc}")


if __name__ == "__main__":  # `python tools/llamacpp.py quantize SRC DST q8_0|q4_0|q4_k|q4_k_s` (tools/bench_convert.py)
    if len(sys.argv) != 5 or sys.argv[1] != "quantize":
        sys.exit(f"usage: python {sys.argv[0]} quantize SRC.gguf DST.gguf {{{'|'.join(QUANT_FTYPES)}}}")
    quantize(sys.argv[2], sys.argv[3], sys.argv[4])
