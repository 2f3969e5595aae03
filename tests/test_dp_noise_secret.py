"""DP noise that only the site can regenerate (adversarial-holes issue, hole 1).

The server knows the run seed and the whole config; if DP-SGD's Poisson sampling and Gaussian noise were seeded
from them it could regenerate and subtract the noise. They are keyed by a per-site secret that never leaves the
site's state folder; only ``privacy.insecure-reproducible-noise`` seeds them publicly, and then every artifact says so.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from common.core.config import RunConfig
from common.data.sites import load_site
from common.federated.local_update import dp_noise_seed, local_train
from common.models.bundle import build_bundle, federated_arrays, load_federated_file
from common.privacy.dpsgd import train_private
from common.privacy.ledger import PrivacyLedger
from common.privacy.site_state import SECRET_FILE, SiteStateStore, copy_site_secrets
from simulations.launcher import run_simulation


def _tiny_task() -> tuple[nn.Module, TensorDataset]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=gen)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    return nn.Linear(4, 2), TensorDataset(x, y)


def _ce(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _dp_weights(noise_seed: int | None, *, seed: int = 0) -> torch.Tensor:
    model, data = _tiny_task()
    ledger = PrivacyLedger(target_epsilon=10.0, target_delta=1e-5, budget_split={"classifier": 1.0})
    train_private(model, _ce, data, steps=4, batch_size=8, lr=0.1, ledger=ledger, model_key="classifier",
                  planned_total_steps=8, seed=seed, noise_seed=noise_seed)
    return model.weight.detach().clone()


def test_dp_noise_follows_the_private_seed_not_the_public_one() -> None:
    same_public_seed = [_dp_weights(noise_seed=s, seed=0) for s in (11, 11, 12)]
    assert torch.equal(same_public_seed[0], same_public_seed[1])  # a site's replay draws the same noise
    assert not torch.equal(same_public_seed[0], same_public_seed[2])
    # the public seed alone (what the server knows) no longer fixes the result: fresh OS noise each call
    assert not torch.equal(_dp_weights(noise_seed=None, seed=0), _dp_weights(noise_seed=None, seed=0))


def test_site_secret_is_created_once_private_to_the_owner_and_keys_the_seeds(tmp_path: Path) -> None:
    a, b = SiteStateStore(tmp_path / "a"), SiteStateStore(tmp_path / "b")
    secret = a.secret()
    assert len(secret) == 32 and a.secret() == secret != b.secret()
    assert stat.S_IMODE((tmp_path / "a" / SECRET_FILE).stat().st_mode) == 0o600
    cfg = RunConfig.from_flat({"preset": "smoke"})
    seed_a = dp_noise_seed(cfg, a.secret(), "Ghana", 1, "classifier")
    assert seed_a == dp_noise_seed(cfg, a.secret(), "Ghana", 1, "classifier")
    assert seed_a != dp_noise_seed(cfg, a.secret(), "Ghana", 2, "classifier")
    assert seed_a != dp_noise_seed(cfg, b.secret(), "Ghana", 1, "classifier")


def test_copied_site_secrets_are_owner_only_and_never_overwrite(tmp_path: Path) -> None:
    src, dst = tmp_path / "arm-a", tmp_path / "arm-b"
    for name in ("Ghana", "Malawi"):
        SiteStateStore(src / "sites" / name).secret()
    kept = SiteStateStore(dst / "sites" / "Malawi").secret()
    assert copy_site_secrets(src, dst) == ["Ghana"]
    assert SiteStateStore(dst / "sites" / "Ghana").secret() == SiteStateStore(src / "sites" / "Ghana").secret()
    assert SiteStateStore(dst / "sites" / "Malawi").secret() == kept
    assert stat.S_IMODE((dst / "sites" / "Ghana" / SECRET_FILE).stat().st_mode) == 0o600


def _local_round(tmp_path: Path, name: str, **overrides: object) -> tuple[dict[str, np.ndarray], dict]:
    cfg = RunConfig.from_flat({"preset": "smoke", "run-dir": str(tmp_path / name), **overrides})
    site = load_site(cfg.data, seed=cfg.seed, site_index=0)
    store = SiteStateStore(tmp_path / name / "state")
    ledger = store.load_ledger(before_round=1, privacy=cfg.privacy)
    bundle = build_bundle(cfg)
    local_train(bundle, site, ledger, cfg, server_round=1, secret=store.secret())
    return federated_arrays(bundle), ledger.summary()


def test_insecure_reproducible_noise_is_reproducible_and_marked_not_private(tmp_path: Path) -> None:
    flag = {"privacy.insecure-reproducible-noise": True, "train.local-steps": 2, "train.downstream-steps": 2}
    a, summary = _local_round(tmp_path, "a", **flag)
    b, _ = _local_round(tmp_path, "b", **flag)  # another state folder, so another secret: ignored
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert summary["generator"]["private_noise"] is False and summary["classifier"]["private_noise"] is False
    secure, secure_summary = _local_round(tmp_path, "c", **{"train.local-steps": 2, "train.downstream-steps": 2})
    assert secure_summary["generator"]["private_noise"] is True
    assert not all(np.array_equal(a[k], secure[k]) for k in a if k.startswith("classifier."))


def test_ledger_state_keeps_the_noise_mark_and_old_states_are_not_private() -> None:
    ledger = PrivacyLedger(target_epsilon=4.0, target_delta=1e-5)
    assert PrivacyLedger.from_state_dict(ledger.state_dict()).private_noise is True
    ledger.mark_noise_not_private()
    assert PrivacyLedger.from_state_dict(ledger.state_dict()).private_noise is False
    old = {k: v for k, v in PrivacyLedger(target_epsilon=4.0, target_delta=1e-5).state_dict().items()
           if k != "private_noise"}  # a ledger written before site-secret noise was seeded publicly
    assert PrivacyLedger.from_state_dict(old).private_noise is False


def _config(run: Path) -> dict:
    cfg = json.loads((run / "config.json").read_text())["config"]
    return {k: v for k, v in cfg.items() if k != "run_dir"}


def _files_containing(root: Path, needles: list[bytes], *, skip: set[Path]) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p not in skip
            and any(n in p.read_bytes() for n in needles)]


@pytest.mark.e2e
def test_same_seed_dp_federations_differ_in_noise_and_the_secret_stays_home(  # type: ignore[no-untyped-def]
        tmp_path: Path, smoke_cli_run) -> None:
    # Prepare: the same config and seed twice, in two run folders (as a server would replay them): the session's
    # smoke federation (`difusal simulate --preset smoke`, tests/conftest.py) and one more here
    out, first = smoke_cli_run
    runs = [first, tmp_path / "two"]
    # Execute
    result = run_simulation(RunConfig.from_flat({"preset": "smoke", "run-dir": str(runs[1])}), num_sites=2,
                            echo=False, timeout_s=300)
    # Assert: the private noise differs, so the federated weights differ
    assert out.returncode == 0 and result.returncode == 0, result.log_file.read_text()[-3000:]
    assert _config(first) == _config(runs[1])  # the same run, but for its folder
    a, b = (load_federated_file(r / "checkpoints" / "round-001") for r in runs)
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.startswith("classifier."))
    assert any(not np.array_equal(a[k], b[k]) for k in a if k.startswith("generator."))
    # ... while the public steps are identical: the same sites, data sizes and DP plans (sigma, q, steps, epsilon)
    recs = [json.loads((r / "metrics.jsonl").read_text().splitlines()[0]) for r in runs]
    assert recs[0]["ledger"] == recs[1]["ledger"]
    assert all(m["private_noise"] is True for site in recs[0]["ledger"].values() for m in site.values())
    sizes = [sorted((s["name"], s.get("num_examples", s.get("num-examples"))) for s in rec["sites"]) for rec in recs]
    assert sizes[0] == sizes[1]
    # each site's secret sits in its own state folder, and in no other file of the run folder
    for run in runs:
        secrets_ = sorted(run.glob(f"sites/*/{SECRET_FILE}"))
        assert len(secrets_) == 2
        needles = [s.read_bytes() for s in secrets_] + [s.read_bytes().hex().encode() for s in secrets_]
        assert _files_containing(run, needles, skip=set(secrets_)) == []


def test_a_train_reply_carries_nothing_of_the_site_secret(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # Prepare: the client's real train handler, in process, as the SuperNode of simulated site 0 would call it
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    import client.app as client_app
    from common.federated.flwr_records import arrays_to_record

    for attr in ("_run_id", "_node_id", "_task_id"):  # messages outside a Flower runtime need a task identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    run_config = {"preset": "smoke", "seed": 0, "run-dir": str(tmp_path / "run"), "prior": "", "resume": False,
                  "train.local-steps": 2, "train.downstream-steps": 2}
    cfg = RunConfig.from_run_config(run_config)
    content = RecordDict({"arrays": arrays_to_record(federated_arrays(build_bundle(cfg))),
                          "config": ConfigRecord({"server-round": 1})})
    msg = Message(content=content, message_type="train", dst_node_id=1)
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 2}, state=RecordDict(),
                  run_config=run_config)
    # Execute
    reply = client_app.train(msg, ctx)
    # Assert: the site trained, and no array or config value of its reply holds the secret (raw or hex)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    (secret_file,) = (tmp_path / "run" / "sites").glob(f"*/{SECRET_FILE}")
    secret = secret_file.read_bytes()
    blobs = [arr.numpy().tobytes() for rec in reply.content.array_records.values() for arr in rec.values()]
    blobs += [str(v).encode() for rec in reply.content.config_records.values() for v in rec.values()]
    blobs += [str(v).encode() for rec in reply.content.metric_records.values() for v in rec.values()]
    assert blobs and not any(secret in b or secret.hex().encode() in b for b in blobs)
