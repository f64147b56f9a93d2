"""Aperture refinement: leaf positions and segment weights optimised together after sequencing.

Sequencing quantises a fluence map to a few intensity levels, with leaf tips on beamlet edges;
the segment-weight fits that follow cannot move a leaf. Here every open leaf pair's two tips
become continuous variables next to the segment weights (direct aperture optimisation in the
manner of Shepard DM et al., Direct aperture optimization: a turnkey solution for step-and-shoot
IMRT, Med Phys 2002;29(6):1007-18, here by gradient from a sequenced start rather than by
simulated annealing). A beamlet's fluence is what ``open_fractions`` gives: each pair's opening
overlapping the beamlet's column, times the part of the beamlet's row the pair covers, times the
segment's weight; it is piecewise linear in each tip, so its gradient is the beamlet's dose
gradient where the tip stands, divided by the beamlet width.

Every round allows each tip to move at most one beamlet width from where the round started,
inside bounds that keep the machine's rules: a pair's tips at least the minimum gap apart, and
(without interdigitation) no tip past the opposing tip of a neighbouring pair in the same segment
(each shared boundary is split at the midpoint of the starting positions, so every point of the
box is deliverable). Pairs that are closed stay where the sequencer parked them; the X jaws are
set to the opening's extent afterwards. Weights keep their lower bound (the minimum MU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.sparse as sp
from scipy.optimize import minimize

from radpilot.delivery.mlc import MlcModel

if TYPE_CHECKING:
    from radpilot.delivery.sequencing import BeamSequence

Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]  # fluence -> (value, gradient)
ROUNDS = 2  # boxes re-centred this many times
ITERATIONS_PER_ROUND = 40


@dataclass
class _Beam:
    """One beam's leaf pairs of every segment, flattened: the beamlet row a pair delivers, the
    fraction of that row's height it covers, its segment (global index), and whether it moves."""

    first: int  # the beam's first beamlet in the plan's fluence vector
    rows: np.ndarray  # beamlet grid rows / cols (the BeamGrid's)
    cols: np.ndarray
    shape: tuple[int, int]
    x0: float
    w: float
    row: np.ndarray  # per pair entry
    zfrac: np.ndarray
    seg: np.ndarray
    pair: np.ndarray
    free: np.ndarray  # bool: an open pair (its tips are variables)
    _gather: sp.csr_matrix | None = None

    @property
    def gather(self) -> sp.csr_matrix:
        """Beamlet rows x entries: which row each entry's opening falls on."""
        if self._gather is None:
            n = self.row.size
            self._gather = sp.csr_matrix(
                (np.ones(n), (self.row, np.arange(n))), shape=(self.shape[0], n)
            )
        return self._gather

    def overlap(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Open length (mm) of every pair entry over every column: entries x columns."""
        lo = self.x0 + np.arange(self.shape[1]) * self.w
        return np.clip(
            np.minimum(lo + self.w, right[:, None]) - np.maximum(lo, left[:, None]), 0.0, None
        )

    def edge_column(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The column each tip stands in (clipped to the map) and whether it lies on the map."""
        c = np.floor((x - self.x0) / self.w).astype(np.int64)
        return np.clip(c, 0, self.shape[1] - 1), (c >= 0) & (c < self.shape[1])


def _entries(
    beams: list[BeamSequence], mlc: MlcModel
) -> tuple[list[_Beam], np.ndarray, np.ndarray, np.ndarray]:
    """Every beam's pair entries, and the flat left/right tips and weights they start from."""
    out: list[_Beam] = []
    lefts, rights, weights = [], [], []
    first = seg0 = 0
    b = mlc.boundaries_mm
    for bs in beams:
        g = bs.grid
        row, zf, seg, pair, free = [], [], [], [], []
        for k, s in enumerate(bs.segments):
            for r in range(g.shape[0]):
                for p in range(int(g.pair_lo[r]), int(g.pair_hi[r])):
                    z = min(b[p + 1], s.jaw_y_mm[1]) - max(b[p], s.jaw_y_mm[0])
                    if z <= 0:
                        continue
                    row.append(r)
                    zf.append(z / g.bixel_mm)
                    seg.append(seg0 + k)
                    pair.append(p)
                    is_free = s.right_mm[p] - s.left_mm[p] > mlc.min_leaf_gap_mm + 1e-6
                    free.append(is_free)
                    if is_free:
                        lefts.append(float(s.left_mm[p]))
                        rights.append(float(s.right_mm[p]))
                    else:  # a closed pair's gap, fixed, as far as the X jaws leave it open
                        lefts.append(max(float(s.left_mm[p]), s.jaw_x_mm[0]))
                        rights.append(min(float(s.right_mm[p]), s.jaw_x_mm[1]))
            weights.append(s.weight)
        out.append(
            _Beam(
                first,
                g.rows,
                g.cols,
                g.shape,
                g.x0_mm,
                g.bixel_mm,
                np.asarray(row, dtype=np.int64),
                np.asarray(zf, dtype=np.float64),
                np.asarray(seg, dtype=np.int64),
                np.asarray(pair, dtype=np.int64),
                np.asarray(free, dtype=bool),
            )
        )
        first += g.rows.size
        seg0 += len(bs.segments)
    return out, np.asarray(lefts), np.asarray(rights), np.asarray(weights, dtype=np.float64)


def _boxes(
    parts: list[_Beam], left: np.ndarray, right: np.ndarray, mlc: MlcModel
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bounds for every tip this round: within one beamlet of its start and on the beam's map,
    at least the minimum gap from its own pair's other tip, and (without interdigitation) not
    past a neighbouring pair's opposing tip; closed pairs are held where they are."""
    l_lo, l_hi = left.copy(), left.copy()
    r_lo, r_hi = right.copy(), right.copy()
    at = 0
    half_gap = mlc.min_leaf_gap_mm / 2
    for part in parts:
        n = part.row.size
        sl = slice(at, at + n)
        lo_edge, hi_edge = part.x0, part.x0 + part.shape[1] * part.w
        f = part.free
        L, R = left[sl], right[sl]
        mid = (L + R) / 2
        ll, lh = l_lo[sl], l_hi[sl]
        rl, rh = r_lo[sl], r_hi[sl]
        ll[f] = np.minimum(np.maximum(L[f] - part.w, lo_edge), L[f])
        lh[f] = np.minimum(L[f] + part.w, mid[f] - half_gap)
        rl[f] = np.maximum(R[f] - part.w, mid[f] + half_gap)
        rh[f] = np.maximum(np.minimum(R[f] + part.w, hi_edge), R[f])
        if not mlc.interdigitation:
            # consecutive open pairs of one segment (closed ones between them are parked again
            # afterwards, inside both openings): each keeps an overlap of the minimum gap
            idx = np.flatnonzero(f)
            same = part.seg[idx[1:]] == part.seg[idx[:-1]]
            for a0, c0 in zip(idx[:-1][same], idx[1:][same], strict=True):
                for a, c in ((a0, c0), (c0, a0)):  # a's left tip against c's right tip
                    m = (L[a] + R[c]) / 2
                    room = half_gap if R[c] - L[a] >= 2 * half_gap else 0.0
                    lh[a] = max(min(lh[a], m - room), min(L[a], lh[a]))
                    rl[c] = min(max(rl[c], m + room), max(R[c], rl[c]))
        at += n
    return l_lo, l_hi, r_lo, r_hi


def _fluence_and_grad(
    parts: list[_Beam],
    num_beamlets: int,
    weights: np.ndarray,
    left: np.ndarray,
    right: np.ndarray,
    grad: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The plan's fluence; with ``grad`` (the objective's gradient in beamlet space), the
    gradient in (weights, left tips, right tips)."""
    x = np.zeros(num_beamlets)
    out = None
    if grad is not None:
        gw, gl, gr = np.zeros(weights.size), np.zeros(left.size), np.zeros(right.size)
    at = 0
    for part in parts:
        n = part.row.size
        sl = slice(at, at + n)
        at += n
        if n == 0:
            continue
        L, R = left[sl], right[sl]
        ov = part.overlap(L, R)  # entries x columns, mm
        scale = part.zfrac  # per entry: the part of the beamlet row the pair covers
        contrib = (weights[part.seg] * scale)[:, None] * ov / part.w
        fmap = part.gather @ contrib  # each beamlet row sums its pairs' entries
        idx = slice(part.first, part.first + part.rows.size)
        x[idx] = fmap[part.rows, part.cols]
        if grad is None:
            continue
        gmap = np.zeros(part.shape)
        gmap[part.rows, part.cols] = grad[idx]
        grow = gmap[part.row]  # entries x columns
        gw += np.bincount(
            part.seg, weights=scale * np.einsum("ij,ij->i", ov, grow) / part.w, minlength=gw.size
        )
        open_ = R > L
        cl, onl = part.edge_column(L)
        cr, onr = part.edge_column(R)
        k = weights[part.seg] * scale / part.w
        e = np.arange(n)
        gl[sl] = np.where(open_ & onl, -k * grow[e, cl], 0.0)
        gr[sl] = np.where(open_ & onr, k * grow[e, cr], 0.0)
    if grad is not None:
        out = np.concatenate([gw, gl, gr])
    return x, out


def refine_apertures(
    beams: list[BeamSequence],
    mlc: MlcModel,
    num_beamlets: int,
    objective: Objective,
    lower: np.ndarray,
    rounds: int = ROUNDS,
    iterations: int = ITERATIONS_PER_ROUND,
) -> dict[str, Any]:
    """Optimise the segments' leaf tips and weights together on ``objective`` (a function of the
    plan's fluence, with its gradient), each weight at least ``lower``; updates the segments in
    place (leaves, weights, X jaws) and says what it did."""
    parts, left, right, weights = _entries(beams, mlc)
    ns = weights.size
    if ns == 0:
        return {"segments": 0}
    calls = 0

    def f(theta: np.ndarray) -> tuple[float, np.ndarray]:
        nonlocal calls
        calls += 1
        w, L, R = theta[:ns], theta[ns : ns + left.size], theta[ns + left.size :]
        x, _ = _fluence_and_grad(parts, num_beamlets, w, L, R, None)
        value, g = objective(x)
        _, full = _fluence_and_grad(parts, num_beamlets, w, L, R, np.asarray(g, np.float64))
        assert full is not None
        return float(value), full

    theta = np.concatenate([weights, left, right])
    before = f(theta)[0]
    value = before
    for _ in range(rounds):
        L, R = theta[ns : ns + left.size], theta[ns + left.size :]
        l_lo, l_hi, r_lo, r_hi = _boxes(parts, L, R, mlc)
        bounds = (
            [(lo, None) for lo in lower]
            + list(zip(l_lo, l_hi, strict=True))
            + list(zip(r_lo, r_hi, strict=True))
        )
        res = minimize(
            f, theta, jac=True, method="L-BFGS-B", bounds=bounds, options={"maxiter": iterations}
        )
        if res.fun >= value * (1 - 1e-4):
            if res.fun < value:
                theta, value = res.x, float(res.fun)
            break
        theta, value = res.x, float(res.fun)
    _apply(beams, parts, theta, ns, left.size, mlc)
    return {
        "objective_before": round(float(before), 6),
        "objective_after": round(float(value), 6),
        "evaluations": calls,
        "moved_tips": int(np.sum(np.abs(theta[ns:] - np.concatenate([left, right])) > 1e-3)),
    }


def _apply(
    beams: list[BeamSequence], parts: list[_Beam], theta: np.ndarray, ns: int, n: int, mlc: MlcModel
) -> None:
    """Write optimised weights and open pairs' tips back into the segments, park the closed
    pairs again inside their open neighbours' openings and fit the X jaws to the opening."""
    weights, left, right = theta[:ns], theta[ns : ns + n], theta[ns + n :]
    segs = [s for bs in beams for s in bs.segments]
    for s, w in zip(segs, weights, strict=True):
        s.weight = float(w)
    opened: list[set[int]] = [set() for _ in segs]
    at = 0
    for part in parts:
        sl = slice(at, at + part.row.size)
        at += part.row.size
        for k, p, free, lo, hi in zip(
            part.seg, part.pair, part.free, left[sl], right[sl], strict=True
        ):
            if free:  # to the RT Plan's 0.01 mm, outwards: no gap or overlap gets smaller
                segs[k].left_mm[p] = np.floor(lo * 100 + 1e-9) / 100
                segs[k].right_mm[p] = np.ceil(hi * 100 - 1e-9) / 100
                opened[k].add(int(p))
    for s, pairs in zip(segs, opened, strict=True):
        if pairs:
            is_open = np.zeros(s.left_mm.size, dtype=bool)
            is_open[sorted(pairs)] = True
            park_closed(s.left_mm, s.right_mm, is_open, mlc.min_leaf_gap_mm)
            s.jaw_x_mm = (float(s.left_mm[is_open].min()), float(s.right_mm[is_open].max()))


GAP_CLEARANCE_MM = 0.01  # a closed pair's gap overlaps its open neighbour's opening by this


def park_closed(left: np.ndarray, right: np.ndarray, is_open: np.ndarray, min_gap: float) -> None:
    """Place every closed pair's gap (``min_gap`` wide) inside the openings of its nearest open
    pairs on either side, as far left as they allow, so that no leaf passes an opposing
    neighbour; in place."""
    open_pairs = np.flatnonzero(is_open)
    for p in np.flatnonzero(~is_open):
        below = open_pairs[open_pairs < p]
        above = open_pairs[open_pairs > p]
        lo = max(left[q] for q in [*below[-1:], *above[:1]])
        left[p], right[p] = lo - min_gap + GAP_CLEARANCE_MM, lo + GAP_CLEARANCE_MM


def leaf_rule_breaks(left: np.ndarray, right: np.ndarray, mlc: MlcModel) -> list[str]:
    """What a segment's leaf positions break of the machine's rules (empty: deliverable): a
    pair's tips closer than the minimum gap, a tip outside the leaf travel, and (without
    interdigitation) a tip past the opposing tip of a neighbouring pair."""
    out: list[str] = []
    tol = 1e-6
    for p in np.flatnonzero(right - left < mlc.min_leaf_gap_mm - tol):
        out.append(f"pair {p}: gap {right[p] - left[p]:.3f} mm < {mlc.min_leaf_gap_mm:g} mm")
    lo, hi = mlc.leaf_travel_mm
    for p in np.flatnonzero((left < lo - tol) | (right > hi + tol)):
        out.append(f"pair {p}: tips {left[p]:.2f}..{right[p]:.2f} mm outside the leaf travel")
    if not mlc.interdigitation:
        for p in np.flatnonzero((left[:-1] >= right[1:] - tol) | (left[1:] >= right[:-1] - tol)):
            out.append(f"pairs {p}/{p + 1}: a tip passes the neighbour's opposing tip")
    return out
