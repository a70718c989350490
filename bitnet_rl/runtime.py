"""Process-wide settings a command applies before it loads anything: CPU threads and progress bars.

Threads: torch's default uses every core for intra-op parallelism, which on a small shared
machine fights other processes (the quickstart took 105–510 s instead of 70 s on 2 busy cores;
one thread took 108 s under the same load). On a CPU-only machine we use half the cores we may
run on, at most 8; `bitnet-rl --threads N COMMAND` or `OMP_NUM_THREADS=N` (honoured when set)
choose another count. GPU runs keep torch's default.

Progress: `logging.progress: false` (or `quickstart --no-progress`) also silences the progress
bars of transformers, datasets and huggingface_hub (e.g. "Loading weights").
"""

from __future__ import annotations

import os


def default_threads() -> int:
    """Half the CPUs this process may run on, at least 1 and at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


def set_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count: `threads`, else `OMP_NUM_THREADS`, else `default_threads()` on CPU."""
    import torch

    if threads is None and (os.environ.get("OMP_NUM_THREADS") or torch.cuda.is_available()):
        return torch.get_num_threads()
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


def configure_progress(progress: bool) -> None:
    """Hide (or show) the progress bars of transformers, datasets and huggingface_hub."""
    from transformers.utils import logging as hf_logging

    if progress:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        import datasets

        datasets.enable_progress_bars() if progress else datasets.disable_progress_bars()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

        enable_progress_bars() if progress else disable_progress_bars()
    except ImportError:
        pass
