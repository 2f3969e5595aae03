"""Per-site assembly (phantoms and real data) and the records -> tensors conversion."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.core.config import DataConfig
from common.core.errors import ConfigError, DataError
from common.core.records import PLANES, UltrasoundRecord
from common.data.dedup import pixel_hash
from common.data.sites import FederatedData, SiteData, load_federated_data, load_site, public_phantoms
from common.data.tensors import records_to_dataset
from common.phantoms.simulator import SCANNER_PROFILES

SMALL = DataConfig(source="phantom", image_size=32, num_sites=3, images_per_site=12, test_fraction=0.25,
                   public_images=16, partition="iid")


def plane_tv(sites: list[SiteData]) -> float:
    """Mean total-variation distance between each site's training plane mix and the pooled one."""
    counts = np.array([np.bincount([r.plane for r in s.train], minlength=len(PLANES)) for s in sites], float)
    pooled = counts.sum(0) / counts.sum()
    return float(np.mean([0.5 * np.abs(c / c.sum() - pooled).sum() for c in counts]))


def same_records(a: list[UltrasoundRecord], b: list[UltrasoundRecord]) -> bool:
    """Same ids and identical pixels, in order."""
    return [r.image_id for r in a] == [r.image_id for r in b] and all(
        np.array_equal(x.image, y.image) for x, y in zip(a, b))


def shared_natural_sites(shared: Path, folder: str, source: str, num_sites: int) -> FederatedData:
    """The shared real dataset ``shared/folder`` split into its natural sites (32 px, seed 0); skip when absent."""
    root = shared / folder
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    cfg = DataConfig(source=source, root=str(root), image_size=32, num_sites=num_sites, partition="natural")
    return load_federated_data(cfg, seed=0)


# -- phantoms ---------------------------------------------------------------------------------
def test_phantom_sites_sizes_profiles_and_determinism() -> None:
    # Prepare
    profiles = list(SCANNER_PROFILES)
    # Execute
    fed = load_federated_data(SMALL, seed=7)
    again = load_federated_data(SMALL, seed=7)
    other = load_federated_data(SMALL, seed=8)
    one = load_site(SMALL, seed=7, site_index=1)
    # Assert: 12 train + 4 test (test is 25 % of each site), profile i mod P, seeded, one site alone = same
    assert [len(s.train) for s in fed.sites] == [12, 12, 12] and [len(s.test) for s in fed.sites] == [4, 4, 4]
    assert [s.name for s in fed.sites] == [f"site{i}-{profiles[i]}" for i in range(3)]
    assert [s.train[0].extra["profile"] for s in fed.sites] == profiles[:3]
    assert all(same_records(a.train + a.test, b.train + b.test) for a, b in zip(fed.sites, again.sites))
    assert not same_records(fed.sites[0].train, other.sites[0].train)
    assert one.name == fed.sites[1].name and same_records(one.train, fed.sites[1].train)
    assert same_records(one.test, fed.sites[1].test)
    ids = [r.image_id for s in fed.sites for r in s.train + s.test]
    assert len(set(ids)) == len(ids)
    assert fed.report["num_sites"] == 3 and "site0" in fed.report["table"]


def test_phantom_dirichlet_skews_planes_and_quantity_skews_sizes() -> None:
    # Prepare
    iid_cfg = replace(SMALL, images_per_site=16)
    skew_cfg = replace(iid_cfg, partition="dirichlet", dirichlet_alpha=0.05)
    qty_cfg = replace(iid_cfg, partition="quantity", dirichlet_alpha=0.3)
    # Execute
    iid = np.mean([plane_tv(load_federated_data(iid_cfg, seed=s).sites) for s in range(2)])
    skew = np.mean([plane_tv(load_federated_data(skew_cfg, seed=s).sites) for s in range(2)])
    qty = load_federated_data(qty_cfg, seed=3)
    # Assert
    assert skew > 0.4 and skew > 1.5 * iid  # measured: 0.44 vs 0.22
    sizes = [len(s.train) for s in qty.sites]
    assert sizes == qty.report["train_sizes"] and min(sizes) >= 4 and max(sizes) >= 2 * min(sizes)
    assert load_site(qty_cfg, seed=3, site_index=0).train[-1].image_id == qty.sites[0].train[-1].image_id


def test_public_phantoms_cover_profiles_and_differ_from_sites() -> None:
    # Prepare
    cfg = replace(SMALL, public_images=17)
    # Execute
    public = public_phantoms(cfg, seed=7)
    sites = load_federated_data(cfg, seed=7).sites
    # Assert
    assert len(public) == 17 and {r.site for r in public} == {"public"}
    assert {r.extra["profile"] for r in public} == set(SCANNER_PROFILES)
    site_hashes = {pixel_hash(r) for s in sites for r in s.train + s.test}
    assert not site_hashes & {pixel_hash(r) for r in public}
    assert same_records(public, public_phantoms(cfg, seed=7))


def test_site_index_out_of_range_raises() -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match="site_index=3"):
        load_site(SMALL, seed=0, site_index=3)


# -- real data --------------------------------------------------------------------------------
def write_african_with_leak(root: Path) -> Path:
    """One-country African layout; test image T1 is a byte copy of train image A1 under another patient."""
    rng = np.random.default_rng(0)
    pixels = {n: rng.integers(0, 256, size=(30, 30), dtype=np.uint8)
              for n in ("patient001_GHA_plane0", "patient002_GHA_plane0", "patient003_GHA_plane1",
                        "patient004_GHA_plane1")}
    pixels["patient009_GHA_plane0"] = pixels["patient001_GHA_plane0"].copy()
    planes = {"0": "Fetal abdomen", "1": "Fetal brain"}
    for split, names in (("train", list(pixels)[:3]), ("test", list(pixels)[3:])):
        (root / split).mkdir(parents=True)
        rows = ["Patient_num,Plane,Train,Center,Image_name"]
        for n in names:
            rows.append(f"{int(n[7:10])},{planes[n[-1]]},{int(split == 'train')},Ghana,{n}")
            Image.fromarray(pixels[n]).save(root / split / f"{n}.png")
        (root / split / f"African_{split}.csv").write_text("\n".join(rows) + "\n")
    return root


def test_official_split_drops_test_copies_of_training_cases(tmp_path: Path) -> None:
    # Prepare
    root = write_african_with_leak(tmp_path / "african")
    cfg = DataConfig(source="african", root=str(root), image_size=32, num_sites=1)
    # Execute
    fed = load_federated_data(cfg, seed=0)
    # Assert
    (site,) = fed.sites
    assert site.name == "Ghana" and fed.report["split"] == "official"
    assert sorted(r.image_id for r in site.train) == ["train/patient001_GHA_plane0", "train/patient002_GHA_plane0",
                                                      "train/patient003_GHA_plane1"]
    assert [r.image_id for r in site.test] == ["test/patient004_GHA_plane1"]
    assert fed.report["test_leakage_removed"] == 1
    assert fed.report["duplicates"]["exact_pairs"] == 1


def test_african_shared_natural_sites_keep_cases_whole(shared_data: Path) -> None:
    # Execute
    fed = shared_natural_sites(shared_data, "african_fetal_planes", "african", num_sites=2)
    # Assert: 5 countries (num_sites=2 overridden and reported); every record used once; no patient or
    # duplicated image on two sites or on both sides of a site's split
    assert [s.name for s in fed.sites] == ["Algeria", "Egypt", "Ghana", "Malawi", "Uganda"]
    assert fed.report["num_sites"] == 5 and any("num_sites=2" in n for n in fed.report["notes"])
    assert sum(len(s.train) + len(s.test) for s in fed.sites) == 217
    assert fed.report["duplicates"]["exact_pairs"] >= 16 and fed.report["split"] == "grouped"
    seen_patient: dict[str, str] = {}
    seen_pixels: dict[str, str] = {}
    for s in fed.sites:
        for side, recs in (("train", s.train), ("test", s.test)):
            assert recs, f"{s.name} has an empty {side} side"
            for r in recs:
                assert seen_patient.setdefault(r.patient_id, f"{s.name}/{side}") == f"{s.name}/{side}"
                assert seen_pixels.setdefault(pixel_hash(r), f"{s.name}/{side}") == f"{s.name}/{side}"
    # patient019_MWI's images are copies of patient008_MWI's: the two patients share a side
    assert seen_patient["MWI-008"] == seen_patient["MWI-019"]


# -- tensors ----------------------------------------------------------------------------------
def test_records_to_dataset_fixed_order_and_scaling() -> None:
    # Prepare: a 32 px record with GA and spacing, and a 64 px record without either
    black = np.zeros((32, 32), dtype=np.uint8)
    black[0, 0] = 255
    big = np.full((64, 64), 128, dtype=np.uint8)
    recs = [UltrasoundRecord(black, 2, 22.5, 0.4, "a", "p0", "i0", "test"),
            UltrasoundRecord(big, 5, None, 0.25, "a", "p1", "i1", "test")]
    # Execute
    images, plane, ga, spacing = records_to_dataset(recs, image_size=32).tensors
    # Assert
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.float32
    assert images[0, 0, 0, 0].item() == 1.0 and images[0].min().item() == -1.0
    assert plane.dtype == torch.int64 and plane.tolist() == [2, 5]
    assert ga.dtype == torch.float32 and ga[0].item() == 22.5 and math.isnan(ga[1].item())
    assert spacing.dtype == torch.float32 and spacing[0].item() == pytest.approx(0.4)
    assert spacing[1].item() == pytest.approx(0.5)  # 64 -> 32 px: each pixel twice as large
    assert images[1].mean().item() == pytest.approx(128 / 127.5 - 1.0, abs=1e-3)


def test_records_to_dataset_rejects_empty_and_bad_records() -> None:
    # Prepare
    bad = UltrasoundRecord(np.zeros((4, 4, 3), dtype=np.uint8), 0, None, None, "a", "p", "rgb", "test")
    # Execute / Assert
    with pytest.raises(DataError, match="no records"):
        records_to_dataset([], image_size=32)
    with pytest.raises(DataError, match="rgb"):
        records_to_dataset([bad], image_size=32)
    with pytest.raises(ValueError, match="image_size"):
        records_to_dataset([bad], image_size=30)


def test_fpdb_shared_natural_sites_by_machine(shared_data: Path) -> None:
    # Execute
    fed = shared_natural_sites(shared_data, "fetal_planes_db", "fetal_planes_db", num_sites=4)
    # Assert: the 100 shipped images are all official-train, so each site is split by case group instead;
    # Voluson S10's 7 images come from one patient: no test side there, and the report says so
    sites = {s.name: s for s in fed.sites}
    assert sorted(sites) == ["Aloka", "Other", "Voluson E6", "Voluson S10"]
    assert fed.report["split"] == "grouped" and fed.report["loader"]["skips"] == {"missing_image": 12_300}
    assert sum(len(s.train) + len(s.test) for s in fed.sites) == 100
    assert len(sites["Voluson S10"].train) == 7 and sites["Voluson S10"].test == []
    assert any("single case group" in n for n in fed.report["notes"])
    for s in fed.sites:
        assert not {r.patient_id for r in s.train} & {r.patient_id for r in s.test}
