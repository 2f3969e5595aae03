"""FedProx at the sites: (mu/2)·||w - w_global||² in every model's local update, outside DP-SGD's noise.

Flower's FedProx only puts ``proximal-mu`` into the train config; the sites read mu from their run config
(``federation.proximal-mu``) and add the proximal gradient mu·(w - w_global) to the privatized gradient, after
Opacus' clipping and noise (:class:`common.privacy.dpsgd.ProximalTerm`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from common.core.config import RunConfig
from common.core.errors import ConfigError
from common.data.sites import load_site
from common.federated import local_update
from common.federated.local_update import local_train
from common.models.bundle import build_bundle, federated_arrays
from common.privacy.dpsgd import ProximalTerm, train_private
from common.privacy.ledger import PrivacyLedger
from common.privacy.site_state import SiteStateStore
from server.strategy import make_strategy

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the")


def _tiny_task(seed: int = 0) -> tuple[nn.Module, TensorDataset]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), TensorDataset(x, y)


def _ce(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _zero_loss(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    """A data loss whose gradient is exactly zero: any move comes from the proximal term (or the DP noise)."""
    return (model(batch[0]) * 0.0).sum(dim=1)


def _ledger() -> PrivacyLedger:
    return PrivacyLedger(target_epsilon=None, target_delta=1e-5, budget_split={"classifier": 1.0})


def _train(model: nn.Module, data: TensorDataset, *, dp: bool, proximal: ProximalTerm | None, loss: Any = _ce,
           steps: int = 5, lr: float = 0.05, optimizer: str = "adam", mode: str = "functorch",
           ledger: PrivacyLedger | None = None) -> PrivacyLedger | None:
    ledger = (ledger or _ledger()) if dp else None
    train_private(model, loss, data, steps=steps, batch_size=8, lr=lr, ledger=ledger, model_key="classifier",
                  planned_total_steps=steps, seed=3, noise_seed=7, noise_multiplier=1.0 if dp else None,
                  optimizer=optimizer, grad_sample_mode=mode, proximal=proximal)  # type: ignore[arg-type]
    return ledger


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# -- (1) mu = 0 is plain local training, bit for bit ---------------------------------------------------------------
@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp-sgd"])
def test_mu_zero_gives_exactly_the_plain_local_update(dp: bool) -> None:
    # Prepare: two copies of one model, one data set, the same public and private seeds
    plain, data = _tiny_task()
    prox, _ = _tiny_task()
    # Execute
    _train(plain, data, dp=dp, proximal=None)
    _train(prox, data, dp=dp, proximal=ProximalTerm.at(prox, 0.0))
    # Assert
    assert torch.equal(_flat(plain), _flat(prox))


def test_local_train_without_proximal_mu_passes_no_proximal_term(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = RunConfig.from_flat({"preset": "smoke", "privacy.target-epsilon": "none"})
    seen = _spy_train_private(monkeypatch)
    local_train(build_bundle(cfg), load_site(cfg.data, seed=cfg.seed, site_index=0), None, cfg, server_round=1)
    assert seen and all(proximal is None for proximal, _ in seen.values())


# -- (2) mu > 0 pulls every model toward the weights the site received --------------------------------------------
def _round(tmp_path: Path, name: str, mu: float, dp: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                                                     dict[str, Any]]:
    flat: dict[str, Any] = {"preset": "smoke", "run-dir": str(tmp_path / name), "train.local-steps": 4,
                            "train.downstream-steps": 4,
                            # SGD heads: lr * mu must stay below 1 at mu = 100 (the config refuses more)
                            "train.downstream-lr": 0.005, "train.regressor-lr": 0.005}
    if mu > 0:
        flat.update({"federation.strategy": "fedprox", "federation.proximal-mu": mu})
    if dp:  # the same DP noise in both arms (public seed), so only the proximal term differs
        flat["privacy.insecure-reproducible-noise"] = True
    else:
        flat["privacy.target-epsilon"] = "none"
    cfg = RunConfig.from_flat(flat)
    site = load_site(cfg.data, seed=cfg.seed, site_index=0)
    ledger = SiteStateStore(tmp_path / name / "state").load_ledger(before_round=1, privacy=cfg.privacy) if dp else None
    bundle = build_bundle(cfg)
    sent = federated_arrays(bundle)
    local_train(bundle, site, ledger, cfg, server_round=1)
    return sent, federated_arrays(bundle), (ledger.summary() if ledger is not None else {})


def _distances(sent: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, float]:
    parts = ("generator", "classifier", "regressor")
    return {part: float(np.sqrt(sum(np.sum((got[k].astype(np.float64) - sent[k]) ** 2) for k in sent
                                    if k.startswith(part + ".")))) for part in parts}


@pytest.mark.parametrize("dp", [False, True], ids=["no-dp", "dp-sgd"])
def test_a_large_mu_pulls_every_model_toward_the_global_weights(tmp_path: Path, dp: bool) -> None:
    # Execute: one round from the same global weights, with the same data and seeds, mu = 0 and mu = 100
    sent, fedavg, privacy_avg = _round(tmp_path, "fedavg", 0.0, dp)
    sent_prox, fedprox, privacy_prox = _round(tmp_path, "fedprox", 100.0, dp)
    # Assert: the same start, every model trained, and every model ended closer to the global weights
    assert all(np.array_equal(sent[k], sent_prox[k]) for k in sent)
    far, near = _distances(sent, fedavg), _distances(sent, fedprox)
    assert all(far[part] > 0 for part in far)
    assert all(near[part] < far[part] for part in far), (near, far)
    if dp:  # and at the same privacy cost
        assert {m: s["epsilon"] for m, s in privacy_avg.items()} == {m: s["epsilon"] for m, s in privacy_prox.items()}


def _spy_train_private(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[ProximalTerm | None, list[Tensor]]]:
    """Record, per model, the proximal term local_train passes and the model's trainable weights at that call."""
    seen: dict[str, tuple[ProximalTerm | None, list[Tensor]]] = {}
    real = local_update.train_private

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen[kwargs["model_key"]] = (kwargs.get("proximal"),
                                     [p.detach().clone() for p in model.parameters() if p.requires_grad])
        return real(model, *args, **kwargs)

    monkeypatch.setattr(local_update, "train_private", spy)
    return seen


def test_local_train_takes_mu_from_the_run_config_and_anchors_at_the_received_weights(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    cfg = RunConfig.from_flat({"preset": "smoke", "privacy.target-epsilon": "none", "federation.strategy": "fedprox",
                               "federation.proximal-mu": 0.25})
    bundle = build_bundle(cfg)
    received = {key: [p.detach().clone() for p in getattr(bundle, key).parameters() if p.requires_grad]
                for key in ("generator", "classifier", "regressor")}
    seen = _spy_train_private(monkeypatch)
    # Execute
    local_train(bundle, load_site(cfg.data, seed=cfg.seed, site_index=0), None, cfg, server_round=1)
    # Assert: all three models got mu = 0.25 and w_global = the weights the bundle held on entry
    assert set(seen) == {"generator", "classifier", "regressor"}
    for key, (proximal, _) in seen.items():
        assert proximal is not None and proximal.mu == 0.25
        assert len(proximal.anchor) == len(received[key])
        assert all(torch.equal(a, w) for a, w in zip(proximal.anchor, received[key]))


# -- (3) the proximal gradient is exactly mu·(w - w_global), and costs no privacy ---------------------------------
def test_one_sgd_step_moves_the_weights_by_exactly_minus_lr_mu_times_the_distance() -> None:
    # Prepare: w_global = 0, then w = small integers (exact in float32), zero data loss
    model, data = _tiny_task()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    proximal = ProximalTerm.at(model, 0.5)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape) - 3 * i)
    w, w_global, lr = _flat(model), torch.cat([a.flatten() for a in proximal.anchor]), 1.0
    # Execute
    _train(model, data, dp=False, proximal=proximal, loss=_zero_loss, steps=1, lr=lr, optimizer="sgd")
    # Assert
    assert torch.equal(_flat(model), w - lr * 0.5 * (w - w_global))


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_under_dp_sgd_the_proximal_gradient_is_added_after_the_noise_at_no_privacy_cost(mode: str) -> None:
    # Prepare: the same private noise in both runs; w != w_global
    plain, data = _tiny_task()
    prox, _ = _tiny_task()
    proximal = ProximalTerm.at(prox, 2.0)
    with torch.no_grad():
        for p in prox.parameters():
            p.add_(0.5)
        for p in plain.parameters():
            p.add_(0.5)
    start, w_global, lr = _flat(prox), torch.cat([a.flatten() for a in proximal.anchor]), 1.0
    # Execute: one SGD step on a zero data loss, so the update is the DP noise (plus the proximal gradient)
    ledger_plain = _train(plain, data, dp=True, proximal=None, loss=_zero_loss, steps=1, lr=lr, optimizer="sgd",
                          mode=mode)
    ledger_prox = _train(prox, data, dp=True, proximal=proximal, loss=_zero_loss, steps=1, lr=lr, optimizer="sgd",
                         mode=mode)
    # Assert: noise was added (the step moved the weights), and the proximal run differs from the plain one by
    # exactly -lr·mu·(w - w_global): neither clipped to C nor divided by the batch size
    noise = _flat(plain) - start
    assert noise.abs().max() > 0
    torch.testing.assert_close(_flat(prox) - _flat(plain), -lr * 2.0 * (start - w_global), rtol=0, atol=1e-6)
    assert ledger_plain is not None and ledger_prox is not None
    assert ledger_prox.epsilon("classifier") == ledger_plain.epsilon("classifier") > 0
    assert ledger_prox.summary() == ledger_plain.summary()


def test_a_proximal_term_for_another_model_is_refused() -> None:
    model, data = _tiny_task()
    with pytest.raises(ValueError, match="proximal anchor does not match"):
        _train(model, data, dp=False, proximal=ProximalTerm.at(nn.Linear(4, 2), 0.1))
    with pytest.raises(ValueError, match="mu must be finite and >= 0"):
        ProximalTerm.at(model, -1.0)


# -- (4) the config: mu > 0 exactly with fedprox -------------------------------------------------------------------
def test_fedprox_needs_a_positive_mu_and_mu_needs_fedprox() -> None:
    with pytest.raises(ConfigError, match=r"federation.strategy='fedprox' needs federation.proximal_mu > 0.*"
                                          r"federation.proximal-mu=0.01"):
        RunConfig.from_flat({"preset": "smoke", "federation.strategy": "fedprox"})
    for strategy in ("fedavg", "fedadam", "krum"):
        with pytest.raises(ConfigError, match=rf"federation.proximal_mu=0.01 .* federation.strategy='{strategy}'"):
            RunConfig.from_flat({"preset": "smoke", "federation.strategy": strategy, "federation.proximal-mu": 0.01})
    with pytest.raises(ConfigError, match=r"federation.proximal_mu=-0.1 is out of range"):
        RunConfig.from_flat({"preset": "smoke", "federation.strategy": "fedprox", "federation.proximal-mu": -0.1})
    cfg = RunConfig.from_flat({"preset": "smoke", "federation.strategy": "fedprox", "federation.proximal-mu": 0.01})
    assert cfg.federation.proximal_mu == 0.01
    assert RunConfig.from_flat(cfg.to_flat()) == cfg == RunConfig.from_dict(cfg.to_dict())
    assert make_strategy(cfg).proximal_mu == 0.01  # type: ignore[attr-defined]


def test_fedprox_with_sgd_heads_refuses_a_mu_that_overshoots_the_global_weights() -> None:
    # lr * mu >= 1 turns the proximal step (1 - lr*mu) into an overshoot, >= 2 into divergence
    base = {"preset": "smoke", "federation.strategy": "fedprox", "train.downstream-optimizer": "sgd",
            "train.downstream-lr": 2.0, "train.regressor-lr": 0.1}
    with pytest.raises(ConfigError, match=r"lr\*mu = 2 >= 1.*lower mu below 0.5"):
        RunConfig.from_flat({**base, "federation.proximal-mu": 1.0})
    assert RunConfig.from_flat({**base, "federation.proximal-mu": 0.4}).federation.proximal_mu == 0.4
    # Adam's step does not scale with the gradient the same way: not refused
    adam = {**base, "train.downstream-optimizer": "adam", "train.downstream-lr": 2e-3, "federation.proximal-mu": 100}
    assert RunConfig.from_flat(adam).federation.proximal_mu == 100
