"""pe_offline: the coordinator's evolution without Flower, with every site's votes charged to its own ledger."""

from __future__ import annotations

import numpy as np

from common.active_learning.vote_query import vote_embedder
from common.phantoms.simulator import make_phantoms
from simulations.config_args import build_config
from simulations.experiments.al_loop import ARMS
from simulations.experiments.pe_offline import evolve


def _setup():  # type: ignore[no-untyped-def]
    cfg = build_config("smoke", [f"{k}={v}" for k, v in ARMS["private-evolution"].items()]
                       + ["privacy.target-epsilon=10", "federation.num-rounds=2", "federation.pe-population=8"])
    embed = vote_embedder(cfg)
    private = {}
    for k in range(2):  # two sites of 12 private phantoms
        recs = make_phantoms(12, size=cfg.data.image_size, seed=100 + k, site=f"s{k}", id_prefix=f"s{k}")
        private[f"s{k}"] = (embed(np.stack([r.image for r in recs])), np.array([r.plane for r in recs]))
    return cfg, embed, private


def test_private_votes_spend_the_votes_share_and_report_their_signal() -> None:
    # Prepare
    cfg, embed, private = _setup()
    share = cfg.privacy.target_epsilon * cfg.privacy.budget_split()["votes"]
    # Execute: 2 query rounds x 2 votes, sigma from each site's ledger
    release, info = evolve(cfg, private, embed, population=8, votes_per_round=2, noise=None, rounds=2, seed=0)
    # Assert: the planned 4 votes fit the votes' share and nearly use it; the signal figure is votes per candidate
    # over the summed noise std (24 private images, 8 candidates, 2 sites)
    assert 0.5 * share < info["votes_epsilon_max"] <= share + 1e-9
    assert info["sigma"] > 0
    assert abs(info["snr_mean"] - (24 / 8) / (info["sigma"] * np.sqrt(2))) < 1e-9
    assert 0 < len(release) <= 2 * cfg.federation.al_select
    assert all(c.source == "phantom" for c in release)


def test_noiseless_votes_have_no_finite_noise_figure_and_charge_nothing() -> None:
    cfg, embed, private = _setup()
    release, info = evolve(cfg, private, embed, population=8, votes_per_round=1, noise=0.0, rounds=1, seed=0)
    assert info["snr_mean"] is None and info["votes_epsilon_max"] is None and info["sigma"] == 0.0
    # without noise every candidate that got a vote is released (up to al-select), and only those
    assert 0 < len(release) <= min(8, cfg.federation.al_select)


def test_class_aware_votes_release_only_the_planes_the_sites_hold_and_both_kinds_cost_the_same() -> None:
    # Prepare: private images of one plane only; the population spans the preset's planes
    cfg, embed, private = _setup()
    plane = int(private["s0"][1][0])
    one_plane = {s: (z[y == plane], y[y == plane]) for s, (z, y) in private.items()}
    assert sum(len(y) for _, y in one_plane.values()) > 0
    # Execute: noiseless votes (every voted candidate is released), then private votes of both kinds
    aware, _ = evolve(cfg, one_plane, embed, population=8, votes_per_round=1, noise=0.0, rounds=1, seed=0)
    _, info_aware = evolve(cfg, private, embed, population=8, votes_per_round=1, noise=None, rounds=1, seed=0)
    _, info_any = evolve(cfg, private, embed, population=8, votes_per_round=1, noise=None, rounds=1, seed=0,
                         class_aware=False)
    # Assert
    assert aware and {c.plane for c in aware} == {plane}
    assert info_any["sigma"] == info_aware["sigma"] and info_any["votes_epsilon_max"] == info_aware["votes_epsilon_max"]
