"""Greedy knapsack behind :func:`gqa_prune.allocation.allocate_global` (internal).

Every removable GQA group and MLP step of every prunable layer is a *unit* priced at
``score / params removed``. Each layer contributes two queues (groups, MLP steps), each
in price order; taking units cheapest-first across all queues is a greedy knapsack.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from gqa_prune.allocation.solver import LayerGrid
from gqa_prune.errors import GQAPruneError


def layer_units(
    grid: LayerGrid, layer: int, group_scores: np.ndarray, channel_scores: np.ndarray
) -> list[tuple[np.ndarray, ...]]:
    """Global-mode queues of one layer: its removable groups and MLP steps, cheapest first,
    as ``(price, layer, kind, amount, params)`` arrays; price = score sum / params."""
    gs, cs = np.sort(group_scores)[: grid.gmax], np.sort(channel_scores)
    queues: list[tuple[np.ndarray, ...]] = [
        (
            gs / grid.ppg,
            np.full(gs.size, layer),
            np.zeros(gs.size),
            np.ones(gs.size),
            np.full(gs.size, grid.ppg),
        )
    ]
    if grid.hmax:  # steps between allowed removals 0 < h1 < h1 + q < ... <= hmax
        h = np.concatenate([[0], np.arange(grid.h_ceil(1) or 0, grid.hmax + 1, grid.q)])
        step, cum = np.diff(h), np.concatenate([[0.0], np.cumsum(cs)])[h]
        queues.append(
            (
                np.diff(cum) / (step * grid.ppc),
                np.full(step.size, layer),
                np.ones(step.size),
                step,
                step * grid.ppc,
            )
        )
    return queues


class CheapestFirst:
    """Greedy knapsack over units: cheapest first, each layer's queues kept in price order.

    Unit ``k`` removes ``params[k]`` parameters (``amount[k]`` groups if ``kind[k] == 0``,
    channels if 1) from ``layer[k]``. A unit that does not fit (its layer above ``hi`` or,
    with ``cap_total``, the total above ``limit``) closes its queue (layer, kind): the
    rest of that queue comes after it. Runs are vectorised: each numpy pass takes the
    longest prefix that fits, so a pass either finishes or closes one queue.

    Args:
        parts: ``(price, layer, kind, amount, params)`` arrays, one tuple per queue, each
            queue in price order.
        hi: most params each layer may lose.
        limit: most params all layers together may lose.
    """

    def __init__(
        self, parts: list[tuple[np.ndarray, ...]], hi: dict[int, int], limit: float
    ) -> None:
        price, layer, kind, amount, params = (
            np.concatenate([np.zeros(0, dt)] + [np.asarray(p[k], dt) for p in parts])
            for k, dt in enumerate((float, np.int64, np.int64, np.int64, np.int64))
        )
        order = np.argsort(price, kind="stable")  # stable: queue order is kept
        self.layer, self.kind, self.amount, self.params = (
            layer[order],
            kind[order],
            amount[order],
            params[order],
        )
        self.hi, self.limit = hi, limit
        self.taken = np.zeros(order.size, bool)
        self.closed = np.zeros((max(hi, default=0) + 1, 2), bool)  # [layer, kind]
        self.removed = dict.fromkeys(hi, 0)
        self.total = 0
        self.attention = 0

    def pool(self, *, kind: int | None = None) -> np.ndarray:
        """Positions of all units (or of one kind: 0 groups, 1 channels), cheapest first."""
        return np.arange(self.layer.size) if kind is None else np.flatnonzero(self.kind == kind)

    def layer_pools(self) -> dict[int, np.ndarray]:
        """Positions of each layer's units, cheapest first."""
        by_layer = np.argsort(self.layer, kind="stable")
        ends = np.cumsum(np.bincount(self.layer, minlength=len(self.closed)))
        starts = np.concatenate([[0], ends[:-1]])
        return {i: by_layer[starts[i] : ends[i]] for i in self.hi}

    def got(self) -> dict[int, tuple[int, int]]:
        """{layer: (groups taken, channels taken)}."""
        counts = [
            np.bincount(
                self.layer[self.taken & (self.kind == k)],
                weights=self.amount[self.taken & (self.kind == k)],
                minlength=len(self.closed),
            )
            for k in (0, 1)
        ]
        return {i: (int(counts[0][i]), int(counts[1][i])) for i in self.hi}

    def measured(self, what: int | str) -> int:
        """Params removed in one layer (int), from attention, or in total."""
        if isinstance(what, int):
            return self.removed[what]
        return self.attention if what == "attention" else self.total

    def run(
        self,
        pool: np.ndarray,
        goal: float,
        measure: int | str = "total",
        cap_total: bool = True,
        chunk: int = 1 << 15,
    ) -> None:
        """Take units of ``pool`` in order until ``measured(measure)`` reaches ``goal``."""
        start = 0
        while self.measured(measure) < goal and start < pool.size:
            window = pool[start : start + chunk]
            idx = np.flatnonzero(
                ~self.taken[window] & ~self.closed[self.layer[window], self.kind[window]]
            )
            if idx.size == 0:
                start += window.size
                continue
            pos = window[idx]
            csum = np.cumsum(self.params[pos])
            n = min(
                int(np.searchsorted(self.measured(measure) + csum, goal, side="left")) + 1, pos.size
            )
            stop = n
            if cap_total and self.total + csum[n - 1] > self.limit:
                stop = int(np.argmax(self.total + csum[:n] > self.limit))
            per_layer = np.bincount(self.layer[pos[:n]], weights=self.params[pos[:n]])
            for i in np.flatnonzero(per_layer):
                if self.removed[int(i)] + per_layer[i] > self.hi[int(i)]:
                    mine = np.flatnonzero(self.layer[pos[:n]] == i)
                    over = (
                        self.removed[int(i)] + np.cumsum(self.params[pos[mine]]) > self.hi[int(i)]
                    )
                    stop = min(stop, int(mine[np.argmax(over)]))
            self._take(pos[:stop])
            if stop < n:
                self.closed[self.layer[pos[stop]], self.kind[pos[stop]]] = True
            start += int(idx[min(stop, n - 1)]) + 1

    def give_back(self, goal: float, lo: dict[int, int]) -> None:
        """Return the dearest MLP steps taken while the total stays at or above ``goal``.

        The last unit a run takes can be a whole GQA group that crosses ``goal`` by up to its
        size; giving back the dearest channel steps (each layer's last, so every layer still
        removes a cheapest-first prefix) lands the total within one MLP step above ``goal``.
        A layer whose dearest step does not fit (the total would drop below ``goal``, or
        the layer below its floor ``lo``) gives back no more.
        """
        taken = np.flatnonzero(self.taken & (self.kind == 1))[::-1]  # dearest first
        smallest = int(self.params[taken].min(initial=np.iinfo(np.int64).max))
        done: set[int] = set()
        for p in taken:
            if self.total - goal < smallest:
                return
            i, size = int(self.layer[p]), int(self.params[p])
            if i in done or self.total - size < goal or self.removed[i] - size < lo.get(i, 0):
                done.add(i)
                continue
            self.taken[p] = False
            self.total -= size
            self.removed[i] -= size

    def _take(self, pos: np.ndarray) -> None:
        self.taken[pos] = True
        p = self.params[pos]
        self.total += int(p.sum())
        self.attention += int(p[self.kind[pos] == 0].sum())
        for i, amount in enumerate(np.bincount(self.layer[pos], weights=p)):
            if amount:
                self.removed[i] += int(amount)


def remove_cheapest(
    grids: dict[int, LayerGrid],
    scores: dict[int, tuple[Sequence[float], Sequence[float]]],
    target: float,
    tol: float,
    attention_goal: float | None,
) -> tuple[dict[int, tuple[int, int]], int, int | None]:
    """Run the global passes over the prunable layers' (group, channel) scores.

    1. each layer takes its own cheapest units until it reaches ``grid.lo`` (min rate);
    2. with ``attention_goal``: groups only up to that many params, then channels only;
    3. any unit, until ``target``. A unit above ``target + tol`` or its layer's ``hi``
       is skipped together with the rest of its queue;
    4. the dearest MLP steps taken go back while the total stays at or above ``target``
       (a crossing group overshoots by up to its size; this lands within one MLP step).

    Returns:
        ``({layer: (groups, channels)}, params removed, None)``, or a layer that cannot
        reach its min rate as the third item.
    """
    queues: list[tuple[np.ndarray, ...]] = []
    for i, grid in grids.items():
        gs, cs = (np.asarray(x, float).reshape(-1) for x in scores[i])
        finite = np.isfinite(gs).all() and np.isfinite(cs).all()
        if (gs.size, cs.size) != (grid.kv, grid.inter) or not finite:
            raise GQAPruneError(
                f"layer {i}: expected {grid.kv} group and {grid.inter} channel "
                f"scores, all finite; got {gs.size} and {cs.size}"
            )
        queues += layer_units(grid, i, gs, cs)
    greedy = CheapestFirst(queues, {i: g.hi for i, g in grids.items()}, target + tol)
    if any(g.lo for g in grids.values()):
        for i, pool in greedy.layer_pools().items():
            greedy.run(pool, grids[i].lo, measure=i, cap_total=False)
            if greedy.removed[i] < grids[i].lo:
                return {}, greedy.total, i
        greedy.closed[:] = False
    if attention_goal is not None:
        greedy.run(greedy.pool(kind=0), attention_goal, measure="attention")
        greedy.run(greedy.pool(kind=1), target)
    greedy.run(greedy.pool(), target)
    greedy.give_back(target, {i: g.lo for i, g in grids.items()})
    return greedy.got(), greedy.total, None
