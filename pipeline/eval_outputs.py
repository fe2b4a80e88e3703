"""What the evaluate stage writes besides metrics.json: per-query ranks, plot data (CSV for
`dvc plots`, PNG when matplotlib is importable) and a compact Markdown report."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.io import atomic_path, write_bytes, write_parquet
from pipeline.log import get_logger
from pipeline.metrics.retrieval import recall_curve

log = get_logger(__name__)

DIRECTIONS = ("t2v", "v2t")
VARIANTS = ("stage1", "rerank")

# ranks[direction][variant] = (query ids [Q], ranks [Q] int64)
RankTable = Mapping[str, Mapping[str, tuple[list[str], np.ndarray]]]


def write_ranks(path: Path, tables: Mapping[str, RankTable]) -> None:
    """ranks.parquet, one row per (dataset, query, direction, variant): id, direction, variant,
    rank, dataset ("test" for the pipeline's own test split)."""
    frames = [
        pd.DataFrame({"id": ids, "direction": d, "variant": v, "rank": r.astype(np.int64),
                      "dataset": name})
        for name, table in tables.items()
        for d, per in table.items()
        for v, (ids, r) in per.items()
    ]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        {"id": [], "direction": [], "variant": [], "rank": [], "dataset": []}
    )
    write_parquet(path, pa.Table.from_pandas(df, preserve_index=False))


def curve_ks(n_gallery: int) -> np.ndarray:
    """K grid of the recall curve: every K up to 50, then 50 log-spaced values up to n_gallery."""
    dense = np.arange(1, min(n_gallery, 50) + 1)
    tail = np.geomspace(50, max(n_gallery, 50), 50).round().astype(np.int64)
    return np.unique(np.concatenate([dense, tail[tail <= n_gallery]]))


def rank_bins(n_gallery: int) -> np.ndarray:
    """Left edges of log2 rank bins: 1, 2, 3, 5, 9, 17, ... (bin i = [e_i, e_{i+1}))."""
    edges = [1, 2]
    while edges[-1] <= n_gallery:
        edges.append(2 * edges[-1] - 1)
    return np.array(edges, dtype=np.int64)


def write_plots(folder: Path, table: RankTable, n_gallery: Mapping[str, int]) -> list[Path]:
    """plots/recall_curve_<dir>.csv, plots/rank_hist_<dir>.csv (+ .png); returns written paths."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for d, per in table.items():
        n = int(n_gallery[d])
        ks = curve_ks(n)
        curve = pd.DataFrame({"k": ks, **{v: recall_curve(r, ks) for v, (_, r) in per.items()}})
        edges = rank_bins(n)
        pairs = zip(edges[:-1], edges[1:], strict=True)
        labels = [f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in pairs]
        hist = pd.DataFrame({"bin": labels, "bin_start": edges[:-1]})
        for v, (_, r) in per.items():
            hist[v] = np.histogram(r, bins=edges)[0]
        for name, df in ((f"recall_curve_{d}", curve), (f"rank_hist_{d}", hist)):
            path = folder / f"{name}.csv"
            with atomic_path(path) as tmp:
                df.to_csv(tmp, index=False)
            written.append(path)
        written += _pngs(folder, d, curve, hist)
    return written


def _pngs(folder: Path, direction: str, curve: pd.DataFrame, hist: pd.DataFrame) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # optional: the CSVs are the record
        return []
    import io

    out = []
    variants = [c for c in curve.columns if c != "k"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for v in variants:
        ax.plot(curve["k"], curve[v], label=v)
    ax.set(xscale="log", xlabel="K", ylabel="R@K (%)", title=f"{direction}: recall@K",
           ylim=(0, 100))
    ax.legend()
    ax.grid(alpha=0.3)
    out.append(_save_fig(fig, folder / f"recall_curve_{direction}.png", io))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(hist))
    for i, v in enumerate(variants):
        ax.bar(x + i * width, hist[v], width=width, label=v)
    ax.set_xticks(x + 0.4 - width / 2, hist["bin"], rotation=45, fontsize=7)
    ax.set(xlabel="rank", ylabel="queries", title=f"{direction}: rank histogram")
    ax.legend()
    fig.tight_layout()
    out.append(_save_fig(fig, folder / f"rank_hist_{direction}.png", io))
    return out


def _save_fig(fig: Any, path: Path, io: Any) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return path


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def metrics_rows(metrics: Mapping[str, Any], ks: tuple[int, ...]) -> list[list[str]]:
    """Rows direction x variant: R@K..., MdR, MnR, R@1 95% CI (also the CLI's table)."""
    rows = []
    for d in DIRECTIONS:
        for v in VARIANTS:
            m = metrics.get(d, {}).get(v)
            if not m:
                continue
            ci = f"[{_fmt(m['R1_ci_low'])}, {_fmt(m['R1_ci_high'])}]" if "R1_ci_low" in m else ""
            rows.append([d, v, *(_fmt(m[f"R{k}"]) for k in ks), _fmt(m["MdR"]), _fmt(m["MnR"]), ci])
    return rows


def metrics_header(ks: tuple[int, ...]) -> list[str]:
    return ["dir", "variant", *(f"R@{k}" for k in ks), "MdR", "MnR", "R@1 95% CI"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def write_report(
    path: Path, metrics: Mapping[str, Any], ks: tuple[int, ...], plots: list[Path]
) -> None:
    """report.md: counts, the metrics table, OOD and cross-dataset tables, links to the plots."""
    c = metrics["counts"]
    lines = [
        "# Evaluation report",
        "",
        f"Test split: {c['n_gallery']['t2v']} videos ({c['n_missing']} without frames, counted as "
        f"misses), {c['n_queries']['t2v']} caption queries. Tie rule: rank = 1 + #strictly higher.",
        "",
        *_md_table(metrics_header(ks), metrics_rows(metrics, ks)),
    ]
    if metrics.get("ood"):
        lines += ["", "## Out-of-distribution queries (higher score = more OOD)", ""]
        rows = [
            [kind, score, _fmt(m["AUROC"]), _fmt(m["FPR95"]), str(int(m["n_ood"]))]
            for kind, per in metrics["ood"].items()
            for score, m in per.items()
        ]
        lines += _md_table(["kind", "score", "AUROC", "FPR@95TPR", "n_ood"], rows)
    if metrics.get("other"):
        o = metrics["other"]
        lines += ["", f"## Cross-dataset: {o['dataset']}", ""]
        lines += _md_table(metrics_header(ks), metrics_rows(o, ks))
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"- [{p.name}](plots/{p.name})" for p in plots]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
