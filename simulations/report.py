"""One self-contained HTML page per run: ``python -m simulations.report RUN_DIR`` -> ``RUN_DIR/report.html``.

Every image is embedded (base64 PNG), so the page opens offline and can be mailed on its own. Tables and plots
come from the run folder: ``config.json``, ``metrics.jsonl``, ``release/``, ``figures/`` and, when present,
``evaluation/`` (``python -m simulations.experiments.downstream evaluate RUN_DIR``), a privacy-utility curve
(``evaluation/privacy_utility.json`` or ``../privacy_utility.json``) and the active-learning arms
(``../al_loop.json``, from ``python -m simulations.experiments.al_loop``).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from common.core.atomic_io import write_text_atomic
from common.core.records import GA_MAX_WEEKS, GA_MIN_WEEKS, PLANES, UltrasoundRecord
from common.core.run_layout import RunLayout
from common.core.viz import plot_series, save_grid
from common.federated.round_metrics import round_summary

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CSS = """body{font-family:system-ui,sans-serif;margin:24px;max-width:1200px;color:#222}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;margin-top:28px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f0f0f0}td.t{text-align:left}td:first-child,th:first-child{text-align:left}.note{color:#666;font-size:12px;max-width:1000px}
img{image-rendering:pixelated;max-width:100%;border:1px solid #ddd;margin:4px 0}figure{margin:8px 0}
figcaption{font-size:12px;color:#555}"""


# -- small helpers ------------------------------------------------------------------------------------------
def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _img(data: bytes, caption: str) -> str:
    return f'<figure><img src="{_png_uri(data)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}' \
           "</figcaption></figure>"


def _grid_png(rows: Sequence[Sequence[np.ndarray]], **kw: Any) -> bytes:
    """``common.core.viz.save_grid`` into memory (through a temp file: the writer is atomic on disk)."""
    with tempfile.TemporaryDirectory() as tmp:
        return save_grid(rows, Path(tmp) / "grid.png", **kw).read_bytes()


def _fig_png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return html.escape(str(x))
    if isinstance(x, float) and x != 0 and abs(x) < 10 ** -digits:
        return f"{x:.2e}"  # a delta of 1e-5 must not read as 0.000
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], digits: int = 3) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td{' class=t' if isinstance(c, str) else ''}>{_fmt(c, digits)}</td>" for c in row)
            + "</tr>" for row in rows]
    return "\n".join(out) + "</table>"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -- sections -----------------------------------------------------------------------------------------------
GA_EDGES = (GA_MIN_WEEKS, 20.0, 26.0, 32.0, GA_MAX_WEEKS)


def real_vs_synthetic_cells(real: Sequence[UltrasoundRecord], synthetic: Sequence[UltrasoundRecord],
                            *, unknown_ga_columns: int = 3) -> tuple[list[list[np.ndarray]], list[str], list[str]]:
    """Cells of :func:`real_vs_synthetic_grid`: rows = planes; columns = GA bins, real first then synthetic.

    Real images without a recorded GA (e.g. the African planes) get ``unknown_ga_columns`` columns of their own
    ("real, GA n/a"), so a dataset without GA still shows its real images. A cell is the first image that fits,
    white if none.
    """
    size = (real or synthetic)[0].image.shape
    blank = np.full(size, 255, np.uint8)
    bins = [(lo, hi) for lo, hi in zip(GA_EDGES[:-1], GA_EDGES[1:])]

    def pick(recs: Sequence[UltrasoundRecord], plane: int, lo: float, hi: float) -> np.ndarray:
        for r in recs:
            ga = r.ga_weeks if r.ga_weeks is not None else float("nan")
            if r.plane == plane and lo <= ga < hi + (hi == GA_MAX_WEEKS) and r.image.shape == size:
                return r.image
        return blank

    def no_ga(plane: int) -> list[np.ndarray]:
        imgs = [r.image for r in real if r.plane == plane and r.ga_weeks is None and r.image.shape == size]
        return (imgs + [blank] * n_unknown)[:n_unknown]

    n_unknown = unknown_ga_columns if any(r.ga_weeks is None for r in real) else 0
    planes = sorted({r.plane for r in (*real, *synthetic)})
    rows = [no_ga(p) + [pick(real, p, lo, hi) for lo, hi in bins] + [pick(synthetic, p, lo, hi) for lo, hi in bins]
            for p in planes]
    cols = (["real, GA n/a"] * n_unknown + [f"real {lo:.0f}-{hi:.0f}w" for lo, hi in bins]
            + [f"syn {lo:.0f}-{hi:.0f}w" for lo, hi in bins])
    return rows, [PLANES[p] for p in planes], cols


def real_vs_synthetic_grid(real: Sequence[UltrasoundRecord], synthetic: Sequence[UltrasoundRecord]) -> bytes | None:
    """Real vs synthetic images by plane and GA bin as one PNG (``None`` when there are no images)."""
    if not real and not synthetic:
        return None
    rows, row_labels, cols = real_vs_synthetic_cells(real, synthetic)
    return _grid_png(rows, row_labels=row_labels, col_labels=cols, scale=2,
                     title="Real (left) vs synthetic (right), by plane and GA bin (blank: none in that bin)")


def nearest_pairs(real: Sequence[UltrasoundRecord], synthetic: Sequence[UltrasoundRecord],
                  image_metrics: dict[str, Any] | None, *, max_pairs: int = 12) -> tuple[bytes | None, str]:
    """Top row synthetic, bottom row its nearest real training image: from the evaluation, else pixel space."""
    if not synthetic or not real:
        return None, ""
    by_id = {r.image_id: r for r in real}
    syn_by_id = {r.image_id: r for r in synthetic}
    pairs = []
    if image_metrics and image_metrics.get("nearest_real_pairs"):
        for p in image_metrics["nearest_real_pairs"][:max_pairs]:
            if p["synthetic_id"] in syn_by_id and p["real_id"] in by_id:
                pairs.append((syn_by_id[p["synthetic_id"]], by_id[p["real_id"]], p["feature_distance"]))
        how = f"nearest in the evaluation's feature space ({image_metrics.get('feature_space', '?')})"
    else:
        a = _unit([r.image for r in synthetic])
        b = _unit([r.image for r in real])
        d = np.sqrt(np.maximum(2.0 - 2.0 * a @ b.T, 0.0))
        idx = d.argmin(1)
        order = np.argsort(d[np.arange(len(a)), idx])[:max_pairs]
        pairs = [(synthetic[i], real[idx[i]], float(d[i, idx[i]])) for i in order]
        how = "nearest in pixel space (L2 of zero-mean, unit-norm images); run the evaluation for the feature space"
    if not pairs:
        return None, how
    rows = [[s.image for s, _, _ in pairs], [r.image for _, r, _ in pairs]]
    caps = [[f"{s.plane_name.split('_')[-1][:7]} {dist:.2f}" for s, _, dist in pairs],
            [r.site[:12] for _, r, _ in pairs]]
    return _grid_png(rows, row_labels=["synthetic", "nearest real"], cell_captions=caps, scale=3,
                     title="Closest pairs first (caption: plane, distance)"), how


def _unit(images: Sequence[np.ndarray]) -> np.ndarray:
    x = np.stack([np.asarray(i, np.float64).reshape(-1) for i in images])
    x -= x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def downstream_section(result: dict[str, Any] | None) -> str:
    """Protocol table (pooled + per-site accuracy) and per-class recall."""
    if result is None:
        return ('<p class="note">No downstream evaluation yet: run <code>python -m simulations.experiments.downstream '
                "evaluate RUN_DIR</code> (or this report with <code>--evaluate</code>).</p>")
    sites = list(result.get("n_test", {}))
    rows, recall_rows = [], []
    for arm in result["arms"]:
        if "pooled" not in arm:
            rows.append([arm["arm"], "skipped"] + [None] * (3 + len(sites)))
            continue
        p = arm["pooled"]
        rows.append([arm["arm"], p["accuracy"], p["macro_f1"], p["mae_days"], p["coverage"]]
                    + [arm["per_site"].get(s, {}).get("accuracy") for s in sites])
        recall_rows.append([arm["arm"], *p["per_class_recall"]])
    desc = "".join(f"<li><b>{html.escape(a['arm'])}</b>: {html.escape(a.get('description', ''))}"
                   + (f" <i>({html.escape('; '.join(a['notes']))})</i>" if a.get("notes") else "") + "</li>"
                   for a in result["arms"])
    return (_table(["arm", "accuracy", "macro-F1", "GA MAE (days)", "90% coverage"] + [f"acc {s}" for s in sites], rows)
            + f"<ul class='note'>{desc}</ul><p class='note'>Test: {html.escape(result.get('test_data', ''))}. "
            f"Train sizes {result.get('n_train')}, test sizes {result.get('n_test')}, synthetic "
            f"{result.get('n_synthetic')}. Models (every arm): {html.escape(json.dumps(result.get('downstream')))}. "
            f"Prior: {html.escape(str(result.get('prior_source')))}. Settings: "
            f"{html.escape(json.dumps(result.get('effective_settings', result.get('settings'))))}.</p><h3>Per-class recall (pooled test)</h3>"
            + _table(["arm", *PLANES], recall_rows, 2))


def image_metrics_section(m: dict[str, Any] | None) -> str:
    """Synthetic vs real train, next to real test vs real train (the two-real-samples floor)."""
    if m is None:
        return "<p class='note'>No image metrics yet (see the downstream evaluation).</p>"
    keys = ["n_fake", "fd", "kid", "kid_std", "precision", "recall", "diversity_fake", "diversity_real"]
    rows = [[name, *[m[key].get(k) for k in keys]] for name, key in
            (("synthetic release vs real train", "synthetic_vs_real_train"),
             ("real test vs real train (reference)", "real_test_vs_real_train")) if key in m]
    extra = [[name, m[key]] for name, key in (
        ("synthetic plane agreement (real-trained classifier)", "synthetic_plane_agreement"),
        ("real test plane accuracy (same classifier)", "real_test_plane_accuracy"),
        ("real test GA MAE, days (the feature regressor)", "real_test_ga_mae_days"),
        ("median NN distance synthetic -> train", "median_nn_distance_synthetic_to_train"),
        ("median NN distance real test -> train", "median_nn_distance_real_test_to_train")) if key in m]
    lp = m.get("lpips")
    lpips_html = (_table(["LPIPS", "value"], [[k, v] for k, v in lp.items()]) if isinstance(lp, dict) else
                  f"<p class='note'>LPIPS not computed: {html.escape(str(m.get('lpips_unavailable', '')))}</p>")
    return (_table(["set", "n", "FD", "KID", "KID std", "precision", "recall", "diversity (set)", "diversity (real)"],
                   rows) + _table(["measure", "value"], extra) + lpips_html
            + f"<p class='note'>Feature space: {html.escape(str(m.get('feature_space')))}. {html.escape(m.get('note', ''))}"
            "</p>")


def ledger_section(metrics: Sequence[dict[str, Any]]) -> tuple[str, bytes | None]:
    """Per-site, per-model privacy ledger after the last round, and a per-site epsilon bar chart."""
    if not metrics:
        return "<p class='note'>metrics.jsonl is empty.</p>", None
    ledger = metrics[-1].get("ledger", {})
    rows = [[site, model, e.get("epsilon"), e.get("budget_epsilon"), e.get("delta"), e.get("steps"),
             e.get("noise_multiplier"), e.get("sample_rate"), e.get("accountant"), e.get("exhausted")]
            for site, models in sorted(ledger.items()) for model, e in models.items() if model != "distributed"]
    # secure aggregation's distributed DP (site-level): the local figure (against collusion) and the central one
    rows += [[site, label, e.get(key), None, e.get("delta"), e.get("rounds"), e.get("noise_multiplier"), None,
              "distributed discrete Gaussian (zCDP)", None]
             for site, models in sorted(ledger.items()) if (e := models.get("distributed"))
             for label, key in (("distributed: central (vs the server)", "central_epsilon"),
                                ("distributed: local (vs server + other sites)", "local_epsilon"))]
    # example-level distributed DP of a model (privacy.distributed-classifier): its row above is the central figure;
    # the local one (the site's own noise share) beside it
    rows += [[site, f"{model}: local (vs server + other sites)", d.get("local_epsilon"), None, e.get("delta"),
              e.get("steps"), None, e.get("sample_rate"), "distributed discrete Gaussian (example-level)", None]
             for site, models in sorted(ledger.items()) for model, e in models.items()
             if model != "distributed" and isinstance(e, dict) and isinstance(d := e.get("distributed"), dict)]
    ledger = {s: {m: e for m, e in models.items() if m != "distributed"} for s, models in ledger.items()}
    head = ["site", "model", "epsilon", "budget", "delta", "steps", "noise mult.", "sample rate", "accountant",
            "exhausted"]
    if not any(ledger.values()):  # distributed DP only (no DP-SGD): the table says it all
        return _table(head, rows, 4), None
    if not rows:
        return "<p class='note'>No privacy ledger in metrics.jsonl (a run without DP).</p>", None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 2.8))
    sites = sorted(ledger)
    models = sorted({m for s in ledger.values() for m in s})
    for k, model in enumerate(models):
        ax.bar(np.arange(len(sites)) + k * 0.8 / len(models),
               [ledger[s].get(model, {}).get("epsilon", 0.0) for s in sites], 0.8 / len(models), label=model)
    ax.set_xticks(np.arange(len(sites)) + 0.4 - 0.4 / len(models), sites, fontsize=8)
    ax.set_ylabel("epsilon spent")
    ax.set_title(f"privacy spent per site after round {metrics[-1].get('round')}")
    ax.legend(fontsize=7)
    return _table(head, rows, 4), _fig_png(fig)


def per_site_bars(result: dict[str, Any] | None) -> bytes | None:
    """Accuracy of every arm on every site's test split."""
    if result is None:
        return None
    arms = [a for a in result["arms"] if "per_site" in a]
    sites = list(result.get("n_test", {}))
    if not arms or not sites:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(sites) + 3), 3))
    w = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        ax.bar(np.arange(len(sites)) + k * w, [arm["per_site"].get(s, {}).get("accuracy", np.nan) for s in sites], w,
               label=arm["arm"])
    ax.set_xticks(np.arange(len(sites)) + 0.4 - w / 2, sites, fontsize=8)
    ax.set_ylabel("plane accuracy")
    ax.set_title("per-site test accuracy by arm")
    ax.legend(fontsize=6, ncol=2)
    return _fig_png(fig)


def rounds_plot(metrics: Sequence[dict[str, Any]], result: dict[str, Any] | None) -> bytes | None:
    """Checkpoint utility (protocol test sets) or the federation's own evaluation, and release size, per round."""
    per_round = (result or {}).get("per_round") or [
        {"round": s["round"], "accuracy": s["plane_accuracy"], "mae_days": s["ga_mae_days"],
         "release_size": s["release_size"]} for s in map(round_summary, metrics)]
    if not per_round:
        return None
    plt = _plt()
    rounds = [r["round"] for r in per_round]
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.8))
    for ax, key, title in zip(axes, ("accuracy", "mae_days", "release_size"),
                              ("plane accuracy (federated model)", "GA MAE, days", "release size")):
        plot_series(ax, rounds, [r.get(key) for r in per_round])
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _fig_png(fig)


def curve_section(curve: dict[str, Any] | None) -> tuple[str, bytes | None]:
    """Utility against epsilon (one line per arm) from a privacy-utility curve file."""
    if curve is None:
        return ("<p class='note'>No privacy-utility curve found (run <code>python -m simulations.experiments."
                "downstream curve --out DIR</code>; this run's parent folder or evaluation/ is searched).</p>", None)
    from simulations.experiments.downstream import plot_curve

    rows = curve["rows"]
    table = _table(["epsilon", "arm", "accuracy", "macro-F1", "GA MAE (d)", "coverage", "FD", "KID"],
                   [[r["epsilon"], r["arm"], r["accuracy"], r["macro_f1"], r["mae_days"], r["coverage"], r["fd"],
                     r["kid"]] for r in rows])
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_curve(rows, Path(tmp) / "curve.png").read_bytes()
    return table, png


def al_arms_section(al_loop: dict[str, Any] | None, path: Path | None) -> str:
    """Acquisition vs random vs no synthetic data, per active-learning round, from an ``al_loop.json``."""
    if al_loop is None:
        return ("<p class='note'>No active-learning comparison found (run <code>python -m simulations.experiments."
                "al_loop --out DIR</code>; this run's parent folder is searched).</p>")
    from simulations.experiments.al_loop import plot_arms

    table = al_loop["table"]
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_arms(table, Path(tmp) / "arms.png").read_bytes()
    rows = [[arm, r["round"], r["plane_accuracy"], r["plane_macro_f1"], r["ga_mae_days"], r["release_size"]]
            for arm, arm_rows in table.items() for r in arm_rows]
    return (_img(png, f"the same federation with each selection arm, from {path}")
            + _table(["arm", "round", "plane acc", "macro-F1", "GA MAE (d)", "release"], rows)
            + "<p class='note'>Held-out metrics are the sites' evaluation of the global downstream models on their "
              "test splits, pooled by example count; arms differ only in the coordinator.</p>")


# -- the page -----------------------------------------------------------------------------------------------
def build_report(run_dir: Path, *, curve_file: Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (all images embedded) and return its path.

    Parameters
    ----------
    run_dir:
        A run folder (``config.json`` required).
    curve_file:
        A ``privacy_utility.json``; default ``run_dir/evaluation/privacy_utility.json`` or ``run_dir/../``.
    """
    from common.analysis.evaluation import load_run

    run_dir = Path(run_dir)
    inputs = load_run(run_dir)
    cfg = inputs.cfg
    real = [r for s in inputs.sites for r in s.train]
    layout = RunLayout(run_dir)
    ev_dir = layout.evaluation
    result, image_metrics = _read_json(ev_dir / "downstream.json"), _read_json(ev_dir / "image_metrics.json")
    curve_path = curve_file or next((p for p in (ev_dir / "privacy_utility.json",
                                                 run_dir.parent / "privacy_utility.json") if p.is_file()), None)
    curve = _read_json(curve_path) if curve_path else None
    status = _read_json(layout.status) or {}
    code = (_read_json(layout.config) or {}).get("code_version", "?")
    parts = [f"<h1>DiFUSAL run report: {html.escape(run_dir.name)}</h1>",
             _table(["preset", "seed", "data", "sites", "rounds done", "target epsilon", "delta", "release size",
                     "code version"],
                    [[cfg.preset, cfg.seed, f"{cfg.data.source} {cfg.data.image_size}px", len(inputs.sites),
                      status.get("last_round", len(inputs.metrics)), cfg.privacy.target_epsilon,
                      cfg.privacy.target_delta, len(inputs.synthetic), code]])]
    parts.append("<h2>Real vs synthetic, by plane and gestational age</h2>")
    grid = real_vs_synthetic_grid(real, inputs.synthetic)
    parts.append(_img(grid, "real (train split) vs released synthetic") if grid else "<p>No images.</p>")
    parts.append("<h2>Nearest real neighbours of synthetic images</h2>")
    pairs, how = nearest_pairs(real, inputs.synthetic, image_metrics)
    parts.append(_img(pairs, how) if pairs else "<p class='note'>No synthetic images released.</p>")
    parts.append("<h2>Downstream protocol: does the synthetic data help?</h2>" + downstream_section(result))
    bars = per_site_bars(result)
    if bars:
        parts.append(_img(bars, "per-site test accuracy of every arm"))
    parts.append("<h2>Image metrics</h2>" + image_metrics_section(image_metrics))
    parts.append("<h2>Utility per round</h2>")
    rp = rounds_plot(inputs.metrics, result)
    if rp:
        parts.append(_img(rp, "per round: federated checkpoint on the protocol's test sets (or the federation's own "
                              "evaluation when no protocol ran), and the release size"))
    if result and result.get("per_round"):
        parts.append(_table(["round", "release size", "synthetic used (sum over sites)", "accuracy", "macro-F1", "GA MAE (d)",
                             "coverage"], [[r["round"], r["release_size"], r["synthetic_examples_used"], r["accuracy"],
                                            r["macro_f1"], r["mae_days"], r["coverage"]] for r in result["per_round"]]))
    al_path = run_dir.parent / "al_loop.json"
    parts.append("<h2>Active learning: acquisition vs random vs none</h2>"
                 + al_arms_section(_read_json(al_path), al_path))
    parts.append("<h2>Privacy ledger per site</h2>")
    table, eps_png = ledger_section(inputs.metrics)
    parts.append(table + (_img(eps_png, "epsilon spent per site and model") if eps_png else ""))
    parts.append("<h2>Utility against epsilon</h2>")
    curve_table, curve_png = curve_section(curve)
    parts.append((_img(curve_png, f"privacy-utility curve from {curve_path}") if curve_png else "") + curve_table)
    parts.append("<h2>Run figures</h2>")
    figs = layout.figures
    samples = sorted(figs.glob("samples-round-*.png"))[-1:] + sorted(figs.glob("release-round-*.png"))[-3:]
    for path in [figs / "rounds.png", *samples]:
        if path.is_file():
            parts.append(_img(path.read_bytes(), f"figures/{path.name}"))
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>DiFUSAL report {html.escape(run_dir.name)}"
            f"</title><style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    out = layout.report
    return write_text_atomic(out, page, mode=0o644)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m simulations.report RUN_DIR [--evaluate] [--curve FILE]``."""
    os.environ.setdefault("MPLCONFIGDIR", str(PROJECT_ROOT / ".cache" / "mpl"))
    os.environ.setdefault("TORCH_HOME", str(PROJECT_ROOT / ".cache" / "torch"))
    p = argparse.ArgumentParser(prog="python -m simulations.report", description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--evaluate", action="store_true", help="run the downstream evaluation first")
    p.add_argument("--steps", type=int, default=300, help="training steps per model for --evaluate")
    p.add_argument("--curve", type=Path, default=None, help="a privacy_utility.json to plot")
    args = p.parse_args(argv)
    if args.evaluate:
        import torch

        from common.analysis.evaluation import EvalSettings
        from simulations.experiments.downstream import evaluate_run

        torch.set_num_threads(1)  # a small shared CPU: more threads oversubscribe
        evaluate_run(args.run_dir, EvalSettings(steps=args.steps, prior_steps=args.steps))
    print(f"[report] {build_report(args.run_dir, curve_file=args.curve)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
