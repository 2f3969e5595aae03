"""GuardedStrategy: malformed, failed and budget-exhausted replies never reach aggregation."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from common.core.config import get_preset
from common.core.errors import ConfigError
from common.federated.flwr_records import arrays_to_record, record_to_arrays
from server.strategy import GuardedStrategy, make_strategy

SHAPES = {"generator.w": (2, 3), "classifier.b": (4,)}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages outside a Flower runtime need a task identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _reply(node: int, arrays: dict[str, np.ndarray], *, status: str = "ok", n: int = 10,
           metrics: dict | None = None, drop: str = "") -> Message:
    request = Message(content=RecordDict({"config": ConfigRecord({"server-round": 1})}), dst_node_id=node,
                      message_type="train")
    content = {
        "arrays": arrays_to_record(arrays),
        "metrics": MetricRecord(metrics or {"num-examples": n, "generator-loss": 0.5}),
        "site": ConfigRecord({"name": f"hospital-{node}", "status": status, "metrics": "{}",
                              "privacy": json.dumps({"generator": {"epsilon": 1.0}}), "messages": "[]"}),
    }
    content.pop(drop, None)
    return Message(content=RecordDict(content), reply_to=request)


def _good(value: float) -> dict[str, np.ndarray]:
    return {"generator.w": np.full((2, 3), value, np.float32), "classifier.b": np.full(4, value, np.float32)}


def test_valid_replies_are_averaged_and_bad_ones_rejected_with_the_site_named() -> None:
    # Prepare
    strategy = GuardedStrategy(FedAvg(), expected_shapes=SHAPES)
    failed_request = Message(content=RecordDict(), dst_node_id=7, message_type="train")
    replies = [
        _reply(1, _good(1.0)),
        _reply(2, _good(3.0)),
        _reply(3, {"generator.w": np.zeros((3, 2), np.float32), "classifier.b": np.zeros(4, np.float32)}),
        _reply(4, {**_good(0.0), "classifier.b": np.array([0, np.nan, 0, 0], np.float32)}),
        _reply(5, {"generator.w": np.zeros((2, 3), np.float32)}),
        _reply(6, _good(100.0), drop="site"),
        Message(Error(code=700, reason="site hospital-7: RuntimeError: disk full"), reply_to=failed_request),
        _reply(8, _good(50.0), metrics={"num-examples": 5, "generator-loss": float("inf")}),
    ]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert: only hospitals 1 and 2 were averaged (equal weights)
    assert arrays is not None
    assert np.allclose(record_to_arrays(arrays)["generator.w"], 2.0)
    status = {r.name: (r.status, r.reason) for r in strategy.reports.values()}
    assert status["hospital-1"][0] == status["hospital-2"][0] == "ok"
    assert status["hospital-3"][0] == "rejected" and "shape" in status["hospital-3"][1]
    assert status["hospital-4"][0] == "rejected" and "non-finite" in status["hospital-4"][1]
    assert status["hospital-5"][0] == "rejected" and "missing ['classifier.b']" in status["hospital-5"][1]
    assert status["node-6"][0] == "rejected" and "lacks" in status["node-6"][1]
    assert status["node-7"] == ("failed", "site hospital-7: RuntimeError: disk full")
    assert status["hospital-8"][0] == "rejected" and "not finite" in status["hospital-8"][1]


def test_budget_exhausted_site_is_not_averaged_and_is_skipped_next_round() -> None:
    strategy = GuardedStrategy(FedAvg(), expected_shapes=SHAPES)
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _good(1.0)), _reply(2, _good(9.0), status="budget-exhausted", n=0)])
    assert arrays is not None and np.allclose(record_to_arrays(arrays)["classifier.b"], 1.0)
    assert strategy.exhausted == {2}
    assert {r.name: r.status for r in strategy.reports.values()}["hospital-2"] == "budget-exhausted"


def test_no_valid_reply_leaves_the_model_unchanged() -> None:
    strategy = GuardedStrategy(FedAvg(), expected_shapes=SHAPES)
    arrays, metrics = strategy.aggregate_train(1, [_reply(3, {"generator.w": np.zeros((1,), np.float32)})])
    assert arrays is None and metrics is None


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [("fedavg", {}, 22.2),
     ("fedprox", {"federation.proximal-mu": 0.01}, 22.2),  # server side it averages; the proximal term is at the sites
     ("fedmedian", {}, 3.0),
     ("trimmedmean", {}, 10 / 3),  # beta=0.2 of 5 replies: the lowest and the highest are cut
     ("krum", {}, 3.0)],  # the reply closest to its 3 nearest neighbours
)
def test_strategy_from_config_aggregates_as_its_name_says(name: str, extra: dict, expected: float) -> None:
    # Prepare: five sites, equal example counts, one far outlier
    cfg = get_preset("smoke").from_flat({"preset": "smoke", "federation.strategy": name, **extra})
    strategy = GuardedStrategy(make_strategy(cfg), expected_shapes=SHAPES)
    replies = [_reply(node, _good(value)) for node, value in enumerate([1.0, 2.0, 3.0, 5.0, 100.0], start=1)]
    # Execute
    arrays, _ = strategy.aggregate_train(1, replies)
    # Assert
    assert arrays is not None
    assert np.allclose(record_to_arrays(arrays)["generator.w"], expected)


def test_fedprox_tells_the_sites_the_configured_mu() -> None:
    cfg = get_preset("smoke").from_flat({"preset": "smoke", "federation.strategy": "fedprox",
                                         "federation.proximal-mu": 0.3})
    strategy = make_strategy(cfg)
    # Flower's FedProx puts it into the train config; the sites read the same value from their run config
    assert strategy.proximal_mu == 0.3  # type: ignore[attr-defined]


def _fedadam_round(extra: dict[str, float]) -> tuple[Any, np.ndarray]:
    """One FedAdam aggregation from weights 0 of two replies, 1 and 3 (average 2): the strategy and the result."""
    cfg = get_preset("smoke").from_flat({"preset": "smoke", "federation.strategy": "fedadam", **extra})
    strategy = GuardedStrategy(make_strategy(cfg), expected_shapes=SHAPES)
    strategy.base.current_arrays = {k: v.copy() for k, v in _good(0.0).items()}  # what configure_train sets
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _good(1.0)), _reply(2, _good(3.0))])
    assert arrays is not None
    return strategy.base, record_to_arrays(arrays)["generator.w"]


def _first_fedadam_step(eta: float, tau: float, delta: float = 2.0, b1: float = 0.9, b2: float = 0.99) -> float:
    """Flower's FedAdam at round 1: m = (1-b1) delta, v = (1-b2) delta^2, bias-corrected with exponent 2."""
    eta_norm = eta * math.sqrt(1 - b2**2) / (1 - b1**2)
    return eta_norm * (1 - b1) * delta / (math.sqrt((1 - b2) * delta**2) + tau)


def test_fedadam_takes_eta_and_tau_from_the_config() -> None:
    # Execute
    default, moved_default = _fedadam_round({})
    custom, moved = _fedadam_round({"federation.fedadam-eta": 0.5, "federation.fedadam-tau": 0.1})
    # Assert: the defaults are the former hard-coded values; the configured ones reach Flower's strategy and its step
    assert (default.eta, default.tau) == (1e-2, 1e-3)
    assert (custom.eta, custom.tau) == (0.5, 0.1)
    assert np.allclose(moved_default, _first_fedadam_step(1e-2, 1e-3), rtol=1e-6, atol=0)
    assert np.allclose(moved, _first_fedadam_step(0.5, 0.1), rtol=1e-6, atol=0)
    assert not np.allclose(moved, moved_default)
    for key in ("federation.fedadam-eta", "federation.fedadam-tau"):
        with pytest.raises(ConfigError, match=rf"{key.replace('-', '_')}=0.0 is out of range"):
            get_preset("smoke").from_flat({"preset": "smoke", "federation.strategy": "fedadam", key: 0.0})


def test_an_unknown_strategy_is_an_error_in_the_config_and_in_the_factory() -> None:
    # The config refuses the name and lists the choices
    with pytest.raises(ConfigError, match=r"federation.strategy='krum2' is not allowed; choose one of \['fedavg'"):
        get_preset("smoke").from_flat({"preset": "smoke", "federation.strategy": "krum2"})
    # A config that got past validation does not fall through to Krum (it used to)
    cfg = get_preset("smoke")
    object.__setattr__(cfg.federation, "strategy", "krum2")
    with pytest.raises(ConfigError, match="federation.strategy='krum2' is unknown"):
        make_strategy(cfg)


def test_fedadam_state_round_trips_for_resume() -> None:
    # Prepare: one FedAdam step creates moments
    cfg = get_preset("smoke").from_flat({"preset": "smoke", "federation.strategy": "fedadam"})
    strategy = GuardedStrategy(make_strategy(cfg), expected_shapes=SHAPES)
    strategy.base.current_arrays = {k: v.copy() for k, v in _good(0.0).items()}  # what configure_train sets
    strategy.aggregate_train(1, [_reply(1, _good(1.0)), _reply(2, _good(3.0))])
    state = strategy.state_arrays()
    # Execute
    other = GuardedStrategy(make_strategy(cfg), expected_shapes=SHAPES)
    other.load_state_arrays(state)
    # Assert
    assert any(k.startswith("m_t/") for k in state) and any(k.startswith("v_t/") for k in state)
    for key, value in state.items():
        attr, _, name = key.partition("/")
        assert np.array_equal(getattr(other.base, attr)[name], value)


def test_the_client_handler_wrapper_keeps_the_handler_identity() -> None:
    from client.app import _guarded, train

    def handler(msg, context):  # type: ignore[no-untyped-def]
        """The handler's own docstring."""
        raise AssertionError("not called")

    wrapped = _guarded(handler)
    assert wrapped.__wrapped__ is handler
    assert (wrapped.__name__, wrapped.__doc__) == ("handler", "The handler's own docstring.")
    assert train.__name__ == "train" and train.__wrapped__.__name__ == "train"



def test_a_site_left_out_of_the_training_sample_is_reported_as_not_sampled_not_ok() -> None:
    # Prepare: 4 live sites, fraction-train 0.5 (Flower samples int(4 * 0.5) = 2), every site evaluates
    from types import SimpleNamespace

    from server.federation import round_failure

    cfg = get_preset("smoke").from_flat({"preset": "smoke", "federation.fraction-train": 0.5})
    strategy = GuardedStrategy(make_strategy(cfg), expected_shapes=SHAPES)
    nodes = (1, 2, 3, 4)
    grid = SimpleNamespace(get_nodes=lambda: [SimpleNamespace(node_id=n, name="") for n in nodes],
                           get_node_ids=lambda: list(nodes))

    def evaluations() -> list[Message]:
        return [Message(RecordDict({"metrics": MetricRecord({"num-examples": 5})}),
                        reply_to=Message(content=RecordDict(), dst_node_id=n, message_type="evaluate")) for n in nodes]

    strategy.begin_round()
    # Execute
    asked = {m.metadata.dst_node_id for m in strategy.configure_train(1, arrays_to_record(_good(0.0)),
                                                                      ConfigRecord({"server-round": 1}), grid)}
    strategy.aggregate_train(1, [_reply(n, _good(1.0)) for n in sorted(asked)])
    strategy.aggregate_evaluate(1, evaluations())
    # Assert: the two sites never asked to train say so, with the reason; the sampled ones trained
    assert len(asked) == 2
    status = {n: (r.status, r.reason) for n, r in strategy.reports.items()}
    assert {n for n, (s, _) in status.items() if s == "ok"} == asked
    for n in set(nodes) - asked:
        assert status[n][0] == "not-sampled" and "fraction-train" in status[n][1]
    assert round_failure(strategy.reports.values()) is None
    # and a round whose sampled sites all failed is a failed round, not hidden by the others' evaluations
    strategy.begin_round()
    asked = {m.metadata.dst_node_id for m in strategy.configure_train(2, arrays_to_record(_good(0.0)),
                                                                      ConfigRecord({"server-round": 2}), grid)}
    strategy.aggregate_train(2, [_reply(n, {"generator.w": np.zeros((1,), np.float32)}) for n in sorted(asked)])
    strategy.aggregate_evaluate(2, evaluations())
    assert "not-sampled" in (round_failure(strategy.reports.values()) or "")
