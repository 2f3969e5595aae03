"""The phantom preset's downstream table (simulations.experiments.phantom_heads) on the smoke preset."""

from __future__ import annotations

import json

from simulations.experiments import phantom_heads


def test_phantom_heads_writes_every_arm_with_sane_values(tmp_path):
    out = tmp_path / "ph.json"
    assert phantom_heads.main(["--preset", "smoke", "--seeds", "1", "--extractors", "public_cnn",
                               "--epsilons", "10", "--reg-steps", "5", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    arms = report["summary"]["public_cnn"]
    assert set(arms) == {"clf_public_head", "clf_nonprivate", "clf_dp_eps10", "reg_nonprivate", "reg_dp_eps10"}
    # the phantom scope is every plane: no public GA warm start (it reads head size, brain-only consortia)
    assert "reg_public_head" not in arms
    for arm in ("clf_public_head", "clf_nonprivate", "clf_dp_eps10"):
        assert 0.0 <= arms[arm]["accuracy"]["mean"] <= 1.0
    assert arms["clf_nonprivate"]["accuracy"]["mean"] > 1 / 6 + 0.15  # well above chance over six planes
    for arm in ("reg_nonprivate", "reg_dp_eps10"):
        m = arms[arm]
        assert 0.0 < m["mae_days"]["mean"] < 200.0 and 0.0 <= m["coverage"]["mean"] <= 1.0
    assert report["settings"]["epsilons"] == [10.0] and report["data"]["sites"]["n_test"] > 0
