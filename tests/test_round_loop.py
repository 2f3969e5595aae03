"""The round loop drives the strategy with the true round number; the release reaches each site as its own delta."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from common.core.config import RunConfig
from common.federated.flwr_records import ROUND_KEY, bundle_to_record, delta_from_content, held_from_config
from common.models.bundle import build_bundle, expected_shapes, federated_arrays
from server.federation import fl_round
from server.strategy import GuardedStrategy, make_strategy, update_bounds
from tests.test_release import _item


class _Node:
    def __init__(self, node_id: int) -> None:
        self.node_id, self.name = node_id, ""


class _SilentGrid:
    """Two nodes that never answer; it keeps every message it was asked to send."""

    def __init__(self) -> None:
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return [1, 2]

    def get_nodes(self) -> list[_Node]:
        return [_Node(1), _Node(2)]

    def send_and_receive(self, messages: Any, timeout: float) -> list[Message]:
        self.sent.extend(messages)
        return []


def _strategy(cfg: RunConfig, bundle: Any) -> GuardedStrategy:
    return GuardedStrategy(make_strategy(cfg), expected_shapes=expected_shapes(bundle), update_bounds=update_bounds(cfg))


@pytest.mark.usefixtures("task_identity")
def test_every_message_of_a_round_carries_the_true_round_and_the_model_is_kept_without_replies(tmp_path: Path) -> None:
    # Prepare: round 5 of a resumed run
    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path)})
    bundle = build_bundle(cfg)
    before = federated_arrays(bundle)
    grid = _SilentGrid()
    # Execute
    train, evaluate = fl_round(_strategy(cfg, bundle), grid, bundle, 5, timeout=1.0)  # type: ignore[arg-type]
    # Assert: Flower's own key says 5 in the train and the evaluate messages; no reply leaves the weights as they were
    kinds = sorted(m.metadata.message_type for m in grid.sent)
    assert kinds == ["evaluate", "evaluate", "train", "train"]
    assert {int(m.content["config"][ROUND_KEY]) for m in grid.sent} == {5}
    assert train is None and evaluate is None
    for key, value in federated_arrays(bundle).items():
        np.testing.assert_array_equal(value, before[key])


@pytest.mark.usefixtures("task_identity")
def test_each_site_gets_only_the_release_it_lacks(tmp_path: Path) -> None:
    # Prepare: a release of 3; node 1 says it holds all of it, node 2 has said nothing
    from common.active_learning.release_sync import Held, chain_digest
    from server.coordinator import Coordinator

    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path), "federation.al-every": 1})
    coordinator = Coordinator(cfg, run_dir=tmp_path)
    coordinator.sync_with_checkpoint()  # in step with the (absent) checkpoint, as during a run's first query round
    coordinator.store.add([_item(i) for i in range(3)])
    digest = chain_digest([r["sha256"] for r in coordinator.store.records()])
    coordinator.acknowledge({1: Held(count=3, digest=digest), 2: None})
    bundle = build_bundle(cfg)
    strategy = _strategy(cfg, bundle)
    strategy.extra_train_records = coordinator.train_records
    grid = _SilentGrid()
    # Execute
    messages = list(strategy.configure_train(2, bundle_to_record(bundle), _config(2), grid))  # type: ignore[arg-type]
    # Assert: node 1's message carries no image, node 2's the whole release; the weights are the same object
    deltas = {m.metadata.dst_node_id: delta_from_content(m.content) for m in messages}
    assert deltas[1] is not None and len(deltas[1].keys) == 0 and deltas[1].offset == 3
    assert deltas[2] is not None and len(deltas[2].keys) == 3 and deltas[2].offset == 0
    assert strategy.reports[2].bytes_down - strategy.reports[1].bytes_down >= 3 * 16 * 16
    assert messages[0].content["arrays"] is messages[1].content["arrays"]
    # a failed reply (nothing acknowledged) sends everything again
    coordinator.acknowledge({1: held_from_config({})})  # type: ignore[arg-type]
    assert len(delta_from_content(_content(coordinator.train_records(1))).keys) == 3  # type: ignore[union-attr]


def _config(server_round: int) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({ROUND_KEY: server_round})


def _content(records: Any) -> Any:
    from flwr.app import RecordDict

    return RecordDict(dict(records))
