"""Integer arithmetic of the layer mode (internal; no public API here).

Amounts are parameters removed from one layer. With ``g`` groups removed, the amounts a
layer can reach form a grid ``g * params_per_group + h * params_per_channel`` where ``h``
runs over the allowed channel removals (those leaving a kept count on the
``mlp_round_to`` grid, or the layer unpruned)::

    kept:    inter   m_top*q   (m_top-1)*q   ...   m_bot*q
    h:         0        h1      h1 + q       ...    hmax
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from gqa_prune.allocation.config import AllocationConfig
from gqa_prune.allocation.target import Target
from gqa_prune.errors import GQAPruneError
from gqa_prune.models.geometry import GQAGeometry


@dataclass(frozen=True)
class LayerGrid:
    """What one prunable layer can remove.

    Attributes:
        kv, inter, size: KV groups, MLP channels, prunable params of the layer.
        gmax: most groups it may lose (floors and prune_attention applied).
        q, mbot, mtop: kept channel counts ``m * q`` for ``m`` in ``[mbot, mtop]`` (or
            the full ``inter``); ``mbot > mtop`` means the MLP cannot be pruned.
        lo, hi: removed params allowed by min/max_pruning_rate.
        ppg, ppc: params per group and per channel.
    """

    kv: int
    inter: int
    size: int
    gmax: int
    q: int
    mbot: int
    mtop: int
    lo: int
    hi: int
    ppg: int
    ppc: int

    @property
    def hmax(self) -> int:
        return self.inter - self.mbot * self.q if self.mbot <= self.mtop else 0

    def h_floor(self, x: int) -> int | None:
        """Largest allowed channel removal <= x (None if x < 0)."""
        if x < 0:
            return None
        if self.mbot > self.mtop or x < self.inter - self.mtop * self.q:
            return 0
        return min(self.hmax, self.inter + ((x - self.inter) // self.q) * self.q)

    def h_ceil(self, x: int) -> int | None:
        """Smallest allowed channel removal >= x (None if above hmax)."""
        if x <= 0:
            return 0
        if x > self.hmax:
            return None
        return max(
            self.inter - self.mtop * self.q, self.inter - ((self.inter - x) // self.q) * self.q
        )

    def v_floor(self, g: int, y: int) -> int | None:
        """Largest reachable amount <= y with g groups removed."""
        h = self.h_floor((y - g * self.ppg) // self.ppc)
        return None if h is None else g * self.ppg + h * self.ppc

    def v_ceil(self, g: int, y: int) -> int | None:
        """Smallest reachable amount >= y with g groups removed."""
        h = self.h_ceil(-((g * self.ppg - y) // self.ppc))
        return None if h is None else g * self.ppg + h * self.ppc

    def window(self, g: int) -> tuple[int, int] | None:
        """(lowest, highest) amount with g groups inside [lo, hi], or None."""
        lo, hi = self.v_ceil(g, self.lo), self.v_floor(g, self.hi)
        return None if lo is None or hi is None or lo > hi else (lo, hi)


def grid_of(geometry: GQAGeometry, config: AllocationConfig, layer: int) -> LayerGrid:
    """The grid of one prunable layer under the config's floors, grid and rate bounds."""
    kv, inter = geometry.kv_heads[layer], geometry.intermediate_sizes[layer]
    size = geometry.attention_params(layer) + geometry.mlp_params(layer)
    gmax = (
        (kv if config.allow_attention_removal else max(kv - 1, 0)) if config.prune_attention else 0
    )
    q = config.mlp_round_to
    mbot, mtop = -(-config.min_mlp_channels // q), (inter - 1) // q
    if mbot > mtop:  # too small for the grid: round to single channels
        q, mbot, mtop = 1, config.min_mlp_channels, inter - 1
    if not config.prune_mlp:
        mbot, mtop = 1, 0
    # decimal reading: max_pruning_rate=0.3 of 80 params allows 24, not floor(23.999...)
    lo = math.ceil(Fraction(repr(float(config.min_pruning_rate))) * size)
    hi = math.floor(Fraction(repr(float(config.max_pruning_rate))) * size)
    return LayerGrid(
        kv,
        inter,
        size,
        gmax,
        q,
        mbot,
        mtop,
        lo,
        hi,
        geometry.params_per_group,
        geometry.params_per_channel,
    )


def check_reach(
    grids: list[LayerGrid], layers: list[int], goal: Target, config: AllocationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Least and most params each layer may remove; refuses a target outside their sums.

    The refusal names the largest (or smallest) ratio reachable on the target's basis. A
    target is refused only when it is out of reach even at the edge of the tolerance
    (float slack up); landing itself aims strictly inside it (slack down).

    Args:
        grids: one grid per prunable layer.
        layers: the layer index of each grid (for messages).
        goal: the target on its basis.
        config: the constraints (for messages).

    Returns:
        ``(lo, hi)``, float arrays of shape ``(len(grids),)``.
    """
    wins = [[win for g in range(grid.gmax + 1) if (win := grid.window(g))] for grid in grids]
    for i, options in zip(layers, wins, strict=True):
        if not options:
            raise GQAPruneError(
                f"layer {i}: no whole number of groups and channels removes between "
                f"{config.min_pruning_rate:.1%} and {config.max_pruning_rate:.1%} of its params; "
                "widen --min_pruning_rate/--max_pruning_rate or lower --mlp_round_to"
            )
    lo = np.array([min(a for a, _ in win) for win in wins], float)
    hi = np.array([max(b for _, b in win) for win in wins], float)
    if goal.params - goal.edge > hi.sum():
        raise GQAPruneError(
            f"{goal.flag} is out of reach: the {len(grids)} prunable layers can remove at most "
            f"{goal.pct(hi.sum())} (floors: {'0' if config.allow_attention_removal else '1'} KV "
            f"group, {config.min_mlp_channels} MLP channels, --max_pruning_rate="
            f"{config.max_pruning_rate}); lower --pruning_ratio, widen --layer_start/--layer_end, "
            "lower --freeze_top_n_layers or raise --max_pruning_rate"
        )
    if goal.params + goal.edge < lo.sum():
        raise GQAPruneError(
            f"--min_pruning_rate={config.min_pruning_rate} alone removes {goal.pct(lo.sum())}, "
            f"more than {goal.flag}; lower --min_pruning_rate or raise --pruning_ratio"
        )
    return lo, hi


def solve_scale(base: np.ndarray, lo: np.ndarray, hi: np.ndarray, target: float) -> np.ndarray:
    """``clip(c * base, lo, hi)`` with ``c >= 0`` chosen by bisection so the sum hits target.

    The sum is non-decreasing in ``c``; a target outside ``[sum lo, sum hi]`` gives the
    nearest end.
    """

    def total(c: float) -> float:
        return float(np.clip(c * base, lo, hi).sum())

    if target >= hi.sum():
        return hi.copy()
    c_hi = 1.0
    while total(c_hi) < target and c_hi < 1e300:
        c_hi *= 2.0
    c_lo = 0.0
    for _ in range(100):
        mid = 0.5 * (c_lo + c_hi)
        c_lo, c_hi = (mid, c_hi) if total(mid) < target else (c_lo, mid)
    return np.clip(c_hi * base, lo, hi)


def largest_remainder(x: np.ndarray, n_total: int, lo: np.ndarray, hi: np.ndarray) -> list[int]:
    """Integers in ``[lo, hi]`` summing to ``n_total``, near ``x``; ties go to earlier entries."""
    g = np.clip(np.floor(x + 1e-9), lo, hi).astype(int)
    frac = x - g
    missing = n_total - int(g.sum())
    if missing > 0:
        step, order = 1, sorted(range(x.size), key=lambda k: (-frac[k], k))
    else:
        step, order = -1, sorted(range(x.size), key=lambda k: (frac[k], -k))
    for k in order * 2:
        if missing == 0:
            break
        if lo[k] <= g[k] + step <= hi[k]:
            g[k] += step
            missing -= step
    return [int(v) for v in g]


def fit_mlp(
    grids: list[LayerGrid],
    groups: list[int],
    w: np.ndarray,
    target: float,
    tol: float,
    ordered: bool,
) -> list[int] | None:
    """Removed params per layer with the groups fixed: the MLP absorbs the rest.

    Layers come in strategy order (highest weight ``w`` first). Each layer's goal is
    ``clip(c * w * size, window)`` with ``sum = target``; amounts start at the grid point
    below the goal, then single grid steps go to the layer furthest below its goal among
    those whose step brings the total closer to target. With ``ordered``, no layer may end with
    a higher rate (amount / size) than the layer before it. None when the windows exclude
    the target.
    """
    wins = [grid.window(g) for grid, g in zip(grids, groups, strict=True)]
    if any(win is None for win in wins):
        return None
    lo = [win[0] for win in wins if win]
    hi = [win[1] for win in wins if win]
    size = [grid.size for grid in grids]
    n = len(grids)
    if ordered:  # bounds themselves monotone in rate, exact integer comparisons
        for k in range(1, n):
            cap = grids[k].v_floor(groups[k], hi[k - 1] * size[k] // size[k - 1])
            hi[k] = -1 if cap is None else min(hi[k], cap)
        for k in range(n - 2, -1, -1):
            need = grids[k].v_ceil(groups[k], -(-lo[k + 1] * size[k] // size[k + 1]))
            lo[k] = hi[k] + 1 if need is None else max(lo[k], need)
        if any(a > b for a, b in zip(lo, hi, strict=True)):
            return None
    if sum(lo) > target + tol or sum(hi) < target - tol:
        return None
    goal = solve_scale(w * np.array(size, float), np.array(lo, float), np.array(hi, float), target)
    # goal[k] >= lo[k], a grid point, so v_floor never falls below lo[k]
    v = [max(lo[k], grids[k].v_floor(groups[k], math.floor(goal[k])) or 0) for k in range(n)]
    if ordered:
        for k in range(1, n):
            cap = grids[k].v_floor(groups[k], v[k - 1] * size[k] // size[k - 1]) or 0
            v[k] = max(lo[k], min(v[k], cap))
    total = sum(v)
    while total < target:
        best, best_gap, best_next = -1, -math.inf, 0
        for k in range(n):
            nxt = grids[k].v_ceil(groups[k], v[k] + 1)
            if nxt is None or nxt > hi[k]:
                continue
            if ordered and k > 0 and nxt * size[k - 1] > v[k - 1] * size[k]:
                continue
            if total + nxt - v[k] - target >= target - total:
                continue  # this step would not bring the total closer
            if goal[k] - v[k] > best_gap:
                best, best_gap, best_next = k, goal[k] - v[k], nxt
        if best < 0:
            break
        total += best_next - v[best]
        v[best] = best_next
    return v


def search_groups(
    grids: list[LayerGrid],
    w: np.ndarray,
    rate: np.ndarray,
    n_wanted: float,
    target: float,
    tol: float,
    ordered: bool,
) -> list[tuple[int, int]] | float:
    """Removed (groups, channels) per layer, or the smallest miss if nothing is within tol.

    Total group counts are tried nearest ``n_wanted`` first (64 at most); each count is
    shared among layers by ``rate * kv`` (largest remainder), then :func:`fit_mlp`.
    """
    wins = [[g for g in range(grid.gmax + 1) if grid.window(g)] for grid in grids]
    gmin = np.array([min(win) for win in wins])
    gmax = np.array([max(win) for win in wins])
    share = rate * np.array([grid.kv for grid in grids]) + 1e-12
    counts = range(int(gmin.sum()), int(gmax.sum()) + 1)
    best = math.inf
    for n_groups in sorted(counts, key=lambda n: (abs(n - n_wanted), n))[:64]:
        x = solve_scale(share, gmin.astype(float), gmax.astype(float), n_groups)
        groups = largest_remainder(x, n_groups, gmin, gmax)
        v = fit_mlp(grids, groups, w, target, tol, ordered)
        if v is not None and abs(sum(v) - target) <= tol:
            return [
                (g, (r - g * grid.ppg) // grid.ppc)
                for g, r, grid in zip(groups, v, grids, strict=True)
            ]
        best = min(best, math.inf if v is None else abs(sum(v) - target))
    return best


def _spread(reach: int, step: int, count: int, mask: int) -> int:
    """OR of ``reach << (k * step)`` for k in [0, count), by doubling (O(log count) shifts)."""
    out, block, span, shift = 0, reach, 1, 0
    while count:
        if count & 1:
            out |= (block << shift) & mask
            shift += span * step
        block |= (block << (span * step)) & mask
        span, count = span * 2, count >> 1
    return out


def exact_fit(
    grids: list[LayerGrid], target: float, tol: float, goals: np.ndarray, max_bits: int = 1 << 21
) -> list[tuple[int, int]] | None | bool:
    """(groups, channels) per layer with the total nearest ``target``, if within ``tol``.

    Exact subset-sum over layers on a bitset of reachable totals (in units of
    gcd(params_per_group, params_per_channel)); the backtrack gives each layer, from the
    last, the feasible amount nearest its ``goals`` entry. Layers with identical grids then
    swap choices so that amounts never increase along the list (the strategy order).
    Returns None if no combination is within ``tol``, False if the bitset would need more
    than ``max_bits`` bits.
    """
    ppg, ppc = grids[0].ppg, grids[0].ppc
    unit = math.gcd(ppg, ppc)
    top, bottom = math.floor((target + tol) / unit), max(math.ceil((target - tol) / unit), 0)
    if top > max_bits:
        return False
    mask = (1 << (top + 1)) - 1
    choices: list[list[tuple[int, np.ndarray]]] = []  # per layer: (g, reachable h)
    prefix = [1]
    for grid in grids:
        acc, mine = 0, []
        for g in range(grid.gmax + 1):
            win = grid.window(g)
            if win is None:
                continue
            h_lo, h_hi = (win[0] - g * ppg) // ppc, (win[1] - g * ppg) // ppc
            first = grid.h_ceil(max(h_lo, 1)) or 0
            ap = 0 if not first or first > h_hi else (h_hi - first) // grid.q + 1
            base = prefix[-1] << (g * ppg // unit)
            if h_lo == 0:
                acc |= base & mask
            if ap:
                acc |= _spread(base << (first * ppc // unit), grid.q * ppc // unit, ap, mask)
            hs = np.arange(first, first + ap * grid.q, grid.q)
            mine.append((g, np.concatenate([[0], hs]) if h_lo == 0 else hs))
        choices.append(mine)
        prefix.append(acc & mask)

    def bits(reach: int) -> np.ndarray:
        raw = np.frombuffer(reach.to_bytes(top // 8 + 1, "little"), np.uint8)
        return np.unpackbits(raw, bitorder="little")[: top + 1]

    hits = np.flatnonzero(bits(prefix[-1])[bottom:]) + bottom
    if hits.size == 0:
        return None
    total = int(hits[np.argmin(np.abs(hits - target / unit))])
    out: list[tuple[int, int]] = []
    for k in range(len(grids) - 1, -1, -1):
        ok_bits, best = bits(prefix[k]), (math.inf, 0, 0)
        for g, hs in choices[k]:
            amount = g * ppg + hs * ppc
            rest = total - amount // unit
            ok = (rest >= 0) & (ok_bits[np.clip(rest, 0, top)] == 1)
            if ok.any():
                j = int(np.argmin(np.where(ok, np.abs(amount - goals[k]), np.inf)))
                best = min(best, (float(abs(amount[j] - goals[k])), g, int(hs[j])))
        out.append(best[1:])
        total -= (best[1] * ppg + best[2] * ppc) // unit
    out.reverse()
    for same in _classes(grids):  # identical layers: larger removals go first in the order
        ranked = sorted((out[k] for k in same), key=lambda c: -(c[0] * ppg + c[1] * ppc))
        for k, choice in zip(same, ranked, strict=True):
            out[k] = choice
    return out


def _classes(grids: list[LayerGrid]) -> list[list[int]]:
    """Positions of identical grids, each list ascending."""
    groups: dict[LayerGrid, list[int]] = {}
    for k, grid in enumerate(grids):
        groups.setdefault(grid, []).append(k)
    return list(groups.values())
