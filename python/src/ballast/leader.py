"""Following a cluster's leader (``docs/replication.md``, "Where clients attach").

The rules of the Rust client's ``client/src/leader.rs``:

- A client may be given several addresses, the *seeds*
  (``"host1:7400,host2:7400,host3:7400"``); calls go to one of them, the
  *current* address, the first seed at the start.
- A follower answers a call on a replicated queue with UNAVAILABLE and the
  metadata ``ballast-leader: <host:port>`` (:class:`~ballast.errors.NotLeader`):
  the next calls go to that leader (:meth:`Seeds.follow`).
- A call that cannot reach its node (UNAVAILABLE the broker did not send,
  :attr:`~ballast.errors.Unavailable.unreachable`) moves the next calls to
  the next seed (:meth:`Seeds.next_seed`), skipping the seeds that could not
  be reached within :data:`UNREACHABLE_FOR`. A follower still naming a dead
  leader is not followed back there within that window either.

The failed call itself stays a retryable error: the producer's retry (with
the same idempotency keys) and the consumer's reconnect go to the new
address. This module holds only the choice of address; the channels are the
:class:`~ballast.client.Connection`'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("ballast")

#: Seconds an address that could not be reached is passed over: neither the
#: next seed chosen nor followed when a follower names it as leader (a
#: follower's view of the leader lags an election by up to an election
#: timeout). The Rust client's ``UNREACHABLE_FOR``.
UNREACHABLE_FOR = 3.0

_SCHEMES = ("http://", "https://")


def normalize(address: str) -> str:
    """``address`` without surrounding blanks and without an ``http://`` or
    ``https://`` prefix: the ``host:port`` a channel dials."""
    address = address.strip()
    for prefix in _SCHEMES:
        if address.startswith(prefix):
            return address[len(prefix) :]
    return address


def parse_addresses(addresses: str) -> list[str]:
    """The seeds of a comma-separated address list, in order, each
    :func:`normalize`\\ d, repeats dropped. Raises :class:`ValueError` on an
    empty list or an empty entry (``"a:1,,b:2"``), which is a typo."""
    seeds: list[str] = []
    for entry in addresses.split(","):
        address = normalize(entry)
        if not address:
            raise ValueError(
                f"empty address in {addresses!r}: give host:port, or several separated by commas"
            )
        if address not in seeds:
            seeds.append(address)
    return seeds


class Seeds:
    """The addresses a client may call and the one it calls now.

    ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(self, seeds: list[str], clock: Callable[[], float] = time.monotonic) -> None:
        if not seeds:
            raise ValueError("at least one address is needed")
        self.seeds = list(seeds)
        self._clock = clock
        self._current = self.seeds[0]
        self._unreachable: dict[str, float] = {}

    @property
    def current(self) -> str:
        """Where the next call goes."""
        return self._current

    def recently_unreachable(self, address: str) -> bool:
        """Whether a call could not reach ``address`` within the last
        :data:`UNREACHABLE_FOR` seconds."""
        failed_at = self._unreachable.get(address)
        return failed_at is not None and self._clock() - failed_at < UNREACHABLE_FOR

    def next_seed(self, failed: str) -> None:
        """A call to ``failed`` could not reach it: remember that, and if the
        next calls still go there, send them to the next seed after it that
        was not found unreachable lately (or simply the next one when all
        were). A leader followed outside the seeds hands back to the first
        seed. Nothing moves when calls already went elsewhere (another call
        failed first and moved them)."""
        self._unreachable[failed] = self._clock()
        if self._current != failed:
            return
        count = len(self.seeds)
        at = self.seeds.index(failed) + 1 if failed in self.seeds else 0
        candidates = [self.seeds[(at + k) % count] for k in range(count)]
        chosen = next(
            (s for s in candidates if s != failed and not self.recently_unreachable(s)),
            self.seeds[at % count],
        )
        self._switch(chosen, "the node in use cannot be reached")

    def follow(self, leader: str) -> None:
        """A node named ``leader`` (``host:port``) as the cluster's leader:
        the next calls go there, unless it could not be reached lately (the
        node's view lags the election; the calls stay and retry here)."""
        leader = normalize(leader)
        if not leader or self.recently_unreachable(leader):
            return
        self._switch(leader, "following the cluster leader")

    def _switch(self, address: str, why: str) -> None:
        if address != self._current:
            log.info("%s: calls go to %s (were going to %s)", why, address, self._current)
            self._current = address
