"""Case groups, site partitions and grouped splits: disjoint, complete, grouped, seeded, skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest

from common.core.records import PLANES, UltrasoundRecord
from common.data.dedup import find_duplicates
from common.data.partition import case_groups, format_summary, grouped_split, natural_sites, partition, site_summary


def make_records(n_patients: int = 60, per_patient: int = 3, seed: int = 0, sites: int = 3
                 ) -> list[UltrasoundRecord]:
    """Synthetic records: patients with a few images each, planes drawn at random, distinct tiny images."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        plane = int(rng.integers(len(PLANES)))
        for k in range(per_patient):
            out.append(UltrasoundRecord(
                image=rng.integers(0, 256, size=(8, 8), dtype=np.uint8), plane=plane,
                ga_weeks=float(rng.uniform(14, 40)), pixel_spacing_mm=None, site=f"s{p % sites}",
                patient_id=f"p{p}", image_id=f"p{p}_{k}", source="test"))
    return out


def plane_skew(records: list[UltrasoundRecord], assignment: list[list[int]]) -> float:
    """Mean total-variation distance between each site's plane distribution and the global one."""
    planes = np.array([r.plane for r in records])
    overall = np.bincount(planes, minlength=len(PLANES)) / len(planes)
    tv = [0.5 * np.abs(np.bincount(planes[idx], minlength=len(PLANES)) / len(idx) - overall).sum()
          for idx in assignment]
    return float(np.mean(tv))


def assert_valid(records: list[UltrasoundRecord], assignment: list[list[int]], groups: list[list[int]]) -> None:
    """Disjoint, complete, no empty site, every case group on one site."""
    flat = [i for idx in assignment for i in idx]
    assert sorted(flat) == list(range(len(records)))
    assert all(idx for idx in assignment)
    site_of = {i: s for s, idx in enumerate(assignment) for i in idx}
    for group in groups:
        assert len({site_of[i] for i in group}) == 1


def test_case_groups_join_patients_and_duplicates() -> None:
    # Prepare: patient p1's first image is a byte copy of patient p4's first image
    recs = make_records(n_patients=6, per_patient=2)
    recs[2] = UltrasoundRecord(**{**recs[2].__dict__, "image": recs[8].image.copy()})
    # Execute
    plain = case_groups(recs)
    merged = case_groups(recs, find_duplicates(recs))
    # Assert
    assert plain == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11]]
    assert merged == [[0, 1], [2, 3, 8, 9], [4, 5], [6, 7], [10, 11]]
    with pytest.raises(ValueError, match="same record list"):
        case_groups(recs[:5], find_duplicates(recs))


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "quantity"])
def test_partitions_are_disjoint_complete_grouped_and_seeded(kind: str) -> None:
    # Prepare: duplicates join patients p0 and p7 into one case group
    recs = make_records()
    recs[0] = UltrasoundRecord(**{**recs[0].__dict__, "image": recs[21].image.copy()})
    groups = case_groups(recs, find_duplicates(recs))
    # Execute
    a = partition(recs, kind=kind, num_sites=4, seed=1, alpha=0.5, groups=groups)
    b = partition(recs, kind=kind, num_sites=4, seed=1, alpha=0.5, groups=groups)
    c = partition(recs, kind=kind, num_sites=4, seed=2, alpha=0.5, groups=groups)
    # Assert
    assert len(a) == 4
    assert_valid(recs, a, groups)
    assert a == b and a != c
    site_of = {i: s for s, idx in enumerate(a) for i in idx}
    assert site_of[0] == site_of[21]  # the duplicate-linked patients share a site


def test_iid_sizes_are_balanced() -> None:
    # Prepare
    recs = make_records(n_patients=60, per_patient=3)
    # Execute
    sizes = [len(idx) for idx in partition(recs, kind="iid", num_sites=4, seed=0)]
    # Assert: groups of 3 images over 4 sites: sizes within one group of each other
    assert sum(sizes) == 180 and max(sizes) - min(sizes) <= 3


def test_dirichlet_small_alpha_is_more_skewed_than_iid() -> None:
    # Prepare
    recs = make_records(n_patients=240, per_patient=1)
    # Execute: mean over seeds of the site-vs-global plane TV distance
    iid = np.mean([plane_skew(recs, partition(recs, kind="iid", num_sites=4, seed=s)) for s in range(5)])
    skew = np.mean([plane_skew(recs, partition(recs, kind="dirichlet", num_sites=4, seed=s, alpha=0.1))
                    for s in range(5)])
    mild = np.mean([plane_skew(recs, partition(recs, kind="dirichlet", num_sites=4, seed=s, alpha=100.0))
                    for s in range(5)])
    # Assert
    assert skew > 0.35 and iid < 0.12 and skew > 3 * iid
    assert mild < skew


def test_quantity_skew_varies_sizes() -> None:
    # Prepare
    recs = make_records(n_patients=200, per_patient=1)
    # Execute
    iid = [len(i) for i in partition(recs, kind="iid", num_sites=5, seed=3)]
    qty = [len(i) for i in partition(recs, kind="quantity", num_sites=5, seed=3, alpha=0.5)]
    # Assert
    assert np.std(qty) / np.mean(qty) > 0.3 > np.std(iid) / np.mean(iid)
    assert sum(qty) == 200


def test_natural_partition_by_site_and_majority_for_spanning_groups() -> None:
    # Prepare: patient p0 has images at s0, s0 and s1 -> majority s0
    recs = make_records(n_patients=9, per_patient=3, sites=3)
    recs[2] = UltrasoundRecord(**{**recs[2].__dict__, "site": "s1"})
    # Execute
    names, assignment = natural_sites(recs)
    via_partition = partition(recs, kind="natural", num_sites=99, seed=0)
    # Assert
    assert names == ["s0", "s1", "s2"] and via_partition == assignment
    assert {0, 1, 2} <= set(assignment[0])
    assert all(recs[i].site == "s1" for i in assignment[1])


def test_partition_errors_are_explicit() -> None:
    # Prepare
    recs = make_records(n_patients=3, per_patient=2)
    # Execute / Assert
    with pytest.raises(ValueError, match="kind"):
        partition(recs, kind="random", num_sites=2, seed=0)
    with pytest.raises(ValueError, match="only 3 case groups"):
        partition(recs, kind="iid", num_sites=4, seed=0)
    with pytest.raises(ValueError, match="exactly once"):
        partition(recs, kind="iid", num_sites=2, seed=0, groups=[[0, 1], [2, 3]])


def test_grouped_split_keeps_groups_whole_and_hits_fraction() -> None:
    # Prepare
    recs = make_records(n_patients=120, per_patient=2)
    groups = case_groups(recs)
    # Execute
    train, test = grouped_split(recs, test_fraction=0.25, seed=0)
    again = grouped_split(recs, test_fraction=0.25, seed=0)
    # Assert
    assert sorted(train + test) == list(range(240)) and not set(train) & set(test)
    assert (train, test) == again
    test_set = set(test)
    assert all(len({i in test_set for i in g}) == 1 for g in groups)
    assert abs(len(test) / 240 - 0.25) < 0.05
    test_planes = {recs[i].plane for i in test}
    assert test_planes == {r.plane for r in recs}  # every plane stratum contributes test cases


def test_grouped_split_two_groups_gives_both_sides() -> None:
    # Prepare
    recs = make_records(n_patients=2, per_patient=3)
    # Execute
    train, test = grouped_split(recs, test_fraction=0.1, seed=0)
    # Assert
    assert len(train) == 3 and len(test) == 3
    with pytest.raises(ValueError, match="test_fraction"):
        grouped_split(recs, test_fraction=1.0, seed=0)


def test_site_summary_counts_and_table() -> None:
    # Prepare
    recs = make_records(n_patients=4, per_patient=2)
    assignment = [[0, 1, 2, 3], [4, 5, 6, 7]]
    # Execute
    rows = site_summary(recs, assignment, ["north", "south"])
    table = format_summary(rows)
    # Assert
    assert [r["images"] for r in rows] == [4, 4] and [r["patients"] for r in rows] == [2, 2]
    assert sum(rows[0]["planes"].values()) == 4
    ga = [recs[i].ga_weeks for i in assignment[0]]
    assert rows[0]["ga_min"] == pytest.approx(min(ga), abs=0.01)
    assert "north" in table and "south" in table and len(table.splitlines()) == 3
