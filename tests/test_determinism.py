"""Same seed and parameters -> identical results: a second run in other directories with 4 luigi worker
processes of one luigi process (``--workers 4``) reproduces the one-worker reference run file for file (pseudo
labels, metrics, classifier weights, CAMs, proposals); test_luigid.py does the same with 4 separate processes
under luigid."""

import pytest

import harness as H

pytestmark = pytest.mark.slow  # luigi subprocess runs


def test_same_seed_same_products_with_one_and_four_workers(tmp_path):
    ref, ref_data = H.reference_run()
    outputs, data = tmp_path / "outputs", tmp_path / "data"
    res = H.run_luigi("PseudoLabels", H.tiny_args(data), outputs, workers=4, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = H.products(ref, [ref_data]), H.products(outputs, [data])
    kinds = {k.rsplit(".", 1)[-1] for k in a}
    assert {"csv", "json", "h5", "pt", "parquet", "xml"} <= kinds, kinds  # every kind of product is compared
    assert H.diff_products(a, b) == []
    pa, pb = H.pseudo_labels(ref), H.pseudo_labels(outputs)
    assert len(pa) > 0 and pa.equals(pb)
