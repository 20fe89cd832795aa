"""Learning curves of one or more runs, read from their ``metrics.jsonl`` (used by ``tools/plot.py``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

from .metrics import read_metrics

__all__ = ["plot_runs", "run_label"]


def run_label(run_dir: Union[str, Path]) -> str:
    """``model method d=.. tau=..`` from the run's config.yaml, or the folder name."""
    import yaml

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return run_dir.name
    cfg = yaml.safe_load(cfg_path.read_text())
    parts = [str(cfg.get("model", "")), str(cfg.get("method", ""))]
    for key, short in (("aux_depth", "d"), ("tau", "tau")):
        value = (cfg.get("method_config") or {}).get(key)
        if value is not None:
            parts.append(f"{short}={value}")
    return " ".join(p for p in parts if p) or run_dir.name


def plot_runs(run_dirs: Sequence[Union[str, Path]], out: Union[str, Path], labels: Optional[Sequence[str]] = None,
              title: Optional[str] = None) -> Path:
    """One figure, four panels: training loss and learning rate per step, test top-1 per epoch, and the
    last evaluation's per-auxiliary-head test accuracy against block index (the local-learning
    diagnostic: how linearly separable each block's features already are).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels is None:
        labels = [run_label(d) for d in run_dirs]
        if len(set(labels)) < len(labels):  # same configuration twice: tell them apart by folder
            labels = [f"{label} ({Path(d).name})" for label, d in zip(labels, run_dirs)]
    labels = list(labels)
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(run_dirs)} runs but {len(labels)} labels")
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (ax_loss, ax_acc), (ax_lr, ax_heads) = axes
    for run_dir, label in zip(run_dirs, labels):
        rows = read_metrics(run_dir)
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], marker=".", label=label)
            ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], marker=".", label=label)
        if evals:
            ax_acc.plot([r["epoch"] for r in evals], [r["top1"] for r in evals], marker="o", label=label)
            heads = evals[-1].get("head_top1")
            if heads:
                ax_heads.plot(range(len(heads)), heads, marker=".",
                              label=f"{label} (network {evals[-1]['top1']:.1f})")
    ax_loss.set(xlabel="step", ylabel="training loss (network output)", title="training loss")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy (backbone alone)")
    ax_lr.set(xlabel="step", ylabel="learning rate", title="learning rate")
    ax_heads.set(xlabel="local block with an auxiliary head", ylabel="test top-1 (%)",
                 title="auxiliary heads (last evaluation)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
