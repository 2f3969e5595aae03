"""Real-data loaders, duplicate detection, site partitions, per-site assembly and tensor conversion.

Modules: :mod:`~common.data.loaders` (FETAL_PLANES_DB, HC18, African planes -> records + report),
:mod:`~common.data.dedup` (exact and near duplicates), :mod:`~common.data.partition` (case groups,
natural/IID/Dirichlet/quantity partitions, grouped splits), :mod:`~common.data.sites` (the federation's
view: :class:`SiteData`, :func:`load_federated_data`), :mod:`~common.data.tensors` (records -> tensors).
Names are re-exported lazily (PEP 562) so that importing the loaders does not import torch or the phantoms;
the function ``partition`` is not re-exported (the name is its submodule): use ``common.data.partition.partition``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "loaders": ("LoadReport", "LoadResult", "load_fetal_planes_db", "load_hc18", "load_african", "load_source",
                "fit_square"),
    "dedup": ("DuplicateGroup", "DuplicateReport", "find_duplicates"),
    "partition": ("case_groups", "grouped_split", "natural_sites", "site_summary", "format_summary"),
    "sites": ("SiteData", "FederatedData", "load_federated_data", "load_site", "public_phantoms"),
    "tensors": ("records_to_dataset",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module 'common.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"common.data.{_WHERE[name]}"), name)
