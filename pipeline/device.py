"""Device selection (``--device auto`` uses CUDA when present, else the CPU) and the process's malloc settings."""
from __future__ import annotations

import ctypes
import os
import sys

import torch


def resolve_device(name: str = "auto") -> torch.device:
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} asked for, but torch sees no CUDA device; use --device auto or cpu")
    return torch.device(name)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt() parameter numbers (malloc.h)
_malloc_tuned: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process (no ``mmap`` for large blocks, no trimming of the heap)
    instead of handing it back to the kernel; True when applied (glibc on Linux), False elsewhere or when the
    environment sets ``CLICKSCALE_MALLOC=default``. Idempotent; called by every stage before it runs.

    Why: PyTorch's CPU allocator does not cache, and glibc serves each block over 32 MB (a batch of 64 crops at
    224 px makes several per layer) with a fresh ``mmap`` that it unmaps on free, so every batch faults in and
    zeroes its activations again (page faults, kernel time and wall time with and without this: docs/results.md,
    docs/experiments.md). The cost: the process keeps its peak heap until it exits (the stages are batch jobs)."""
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if os.environ.get("CLICKSCALE_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _malloc_tuned


def release_freed_memory() -> bool:
    """Hand the memory malloc holds free back to the kernel (glibc ``malloc_trim(0)``): called when a stage ends,
    so that :func:`keep_freed_memory`'s retained heap of one stage does not stay resident through the next stages
    of the same process. True when glibc released something."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux ``VmHWM``, through ``/proc/self/clear_refs``), so that
    :func:`peak_rss_mb` measures from now on; False where that is not possible (then it measures since start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds() -> float:
    """CPU time (user + system, seconds) of this process and its descendants: the children it has waited for
    (``getrusage``), and on Linux every live descendant with the children that one has waited for (``/proc``), e.g.
    a multiprocessing forkserver and the selective-search or DataLoader workers it started and reaped. The
    difference of two readings is the CPU time the process tree spent between them."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + _live_descendants_cpu()


def _live_descendants_cpu() -> float:
    """Sum of utime + stime + cutime + cstime of this process's live descendants (0 where /proc is missing)."""
    children: dict[int, list[int]] = {}
    cpu: dict[int, float] = {}
    try:
        pids = [int(d) for d in os.listdir("/proc") if d.isdigit()]
    except OSError:
        return 0.0
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                text = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid ... (man 5 proc)
        children.setdefault(int(fields[1]), []).append(pid)
        cpu[pid] = sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
    total, todo = 0.0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        total += cpu.get(pid, 0.0)
        todo += children.get(pid, [])
    return total


def cpu_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def peak_rss_mb() -> dict:
    """Peak resident memory in MB: ``process`` (this process since :func:`reset_peak_rss`, or since it started) and
    ``children`` (the largest child process this process waited for, e.g. DataLoader workers; since start)."""
    import resource

    process = None
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    process = int(line.split()[1]) / 1024
    except OSError:
        pass
    if process is None:  # not Linux: ru_maxrss (kB on Linux, bytes on macOS)
        scale = 1 / 2**20 if sys.platform == "darwin" else 1 / 1024
        process = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
    return {"process": round(process, 1), "children": round(children, 1)}
