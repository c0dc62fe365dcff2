"""Which controller owns an engine: weighted rendezvous hashing, pure and deterministic.

Every controller ranks the controllers for an engine the same way from the same list of live controllers,
without talking to anyone. For engine ``e`` and controller ``c`` with weight ``w``::

    h(e, c) = uniform in (0, 1) from BLAKE2b(e, c)        score(e, c) = -w / ln(h(e, c))

and the controller with the highest score wins. Controller ``i`` wins with probability ``w_i / sum(w)``
(the score is an exponential race), and when a controller joins or leaves only the engines whose winner
changes move: a joining controller takes about ``w_new / sum(w)`` of the engines, from every other
controller in proportion; a leaving controller's engines spread over the survivors by their weights.

Hashing alone leaves large differences when engines are few (6 engines on 3 controllers: a controller
gets none about 9% of the time), and a controller without engines adds nothing. So placement uses the
rendezvous *ranking* with *bounded loads*: each controller has a quota, its weighted share of the engines
(``quotas``: largest remainders, so they add up to the total); an engine that needs a home (its
controller died or left) goes to its best-ranked controller still under quota (``place``), and a
controller over quota (new engines stay where they first registered) sheds engines to the best-ranked
controllers under quota, the overloaded controllers sharing the free room in proportion to their excess
(``rebalance``). Only over-quota controllers move engines, so balanced federations move none.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence

_SCALE = float(1 << 64)


def _uniform(engine_id: int, cid: str) -> float:
    """A deterministic number in the open interval (0, 1) for the pair."""
    digest = hashlib.blake2b(f"{engine_id}\x00{cid}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 0.5) / _SCALE


def score(engine_id: int, cid: str, weight: float) -> float:
    """The rendezvous score of controller ``cid`` for engine ``engine_id`` (higher wins)."""
    if weight <= 0:
        return -math.inf
    return -weight / math.log(_uniform(engine_id, cid))


def owner(engine_id: int, controllers: Iterable[tuple[str, float]]) -> str | None:
    """The controller (by id) that owns ``engine_id`` among ``(cid, weight)`` pairs; None if there is none.

    Ties (equal scores) go to the smaller id, so the answer never depends on the order given."""
    best: str | None = None
    best_score = -math.inf
    for cid, weight in controllers:
        s = score(engine_id, cid, weight)
        if best is None or s > best_score or (s == best_score and cid < best):
            best, best_score = cid, s
    return best


def ranking(engine_id: int, controllers: Iterable[tuple[str, float]]) -> list[str]:
    """Controller ids from the one ``engine_id`` prefers most to the one it prefers least."""
    scored = sorted(((score(engine_id, cid, w), cid) for cid, w in controllers), key=lambda x: (-x[0], x[1]))
    return [cid for _, cid in scored]


def quotas(total: int, controllers: Sequence[tuple[str, float]]) -> dict[str, int]:
    """Each controller's share of ``total`` engines by weight, as integers adding up to ``total`` (the
    largest remainders get the rounding; ties by controller id)."""
    weight = sum(max(w, 0.0) for _, w in controllers)
    if not controllers or weight <= 0:
        return {cid: 0 for cid, _ in controllers}
    exact = {cid: total * max(w, 0.0) / weight for cid, w in controllers}
    out = {cid: math.floor(x) for cid, x in exact.items()}
    left = total - sum(out.values())
    for cid in sorted(exact, key=lambda c: (-(exact[c] - out[c]), c))[:left]:
        out[cid] += 1
    return out


def place(engine_id: int, controllers: Sequence[tuple[str, float]], counts: dict[str, int]) -> str | None:
    """Where a new engine goes: its best-ranked controller under quota (``counts``: engines each controller
    has now, this one not included)."""
    if not controllers:
        return None
    quota = quotas(sum(counts.get(c, 0) for c, _ in controllers) + 1, controllers)
    order = ranking(engine_id, controllers)
    for cid in order:
        if counts.get(cid, 0) < quota[cid]:
            return cid
    return order[0]


def rebalance(cid: str, engines: Sequence[int], controllers: Sequence[tuple[str, float]],
              counts: dict[str, int]) -> dict[int, str]:
    """Which of controller ``cid``'s ``engines`` to move where, when it is over quota: to the best-ranked
    controllers under quota, taking its share of their free room (shared by all over-quota controllers in
    proportion to their excess, so they do not all pile onto the same one). Empty when ``cid`` is within
    its quota."""
    weights = dict(controllers)
    if cid not in weights:
        return {}
    counts = {c: counts.get(c, 0) for c in weights}
    counts[cid] = len(engines)
    quota = quotas(sum(counts.values()), controllers)
    excess = {c: counts[c] - quota[c] for c in weights if counts[c] > quota[c]}
    mine = excess.get(cid, 0)
    if mine <= 0:
        return {}
    room = {c: quota[c] - counts[c] for c in weights if counts[c] < quota[c]}
    total_excess = sum(excess.values())
    share = {c: (r * mine) // total_excess + (1 if (r * mine) % total_excess else 0) for c, r in room.items()}
    moves: dict[int, str] = {}
    own = weights[cid]
    for eid in sorted(engines, key=lambda e: (score(e, cid, own), e)):  # those that like us least go first
        if len(moves) >= mine:
            break
        for target in ranking(eid, controllers):
            if target != cid and share.get(target, 0) > 0:
                moves[eid] = target
                share[target] -= 1
                break
    return moves


def assignment(engine_ids: Iterable[int], controllers: Sequence[tuple[str, float]]) -> dict[int, str]:
    """The owner of every engine id (engines map to nothing when there are no controllers)."""
    out: dict[int, str] = {}
    for eid in engine_ids:
        o = owner(eid, controllers)
        if o is not None:
            out[eid] = o
    return out
