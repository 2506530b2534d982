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
