import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pipeline.device import resolve_device

REPO = Path(__file__).resolve().parents[1]


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            resolve_device("cuda")


# a child process runs 10 forward + backward passes of two convolutions over 4 images of 256 px (activations of
# 32 MB, over glibc's mmap threshold) and prints its minor page faults
_FAULTS = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, {repo!r})
    import torch
    from pipeline.device import keep_freed_memory
    tuned = keep_freed_memory() if sys.argv[1] == "tune" else None
    if tuned is not None:
        assert keep_freed_memory() is tuned  # idempotent
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1))
    x = torch.randn(4, 3, 256, 256)
    net(x).sum().backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        net(x).sum().backward()
    print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str, env: dict | None = None) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _FAULTS.format(repo=str(REPO)), mode], capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    return out[0], int(out[1])


@pytest.mark.slow  # subprocess
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_keep_freed_memory_stops_refaulting_large_blocks():
    """Without it every large activation is a fresh mmap, faulted in page by page on every pass (~1.1 M faults
    here); with it the freed heap is reused (~25 k)."""
    tuned, faults = _faults("tune")
    _, default_faults = _faults("default")
    assert tuned == "True"
    assert default_faults > 10 * 2 * 8192  # at least two 32 MB activations faulted in again per pass
    assert faults < default_faults / 10
    off, off_faults = _faults("tune", env={**os.environ, "CLICKSCALE_MALLOC": "default"})  # the opt-out
    assert off == "False" and off_faults > 10 * 2 * 8192


@pytest.mark.slow  # subprocess
def test_release_freed_memory_hands_the_kept_heap_back():
    """With keep_freed_memory a freed 500 MB stays resident (the point of it, within a stage); release_freed_memory
    (called when a stage ends) hands it back to the kernel."""
    code = textwrap.dedent("""
        import numpy as np
        from pipeline.device import keep_freed_memory, peak_rss_mb, release_freed_memory, reset_peak_rss
        assert keep_freed_memory()
        blocks = [np.ones(50 * 2**20 // 8) for _ in range(10)]
        del blocks
        reset_peak_rss(); kept = peak_rss_mb()["process"]
        assert release_freed_memory()
        reset_peak_rss(); released = peak_rss_mb()["process"]
        print(kept, released)
        assert kept - released > 400, (kept, released)
    """)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={k: v for k, v in os.environ.items() if k != "CLICKSCALE_MALLOC"})
    assert res.returncode == 0, res.stderr
