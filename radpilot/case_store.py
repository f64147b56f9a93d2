"""A content-addressed case store: one folder per case, written atomically, checked on load.

A case id is the SHA-256 of its recipe (builder name, parameters and builder version), so asking
for the same case twice finds the stored one instead of recomputing the dose influence matrix.
Every file's SHA-256 is kept in the case's manifest; ``load(verify=True)`` re-checks them.

Layout::

    ROOT/cases/<case_id>/manifest.json   grid, structures, beams, prescription, file hashes
    ROOT/cases/<case_id>/*.npy           CT, row voxels, structure voxels, CSR parts of A
    ROOT/cases/<case_id>/compressed/     A in the 16-bit layout (radpilot.fmo.compressed),
                                         derived from the CSR parts the first time it is asked for
    ROOT/cases/<case_id>/helpers/        helper structures (rings, OAR minus PTV), one file per
                                         definition, built the first time a plan asks for them
    ROOT/tmp/                            half-written cases; never read, cleaned on open
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from radpilot.case import (
    Beam,
    Case,
    CaseError,
    DoseSamples,
    Grid,
    Structure,
    StructureKind,
)
from radpilot.errors import CaseNotFoundError, StorageFullError, StorageReadOnlyError
from radpilot.storage import storage_faults

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
COMPRESSED = "compressed"  # a case's sub-folder: its matrix in the compressed layout
PACKED_PARTS = ("indptr", "indices", "codes", "scale")
HELPERS = "helpers"  # a case's sub-folder: helper structures built on request (by definition)


def default_store_root() -> Path:
    env = os.environ.get("RADPILOT_CASE_STORE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "radpilot" / "case-store"


def recipe_id(recipe: dict[str, Any]) -> str:
    """Stable id of a case recipe: SHA-256 of its canonical JSON."""
    canonical = json.dumps(recipe, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _structure_entry(i: int, s: Structure) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": s.name, "kind": s.kind.value, "array": f"structure_{i}"}
    if s.weights is not None:
        entry["fraction"] = f"structure_{i}_fraction"
    if s.samples is not None:
        entry["samples"] = f"structure_{i}_samples"
        entry["points"] = int(s.samples.matrix.shape[0])
    return entry


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# a work file or folder in the store's tmp/ untouched for this long is a leftover of a writer
# that died; a younger one may be another process's write in progress (services, a second
# `plan --local`), which opening the store must not delete
STALE_WORK_S = 3600.0


def _remove_stale(tmp: Path) -> None:
    """Delete the leftovers in ``tmp`` (never a valid case), keeping writes in progress."""
    if not tmp.is_dir():
        return
    cutoff = time.time() - STALE_WORK_S
    for entry in tmp.iterdir():
        try:
            if entry.stat().st_mtime >= cutoff:
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink()
        except OSError:  # gone meanwhile (its writer renamed it into place), or not ours
            continue


class CaseStore:
    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_store_root()
        self._where = f"the case store at {self.root}"
        with storage_faults(self._where):
            (self.root / "cases").mkdir(parents=True, exist_ok=True)
        tmp = self.root / "tmp"
        _remove_stale(tmp)
        try:
            tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a read-only store still serves reads; writes say why not
            log.warning("%s: no work folder (%s); writes will fail", self._where, exc.strerror)

    def path(self, case_id: str) -> Path:
        if not case_id or "/" in case_id or case_id.startswith("."):
            raise CaseNotFoundError(f"invalid case id {case_id!r}")
        return self.root / "cases" / case_id

    def __contains__(self, case_id: str) -> bool:
        try:
            return (self.path(case_id) / MANIFEST).is_file()
        except CaseNotFoundError:
            return False

    def list_ids(self) -> list[str]:
        return sorted(p.name for p in (self.root / "cases").iterdir() if (p / MANIFEST).is_file())

    # -- write ------------------------------------------------------------------------------
    def save(self, case: Case, case_id: str, recipe: dict[str, Any] | None = None) -> str:
        """Write a case atomically under ``case_id``; an existing copy is kept as is."""
        case.require_matrix()
        final = self.path(case_id)
        if (final / MANIFEST).is_file():
            return case_id
        with storage_faults(self._where):
            return self._save(case, case_id, final, recipe)

    def _save(self, case: Case, case_id: str, final: Path, recipe: dict[str, Any] | None) -> str:
        work = Path(tempfile.mkdtemp(prefix=f"{case_id}.", dir=self.root / "tmp"))
        try:
            A = case.dose_influence
            arrays: dict[str, np.ndarray] = {
                "ct_hu": case.ct_hu.astype(np.float32, copy=False),
                "row_voxels": case.row_voxels.astype(np.int64, copy=False),
                "A_data": A.data.astype(np.float32, copy=False),
                "A_indices": A.indices,
                "A_indptr": A.indptr,
            }
            stored = case.structures
            for i, s in enumerate(stored):
                arrays[f"structure_{i}"] = s.voxel_indices.astype(np.int64, copy=False)
                if s.weights is not None:
                    arrays[f"structure_{i}_fraction"] = s.weights.astype(np.float32, copy=False)
                if s.samples is not None:
                    m = s.samples.matrix
                    arrays[f"structure_{i}_samples_data"] = m.data.astype(np.float32, copy=False)
                    arrays[f"structure_{i}_samples_indices"] = m.indices.astype(np.int32)
                    arrays[f"structure_{i}_samples_indptr"] = m.indptr.astype(np.int64)
                    arrays[f"structure_{i}_samples_weights"] = s.samples.weights
            files = {}
            for key, arr in arrays.items():
                p = work / f"{key}.npy"
                np.save(p, arr, allow_pickle=False)
                files[key] = {"file": p.name, "sha256": _sha256_file(p)}
            manifest = {
                "format": FORMAT_VERSION,
                "case_id": case_id,
                "name": case.name,
                "created_unix": time.time(),
                "recipe": recipe or {},
                "grid": case.grid.to_dict(),
                "structures": [_structure_entry(i, s) for i, s in enumerate(stored)],
                "beams": [b.to_dict() for b in case.beams],
                "isocenter_mm": list(case.isocenter_mm),
                "prescription_gy": case.prescription_gy,
                "dose_influence_shape": list(A.shape),
                "metadata": case.metadata,
                "files": files,
            }
            (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
            try:
                os.replace(work, final)  # atomic: readers see all of it or nothing
            except OSError:
                if not (final / MANIFEST).is_file():  # lost a race to nobody: a real error
                    raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)
        return case_id

    # -- read -------------------------------------------------------------------------------
    def manifest(self, case_id: str) -> dict[str, Any]:
        p = self.path(case_id) / MANIFEST
        if not p.is_file():
            raise CaseNotFoundError(f"case {case_id!r} is not in the store at {self.root}")
        return json.loads(p.read_text())

    def structures(self, case_id: str) -> tuple[Grid, list[tuple[str, str, np.ndarray]]]:
        """The grid and (name, kind, voxel indices) of every structure, without the matrix."""
        m = self.manifest(case_id)
        folder = self.path(case_id)
        out = []
        for s in m["structures"]:
            entry = m["files"][s["array"]]
            out.append((s["name"], s["kind"], np.load(folder / entry["file"], allow_pickle=False)))
        return Grid.from_dict(m["grid"]), out

    def load(
        self, case_id: str, verify: bool = False, matrix: bool = True, mmap: bool = False
    ) -> Case:
        """The stored case; ``matrix=False`` skips the dose influence matrix (the bulk of a
        case: ~1 GB at a 3 mm grid) for readers that only need geometry and doses.

        ``mmap=True`` maps the matrix's values and indices read-only from their files instead
        of reading them: the load takes milliseconds instead of seconds, pages come in as the
        first product touches them, and replicas on one machine share one copy in the page
        cache. Safe because a stored case's files are never rewritten (a case is written to a
        temporary folder and renamed into place); the arrays are read-only."""
        m = self.manifest(case_id)
        if m.get("format") != FORMAT_VERSION:
            raise CaseError(
                f"case {case_id!r} has store format {m.get('format')}, expected {FORMAT_VERSION}"
            )
        folder = self.path(case_id)

        def arr(key: str) -> np.ndarray:
            entry = m["files"][key]
            p = folder / entry["file"]
            if verify and _sha256_file(p) != entry["sha256"]:
                raise CaseError(f"case {case_id!r}: file {p.name} does not match its recorded hash")
            mapped = mmap and key in ("A_data", "A_indices")
            return np.load(p, allow_pickle=False, mmap_mode="r" if mapped else None)

        shape = tuple(m["dose_influence_shape"])
        if matrix:
            A = sp.csr_matrix((arr("A_data"), arr("A_indices"), arr("A_indptr")), shape=shape)
        else:
            A = sp.csr_matrix(shape, dtype=np.float32)

        def samples(s: dict[str, Any]) -> DoseSamples | None:
            if "samples" not in s:
                return None
            key = s["samples"]
            matrix = sp.csr_matrix(
                (arr(f"{key}_data"), arr(f"{key}_indices"), arr(f"{key}_indptr")),
                shape=(int(s["points"]), int(m["dose_influence_shape"][0])),
            )
            return DoseSamples(matrix, arr(f"{key}_weights"))

        structures = [
            Structure(
                s["name"],
                StructureKind(s["kind"]),
                arr(s["array"]),
                arr(s["fraction"]) if "fraction" in s else None,
                samples(s),
            )
            for s in m["structures"]
        ]
        return Case(
            name=m["name"],
            grid=Grid.from_dict(m["grid"]),
            ct_hu=arr("ct_hu"),
            structures=structures,
            beams=[Beam.from_dict(b) for b in m["beams"]],
            isocenter_mm=tuple(m["isocenter_mm"]),
            prescription_gy=float(m["prescription_gy"]),
            row_voxels=arr("row_voxels"),
            dose_influence=A,
            metadata=m.get("metadata", {}),
            case_id=case_id,
            geometry_only=not matrix,
            compressed_source=(lambda: self.compressed(case_id)) if matrix else None,
        )

    def compressed(self, case_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The case's matrix in the compressed layout (``radpilot.fmo.compressed.quantise``:
        int64 row pointers, uint16 column indices and codes, float32 row scales), its column
        indices and codes mapped read-only like ``load(mmap=True)``.

        Built from the stored CSR matrix the first time it is asked for and kept in the case's
        ``compressed/`` folder (written aside and renamed into place, so a reader sees all of it
        or none; two builders at once both succeed, one copy is kept). A replica then maps ~4
        bytes per non-zero in milliseconds instead of quantising the CSR matrix (seconds at a
        3 mm grid). A store it cannot write to gets the arrays built in memory, with a warning."""
        folder = self.path(case_id) / COMPRESSED
        if not (folder / "parts.json").is_file():
            from radpilot.fmo.compressed import quantise

            t0 = time.perf_counter()
            parts = quantise(self.load(case_id, mmap=True).dose_influence)
            try:
                with storage_faults(self._where):
                    self._save_compressed(case_id, folder, parts)
            except (OSError, StorageFullError, StorageReadOnlyError) as exc:
                log.warning(
                    "case %s: compressed matrix not stored (%s); built in memory", case_id, exc
                )
                return parts
            log.info(
                "case %s: compressed matrix stored in %.1f s", case_id, time.perf_counter() - t0
            )
        entries = json.loads((folder / "parts.json").read_text())["files"]
        indptr, indices, codes, scale = (
            np.asarray(  # plain (read-only) arrays on the mapped files, as the kernels take them
                np.load(
                    folder / entries[name],
                    allow_pickle=False,
                    mmap_mode="r" if name in ("indices", "codes") else None,
                )
            )
            for name in PACKED_PARTS
        )
        return indptr, indices, codes, scale

    def _save_compressed(self, case_id: str, folder: Path, parts: tuple[np.ndarray, ...]) -> None:
        work = Path(tempfile.mkdtemp(prefix=f"{case_id}.{COMPRESSED}.", dir=self.root / "tmp"))
        try:
            files = {}
            for name, array in zip(PACKED_PARTS, parts, strict=True):
                np.save(work / f"{name}.npy", array, allow_pickle=False)
                files[name] = f"{name}.npy"
            source = self.manifest(case_id)["files"]["A_data"]["sha256"]
            (work / "parts.json").write_text(json.dumps({"files": files, "from_A_data": source}))
            try:
                os.replace(work, folder)
            except OSError:
                if not (folder / "parts.json").is_file():  # not a concurrent builder's copy
                    raise
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    # -- helper structures (rings, OAR minus PTV): built on request, kept with the case --------
    def helper(self, case_id: str, case: Case, helper: Any) -> Structure:
        """The voxels of a helper structure (``radpilot.cases.helpers.Helper``) on a stored
        case: read from ``helpers/<definition key>.npz`` in the case's folder, or built and
        kept there (written aside and renamed; a store it cannot write to gets it built in
        memory, with a warning)."""
        from radpilot.cases.helpers import build_helper

        path = self.path(case_id) / HELPERS / f"{helper.key()}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                weights = z["weights"] if z["weights"].size else None
                kind = StructureKind(str(z["kind"]))
                return Structure(helper.name, kind, np.array(z["voxels"]), weights)
        built = build_helper(case, helper)
        weights = built.weights if built.weights is not None else np.ones(0, np.float32)
        try:
            with storage_faults(self._where):
                path.parent.mkdir(exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".npz")
                try:
                    with os.fdopen(fd, "wb") as f:
                        np.savez(
                            f,
                            voxels=built.voxel_indices,
                            kind=np.array(built.kind.value),
                            weights=weights,
                        )
                    os.replace(tmp, path)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        except (OSError, StorageFullError, StorageReadOnlyError) as exc:
            log.warning("case %s: helper %s not stored (%s)", case_id, helper.name, exc)
        return built

    # -- artefacts (doses, fluences): content-addressed files beside the cases ---------------
    def put_artefact(self, case_id: str, kind: str, array: np.ndarray) -> tuple[str, str]:
        """Store an array under ``artefacts/<case_id>/<kind>-<sha256>.npy``; (path, sha256)."""
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
        return self.put_bytes(case_id, kind, buf.getvalue(), "npy")

    def put_bytes(self, case_id: str, kind: str, data: bytes, ext: str) -> tuple[str, str]:
        """Store bytes (a PNG, a report) as ``artefacts/<case_id>/<kind>-<sha256>.<ext>``."""
        if case_id not in self:
            raise CaseNotFoundError(f"case {case_id!r} is not in the store at {self.root}")
        if not kind.replace("-", "_").isidentifier() or not ext.isalnum():
            raise ValueError(f"artefact kind {kind!r} / extension {ext!r} is not a plain name")
        sha = hashlib.sha256(data).hexdigest()
        rel = f"artefacts/{case_id}/{kind}-{sha[:32]}.{ext}"
        final = self.root / rel
        if not final.is_file():
            with storage_faults(self._where):
                final.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
                try:
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                    os.replace(tmp, final)  # readers see the whole file or none
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
        return rel, sha

    def get_bytes(self, rel_path: str, sha256: str = "") -> bytes:
        p = (self.root / rel_path).resolve()
        if not p.is_relative_to((self.root / "artefacts").resolve()) or not p.is_file():
            raise CaseNotFoundError(f"artefact {rel_path!r} is not in the store at {self.root}")
        data = p.read_bytes()
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise CaseError(f"artefact {rel_path!r} does not match its hash")
        return data

    def get_artefact(self, rel_path: str, sha256: str = "") -> np.ndarray:
        return np.load(io.BytesIO(self.get_bytes(rel_path, sha256)), allow_pickle=False)

    def delete(self, case_id: str) -> None:
        shutil.rmtree(self.path(case_id), ignore_errors=True)
