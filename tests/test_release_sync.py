"""The release reaches sites as deltas: only what is new travels, the site's cache checks every item and digest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.active_learning.release import ReleaseStore
from common.active_learning.release_sync import (
    EMPTY_DIGEST,
    Held,
    ReleaseCache,
    ReleaseDelta,
    ReleaseSyncError,
    chain_digest,
    make_delta,
)
from common.federated.flwr_records import delta_from_content, delta_to_records, held_from_config, held_to_config
from tests.test_release import _item


def _store(folder: Path, n: int, *, first: int = 0) -> ReleaseStore:
    store = ReleaseStore(folder)
    store.add([_item(seed) for seed in range(first, first + n)])
    return store


def _delta(store: ReleaseStore, held: Held | None) -> ReleaseDelta:
    return make_delta(store.records(), store.load_image, held)


def test_a_site_receives_only_what_is_new_and_ends_with_the_whole_release(tmp_path: Path) -> None:
    # Prepare: a release of 3, then 2 more
    store = _store(tmp_path / "release", 3)
    cache = ReleaseCache(tmp_path / "site" / "cache")
    # Execute
    first = _delta(store, None)
    held = cache.apply(first)
    store.add([_item(10), _item(11)])
    second = _delta(store, held)
    held = cache.apply(second)
    # Assert: the second delta carries the 2 new items only; the cache equals the release, image for image
    assert (first.offset, len(first.keys), second.offset, len(second.keys)) == (0, 3, 3, 2)
    records = store.records()
    assert held == Held(count=5, digest=chain_digest([r["sha256"] for r in records]))
    np.testing.assert_array_equal(cache.images(), np.stack([store.load_image(r) for r in records]))
    assert [r.plane for r in cache.records()] == [r["plane"] for r in records]
    assert [r.ga_weeks for r in cache.records()] == pytest.approx([r["ga_weeks"] for r in records])
    assert _delta(store, held).keys == ()  # nothing new: an empty delta


def test_a_wrong_or_unknown_acknowledgement_gets_the_whole_release(tmp_path: Path) -> None:
    store = _store(tmp_path / "release", 4)
    keys = [r["sha256"] for r in store.records()]
    # a count the digest does not back (the release was rolled back, or the site lies), and a count past the end
    for held in (Held(count=2, digest=chain_digest(keys[1:3])), Held(count=9, digest=EMPTY_DIGEST), None):
        assert _delta(store, held).offset == 0
    assert _delta(store, Held(count=2, digest=chain_digest(keys[:2]))).offset == 2


def test_a_site_whose_cache_lacks_the_assumed_prefix_refuses_and_changes_nothing(tmp_path: Path) -> None:
    # Prepare: the server believes the site holds 3 items; the site's cache was lost
    store = _store(tmp_path / "release", 3)
    keys = [r["sha256"] for r in store.records()]
    store.add([_item(20)])
    delta = _delta(store, Held(count=3, digest=chain_digest(keys)))
    cache = ReleaseCache(tmp_path / "site")
    # Execute / Assert
    with pytest.raises(ReleaseSyncError, match="holds 0 items, not the 3"):
        cache.apply(delta)
    assert cache.held() == Held() and not (tmp_path / "site").exists()


def test_an_item_whose_pixels_do_not_match_its_key_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path / "release", 2)
    delta = _delta(store, None)
    tampered = delta.images.copy()
    tampered[1, 0, 0] ^= 1
    bad = ReleaseDelta(**{**delta.__dict__, "images": tampered})
    with pytest.raises(ReleaseSyncError, match="item 1 does not match its key"):
        ReleaseCache(tmp_path / "site").apply(bad)


def test_the_delta_and_the_acknowledgement_round_trip_through_flower_records(tmp_path: Path) -> None:
    # Prepare
    from flwr.app import ConfigRecord, RecordDict

    store = _store(tmp_path / "release", 3)
    delta = _delta(store, None)
    # Execute
    back = delta_from_content(RecordDict(delta_to_records(delta)))
    held = held_from_config(ConfigRecord(held_to_config(Held(count=3, digest=delta.digest))))
    # Assert
    assert back is not None and back.meta() == delta.meta()
    for key, value in delta.arrays().items():
        np.testing.assert_array_equal(back.arrays()[key], value)
        assert back.arrays()[key].dtype == value.dtype
    assert held == Held(count=3, digest=delta.digest)
    assert delta_from_content(RecordDict({})) is None
    assert held_from_config(ConfigRecord({"release-held": -1, "release-digest": "x"})) is None


def test_a_malformed_delta_names_what_is_wrong(tmp_path: Path) -> None:
    store = _store(tmp_path / "release", 2)
    delta = _delta(store, None)
    meta = {**delta.meta(), "total": 5}
    with pytest.raises(ReleaseSyncError, match="covers items 0..2 of 5"):
        ReleaseDelta.from_parts(delta.arrays(), meta)
    with pytest.raises(ReleaseSyncError, match="malformed"):
        ReleaseDelta.from_parts(delta.arrays(), {"total": 2})
