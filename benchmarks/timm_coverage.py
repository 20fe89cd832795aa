"""Which of timm's model modules train with local learning: one small model per ``timm.list_modules()``.

For every model module of timm (``timm.list_modules()``, our own ``*_cifar`` modules left out):

1. **the model**: the module's registered model with the fewest parameters, counted on the meta
   device (no memory, no weights; ties by name), built without pretrained weights, 10 classes;
2. **the input size**: the smallest of 32, 64, 96, ... (multiples of 32 up to the model's
   ``pretrained_cfg`` size, then that size) at which ``forward_features`` + ``forward_head`` run on
   one image -- fixed-size models (most ViTs) only run at their own size;
3. ``create_local_model(model, method="auglocal", aux_depth=3)`` and one ``local_step`` (+ SGD step)
   on 2 images, then ``export_backbone`` and ``timm.create_model("local-dir:...")``: the reloaded
   model must give identical logits; AugLocal's forward MACs over BP's (``cost.macs_per_sample``);
4. the same step with ``bp``, ``checkpoint`` and ``dgl``, each from the same initialisation.

Each model runs in its own process with a time limit, so one slow or crashing model cannot stop
the sweep. A failure is recorded with its exception, and with where it was raised: ``timm_local``
(a deliberate error saying why) or elsewhere (a crash inside timm/torch, which the library should
turn into a clear error).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/timm_coverage.py       # ~1 h on 2 CPU cores
    python benchmarks/timm_coverage.py --modules convnext vision_transformer  # a subset
Writes benchmarks/results/timm_coverage.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from results_io import write_results

RESULTS = Path(__file__).resolve().parent / "results"
NUM_CLASSES = 10
METHODS = ("auglocal", "bp", "checkpoint", "dgl")


def timm_modules() -> list[str]:
    """timm's own model modules (ours register ``*_cifar`` models into timm's registry too)."""
    import timm

    import timm_local  # noqa: F401

    return [m for m in timm.list_modules() if not any(n.endswith("_cifar") for n in timm.list_models(module=m))]


def smallest_model(module: str) -> tuple[str, int]:
    """(name, parameters) of the module's model with the fewest parameters (meta device, no memory)."""
    import timm
    import torch

    best: tuple[int, str] | None = None
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                count = sum(p.numel() for p in timm.create_model(name).parameters())
        except Exception:  # a model that cannot even be built is not the one to pick
            continue
        if best is None or (count, name) < best:
            best = (count, name)
    if best is None:
        raise RuntimeError(f"no model of module {module!r} can be built")
    return best[1], best[0]


def smallest_size(model: Any) -> int:
    """Smallest multiple of 32 (up to the model's own size, then that size) the model runs at."""
    import torch

    own = int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    model.eval()
    for size in [*range(32, own, 32), own]:
        try:
            with torch.no_grad():
                model.forward_head(model.forward_features(torch.randn(1, 3, size, size)))
            return size
        except Exception:  # too small for this architecture: try the next size
            continue
    return own


def _error(e: BaseException) -> dict[str, str]:
    """The exception, and the package whose code raised it (timm_local: a deliberate, explained error)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = Path(frames[-1].filename).as_posix() if frames else ""
    origin = next((p for p in ("timm_local", "timm", "torch") if f"/{p}/" in where), where.rsplit("/", 1)[-1])
    message = " ".join(str(e).split())
    return {"error": f"{type(e).__name__}: {message[:600]}", "raised_in": origin}


def run_one(name: str) -> dict[str, Any]:
    """Steps 2-4 for one model (run in a child process)."""
    import copy

    import timm
    import torch

    import timm_local
    from timm_local.cost import macs_per_sample

    torch.manual_seed(0)
    torch.set_num_threads(1)
    row: dict[str, Any] = {"model": name}
    start = time.perf_counter()
    try:
        initial = timm.create_model(name, num_classes=NUM_CLASSES)
        row["class"] = type(initial).__name__
        size = smallest_size(initial)
        row["input_size"] = size
        input_size = (3, size, size)
        x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(1))
        y = torch.tensor([1, 2])
        for method in METHODS:
            kwargs = {"aux_depth": 3} if method == "auglocal" else {}
            model = copy.deepcopy(initial)  # every method starts from the same initialisation
            try:
                lm = timm_local.create_local_model(model, method, input_size=input_size, **kwargs)
                row["family"], row["local_blocks"] = lm.partition.adapter.name, len(lm.partition)
                optimizer = torch.optim.SGD(lm.parameters(), lr=0.01)
                lm.train()
                out = lm.local_step(x, y)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not all(torch.isfinite(loss) for loss in out.losses):
                    raise FloatingPointError("non-finite local loss")
                row[method] = "ok"
                if method == "auglocal":
                    row["heads"] = len(lm.heads)
                    row["auglocal_gmacs"] = macs_per_sample(lm, input_size)["gmacs"]
                    row["export"] = _export_round_trip(lm, x)
                elif method == "bp":
                    row["bp_gmacs"] = macs_per_sample(lm, input_size)["gmacs"]
            except Exception as e:  # recorded, the sweep goes on
                row[method] = "failed"
                row[f"{method}_error"] = _error(e)
    except Exception as e:
        row["setup_error"] = _error(e)
    if row.get("auglocal_gmacs") and row.get("bp_gmacs"):
        row["macs_x_bp"] = row["auglocal_gmacs"] / row["bp_gmacs"]
    row["status"] = "ok" if row.get("auglocal") == "ok" and row.get("export") == "identical" else "failed"
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _export_round_trip(lm: Any, x: Any) -> str:
    """Export the trained backbone, reload it with timm's local-dir loader, compare logits bit for bit."""
    import timm
    import torch

    from timm_local import export_backbone

    lm.eval()
    with torch.no_grad():
        expected = lm(x)
    with tempfile.TemporaryDirectory() as folder:
        export_backbone(lm.backbone, folder)
        reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
        with torch.no_grad():
            # bit for bit; an untrained model's eval-mode logits may overflow, and NaN must match NaN
            same = torch.allclose(reloaded(x), expected, rtol=0, atol=0, equal_nan=True)
    lm.train()
    return "identical" if same else "different logits"


def run_isolated(name: str, timeout: int) -> dict[str, Any]:
    """:func:`run_one` in a child process; a timeout or crash is a recorded failure."""
    try:
        done = subprocess.run([sys.executable, __file__, "--run-one", name], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "status": "failed",
                "setup_error": {"error": f"timeout: no result within {timeout} s on this machine", "raised_in": "-"}}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        tail = " ".join(done.stderr.split())[-400:]
        return {"model": name, "status": "failed",
                "setup_error": {"error": f"process exited {done.returncode}: {tail}", "raised_in": "-"}}
    return json.loads(lines[-1])


def first_error(row: dict[str, Any]) -> str:
    for key in ("setup_error", "auglocal_error"):
        if key in row:
            return f"{row[key]['error']} [raised in {row[key]['raised_in']}]"
    if row.get("export") not in (None, "identical"):
        return f"export round trip: {row['export']}"
    return ""


def to_markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    ok = sum(r["status"] == "ok" for r in rows)
    counts = ", ".join(f"{m} {sum(r.get(m) == 'ok' for r in rows)}" for m in METHODS)
    lines = [
        "# timm coverage: one small model per timm model module",
        "",
        f"**{ok} of {len(rows)} timm model modules ({100 * ok / len(rows):.0f} %) train one AugLocal step "
        "(d = 3) and round-trip through export** with identical logits. Produced by "
        "`python benchmarks/timm_coverage.py` on this 2-core CPU machine "
        f"(timm {meta['timm']}, torch {meta['torch']}); how models and sizes are chosen: the script's docstring. "
        f"Modules where each method ran a step: {counts} (DGL refuses token outputs by design).",
        "",
    ]
    if meta.get("re_measured"):
        lines += [f"Re-measured with `--update` after a fix of the sweep itself (each method now starts from "
                  f"the same initialisation): {', '.join(meta['re_measured'])}.", ""]
    lines += [
        "| module | model | class | size | family | blocks | AugLocal MACs / BP | auglocal | bp | checkpoint | dgl "
        "| error |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['macs_x_bp']:.2f}x" if r.get("macs_x_bp") else ""
        error = first_error(r) or (f"dgl: {r['dgl_error']['error']}" if "dgl_error" in r else "")
        lines.append(
            f"| {r['module']} | {r['model']} | {r.get('class', '')} | {r.get('input_size', '')} | "
            f"{r.get('family', '')} | {r.get('local_blocks', '')} | {ratio} | {r.get('auglocal', '-')} | "
            f"{r.get('bp', '-')} | {r.get('checkpoint', '-')} | {r.get('dgl', '-')} | {error.replace('|', '/')[:300]} |"
        )
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", nargs="*", help="timm model modules (default: all of timm.list_modules())")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per model")
    parser.add_argument("--out", type=Path, default=RESULTS / "timm_coverage", help="output path without suffix")
    parser.add_argument("--update", action="store_true",
                        help="re-measure --modules and keep the other rows of the existing results")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(args.run_one)))
        return
    import timm
    import torch

    previous = json.loads(args.out.with_suffix(".json").read_text()) if args.update else {"results": [], "meta": {}}
    measured = {}
    for module in args.modules or timm_modules():
        name, params = smallest_model(module)
        row = {"module": module, **run_isolated(name, args.timeout), "params_m": round(params / 1e6, 3)}
        measured[module] = row
        print(f"{module:28s} {name:40s} {row['status']:7s} {first_error(row)[:150]}", flush=True)
    rows = [measured.pop(r["module"], r) for r in previous["results"]] + list(measured.values())
    meta = {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "aux_depth": 3, "methods": list(METHODS), "machine": "2-core CPU, one thread per model"}
    if args.update:
        meta["re_measured"] = sorted(set(previous["meta"].get("re_measured", [])) | set(args.modules or []))
    write_results(args.out, {"meta": meta, "results": rows}, to_markdown(rows, meta))
    print(f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} modules ok")


if __name__ == "__main__":
    main()
