"""The two figures of a run: the pass@k curve and maj@k bars (paper Fig. 3 / Fig. 8 style)."""
from __future__ import annotations

from pathlib import Path


def draw_plots(metrics: dict, out_dir: Path) -> list[Path]:
    """Writes pass_at_k.png and maj_at_k.png; returns their paths, or [] when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never needs a display
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    title = f"{metrics.get('dataset', '')} (n={metrics['n']})"
    paths = []

    ks = [int(k) for k in metrics["pass@k"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, [100 * metrics["pass@k"][str(k)] for k in ks], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    paths.append(out_dir / "pass_at_k.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    ks = [int(k) for k in metrics["maj@k"]]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar([str(k) for k in ks], [100 * metrics["maj@k"][str(k)] for k in ks], color="0.6")
    ax.set_xlabel("k")
    ax.set_ylabel("maj@k (%)")
    ax.set_title(title)
    fig.tight_layout()
    paths.append(out_dir / "maj_at_k.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
