"""Which controller owns an engine: weighted rendezvous hashing, pure and deterministic.

Every process (controllers, engines, clients) computes the same answer from the same list of live
controllers, without talking to anyone. For engine ``e`` and controller ``c`` with weight ``w``::

    h(e, c) = uniform in (0, 1) from BLAKE2b(e, c)        score(e, c) = -w / ln(h(e, c))

and the controller with the highest score wins. Controller ``i`` wins with probability ``w_i / sum(w)``
(the score is an exponential race), and when a controller joins or leaves only the engines whose winner
changes move: a joining controller takes about ``w_new / sum(w)`` of the engines, from every other
controller in proportion; a leaving controller's engines spread over the survivors by their weights.
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


def assignment(engine_ids: Iterable[int], controllers: Sequence[tuple[str, float]]) -> dict[int, str]:
    """The owner of every engine id (engines map to nothing when there are no controllers)."""
    out: dict[int, str] = {}
    for eid in engine_ids:
        o = owner(eid, controllers)
        if o is not None:
            out[eid] = o
    return out
