"""Per-round held-out metrics pooled over the sites, from one ``metrics.jsonl`` record.

Flower aggregates only the metrics every site reports (a site without gestational ages has no GA error), so the
round record keeps each site's full evaluation; these helpers pool it by the sites' test-example counts.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

# metrics.jsonl site-evaluation key -> name in a round summary
POOLED_KEYS: dict[str, str] = {
    "plane-accuracy": "plane_accuracy",
    "plane-macro-f1": "plane_macro_f1",
    "ga-mae-days": "ga_mae_days",
    "ga-coverage": "ga_coverage",
}


def pooled(sites: Sequence[Mapping[str, Any]], key: str, weight: str = "num-examples") -> float | None:
    """Example-weighted mean of a site-evaluation metric over the sites that report it (``None``: no site does)."""
    pairs = [(float(s["evaluation"][key]), float(s["evaluation"].get(weight, 0))) for s in sites
             if key in (s.get("evaluation") or {}) and (s.get("evaluation") or {}).get(weight, 0)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def failed_replies(record: Mapping[str, Any]) -> list[str]:
    """``"<phase> <site>: <reason>"`` for every site reply of one ``metrics.jsonl`` record that did not come back ok
    (training, or the coordinator's query): a round with any measured a smaller federation than intended."""
    phases = (("train", record.get("sites", [])), ("query", (record.get("active_learning") or {}).get("sites", [])))
    return [f"{phase} {site.get('name', site.get('node_id'))}: {str(site.get('reason', ''))[:120]}"
            for phase, sites in phases for site in sites if site.get("status", "ok") != "ok"]


def round_summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """Round number, pooled held-out metrics and release size of one ``metrics.jsonl`` record."""
    out: dict[str, Any] = {"round": int(record["round"])}
    for key, name in POOLED_KEYS.items():
        out[name] = pooled(record.get("sites", []), key)
    out["release_size"] = (record.get("active_learning") or {}).get("release_size", 0)
    return out
