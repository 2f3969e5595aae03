"""The active-learning step without Flower: requests per site, the pooled answers, the selected release items."""

from __future__ import annotations

import numpy as np

from common.active_learning.query import QuerySite
from common.active_learning.scoring import Candidates
from common.active_learning.step import SiteAnswer, plan_requests, pool, select_items
from common.core.config import get_preset


def _answer(name: str, n: int, seed: int, epsilon: float) -> SiteAnswer:
    rng = np.random.default_rng(seed)
    cand = Candidates(images=rng.integers(0, 256, (n, 8, 8), dtype=np.uint8),
                      plane=rng.integers(0, 4, n).astype(np.int64), ga=rng.uniform(16, 38, n).astype(np.float32),
                      scores={"quality": rng.uniform(0.5, 1, n).astype(np.float32),
                              "uncertainty": rng.uniform(0, 1, n).astype(np.float32)})
    site = QuerySite(privacy={"epsilon": epsilon, "delta": 1e-5, "accountant": "rdp"}, scanner=f"{name}-scanner",
                     memorization_checked=False)
    return SiteAnswer(name=name, candidates=cand, site=site)


def test_each_sites_request_depends_on_its_name_not_on_the_order_of_the_sites() -> None:
    cfg = get_preset("smoke")
    a = plan_requests(cfg, [], 2, ["site-0", "site-1"])
    b = plan_requests(cfg, [], 2, ["site-1", "site-0"])
    other_round = plan_requests(cfg, [], 3, ["site-0"])
    for name in ("site-0", "site-1"):
        np.testing.assert_array_equal(a[name].plane, b[name].plane)
        np.testing.assert_array_equal(a[name].ga, b[name].ga)
        assert len(a[name].plane) == cfg.federation.al_candidates_per_site
    assert not np.array_equal(a["site-0"].ga, other_round["site-0"].ga)
    assert set(a["site-0"].plane.tolist()) <= set(cfg.data.plane_scope())


def test_selected_items_carry_the_source_site_its_certificate_and_why_they_were_chosen() -> None:
    # Prepare: two sites' answers, features = flattened pixels
    cfg = get_preset("smoke")
    answers = [_answer("site-0", 6, 0, 2.5), _answer("site-1", 6, 1, 4.0)]
    pooled = pool(answers)
    # Execute
    step = select_items(cfg, pooled, server_round=3, features=lambda x: x.reshape(len(x), -1).astype(np.float32),
                        bank=None)
    again = select_items(cfg, pooled, server_round=3, features=lambda x: x.reshape(len(x), -1).astype(np.float32),
                         bank=None)
    # Assert: k items, deterministic, each tied to the answer it came from
    assert len(pooled) == 12 and len(step.items) == cfg.federation.al_select
    assert [i.image.tobytes() for i in step.items] == [i.image.tobytes() for i in again.items]
    for item, chosen in zip(step.items, step.chosen):
        assert item.source_site == chosen.answer.name and item.round == 3
        assert item.privacy["epsilon"] == {"site-0": 2.5, "site-1": 4.0}[item.source_site]
        assert item.privacy["model"] == "generator" and item.scanner == f"{item.source_site}-scanner"
        assert item.acquisition["function"] == cfg.federation.al_acquisition and item.acquisition["reason"]
        np.testing.assert_array_equal(item.image, chosen.image)
    assert [i.acquisition["rank"] for i in step.items] == list(range(len(step.items)))
    assert step.summary["mean_quality_pool"] == np.mean([p.scores["quality"] for p in pooled])


def test_an_empty_pool_selects_nothing() -> None:
    step = select_items(get_preset("smoke"), [], server_round=1, features=lambda x: x, bank=None)
    assert step.items == [] and step.summary == {"selected": 0}
