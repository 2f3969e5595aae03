"""A ``Grid`` that collects replies promptly.

Flower's ``HttpGrid`` (the ServerApp's link to a deployed SuperLink) sleeps 3 s between two pulls of replies, so each
exchange of messages (a training round, an evaluation, a query, each of SecAgg+'s four stages, each DP-FedSGD
sub-round of the distributed classifier) ends on a 3 s tick after its last reply arrived: 1.5 s lost on average per
exchange (an estimate: some 30 exchanges and 45 s a round with the distributed classifier's seven sub-rounds).
:class:`PromptGrid` pushes and pulls through the same grid but polls after 0.1 s, backing off to at most 1 s, with
Flower's semantics otherwise (all replies, or what arrived by ``timeout``; ``None`` waits for all). Everything else is
delegated.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_POLL_S = 0.1
MAX_POLL_S = 1.0


class PromptGrid:
    """``grid`` with a prompter :meth:`send_and_receive` (see the module docstring)."""

    def __init__(self, grid: Grid, *, first_poll_s: float = FIRST_POLL_S, max_poll_s: float = MAX_POLL_S) -> None:
        if not 0 < first_poll_s <= max_poll_s:
            raise ValueError(f"need 0 < first_poll_s <= max_poll_s, got {first_poll_s} and {max_poll_s}")
        self._grid = grid
        self.first_poll_s, self.max_poll_s = first_poll_s, max_poll_s

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all arrived or ``timeout`` seconds passed."""
        pending = set(self._grid.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        wait = self.first_poll_s
        while True:  # the last pull is at the deadline: a reply that arrived during the last pause is kept
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            left = None if timeout is None else end - time.monotonic()
            if not pending or (left is not None and left <= 0):
                return replies
            time.sleep(wait if left is None else min(wait, left))
            wait = min(wait * 2, self.max_poll_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
