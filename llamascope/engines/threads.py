"""PyTorch's threads for the in-process engines, set before the first model loads.

PyTorch sizes its thread pools by the host's cores and lets OpenMP's workers
spin between operations; in a container or on a small machine both take cores
from the event loop. ``configure_openmp`` must run before anything imports
torch; ``configure_torch`` imports it, so the composition root calls it only
when a model is served in process.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path


def usable_cores(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota if one is set.

    PyTorch counts the host's cores; in a container limited to 2 CPUs on a
    64-core host that oversubscribes 32-fold (bench/threads.py: 4x
    oversubscription already makes each decode step 1.5x slower here).
    """
    cores = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        if quota != "max":
            cores = min(cores, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cores


# How long PyTorch's OpenMP worker threads (GNU libgomp) spin after a parallel region before they sleep.
# libgomp's default, 300,000 spins, keeps them busy between the many small operations of a decode step,
# taking a core from the event loop (and, on a small machine, from the clients): bench/engine.py's
# decode load at 16 concurrent streams ran 11% faster with 30,000 (an A/B of two rounds of each of three
# settings, one at a time 4% slower); 10,000 and below cost more than they gave.
GOMP_SPIN_COUNT = "30000"


def configure_openmp() -> None:
    """The OpenMP workers' spinning (``GOMP_SPIN_COUNT``), unless the environment sets a wait policy of its
    own. libgomp reads it once, when PyTorch loads it: call this before anything imports torch."""
    if "torch" not in sys.modules and not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & os.environ.keys():
        os.environ["GOMP_SPINCOUNT"] = GOMP_SPIN_COUNT


def configure_torch(threads: int | None) -> int:
    """Set PyTorch's threads deliberately: its defaults oversubscribe containers."""
    configure_openmp()
    import torch  # only with a model served in process: a gateway never loads PyTorch

    count = threads or usable_cores()
    torch.set_num_threads(count)
    with contextlib.suppress(RuntimeError):  # already set earlier in this process
        torch.set_num_interop_threads(1)  # llamascope runs one generation per engine thread
    return count
