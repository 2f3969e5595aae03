"""A site's persistent state between rounds: its privacy ledger, kept on the site's own disk.

One ledger per site for the whole run (never a fresh accountant per round). A snapshot is written after
every round it trained (``ledger-round-NNN.json``, atomically); round ``r`` restores the newest snapshot
of a round before ``r``. A resumed run that replays round ``r`` therefore continues from the same ledger:
the replay repeats the same seeded computation on the same data and releases the same update, so it reveals
nothing beyond the first attempt (see README, "Resume and privacy").

The site's secret (``site-secret.key``, 32 random bytes from :mod:`secrets`, mode 0600) is drawn here on first
use and never leaves this folder: it keys the seeds of DP-SGD's Poisson sampling and noise
(:func:`common.federated.local_update.dp_noise_seed`), so the server, which knows the run seed and the whole config, cannot
regenerate the noise; a replayed round draws the same noise again, as the replay argument above needs.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from common.core.atomic_io import atomic_path, create_exclusive, write_json_atomic
from common.core.config import PrivacyConfig
from common.core.errors import ConfigError, DataError
from common.core.run_layout import RunLayout
from common.privacy.ledger import PrivacyLedger

_SNAPSHOT = re.compile(r"^ledger-round-(\d{3,})\.json$")
SECRET_FILE = "site-secret.key"
_SECRET_BYTES = 32


class SiteStateStore:
    """Ledger snapshots of one site in ``folder``."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def load_ledger(self, *, before_round: int, privacy: PrivacyConfig) -> PrivacyLedger:
        """Newest ledger saved for a round ``< before_round``; a new ledger when there is none."""
        rounds = [r for r in self.saved_rounds() if r < before_round]
        if not rounds:
            ledger = PrivacyLedger(
                target_epsilon=privacy.target_epsilon,
                target_delta=privacy.target_delta,
                accountant=privacy.accountant,
                budget_split=privacy.budget_split(),
            )
        else:
            payload = json.loads(self._path(max(rounds)).read_text())
            ledger = PrivacyLedger.from_state_dict(payload["ledger"])
            if ledger.budget_split != privacy.budget_split():
                raise ConfigError(
                    f"the site's ledger of round {max(rounds)} splits the budget as {ledger.budget_split}, the config "
                    f"as {privacy.budget_split()}: a run keeps one split (restore privacy.budget-* or start a new run)")
        if privacy.insecure_reproducible_noise:
            ledger.mark_noise_not_private()
        return ledger

    def secret(self) -> bytes:
        """This site's secret, created (32 bytes from :mod:`secrets`, mode 0600) at first use; never sent."""
        path = self.folder / SECRET_FILE
        if not path.exists():
            create_exclusive(path, secrets.token_bytes(_SECRET_BYTES), mode=0o600)
        data = path.read_bytes()
        if len(data) != _SECRET_BYTES:
            raise DataError(f"{path} holds {len(data)} bytes, expected {_SECRET_BYTES}: the site secret is damaged. "
                            "Restore it from the site's backup; a new secret is safe only for a new run")
        return data

    def save_ledger(self, server_round: int, ledger: PrivacyLedger, *, info: dict[str, Any] | None = None) -> Path:
        """Write the ledger after ``server_round`` atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        payload = {"round": server_round, "ledger": ledger.state_dict(), "info": info or {}}
        path = self._path(server_round)
        return write_json_atomic(path, payload, indent=None, default=None)

    def save_local_model(self, server_round: int, arrays: dict[str, "np.ndarray"]) -> Path:
        """Keep the site's own DP fine-tuned generator part of ``server_round`` (used to answer queries)."""
        from safetensors.numpy import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"local-model-round-{server_round:03d}.safetensors"
        with atomic_path(path, mode=0o644) as tmp:  # readable, as before: it is DP-trained, not a secret
            save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
        return path

    def load_local_model(self, *, up_to_round: int) -> dict[str, "np.ndarray"] | None:
        """The newest local model saved at or before ``up_to_round``; ``None`` if the site never trained."""
        from safetensors.numpy import load_file

        found = sorted(
            int(m.group(1)) for p in self.folder.glob("local-model-round-*.safetensors")
            if (m := re.match(r"^local-model-round-(\d+)\.safetensors$", p.name))
        ) if self.folder.is_dir() else []
        found = [r for r in found if r <= up_to_round]
        if not found:
            return None
        return dict(load_file(str(self.folder / f"local-model-round-{found[-1]:03d}.safetensors")))

    def saved_rounds(self) -> list[int]:
        """Rounds with a saved snapshot, ascending."""
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _SNAPSHOT.match(p.name)))

    def _path(self, server_round: int) -> Path:
        return self.folder / f"ledger-round-{server_round:03d}.json"


def copy_site_secrets(src_run_dir: Path, dst_run_dir: Path) -> list[str]:
    """Give the simulated sites of ``dst_run_dir`` the secrets of the same sites in ``src_run_dir``.

    For experiments that simulate *the same hospitals* several times (the arms of a comparison): each site keeps
    its secret, so the arms draw the same private noise and their differences are not noise. A site that already
    has a secret in ``dst_run_dir`` keeps it. Returns the site names given a secret.
    """
    copied = []
    for secret in sorted(Path(src_run_dir).glob(f"sites/*/{SECRET_FILE}")):
        dst = RunLayout(Path(dst_run_dir)).site(secret.parent.name) / SECRET_FILE
        if not dst.exists() and create_exclusive(dst, secret.read_bytes(), mode=0o600):
            copied.append(secret.parent.name)
    return copied

