"""Notebook 00: library noise kept out of the notebooks: the notes optional libraries log while they are imported, and
transformers' progress bars during quick local work.
"""

from __future__ import annotations

import contextlib

NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")  # import notes on CPU-only torch; bnb per matmul


@contextlib.contextmanager


def quiet_imports():
    """Silence the log lines optional libraries write while being imported or run (torchao's notes about CUDA kernels
    a CPU-only torch cannot load, torch's deprecation notes about them, bitsandbytes' "MatMul8bitLt: inputs will be
    cast..." on every CPU matmul), then restore the levels found (notebooks 00, 08)."""
    import logging

    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    old = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, old):
            logger.setLevel(level)


@contextlib.contextmanager


def quiet_progress():
    """Silence transformers' progress bars inside the block, then restore the setting found (local, quick work)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
