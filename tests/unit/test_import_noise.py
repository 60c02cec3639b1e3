"""The import-noise filters drop exactly torchao's CUDA-kernel and Enum notices, and keep real errors."""

from __future__ import annotations

import enum
import logging

import pytest

from llmhpc.metrics import import_noise
from llmhpc.metrics.import_noise import quiet_import_noise

SO = "/venv/site-packages/torchao/"
MXFP8 = f"Failed to load {SO}_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load this library: x"
CUTLASS = f"Failed to load {SO}_C_cutlass_90a.abi3.so: Could not load this library: x"
CPU_KERNELS = f"Failed to load {SO}_C.abi3.so: undefined symbol: _ZN3c10"
ENUM_MSG = ("%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. "
            "Calling register_constant() on Enum subclasses is deprecated and will be an error in a future release.")


class Ours(enum.Enum):
    A = 1


Theirs = enum.Enum("Theirs", "A", module="torchao.quantization.quantize_.common")


def _shown(caplog, logger: str, msg: str, *args) -> bool:
    """Whether a record logged on `logger` gets past its filters (seen by a handler on that very logger).

    A handler of its own, not pytest's caplog: torch's logging set-up (after a torch.compile elsewhere in the
    session) can stop `torch.*` loggers from propagating to the root, where caplog listens.
    """
    seen: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = seen.append
    log = logging.getLogger(logger)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING)
    try:
        log.warning(msg, *args)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    return bool(seen)


@pytest.fixture
def quiet():
    quiet_import_noise()
    quiet_import_noise()  # twice: still one filter per logger
    for name, kind in import_noise.FILTERS.items():
        assert sum(isinstance(f, kind) for f in logging.getLogger(name).filters) == 1


def test_cuda_only_kernels_are_dropped_only_without_cuda(quiet, caplog, monkeypatch):
    monkeypatch.setattr(import_noise, "_no_cuda", lambda: True)
    assert not _shown(caplog, "torchao", MXFP8)
    assert not _shown(caplog, "torchao", CUTLASS)
    assert _shown(caplog, "torchao", CPU_KERNELS)  # a CPU kernel that fails to load is a real error
    assert _shown(caplog, "torchao", "Skipping import of cpp extensions due to incompatible torch version.")
    monkeypatch.setattr(import_noise, "_no_cuda", lambda: False)
    assert _shown(caplog, "torchao", MXFP8)  # with a GPU the CUDA kernels should load: say so when they don't
    assert _shown(caplog, "torchao", CUTLASS)


def test_enum_notice_is_dropped_only_for_torchao_enums(quiet, caplog):
    assert not _shown(caplog, "torch.utils._pytree", ENUM_MSG, Theirs)
    assert _shown(caplog, "torch.utils._pytree", ENUM_MSG, Ours)
    assert _shown(caplog, "torch.utils._pytree", "some other pytree warning about %s", Theirs)
