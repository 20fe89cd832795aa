#!/usr/bin/env python
"""Accuracy of BP vs AugLocal vs DGL / PredSim / InfoPro under one recipe, with learning curves.

Default: ResNet-32 (CIFAR-style, 28x28 resized to 32) on Fashion-MNIST, a stratified subset of
the training set, the full 10k test set, the same epochs/recipe/seed for every method. Every run
is a normal ``tools/train.py`` run (its folder keeps metrics.jsonl, config.yaml, checkpoints),
so any run here can be resumed or re-plotted with ``tools/plot.py``.

    python benchmarks/accuracy.py                                  # Fashion-MNIST, seeds 0 and 1, ~1 h per seed on 2 CPU cores
    python benchmarks/accuracy.py --seeds 0                        # one seed
    python benchmarks/accuracy.py --train-subset 0 --epochs 20     # full training set
    # the paper's CIFAR-10 recipe (docs/spec.md §5; a GPU and the data are needed):
    python benchmarks/accuracy.py --dataset cifar10 --data-dir DATA --model resnet110_cifar \
        --train-subset 0 --epochs 400 --batch-size 1024 --lr 0.8 --warmup-epochs 10 --seeds 0 \
        --methods bp auglocal:2 auglocal:3 auglocal:4 auglocal:5 auglocal:6 dgl predsim infopro

Fashion-MNIST is found in DATA_DIR or where Debian's ``dataset-fashion-mnist`` package puts it
(``apt-get install dataset-fashion-mnist``; elsewhere download the four IDX files from
github.com/zalandoresearch/fashion-mnist into a folder and pass ``--data-dir``).
Writes benchmarks/results/accuracy_<dataset>.{md,json,png}. Where the table departs from the paper,
benchmarks/head_accuracy.py (per-layer head accuracy of these runs) and benchmarks/head_isolation.py
(one stage alone) say why; docs/accuracy.md has the investigation.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_METHODS = ["bp", "auglocal:2", "auglocal:4", "auglocal:6", "dgl", "predsim", "infopro"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--model", default="resnet32_cifar")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, help="method, auglocal:D, and @K for K local modules (e.g. man@4, auglocal:2@4); "
                        "no @K is one module per block (K = N)")
    p.add_argument("--tau", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--train-subset", type=int, default=5000,
                   help="stratified training subset size (0 = all); only for MNIST-format data")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--jobs", type=int, default=2,
                   help="runs in parallel, one intra-op thread each (on a small CPU this beats one run "
                        "with several threads, which also slows down badly when the machine is shared)")
    p.add_argument("--runs-dir", default="runs/accuracy")
    p.add_argument("--results-dir", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--keep-saved", action="store_true",
                   help="keep the saved JSON's runs that this call does not run again (adding rows to a table "
                        "measured earlier under the same recipe)")
    p.add_argument("--report-only", action="store_true",
                   help="re-render the table and plot from the saved JSON, without training")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more tools/train.py flags")
    return p.parse_args()


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX (MNIST format) writer, the inverse of timm_local.data.read_idx for uint8 arrays."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_subset(dataset: str, data_dir: str | None, size: int, seed: int, out: Path) -> str:
    """A stratified subset of an MNIST-format training set (test set unchanged), as IDX files."""
    from timm_local.data import IDX_STEMS as stems
    from timm_local.data import find_idx, read_idx, search_roots

    for root in search_roots(dataset, data_dir):
        paths = [find_idx(root, s) for s in stems]
        if all(paths):
            break
    else:
        raise SystemExit(f"{dataset} IDX files not found (looked in {[str(r) for r in search_roots(dataset, data_dir)]}); "
                         "apt-get install dataset-fashion-mnist, or pass --data-dir")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = size // len(classes)
    keep = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in classes]))
    out.mkdir(parents=True, exist_ok=True)
    _write_idx(out / "train-images-idx3-ubyte.gz", images[keep])
    _write_idx(out / "train-labels-idx1-ubyte.gz", labels[keep])
    for src, stem in zip(paths[2:], stems[2:]):
        _write_idx(out / f"{stem}.gz", read_idx(src))
    return str(out)


def parse_spec(spec: str) -> tuple[str, int | None, int | None]:
    """``method[:depth][@K]`` -> (method, aux depth, local modules); None where the spec leaves it out."""
    rest, _, modules = spec.partition("@")
    method, _, depth = rest.partition(":")
    return method, int(depth) if depth else None, int(modules) if modules else None


def run_name(model: str, spec: str, seed: int) -> str:
    method, depth, modules = parse_spec(spec)
    return f"{model}-{method}{f'-d{depth}' if depth else ''}{f'-k{modules}' if modules else ''}-s{seed}"


def run_one(args: argparse.Namespace, spec: str, seed: int, data_dir: str | None) -> dict[str, Any]:
    method, depth, modules = parse_spec(spec)
    name = run_name(args.model, spec, seed)
    out = Path(args.runs_dir) / args.dataset / name
    cmd = [sys.executable, str(ROOT / "tools" / "train.py"), "--dataset", args.dataset, "--model", args.model,
           "--method", method, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--lr", str(args.lr), "--warmup-epochs", str(args.warmup_epochs), "--image-size", str(args.image_size),
           "--seed", str(seed), "--output-dir", str(out), "--resume", "auto", "--no-eval-heads",
           "--workers", "1", "--trackers", "none", "--keep-checkpoints", "1"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if depth:
        cmd += ["--aux-depth", str(depth), "--tau", str(args.tau)]
    if modules:
        cmd += ["--local-modules", str(modules)]
    cmd += args.extra
    print("$", " ".join(cmd), flush=True)
    env = dict(os.environ)
    if args.jobs > 1:
        env["OMP_NUM_THREADS"] = "1"
    start = time.perf_counter()
    with open(out.parent / f"{name}.log", "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("kind") == "eval"]
    train = [r for r in rows if r.get("kind") == "train"]
    summary = [r for r in rows if r.get("kind") == "summary"][-1]
    loss_per_epoch: dict[int, list[float]] = {}
    for r in train:
        loss_per_epoch.setdefault(int(r["epoch"]), []).append(float(r["loss"]))
    return {
        "method": method, "aux_depth": depth, "local_modules": modules, "seed": seed, "run_dir": str(out),
        "final_top1": evals[-1]["top1"], "best_top1": max(r["top1"] for r in evals),
        "train_time_s": summary["train_time_s"], "wall_time_s": wall,
        "curve_epoch": [r["epoch"] for r in evals], "curve_top1": [r["top1"] for r in evals],
        "curve_train_loss": [float(np.mean(loss_per_epoch[e])) for e in sorted(loss_per_epoch)],
    }


def gmacs_of(model: str, method: str, depth: int | None, tau: float, image_size: int,
             modules: int | None = None) -> float:
    import timm_local
    from timm_local.cost import macs_per_sample

    lm = timm_local.create_local_model(model, method, aux_depth=depth, tau=tau if depth else None, num_classes=10,
                                       method_kwargs={"local_modules": modules} if modules else None)
    return macs_per_sample(lm, (3, image_size, image_size))["gmacs"]


def label(r: dict[str, Any]) -> str:
    """Method, depth, local modules, and any head setting a run records that is not the paper's (e.g.
    head_norm=always). No K in the label means one module per block (K = N), as in the earlier rows."""
    name = f"{r['method']} d={r['aux_depth']}" if r["aux_depth"] else r["method"]
    if r.get("local_modules"):
        name += f" K={r['local_modules']}"
    extras = {k: v for k, v in r.get("method_config", {}).items() if k in ("head_norm", "head_hidden")}
    return name + "".join(f" {k}={v}" for k, v in extras.items())


def group_by_label(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Runs of one method/depth/setting across seeds, in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault(label(r), []).append(r)
    return groups


def group_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Runs of one method/depth across seeds, with the statistics the table and checks use."""
    stats = {}
    for name, rs in group_by_label(runs).items():
        finals = [r["final_top1"] for r in rs]
        stats[name] = {
            "runs": rs, "seeds": [r["seed"] for r in rs], "finals": finals,
            "mean": float(np.mean(finals)), "std": float(np.std(finals)),
            "best_mean": float(np.mean([r["best_top1"] for r in rs])),
            "train_time_s": float(np.mean([r["train_time_s"] for r in rs])), "gmacs": rs[0].get("gmacs"),
        }
    return stats


def ordering_checks(groups: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims (docs/spec.md §4), judged on the seed means and within each seed.

    Returned rather than asserted: at a small budget a claim may fail, and the report must say so.
    """
    means = {name: g["mean"] for name, g in groups.items()}
    by_seed: dict[int, dict[str, float]] = {}
    for name, g in groups.items():
        for r in g["runs"]:
            by_seed.setdefault(r["seed"], {})[name] = r["final_top1"]
    checks: list[dict[str, Any]] = []

    def add(claim: str, needs: tuple[str, ...], holds: Callable[[dict[str, float]], bool]) -> None:
        if not all(n in groups for n in needs):
            return
        seeds = [finals for _, finals in sorted(by_seed.items()) if all(n in finals for n in needs)]
        checks.append({"claim": claim, "on_means": bool(holds(means)),
                       "seeds_holding": sum(bool(holds(f)) for f in seeds), "seeds": len(seeds)})

    def better(a: str, b: str, why: str = "") -> None:
        add(f"{a} > {b}{why}", (a, b), lambda f: f[a] > f[b])

    aug = [name for _, name in sorted((g["runs"][0]["aux_depth"], name) for name, g in groups.items()
                                      if g["runs"][0]["method"] == "auglocal"
                                      and not g["runs"][0].get("local_modules"))]  # the paper's claims are at K = N
    if aug:
        deep = aug[-1]
        add(f"goal: BP - {deep} <= (BP - DGL) / 3", ("bp", deep, "dgl"),
            lambda f: f["bp"] - f[deep] <= (f["bp"] - f["dgl"]) / 3)
        for name in aug:
            better("bp", name)
        for low, high in zip(aug, aug[1:]):
            better(high, low, " (deeper is better)")
        better(aug[0], "infopro", " (every AugLocal above every baseline)")
        better(aug[0], "dgl")
    better("infopro", "dgl")
    for name, g in groups.items():  # MAN's and HPFF's papers: each beats InfoPro with the same local modules
        first = g["runs"][0]
        if first["method"] in ("man", "man_pp", "hpff"):
            k = first.get("local_modules")
            better(name, f"infopro K={k}" if k else "infopro", " (same K)")
    better("dgl", "predsim")
    return checks


def render_markdown(meta: dict[str, Any], groups: dict[str, dict[str, Any]], checks: list[dict[str, Any]],
                    jobs: int) -> str:
    seeds = sorted({s for g in groups.values() for s in g["seeds"]})
    lines = [f"# Accuracy on {meta['dataset']}: {meta['model']}, {meta['epochs']} epochs, "
             f"train subset {meta['train_subset']}, full test set", "",
             "Same recipe for every method: SGD Nesterov 0.9, wd 1e-4, batch "
             f"{meta['batch_size']}, lr {meta['lr']}, cosine with {meta['warmup_epochs']} warm-up epoch(s), "
             f"seeds {seeds} (the seed sets initialisation and data order; the training subset is the same for "
             f"all). Machine: {meta['machine']}. Produced by `benchmarks/accuracy.py`. Train time is the wall time "
             f"of each run's training loop with {jobs} runs in parallel, one thread each, on a shared machine: "
             "a rough guide only (benchmarks/results/cost_table_* compares speed properly)."
             + (f" Every run also had `{' '.join(meta['extra_flags'])}`." if meta.get("extra_flags") else ""), "",
             "| method | final top-1 % (mean ± std over seeds) | per seed | best top-1 % | GMACs/sample | train time s |",
             "|---|---|---|---|---|---|"]
    for name, g in groups.items():
        spread = f" ± {g['std']:.2f}" if len(g["finals"]) > 1 else ""
        per_seed = " / ".join(f"{f:.2f}" for f in g["finals"])
        gmacs = f"{g['gmacs']:.4f}" if g["gmacs"] is not None else "-"
        lines.append(f"| {name} | {g['mean']:.2f}{spread} | {per_seed} | {g['best_mean']:.2f} | {gmacs} | "
                     f"{g['train_time_s']:.0f} |")
    if checks:
        lines += ["", "## The paper's ordering at this budget", "",
                  "| claim | holds on the means | seeds where it holds |", "|---|---|---|"]
        lines += [f"| {c['claim']} | {'yes' if c['on_means'] else 'no'} | {c['seeds_holding']} of {c['seeds']} |"
                  for c in checks]
    return "\n".join(lines) + "\n"


def plot_curves(groups: dict[str, dict[str, Any]], title: str, path: Path) -> None:
    """Mean learning curves over seeds, shaded between the lowest and highest seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.get_cmap("tab20").colors  # more groups than tab10 has colours; K < N runs dashed
    for i, (name, g) in enumerate(groups.items()):
        acc = np.array([r["curve_top1"] for r in g["runs"]])
        loss = np.array([r["curve_train_loss"] for r in g["runs"]])
        epochs, loss_epochs = g["runs"][0]["curve_epoch"], range(1, loss.shape[1] + 1)
        style = dict(marker="o", label=name, color=colours[(2 * i) % 20 + (2 * i) // 20],
                     linestyle="--" if g["runs"][0].get("local_modules") else "-")
        line, = ax_acc.plot(epochs, acc.mean(0), **style)
        ax_loss.plot(loss_epochs, loss.mean(0), **style)
        if len(acc) > 1:
            ax_acc.fill_between(epochs, acc.min(0), acc.max(0), alpha=0.15, color=line.get_color())
            ax_loss.fill_between(loss_epochs, loss.min(0), loss.max(0), alpha=0.15, color=line.get_color())
    ax_acc.set(xlabel="epoch", ylabel="test top-1 %", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="network-output training loss", yscale="log", title="output loss (log)")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recipe_of(args: argparse.Namespace) -> dict[str, Any]:
    """What every row of one table shares: the training recipe (seeds and machine aside)."""
    return {"dataset": args.dataset, "model": args.model, "epochs": args.epochs,
            "train_subset": args.train_subset or "all", "batch_size": args.batch_size, "lr": args.lr,
            "warmup_epochs": args.warmup_epochs, "tau": args.tau, "image_size": args.image_size,
            "extra_flags": args.extra}


def write_results(args: argparse.Namespace, runs: list[dict[str, Any]]) -> None:
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / f"accuracy_{args.dataset}"
    machine = f"{platform.processor() or platform.machine()}, {platform.system()}, python {platform.python_version()}"
    meta = {**recipe_of(args), "seeds": args.seeds, "machine": machine}
    groups = group_runs(runs)
    checks = ordering_checks(groups)
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "runs": runs, "checks": checks}, indent=2))
    text = render_markdown(meta, groups, checks, args.jobs)
    stem.with_suffix(".md").write_text(text)
    print(text)
    seeds = sorted({r["seed"] for r in runs})
    plot_curves(groups, f"{args.model} on {args.dataset} (mean of seeds {seeds}, band: min-max)",
                stem.with_suffix(".png"))
    print(f"wrote {stem}.md/.json/.png")


def saved_runs_not_rerun(args: argparse.Namespace, jobs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """The saved table's runs, less those this call runs again (matched by method, depth, K and seed).

    One table is one recipe: its rows are kept only when this call's recipe is the saved one (a table
    written before ``extra_flags`` was recorded had none).
    """
    path = Path(args.results_dir) / f"accuracy_{args.dataset}.json"
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    saved_recipe = {"extra_flags": [], **saved.get("meta", {})}
    changed = {key: (saved_recipe[key], value) for key, value in recipe_of(args).items()
               if key in saved_recipe and saved_recipe[key] != value}
    if changed:
        raise SystemExit(f"--keep-saved: {path} was measured under another recipe "
                         f"({', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in changed.items())}); "
                         "give the same flags, or another --results-dir")
    rerun = {(*parse_spec(spec), seed) for spec, seed in jobs}
    return [r for r in saved["runs"] if (r["method"], r["aux_depth"], r.get("local_modules"), r["seed"]) not in rerun]


def main() -> None:
    args = parse_args()
    if args.report_only:
        saved = json.loads((Path(args.results_dir) / f"accuracy_{args.dataset}.json").read_text())
        write_results(args, saved["runs"])
        return
    data_dir = args.data_dir
    if args.train_subset:
        data_dir = make_subset(args.dataset, args.data_dir, args.train_subset, 0,
                               Path(args.runs_dir) / args.dataset / f"subset-{args.train_subset}")
    jobs = [(spec, seed) for seed in args.seeds for spec in args.methods]
    kept = saved_runs_not_rerun(args, jobs) if args.keep_saved else []
    (Path(args.runs_dir) / args.dataset).mkdir(parents=True, exist_ok=True)
    runs: dict[int, dict[str, Any]] = {}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_one, args, spec, seed, data_dir): i for i, (spec, seed) in enumerate(jobs)}
        for future in as_completed(futures):
            r = future.result()
            r["gmacs"] = gmacs_of(args.model, r["method"], r["aux_depth"], args.tau, args.image_size,
                                  r["local_modules"])
            runs[futures[future]] = r
            # partial results survive an interruption; rerunning resumes unfinished runs
            write_results(args, kept + [runs[i] for i in sorted(runs)])


if __name__ == "__main__":
    main()
