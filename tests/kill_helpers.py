"""Run `python -m spillover ...` as a child process, kill it at a random point mid-run, and compare
folders file by file: shared by the interruption, fault and safety tests."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def child_env(cache: Path, **extra: str) -> dict[str, str]:
    """The environment of a child run: the session's organism cache, one thread (so its floats
    match an in-process run under the `one_thread` fixture), offline, no progress bars, no .pyc."""
    env = {**os.environ, "SPILLOVER_CACHE": str(cache), "OMP_NUM_THREADS": "1", "SPILLOVER_NO_PROGRESS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra)
    return env


@dataclass
class Child:
    """A running child with its output going to files (a pipe nobody reads could block it)."""

    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def output(self) -> tuple[str, str]:
        return self.stdout.read_text(errors="replace"), self.stderr.read_text(errors="replace")


def start(args: list[str], env: dict[str, str], logs: Path, module: str = "spillover",
          cwd: Path | None = None) -> Child:
    """`python -m MODULE ARGS...`, its stdout and stderr in files under `logs`."""
    logs.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logs / "stdout.txt", logs / "stderr.txt"
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", module, *args], env=env, cwd=cwd, stdout=out, stderr=err)
    return Child(process, stdout, stderr)


def wait_until(child: Child, ready: Callable[[], bool], timeout: float = 180.0) -> None:
    """Poll `ready` until it holds; fails if the child ended first or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        if child.process.poll() is not None:
            raise AssertionError(f"the run ended (exit {child.process.returncode}) before the kill point:\n"
                                 + child.output()[1][-3000:])
        if time.monotonic() > deadline:
            child.process.kill()
            raise AssertionError(f"no kill point within {timeout:.0f} s")
        time.sleep(0.005)


def kill_at_random_point(child: Child, ready: Callable[[], bool], rng: random.Random, spread: float) -> float:
    """SIGKILL the child a random 0..`spread` seconds after `ready` first holds; returns the delay.

    The random delay (not a poll) is the point of the test: the kill lands anywhere in the run,
    mid-write included. The child must still be running when it lands, or the test proves nothing.
    """
    wait_until(child, ready)
    delay = rng.uniform(0.0, spread)
    time.sleep(delay)
    still_running = child.process.poll() is None
    child.process.send_signal(signal.SIGKILL)
    child.process.wait(timeout=60)
    assert still_running, f"the run finished within {delay:.2f} s of the kill point; lower `spread`"
    assert child.process.returncode == -signal.SIGKILL
    return delay


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(folder: Path, skip: Callable[[Path], bool] = lambda p: False) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (links and folders by their kind)."""
    out: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if skip(path):
            continue
        if path.is_symlink():
            out[rel] = f"link -> {os.readlink(path)}"
        elif path.is_file():
            out[rel] = sha256(path)
        elif path.is_dir():
            out[rel + "/"] = "dir"
    return out


def stamps(folder: Path, pattern: str = "**/*") -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of matching files: unchanged stamps show a rerun left a file alone."""
    return {p.relative_to(folder).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(folder.glob(pattern)) if p.is_file()}


def temp_files(folder: Path) -> list[str]:
    """Leftovers of interrupted atomic writes (`.NAME.*.tmp` files, `.NAME.tmp` folders)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob(".*.tmp"))
