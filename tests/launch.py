"""The multi-process tests' launcher: WORLD gloo processes on the CPU that meet through a file, not a port.

A test module runs itself as the launcher: its pytest fixture calls :func:`run_launcher` (``python test_x.py
WORKDIR`` in a subprocess), whose ``__main__`` block calls :func:`spawn`; each rank joins the group with
:func:`init_group` and writes its results under WORKDIR for the tests to compare.

The ranks meet through a rendezvous file in WORKDIR (``init_method="file://…"``). A port chosen up front, by binding
port 0 and letting it go, can be taken by another process before the ranks bind it; gloo's own connections then bind
whatever port the system gives them, so nothing can race.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

WORLD = 2  # processes in every launch


def run_launcher(script: str | Path, workdir: str | Path, timeout: float) -> None:
    """Run ``python SCRIPT WORKDIR`` (one thread, offline) and fail with the end of its stderr if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(workdir)], env=env, capture_output=True, text=True,
                            timeout=timeout)
    errors = "\n".join(line for line in result.stderr.splitlines() if "Warning" not in line)
    assert result.returncode == 0, errors[-4000:]


def spawn(rank_main: Callable[..., None], workdir: str, *args: Any) -> None:
    """In the launcher: ``rank_main(rank, workdir, *args)`` on WORLD processes; raises if any of them fails."""
    import torch.multiprocessing as mp

    mp.spawn(rank_main, args=(workdir, *args), nprocs=WORLD)


def init_group(rank: int, workdir: str | Path, name: str = "group", timeout_s: float = 120) -> None:
    """In a rank: join the default gloo group of WORLD processes through the file ``WORKDIR/rendezvous-NAME``.

    A file serves one rendezvous: a later group (after ``destroy_process_group``) takes another ``name``.
    ``timeout_s`` bounds the rendezvous and every collective's wait."""
    import torch.distributed as dist

    rendezvous = Path(workdir).resolve() / f"rendezvous-{name}"
    dist.init_process_group("gloo", init_method=rendezvous.as_uri(), rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=timeout_s))
