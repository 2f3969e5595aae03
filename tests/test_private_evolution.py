"""Private evolution: the vote mechanism, its accounting in the site's ledger, and the vote replies' validation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from common.active_learning.vote_query import NOISE_Z, validate_vote_reply
from common.core.config import PrivacyConfig, RunConfig
from common.core.errors import ConfigError, ReplyValidationError
from common.privacy.ledger import PrivacyLedger
from common.privacy.site_state import SiteStateStore
from common.privacy.votes import VOTES, VoteBudgetExhausted, gaussian_noise, private_vote, sensitivity, vote_counts

SPLIT = {"generator": 0.5, "classifier": 0.2, "regressor": 0.1, "votes": 0.2}


def _data(seed: int, n: int = 40, m: int = 12, d: int = 8) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)), rng.integers(0, 3, n), rng.normal(size=(m, d)), rng.integers(0, 3, m))


# -- the mechanism -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
def test_noisy_histogram_has_the_calibrated_variance(k: int) -> None:
    # Prepare: a fixed sigma (no budget), 40 private images, 12 candidates
    priv, _, cand, _ = _data(0)
    sigma, draws = 2.5, 1500
    exact = vote_counts(priv, cand, votes_per_image=k)
    # Execute: the released histogram, many times with fresh noise
    hists = np.stack([private_vote(None, private=priv, candidates=cand, votes_per_image=k, planned_votes=1,
                                   noise_multiplier=sigma, noise_seed=s).histogram for s in range(draws)])
    # Assert: unbiased, and variance (sigma * sqrt(k))^2 within 4 % (the estimate's relative sd is ~0.3 % here)
    noise = hists - exact
    target = (sigma * math.sqrt(k)) ** 2
    assert abs(noise.mean()) < 4 * math.sqrt(target / noise.size)
    assert noise.var(ddof=1) == pytest.approx(target, rel=0.04)
    per_entry = noise.var(axis=0, ddof=1)
    assert np.all(np.abs(per_entry / target - 1) < 0.15)  # every entry, not only on average
    assert exact.sum() == 40 * k  # every image voted k times


def test_four_draw_noise_is_gaussian_with_the_stated_std() -> None:
    x = gaussian_noise(200_000, std=3.0, seed=7)
    assert x.std() == pytest.approx(3.0, rel=0.01)
    assert np.mean(np.abs(x) > 2 * 3.0) == pytest.approx(0.0455, abs=0.003)  # two-sided normal tail at 2 sd


@pytest.mark.parametrize("class_aware", [False, True])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_one_private_image_changes_any_entry_by_at_most_its_sensitivity(class_aware: bool, k: int) -> None:
    worst_l2, worst_entry = 0.0, 0.0
    for seed in range(60):
        priv, plane, cand, cplane = _data(seed, n=15, m=7)
        kw = {"private_plane": plane, "candidate_plane": cplane} if class_aware else {}
        full = vote_counts(priv, cand, votes_per_image=k, **kw)
        for i in range(len(priv)):  # remove each image in turn (add/remove adjacency)
            keep = np.arange(len(priv)) != i
            kw_i = {"private_plane": plane[keep], "candidate_plane": cplane} if class_aware else {}
            diff = full - vote_counts(priv[keep], cand, votes_per_image=k, **kw_i)
            worst_l2 = max(worst_l2, float(np.linalg.norm(diff)))
            worst_entry = max(worst_entry, float(np.abs(diff).max()))
            assert np.all(diff >= 0)
    assert worst_entry == 1.0  # some image moves some entry by exactly 1, none by more
    assert worst_l2 == pytest.approx(sensitivity(k))  # attained: the bound is tight


def test_class_aware_votes_stay_within_the_plane() -> None:
    priv = np.array([[0.0, 0.0], [5.0, 5.0]])
    cand = np.array([[0.1, 0.0], [5.0, 5.1], [0.0, 0.1]])
    counts = vote_counts(priv, cand, private_plane=np.array([1, 0]), candidate_plane=np.array([0, 0, 1]))
    # image 0 (plane 1) may only vote for candidate 2; image 1 (plane 0) for its nearest of 0 and 1
    assert counts.tolist() == [0.0, 1.0, 1.0]
    none = vote_counts(priv, cand, private_plane=np.array([4, 4]), candidate_plane=np.array([0, 0, 1]))
    assert none.tolist() == [0.0, 0.0, 0.0]  # no candidate of its plane: no vote


# -- the ledger ----------------------------------------------------------------------------------------------------
def _step_generator(ledger: PrivacyLedger, steps: int) -> None:
    ledger.plan("generator", sample_rate=0.25, planned_total_steps=40)
    for _ in range(steps):
        ledger.accountant_for("generator").step(noise_multiplier=ledger._plans["generator"].noise_multiplier,
                                                 sample_rate=0.25)


def test_votes_compose_with_the_other_mechanisms_across_save_and_restore(tmp_path) -> None:
    # Prepare: one site, DP-SGD steps on the generator, then votes; the same run interrupted after round 1
    priv, _, cand, _ = _data(1)
    store = SiteStateStore(tmp_path / "site")
    privacy = PrivacyConfig(target_epsilon=8.0, budget_generator=0.5, budget_classifier=0.2, budget_regressor=0.1,
                            budget_votes=0.2)

    def vote(ledger: PrivacyLedger, seed: int) -> float:
        return private_vote(ledger, private=priv, candidates=cand, planned_votes=4, noise_seed=seed).epsilon

    uninterrupted = PrivacyLedger(target_epsilon=8.0, target_delta=1e-5, budget_split=privacy.budget_split())
    _step_generator(uninterrupted, 10)
    vote(uninterrupted, 1)
    vote(uninterrupted, 2)
    _step_generator(uninterrupted, 10)
    vote(uninterrupted, 3)
    # Execute: round 1 (10 generator steps, 2 votes) saved; round 2 restores it and goes on
    first = store.load_ledger(before_round=1, privacy=privacy)
    _step_generator(first, 10)
    vote(first, 1)
    vote(first, 2)
    store.save_ledger(1, first)
    second = store.load_ledger(before_round=2, privacy=privacy)
    _step_generator(second, 10)
    vote(second, 3)
    # Assert: the restored ledger continues exactly; the votes are a fourth key in the same accounting
    assert second.budget_split == SPLIT
    assert second.steps(VOTES) == 3 and second.steps("generator") == 20
    assert second.epsilon(VOTES) == pytest.approx(uninterrupted.epsilon(VOTES), rel=1e-12)
    assert second.total_epsilon() == pytest.approx(uninterrupted.total_epsilon(), rel=1e-12)
    assert second.total_epsilon() == pytest.approx(second.epsilon("generator") + second.epsilon(VOTES))
    assert second.total_epsilon() <= 8.0
    assert 0 < second.epsilon(VOTES) <= 0.2 * 8.0
    # the joint composition sees every history, votes included (q = 1 segments)
    assert second.joint_epsilon() > PrivacyLedger._eps(second, second.state_dict()["models"]["generator"]["history"],
                                                       1e-5)
    assert [q for _, q, _ in second.state_dict()["models"][VOTES]["history"]] == [1.0]
    summary = second.summary()[VOTES]
    assert summary["steps"] == 3 and summary["sample_rate"] == 1.0 and summary["budget_epsilon"] == pytest.approx(1.6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_an_over_budget_vote_is_refused_before_it_runs(accountant: str) -> None:
    # Prepare: a votes budget planned for 3 votes
    priv, _, cand, _ = _data(2)
    ledger = PrivacyLedger(target_epsilon=5.0, target_delta=1e-5, accountant=accountant, budget_split=SPLIT)
    for s in range(3):
        private_vote(ledger, private=priv, candidates=cand, planned_votes=3, noise_seed=s)
    spent = ledger.epsilon(VOTES)
    # Execute / Assert: the 4th is refused, and the ledger is unchanged
    with pytest.raises(VoteBudgetExhausted, match="past its budget"):
        private_vote(ledger, private=priv, candidates=cand, planned_votes=3, noise_seed=9)
    assert ledger.steps(VOTES) == 3 and ledger.epsilon(VOTES) == spent <= 1.0
    assert ledger.exhausted(VOTES)
    # a fixed sigma too small for the budget is refused at its first vote
    small = PrivacyLedger(target_epsilon=1.0, target_delta=1e-5, budget_split=SPLIT)
    with pytest.raises(VoteBudgetExhausted):
        private_vote(small, private=priv, candidates=cand, planned_votes=3, noise_multiplier=0.3, noise_seed=0)
    assert small.steps(VOTES) == 0


def test_the_votes_share_is_config_and_must_fit_the_site_budget() -> None:
    cfg = RunConfig.from_flat({"preset": "smoke", "privacy.budget-generator": 0.5, "privacy.budget-regressor": 0.1,
                               "privacy.budget-votes": 0.2, "federation.al-every": 1, "federation.pe-iterations": 3,
                               "federation.num-rounds": 2})
    assert cfg.privacy.budget_split() == SPLIT
    assert cfg.federation.planned_votes() == 6
    assert "votes" not in RunConfig.from_flat({"preset": "smoke"}).privacy.budget_split()  # default: no votes
    with pytest.raises(ConfigError, match="sum to at most 1"):
        RunConfig.from_flat({"preset": "smoke", "privacy.budget-votes": 0.2})
    with pytest.raises(ConfigError, match="budget_votes"):
        RunConfig.from_flat({"preset": "smoke", "federation.pe-iterations": 2, "federation.al-every": 1})


# -- reply validation ----------------------------------------------------------------------------------------------
IDS = np.array([10, 11, 12, 13], dtype=np.int64)


def _reply(hist=None, ids=IDS, std=2.0, status="ok") -> tuple[dict, dict]:
    arrays = {"ids": ids, "histogram": np.array([3.0, 0.5, -1.0, 7.0]) if hist is None else hist}
    site = {"name": "site-b", "status": status,
            "privacy": json.dumps({"epsilon": 0.4, "delta": 1e-6, "noise_std": std, "model": "votes"})}
    return arrays, site


def test_an_honest_vote_reply_validates() -> None:
    arrays, site = _reply()
    got = validate_vote_reply(arrays, site, who="site-b", ids=IDS, max_count=40)
    assert got.status == "ok" and got.histogram.tolist() == [3.0, 0.5, -1.0, 7.0] and got.noise_std == 2.0


@pytest.mark.parametrize(("arrays", "site", "needle"), [
    (*_reply(hist=np.array([1.0, 2.0, 3.0])), "shape"),  # wrong length
    (*_reply(ids=IDS[:3]), "ids must be int64 of shape"),
    (*_reply(ids=np.array([10, 11, 12, 99], dtype=np.int64)), "ids differ"),  # wrong candidate ids
    (*_reply(ids=IDS[::-1].copy()), "ids differ"),  # reordered
    (*_reply(ids=IDS.astype(np.int32)), "int64"),
    (*_reply(hist=np.array([1.0, np.nan, 3.0, 0.0])), "non-finite"),
    (*_reply(hist=np.array([1.0, np.inf, 3.0, 0.0])), "non-finite"),
    (*_reply(hist=np.array([1.0, -2.0 * NOISE_Z - 1, 3.0, 0.0])), "negative beyond the noise"),
    (*_reply(hist=np.array([1.0, -5.0, 3.0, 0.0]), std=0.0), "negative beyond the noise"),
    (*_reply(hist=np.array([1.0, 100.0, 3.0, 0.0])), "above 40"),
    (*_reply(hist=np.array([1.0, 2.0, 3.0, 0.0], np.float32)), "float64"),
    (*_reply(std=float("nan")), "noise_std"),
    (*_reply(status="maybe"), "status"),
    ({"ids": IDS}, _reply()[1], "exactly 'ids' and 'histogram'"),
    (_reply()[0], _reply(status="declined")[1], "declined vote must carry no histogram"),
    (_reply()[0], {**_reply()[1], "privacy": "{not json"}, "not valid JSON"),
])
def test_a_malformed_vote_reply_is_rejected_naming_the_site(arrays, site, needle) -> None:
    with pytest.raises(ReplyValidationError, match=needle) as err:
        validate_vote_reply(arrays, site, who="site-b", ids=IDS, max_count=40)
    assert str(err.value).startswith("site-b:")


def test_a_declined_vote_reply_validates_without_a_histogram() -> None:
    _, site = _reply(status="declined")
    got = validate_vote_reply(None, {**site, "reason": "the votes budget is spent"}, who="site-b", ids=IDS)
    assert got.status == "declined" and got.histogram is None and "spent" in got.reason


# -- the vote message through the coordinator and the client's real handler ---------------------------------------
def _cfg(run_dir, **extra):
    flat = {"preset": "smoke", "run-dir": str(run_dir), "federation.al-every": 1, "federation.num-rounds": 1,
            "federation.pe-iterations": 3, "federation.pe-population": 12, "federation.pe-keep": 2,
            "federation.al-select": 6, "privacy.budget-generator": 0.5, "privacy.budget-regressor": 0.1,
            "privacy.budget-votes": 0.2, "privacy.target-epsilon": 10.0, **extra}
    return RunConfig.from_flat(flat)


class _VoteGrid:
    """Two simulated sites answering vote messages with the client's real ``vote`` handler (no SuperLink)."""

    def __init__(self, cfg, corrupt=None) -> None:
        self.cfg, self.corrupt, self.sent = cfg, corrupt, []

    def get_node_ids(self) -> list[int]:
        return [11, 12]

    def send_and_receive(self, messages, timeout):
        from flwr.app import Context, RecordDict

        import client.app as client_app

        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            ctx = Context(run_id=1, node_id=node, node_config={"partition-id": node - 11, "num-partitions": 2},
                          state=RecordDict(), run_config=self.cfg.to_run_config())
            reply = client_app.vote(msg, ctx)
            if self.corrupt is not None and node == 12:
                self.corrupt(reply)
            replies.append(reply)
        return replies


def _names(cfg) -> dict[int, str]:
    from common.data.sites import load_site

    return {11 + i: load_site(cfg.data, seed=cfg.seed, site_index=i).name for i in range(2)}


@pytest.mark.usefixtures("task_identity")
def test_a_private_evolution_round_through_the_vote_handler_releases_certified_images(tmp_path) -> None:
    # Prepare
    from common.active_learning.release import ReleaseStore
    from common.analysis.audit import compose_epsilon
    from common.models.bundle import build_bundle
    from server.coordinator import Coordinator
    from server.evolution import VOTE_MESSAGE

    cfg = _cfg(tmp_path)
    names = _names(cfg)
    grid = _VoteGrid(cfg)
    # Execute
    summary = Coordinator(cfg, run_dir=tmp_path).query_round(grid, build_bundle(cfg), 1, site_names=names)
    # Assert: 3 votes of both sites, the messages carry embeddings only, the release is certified per site
    pe = summary["private_evolution"]
    assert [len(it["sites"]) for it in pe["iterations"]] == [2, 2, 2]
    assert all(s["status"] == "ok" for it in pe["iterations"] for s in it["sites"])
    assert {m.metadata.message_type for m in grid.sent} == {VOTE_MESSAGE} and len(grid.sent) == 6
    assert set(grid.sent[0].content["request"]) == {"ids", "plane", "embeddings"}
    assert 0 < summary["selected"] <= 6
    records = ReleaseStore(tmp_path / "release").records()
    assert len(records) == summary["selected"]
    for rec in records:
        cert = rec["privacy"]
        assert cert["model"] == "private-evolution" and set(cert["per_site"]) == set(names.values())
        for site, entry in cert["mechanisms"]["votes"].items():
            assert entry["steps"] == 3 and entry["sample_rate"] == 1.0
            eps = compose_epsilon([tuple(h) for h in entry["history"]], delta=entry["delta"])
            assert eps == pytest.approx(entry["epsilon"], rel=1e-9)
            assert cert["per_site"][site]["epsilon"] == pytest.approx(entry["epsilon"])  # phantoms: votes only
        assert cert["epsilon"] == pytest.approx(max(s["epsilon"] for s in cert["per_site"].values()))
        assert 0 < cert["epsilon"] <= 0.2 * 10.0
    # the privacy audit recomputes every certificate, and the site totals include the votes
    from common.analysis.audit import dp_certificate

    rounds = [{"round": 1, "ledger": {}, "active_learning": summary}]
    report = dp_certificate(rounds, release_records=records)
    assert report["problems"] == [] and report["release"]["private_evolution"]["n_images"] == len(records)
    for name in names.values():
        site = report["sites"][name]
        assert site["models"]["votes"]["consistent"] and site["epsilon_basic"] == pytest.approx(
            records[0]["privacy"]["mechanisms"]["votes"][name]["epsilon"])
    forged = [dict(records[0], privacy={**records[0]["privacy"], "per_site": {n: {"epsilon": 0.01, "delta": 0}
                                                                             for n in names.values()}})]
    report = dp_certificate(rounds, release_records=forged)
    assert report["release"]["private_evolution"]["inconsistent"] == [records[0]["id"]]
    assert any("private-evolution images" in p for p in report["problems"])
    # each site's ledger on disk holds the 3 votes
    for name in names.values():
        state = json.loads((tmp_path / "sites" / name / "ledger-round-001.json").read_text())
        assert len(state["ledger"]["models"]["votes"]["history"]) == 1
        assert state["ledger"]["models"]["votes"]["history"][0][2] == 3


@pytest.mark.usefixtures("task_identity")
def test_a_site_with_an_exhausted_vote_budget_declines_and_the_round_goes_on(tmp_path) -> None:
    # Prepare: site 0 spent its 3 planned votes in an earlier round
    from common.active_learning.release import ReleaseStore
    from common.models.bundle import build_bundle
    from server.coordinator import Coordinator

    cfg = _cfg(tmp_path)
    names = _names(cfg)
    store = SiteStateStore(tmp_path / "sites" / names[11])
    ledger = store.load_ledger(before_round=1, privacy=cfg.privacy)
    priv, _, cand, _ = _data(3)
    for s in range(3):
        private_vote(ledger, private=priv, candidates=cand, planned_votes=3, noise_seed=s)
    store.save_ledger(0, ledger)
    # Execute
    summary = Coordinator(cfg, run_dir=tmp_path).query_round(_VoteGrid(cfg), build_bundle(cfg), 1, site_names=names)
    # Assert: site 0 declined every vote, site 1 voted every time, and the release came from site 1's votes
    for it in summary["private_evolution"]["iterations"]:
        status = {s["name"]: s["status"] for s in it["sites"]}
        assert status == {names[11]: "declined", names[12]: "ok"}
        assert "spent" in next(s["reason"] for s in it["sites"] if s["name"] == names[11])
    assert summary["selected"] > 0
    cert = ReleaseStore(tmp_path / "release").records()[0]["privacy"]
    assert cert["mechanisms"]["votes"][names[12]]["steps"] == 3
    assert cert["mechanisms"]["votes"][names[11]]["steps"] == 3  # the decliner's spend so far (earlier round)
    again = SiteStateStore(tmp_path / "sites" / names[11]).load_ledger(before_round=2, privacy=cfg.privacy)
    assert again.steps(VOTES) == 3  # declining spent nothing


def _set_hist(value):
    def corrupt(reply):
        from common.federated.flwr_records import arrays_to_record, record_to_arrays

        arrays = record_to_arrays(reply.content["votes"])
        arrays.update(value(arrays))
        reply.content["votes"] = arrays_to_record(arrays)
    return corrupt


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("corrupt", "needle"), [
    (_set_hist(lambda a: {"histogram": a["histogram"][:-1]}), "shape"),
    (_set_hist(lambda a: {"histogram": np.where(np.arange(len(a["histogram"])) == 0, np.nan, a["histogram"])}),
     "non-finite"),
    (_set_hist(lambda a: {"histogram": a["histogram"] - 1e6}), "negative beyond the noise"),
    (_set_hist(lambda a: {"ids": a["ids"] + 1000}), "ids differ"),
])
def test_a_malformed_vote_reply_is_rejected_naming_the_site_and_the_vote_goes_on(tmp_path, corrupt, needle) -> None:
    from common.models.bundle import build_bundle
    from server.coordinator import Coordinator

    cfg = _cfg(tmp_path, **{"federation.pe-iterations": 1})
    names = _names(cfg)
    summary = Coordinator(cfg, run_dir=tmp_path).query_round(_VoteGrid(cfg, corrupt), build_bundle(cfg), 1,
                                                             site_names=names)
    (it,) = summary["private_evolution"]["iterations"]
    status = {s["name"]: s for s in it["sites"]}
    assert status[names[11]]["status"] == "ok"
    assert status[names[12]]["status"] == "rejected"
    assert status[names[12]]["reason"].startswith(f"{names[12]}:") and needle in status[names[12]]["reason"]
    assert summary["selected"] > 0  # from site 0's votes alone


# -- evolution (coordinator side, no private data) ----------------------------------------------------------------
def test_evolution_keeps_winners_per_bin_varies_them_and_refills_empty_bins() -> None:
    from common.active_learning.evolution import Population, bins_of, next_generation, select_release, winners

    # Prepare: 16 phantom candidates over the 4 GA bins of planes 0 and 1 (2 per bin)
    pop = Population(size=32, source="phantom", rng=np.random.default_rng(0))
    cands = pop.initial(16, planes=[0, 1])
    bins = bins_of(cands)
    assert sorted(np.unique(bins, return_counts=True)[1].tolist()) == [2] * 8
    hist = np.zeros(16)
    first_bin = bins[0]
    hist[[i for i in range(16) if bins[i] == first_bin]] = [9.0, 3.0]  # only the first bin gets votes
    # Execute
    won = winners(cands, hist, keep=1, threshold=0.0)
    nxt = next_generation(pop, cands, hist, keep=1, threshold=0.0, strength=0.5, generation=1)
    # Assert: the bin's best survives (elitism) and its other slot is a mutation of it; the 7 voteless bins get
    # fresh proposals; the population keeps its size and its bins
    assert list(won) == [int(first_bin)] and won[int(first_bin)][0][1] == 9.0
    best = won[int(first_bin)][0][0]
    assert len(nxt) == 16 and sorted(bins_of(nxt).tolist()) == sorted(bins.tolist())
    assert best in nxt
    children = [c for c in nxt if c.parent == best.id]
    assert len(children) == 1 and children[0].params["seed"] != best.params["seed"]
    assert sum(c.parent is None and c.generation == 1 for c in nxt) == 14
    assert len({c.id for c in nxt}) == 16 and min(c.id for c in nxt if c.generation == 1) >= 16
    # the release: counts above the threshold only, at most k
    picked = select_release(cands, hist, k=5, threshold=4.0)
    assert [(c.id, h) for c, h, _ in picked] == [(best.id, 9.0)]


def test_sdedit_strength_zero_is_the_image_and_one_leaves_it() -> None:
    import torch

    from common.diffusion.sdedit import sdedit
    from common.models.bundle import build_bundle

    bundle = build_bundle(RunConfig.from_flat({"preset": "smoke"}))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    kw = {"plane": torch.tensor([0, 1]), "ga": torch.tensor([20.0, 30.0]), "num_inference_steps": 4, "seed": 0}
    assert torch.equal(sdedit(bundle.generator, x, strength=0.0, **kw), x)
    low, high = (float((sdedit(bundle.generator, x, strength=s, **kw) - x).abs().mean()) for s in (0.25, 1.0))
    assert 0 < low < high


def test_certificate_sums_each_sites_mechanisms_and_reports_the_worst() -> None:
    from common.active_learning.evolution import Candidate, certificate

    votes = {"a": {"epsilon": 0.5, "delta": 1e-6, "steps": 3}, "b": {"epsilon": 0.7, "delta": 1e-6, "steps": 3}}
    gen = {"a": {"epsilon": 2.0, "delta": 5e-6}, "b": {"epsilon": 1.0, "delta": 5e-6}}
    img = np.zeros((4, 4), np.uint8)
    phantom = certificate(Candidate(0, img, 0, 20.0, "phantom"), votes=votes, generator=gen, accountant="rdp")
    sample = certificate(Candidate(1, img, 0, 20.0, "generator"), votes=votes, generator=gen, accountant="rdp")
    assert phantom["epsilon"] == 0.7 and phantom["mechanisms"]["generator"] == {}  # phantoms: the votes only
    assert sample["per_site"]["a"]["epsilon"] == 2.5 and sample["epsilon"] == 2.5
    assert sample["delta"] == pytest.approx(6e-6)


@pytest.mark.e2e
def test_private_evolution_through_flower_votes_are_in_the_ledgers_and_the_release_flows_back(tmp_path) -> None:
    # Prepare: 2 rounds, 2 votes after each, through a SuperLink and the staged ClientApp ("query.vote" routing)
    from simulations.launcher import run_simulation

    cfg = _cfg(tmp_path / "run", **{"federation.num-rounds": 2, "federation.pe-iterations": 2,
                                   "federation.al-select": 4})
    # Execute
    result = run_simulation(cfg, num_sites=2, echo=False, timeout_s=400)
    # Assert
    assert result.returncode == 0, result.log_file.read_text()[-3000:]
    first, second = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for record in (first, second):
        its = record["active_learning"]["private_evolution"]["iterations"]
        assert [sorted(s["status"] for s in it["sites"]) for it in its] == [["ok", "ok"]] * 2
        assert record["active_learning"]["selected"] > 0
    # round 2's training replies carry round 1's 2 votes; round 2's query record has all 4, within the votes' share
    assert all(models["votes"]["steps"] == 2 for models in second["ledger"].values())
    votes = second["active_learning"]["private_evolution"]["votes_privacy"]
    assert {v["steps"] for v in votes.values()} == {4}
    assert all(0 < v["epsilon"] <= 0.2 * 10.0 + 1e-9 for v in votes.values())
    # the release of round 1 reached both sites' downstream training in round 2
    assert all(s["metrics"]["synthetic-examples"] == first["active_learning"]["selected"] for s in second["sites"])
