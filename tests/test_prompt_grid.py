"""server.grid.PromptGrid: Flower's send-and-receive semantics with a prompt poll (no Flower processes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import server.grid as grid_module
from server.grid import PromptGrid


class FakeGrid:
    """Replies to message ``i`` become available at pull number ``ready[i]``; records pushes and pulls."""

    def __init__(self, ready: list[int]) -> None:
        self.ready = ready
        self.pulls = 0
        self.pushed: list[str] = []
        self.asked: list[set[str]] = []

    def push_messages(self, messages):  # type: ignore[no-untyped-def]
        ids = [f"m{i}" for i, _ in enumerate(messages)]
        self.pushed.extend(ids)
        return ids

    def pull_messages(self, ids):  # type: ignore[no-untyped-def]
        self.pulls += 1
        self.asked.append(set(ids))
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in sorted(ids)
                if self.ready[int(i[1:])] <= self.pulls]

    def get_node_ids(self) -> list[int]:
        return [7, 8]


def _sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    pauses: list[float] = []
    monkeypatch.setattr(grid_module.time, "sleep", pauses.append)
    return pauses


def test_all_replies_are_collected_once_each_with_a_backing_off_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: three messages whose replies arrive at pulls 1, 4 and 7
    pauses = _sleeps(monkeypatch)
    fake = FakeGrid([1, 4, 7])
    # Execute
    replies = list(PromptGrid(fake).send_and_receive(["a", "b", "c"], timeout=None))
    # Assert: every reply once; a reply already in hand is not asked for again; pauses 0.1 doubling to 1 s
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert fake.pushed == ["m0", "m1", "m2"] and fake.pulls == 7
    assert fake.asked[0] == {"m0", "m1", "m2"} and fake.asked[1] == {"m1", "m2"} and fake.asked[-1] == {"m2"}
    assert pauses == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_a_timeout_returns_the_replies_that_arrived(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a clock that advances by each pause; the second reply never arrives
    now = [0.0]
    monkeypatch.setattr(grid_module.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(grid_module.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    fake = FakeGrid([2, 10**9])
    # Execute
    replies = list(PromptGrid(fake).send_and_receive(["a", "b"], timeout=2.0))
    # Assert: the first reply, and the wait stopped at the timeout (the last pause cut to what was left)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert now[0] == pytest.approx(2.0) and fake.pulls == 6  # pulls at t = 0, .1, .3, .7, 1.5, 2.0


def test_everything_else_is_the_wrapped_grid_and_bad_polls_are_refused() -> None:
    fake = FakeGrid([1])
    assert PromptGrid(fake).get_node_ids() == [7, 8]
    with pytest.raises(ValueError, match="first_poll_s"):
        PromptGrid(fake, first_poll_s=2.0, max_poll_s=1.0)
