"""The case store: round trip, atomic writes, integrity check, recipe caching, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from radpilot.case import Case, CaseError
from radpilot.case_store import CaseNotFoundError, CaseStore
from radpilot.cases import builtin_case_id, builtin_params, load_builtin


def test_round_trip_is_exact(analytic_case: Case, tmp_path) -> None:
    store = CaseStore(tmp_path)
    store.save(analytic_case, "c1")
    back = store.load("c1", verify=True)
    assert back.structure_names == analytic_case.structure_names
    assert back.grid == analytic_case.grid
    assert back.beams == analytic_case.beams
    assert (back.dose_influence != analytic_case.dose_influence).nnz == 0
    np.testing.assert_array_equal(back.row_voxels, analytic_case.row_voxels)
    for a, b in zip(back.structures, analytic_case.structures, strict=True):
        np.testing.assert_array_equal(a.voxel_indices, b.voxel_indices)
    assert not list((tmp_path / "tmp").iterdir())  # nothing half-written left behind


def test_a_mapped_matrix_is_the_same_read_only_and_survives_the_case_being_removed(
    analytic_case: Case, tmp_path
) -> None:
    import shutil

    from radpilot.fmo import FluenceOptimizer, ObjectiveTerm

    store = CaseStore(tmp_path)
    store.save(analytic_case, "c1")
    mapped = store.load("c1", mmap=True)
    A = mapped.dose_influence
    assert not A.data.flags.writeable and not A.indices.flags.writeable  # files are never written
    assert (analytic_case.dose_influence != A).nnz == 0
    terms = [
        ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
        ObjectiveTerm("Core", "squared_overdose", 8.0, 60.0),  # a working set: rows gathered
    ]
    x = np.ones(analytic_case.num_beamlets, dtype=np.float32)
    expected = FluenceOptimizer(analytic_case).dose(x)
    opt = FluenceOptimizer(mapped)
    shutil.rmtree(store.path("c1"))  # the mapping keeps the removed files' pages
    np.testing.assert_array_equal(opt.dose(x), expected)
    a, b = opt.solve(terms), FluenceOptimizer(analytic_case).solve(terms)
    np.testing.assert_array_equal(a.fluence, b.fluence)


def test_the_compressed_layout_is_stored_once_and_mapped(analytic_case: Case, tmp_path) -> None:
    import os

    from radpilot.fmo import FluenceOptimizer
    from radpilot.fmo.compressed import quantise

    store = CaseStore(tmp_path)
    store.save(analytic_case, "c1")
    packed = store.compressed("c1")  # built from the stored CSR matrix, kept beside it
    for got, want in zip(packed, quantise(analytic_case.dose_influence), strict=True):
        np.testing.assert_array_equal(got, want)
        assert got.dtype == want.dtype
    folder = store.path("c1") / "compressed"
    stamp = os.stat(folder / "codes.npy").st_mtime_ns
    again = store.compressed("c1")  # mapped from the files, not built again
    assert os.stat(folder / "codes.npy").st_mtime_ns == stamp
    assert not again[2].flags.writeable and not again[1].flags.writeable
    assert not list((tmp_path / "tmp").iterdir())
    x = np.random.default_rng(0).random(analytic_case.num_beamlets).astype(np.float32)
    stored = FluenceOptimizer(store.load("c1", mmap=True), matrix="compressed", packed=again)
    built = FluenceOptimizer(analytic_case, matrix="compressed")
    assert stored.matrix == "compressed"
    np.testing.assert_array_equal(stored.dose(x), built.dose(x))
    csr = FluenceOptimizer(analytic_case, matrix="csr", packed=again)  # csr asked: packed unused
    assert csr.matrix == "csr"


def test_a_case_from_the_store_brings_its_compressed_layout(
    analytic_case: Case, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import radpilot.fmo.compressed as compressed
    from radpilot.fmo import FluenceOptimizer

    store = CaseStore(tmp_path)
    store.save(analytic_case, "c1")
    store.compressed("c1")  # stored once

    def no_quantising(*args: object) -> None:
        raise AssertionError("quantised again")

    monkeypatch.setattr(compressed, "quantise", no_quantising)
    loaded = store.load("c1", mmap=True)
    opt = FluenceOptimizer(loaded)  # auto: the compressed layout, mapped from the store
    assert opt.matrix == "compressed" and not opt.ops.codes.flags.writeable
    x = np.random.default_rng(1).random(analytic_case.num_beamlets).astype(np.float32)
    want = analytic_case.dose_influence @ x
    np.testing.assert_allclose(opt.dose(x), want, rtol=1e-4, atol=1e-4 * float(want.max()))
    assert store.load("c1", matrix=False).compressed_source is None  # geometry only: nothing


def test_a_read_only_store_builds_the_compressed_layout_in_memory(
    analytic_case: Case, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import tempfile

    store = CaseStore(tmp_path)
    store.save(analytic_case, "c1")

    def read_only(*args: object, **kwargs: object) -> str:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    packed = store.compressed("c1")  # a warning, and the layout built in memory
    assert packed[2].size == analytic_case.dose_influence.nnz
    assert not (store.path("c1") / "compressed").exists()


def test_corruption_is_detected(analytic_case: Case, tmp_path) -> None:
    store = CaseStore(tmp_path)
    store.save(analytic_case, "c2")
    f = store.path("c2") / "ct_hu.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CaseError, match="hash"):
        store.load("c2", verify=True)


def test_leftover_temp_dirs_are_cleaned(tmp_path) -> None:
    import os
    import time

    from radpilot.case_store import STALE_WORK_S

    old = tmp_path / "tmp" / "half.case"
    (old / "inner").mkdir(parents=True)
    (tmp_path / "tmp" / "half.npz").write_bytes(b"x")
    long_ago = time.time() - STALE_WORK_S - 60
    for p in (old, tmp_path / "tmp" / "half.npz"):
        os.utime(p, (long_ago, long_ago))
    # another process's write in progress (a second `plan --local` on the same store): kept,
    # or opening the store would pull its files away mid-write
    (tmp_path / "tmp" / "writing.case").mkdir()
    store = CaseStore(tmp_path)
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == ["writing.case"]
    assert store.list_ids() == []


def test_unknown_case_and_params(tmp_path) -> None:
    store = CaseStore(tmp_path)
    with pytest.raises(CaseNotFoundError):
        store.load("nope")
    with pytest.raises(CaseNotFoundError):
        store.load("../etc")
    with pytest.raises(CaseError, match="unknown case"):
        load_builtin("prostate-xyz", store)
    with pytest.raises(CaseError, match="no parameter"):
        builtin_params("analytic-cshape", grid=3)
    with pytest.raises(CaseError, match="not a float"):
        builtin_params("analytic-cshape", spacing_mm="fine")


def test_same_recipe_loads_from_store(tmp_path) -> None:
    store = CaseStore(tmp_path)
    a = load_builtin("analytic-cshape", store, spacing_mm=8.0)
    assert a.case_id == builtin_case_id("analytic-cshape", spacing_mm=8.0)
    assert store.list_ids() == [a.case_id]
    b = load_builtin("analytic-cshape", store, spacing_mm=8.0)
    assert b.case_id == a.case_id and b.dose_influence.nnz == a.dose_influence.nnz
    assert builtin_case_id("analytic-cshape", spacing_mm=6.0) != a.case_id


def test_cli_lists_builtin_cases(capsys: pytest.CaptureFixture[str]) -> None:
    from services.cli import main

    assert main(["cases"]) == 0
    out = capsys.readouterr().out
    assert "tg119-cshape" in out and "analytic-cshape" in out
