import os
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
