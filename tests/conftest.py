"""Shared fixtures and the marker policy.

Markers (registered in pyproject.toml; ``make test-fast`` runs ``-m "not slow"``):

* ``realdata`` is set here, on every test that uses the ``sample_root`` fixture (``pytest_collection_modifyitems``):
  whether a test reads ../shared/data/voc07-sample is known exactly from its fixtures.
* ``slow`` is written in the test modules (a decorator, or a module ``pytestmark`` where every test of the module
  is slow): tests that start luigi / luigid / torchrun subprocesses or take over ~3 s on 2 cores. Neither a
  fixture nor a helper call tells that reliably (in-process stage tests use ``outputs`` and take 0.1 s; the
  harness's subprocess helpers are called in test bodies), so it is declared, and checked: the end of a run lists
  the tests not marked slow that took longer than :data:`SLOW_SECONDS` (5 s: above the 3 s bound by the
  run-to-run noise of 2 shared cores, where a 2 s test has measured 5 s).
"""
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "voc07-sample"


@pytest.fixture(scope="session")
def sample_root() -> Path:
    """../shared/data/voc07-sample (real VOC2007 images); tests that need it skip when it is absent."""
    if not (SAMPLE / "VOC2007" / "Annotations").is_dir():
        pytest.skip(f"real-data sample not found at {SAMPLE}")
    return SAMPLE


@pytest.fixture
def outputs(tmp_path, monkeypatch) -> Path:
    """A private outputs root for luigi stage tests (CLICKSCALE_OUTPUTS)."""
    root = tmp_path / "outputs"
    monkeypatch.setenv("CLICKSCALE_OUTPUTS", str(root))
    return root


@pytest.fixture(name="tiny_classifier")
def tiny_classifier_fixture():
    """:func:`nets.tiny_classifier`, the factory: ``net = tiny_classifier(num_classes, seed, ...)`` (modules that
    import it from ``nets`` keep doing so)."""
    from nets import tiny_classifier

    return tiny_classifier


@pytest.hookimpl(tryfirst=True)  # before -m selects on the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if "sample_root" in getattr(item, "fixturenames", ()) and not item.get_closest_marker("realdata"):
            item.add_marker(pytest.mark.realdata)


#: a test not marked slow that takes longer (setup + call + teardown) is listed at the end of the run
SLOW_SECONDS = 5.0
_unmarked_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    if "slow" not in report.keywords:
        _unmarked_seconds[report.nodeid] = _unmarked_seconds.get(report.nodeid, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    over = sorted(((s, n) for n, s in _unmarked_seconds.items() if s > SLOW_SECONDS), reverse=True)
    if over:
        terminalreporter.section(f"tests not marked slow that took over {SLOW_SECONDS:g} s (mark them slow)")
        for s, n in over:
            terminalreporter.write_line(f"{s:7.2f} s  {n}")


def pytest_configure(config):
    """``CLICKSCALE_TEST_ONEDNN=0`` runs the suite with PyTorch's oneDNN (mkldnn) CPU kernels off, to check that
    nothing depends on which CPU kernels compute it (with ``OMP_NUM_THREADS`` and ``ONEDNN_MAX_CPU_ISA``)."""
    if os.environ.get("CLICKSCALE_TEST_ONEDNN", "1") == "0":
        import torch

        torch.backends.mkldnn.enabled = False


@pytest.fixture(autouse=True, scope="session")
def _threads():
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    yield


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory) -> Path:
    """A 4+1 image synthetic VOC2007 root (96 px) with its clicks_trainval.csv beside it."""
    from pipeline.synthetic import generate_dataset

    out = tmp_path_factory.mktemp("synth")
    generate_dataset(out, n_trainval=4, n_test=1, image_size=96, seed=3)
    return out


@pytest.fixture
def voc(synth_root, tmp_path) -> Path:
    """A private copy of the synthetic root (VOC2007/ and clicks_trainval.csv) to damage."""
    dst = tmp_path / "ds"
    shutil.copytree(synth_root, dst)
    return dst


@pytest.fixture
def one_thread():
    """torch on one intra-op thread for the test, restored after it."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
