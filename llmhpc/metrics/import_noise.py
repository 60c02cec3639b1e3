"""Keep two known import-time notices of torchao off the console, and nothing else.

With torchao installed, importing a `transformers` model class (transformers' quantizer registry imports
torchao when it is installed), `peft` or `torchao.float8` prints, before any line of ours:

- "Failed to load …/torchao/_C_mxfp8….so" and "Failed to load …/torchao/_C_cutlass_90a.abi3.so", logged
  as warnings by `torchao/__init__.py`: these extensions hold CUDA-only kernels (MX-FP8, SM90 CUTLASS),
  which cannot load where no CUDA device is present. torchao runs without them, and they are never used
  there.
- "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by torch.compile …",
  logged by torch's `torch.utils._pytree`: torchao 0.18 still registers its enums as pytree constants,
  which torch 2.13 deprecates. The notice is meant for torchao's developers, not for people who train.

`quiet_import_noise()` adds a `logging.Filter` to the two loggers that emit these records. The filter
drops only those records. Any other record still prints: a CUDA-only kernel that fails to load on a
machine with CUDA, any other torchao extension (e.g. CPU kernels) that fails to load, and the same
deprecation about another library's enum. Neither library has a switch for this. torchao's
TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 skips every extension and logs a warning of its own instead, and
transformers imports torchao whenever it is installed. The filters must be in place before torchao is
first imported; the function imports nothing and is safe to call more than once.
"""

from __future__ import annotations

import logging
import re

CUDA_ONLY_KERNEL = re.compile(r"Failed to load \S*torchao[/\\]_C_(?:mxfp8|cutlass_\w+)[^/\\\s]*\.so: ")
"""torchao's message when one of its CUDA-only extensions fails to load (the name says the GPU feature)."""

ENUM_NOTICE = "is an Enum subclass and is now natively supported by torch.compile"
"""torch's deprecation notice for `register_constant` on an Enum (the `%s` before it is the enum class)."""


def _no_cuda() -> bool:
    import torch  # already imported: torchao imports it before it logs

    return torch.version.cuda is None or not torch.cuda.is_available()


class CudaKernelsWithoutCuda(logging.Filter):
    """Drops torchao's "Failed to load" for its CUDA-only extensions, only when there is no CUDA device."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (CUDA_ONLY_KERNEL.match(record.getMessage()) and _no_cuda())


class TorchaoEnumNotice(logging.Filter):
    """Drops torch's Enum-as-pytree-constant deprecation, only for enums defined in torchao."""

    def filter(self, record: logging.LogRecord) -> bool:
        if ENUM_NOTICE not in str(record.msg) or not isinstance(record.args, tuple) or not record.args:
            return True
        return not getattr(record.args[0], "__module__", "").startswith("torchao")


FILTERS = {"torchao": CudaKernelsWithoutCuda, "torch.utils._pytree": TorchaoEnumNotice}
"""Logger name (the module that logs) → the filter added to it."""


def quiet_import_noise() -> None:
    """Add the filters to their loggers (once per process; a second call changes nothing)."""
    for name, kind in FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in logger.filters):
            logger.addFilter(kind())
