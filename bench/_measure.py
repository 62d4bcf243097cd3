"""Measuring helpers shared by the benchmarks: RSS high-water marks, worker subprocesses, the machine.

Each benchmark runs every variant and size in a fresh worker subprocess, so a peak belongs to one
variant only. Inside a worker the kernel's RSS high-water mark (VmHWM) is reset after setup through
/proc/self/clear_refs, so the peak read afterwards is the working memory of the timed run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import threading
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]


# --- memory inside a worker -------------------------------------------------------------------


def status_kb(field: str) -> int | None:
    """A field of /proc/self/status in kB (VmRSS, VmHWM), or None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def page_in(model) -> None:
    """Read every weight once, before the peak is reset.

    transformers maps a safetensors checkpoint into memory, so a weight's pages become resident
    (and count in RSS) only when first read. Scoring real text reads embedding rows token by token,
    so without this the peak grows with the vocabulary the samples use, not with the work: on
    SmolLM2 that was all of the RSS growth over 320 samples (file-backed pages the kernel can drop;
    anonymous memory stayed within 3 MB)."""
    import torch

    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.sum()


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where it cannot, and the peak counts from start."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_kb() -> int:
    """The RSS high-water mark since the last reset (since start where it cannot be reset)."""
    return status_kb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class ShardWatch:
    """Polls a folder in a thread: the RSS high-water mark as each shard lands on disk."""

    def __init__(self, folder: Path, interval_s: float = 0.01, pattern: str = "shard-*.safetensors"):
        self.folder, self.interval_s, self.pattern = folder, interval_s, pattern
        self.peaks_mb: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._check()

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._check()

    def _check(self) -> None:
        done = len(list(self.folder.glob(self.pattern))) if self.folder.is_dir() else 0
        while len(self.peaks_mb) < done:
            self.peaks_mb.append(peak_kb() / 1024)


# --- the driver side ----------------------------------------------------------------------------


def worker_env() -> dict[str, str]:
    """The environment of a worker: offline, no progress bars, the repository's src on the path."""
    extra = {"SPILLOVER_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return dict(
        os.environ,
        **extra,
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
    )


def run_worker(cmd: list[str], label: str) -> dict:
    """Run one worker subprocess; its last stdout line is its JSON result. Exits on failure."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env=worker_env(), check=False)
    if proc.returncode != 0:
        sys.exit(f"{label} worker failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the figures were measured on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": usable,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }
