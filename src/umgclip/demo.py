"""``umgclip demo``: the main job (what ``make demo`` runs).

Import the shipped COCO subset, pre-train UMG-CLIP (umg-lite, all four losses) and a plain-CLIP
baseline (same model, data, steps; image-text loss only) for each seed, evaluate both on the val
split, and write ``report.md`` with the metrics side by side, training curves and prediction
overlays. Every finished step (import, run, evaluation, overlay) is reused by a second run
unless ``--fresh``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("umgclip.demo")

#: (name in the report, config file) of the two models compared.
MODELS: tuple[tuple[str, str], ...] = (
    ("umg", "configs/umg-lite-coco.yaml"),
    ("clip", "configs/clip-lite-coco.yaml"),
)
N_OVERLAYS = 4


class DemoError(RuntimeError):
    """The demo cannot run (missing data or configs); the message says what to do."""


def _say(msg: str) -> None:
    # Progress goes to stdout unbuffered so `make demo` shows it as it happens.
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _repo_root() -> Path:
    """The checkout (for configs/): cwd if it has configs/, else next to the package."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (base / "configs").is_dir():
            return base
    return Path.cwd()


def find_data() -> Path:
    """The coco_mg folder, or :class:`DemoError` saying where we looked and how to get it."""
    from umgclip.paths import ENV_VAR, data_roots, find_coco_mg

    root = find_coco_mg()
    if root is None:
        looked = "\n  ".join(str(r / "coco_mg") for r in data_roots())
        raise DemoError(
            "the COCO subset (coco_mg) was not found. Looked in:\n  "
            f"{looked}\nGet it by placing the shared data folder next to this checkout "
            f"(../shared/data/coco_mg) or set {ENV_VAR}=/path/to/folder_holding_coco_mg; any "
            "COCO-layout folder (annotations/captions.json, instances.json, panoptic.json + "
            "images/) works."
        )
    return root


def ensure_imported(root: Path, shards: Path, fresh: bool) -> dict[str, Any]:
    """Import coco_mg into ``shards`` once (index.json marks a finished import)."""
    from umgclip.data.coco import import_coco

    index = shards / "index.json"
    if index.is_file() and not fresh:
        _say(f"data: reusing imported shards in {shards}")
        return json.loads(index.read_text())
    if shards.exists():
        shutil.rmtree(shards)
    _say(f"data: importing {root} -> {shards}")
    return import_coco(root, shards)


def train_run(
    name: str, config: Path, seed: int, run_dir: Path, shards: Path, extra: list[str], fresh: bool
) -> Path:
    """Train one model for one seed (or reuse / resume it); returns its final model folder."""
    from umgclip.config import load_config
    from umgclip.train.config import PretrainConfig
    from umgclip.train.pretrain import train

    final = run_dir / "final"
    overrides = [f"seed={seed}", f"output_dir={run_dir}", f"data.shards={shards}", *extra]
    cfg = load_config(PretrainConfig, config, overrides)
    if run_dir.exists() and not fresh and not _same_config(cfg, run_dir / "config.yaml"):
        # A finished (or half-finished) run of another config is not this run: reusing it
        # would report stale numbers, resuming it would mix two schedules.
        _say(
            f"train {name} seed {seed}: the config changed since {run_dir} was trained; retraining"
        )
        fresh = True
    if fresh and run_dir.exists():
        shutil.rmtree(run_dir)
    if (final / "config.json").is_file():
        _say(f"train {name} seed {seed}: reusing {final}")
        return final
    resume = (
        "latest"
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
        else None
    )
    _say(
        f"train {name} seed {seed}: {cfg.schedule.steps} steps, batch {cfg.data.batch_size}"
        + (" (resuming)" if resume else "")
    )
    t0 = time.perf_counter()
    train(cfg, resume=resume)
    _say(f"train {name} seed {seed}: done in {time.perf_counter() - t0:.0f}s")
    return final


def _same_config(cfg: Any, saved: Path) -> bool:
    """Whether ``saved`` (a run's ``config.yaml``) holds exactly the resolved ``cfg``."""
    import yaml

    from umgclip.config import to_dict

    if not saved.is_file():
        return False
    now = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=True))
    return yaml.safe_load(saved.read_text()) == now


def _fresher(out: Path, model_dir: Path) -> bool:
    """Whether the cached result ``out`` was written after the model it describes."""
    weights = model_dir / "model.safetensors"
    return out.is_file() and (
        not weights.is_file() or out.stat().st_mtime >= weights.stat().st_mtime
    )


def eval_run(
    name: str,
    seed: int,
    model_dir: Path,
    shards: Path,
    out: Path,
    fresh: bool,
    max_images: int | None = None,
) -> dict:
    """Evaluate a model on val (cached as JSON)."""
    from umgclip.eval.evaluate import EvalConfig, evaluate
    from umgclip.model.registry import load_model

    if _fresher(out, model_dir) and not fresh:
        _say(f"eval {name} seed {seed}: reusing {out}")
        return json.loads(out.read_text())
    _say(f"eval {name} seed {seed}: val split")
    t0 = time.perf_counter()
    metrics = evaluate(load_model(model_dir), shards, "val", EvalConfig(max_images=max_images))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    _say(f"eval {name} seed {seed}: done in {time.perf_counter() - t0:.0f}s")
    return metrics


def overlays(models: dict[str, Path], shards: Path, out_dir: Path, fresh: bool) -> list[dict]:
    """Prediction overlays for the first ``N_OVERLAYS`` val images with panoptic labels, per
    model: tags and segmentation over the 133 COCO panoptic classes, the image's ground-truth
    thing boxes (up to 6) labelled among them."""
    from umgclip.data.shards import iter_shard_samples, list_shards
    from umgclip.eval.evaluate import EvalConfig, EvalContext
    from umgclip.eval.overlay import draw_prediction
    from umgclip.eval.predict import predict
    from umgclip.eval.vocab import COCO_PANOPTIC, prompt_name
    from umgclip.model.registry import load_model
    from umgclip.viz import plt

    labels = list(dict.fromkeys(prompt_name(n) for _, n, _ in COCO_PANOPTIC))
    picks = []
    for s in iter_shard_samples(list_shards(shards, "val")):
        if s.panoptic is not None:
            picks.append(s)
        if len(picks) == N_OVERLAYS:
            break
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    loaded: dict[str, Any] = {}
    for s in picks:
        png = out_dir / f"{s.sample.key}.png"
        gt = [r for r in s.sample.regions if r.kind == "thing" and not r.iscrowd][:6]
        boxes = [r.box for r in gt]
        rows.append({"key": s.sample.key, "png": png, "gt": [r.tags[:1] for r in gt]})
        if not fresh and all(_fresher(png, m) for m in models.values()):
            continue
        _say(f"overlay {s.sample.key}")
        fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5.2), dpi=100)
        for ax, (name, mdir) in zip(axes, models.items()):
            if name not in loaded:
                m = load_model(mdir)
                loaded[name] = EvalContext(model=m, shards=[], cfg=EvalConfig())
            pred = predict(loaded[name].model, s.image, labels, boxes, ctx=loaded[name])
            draw_prediction(s.image, pred.result, pred.label_map, ax=ax, title=name)
            (out_dir / f"{s.sample.key}.{name}.json").write_text(json.dumps(pred.result) + "\n")
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)
    return rows


def curves_figure(runs: dict[str, list[Path]], out: Path) -> None:
    """Training losses of both models (every seed) on shared axes, one panel per loss term."""
    from umgclip.viz import plt

    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, dirs in runs.items():
        for i, d in enumerate(dirs):
            p = d / "metrics.jsonl"
            if not p.is_file():
                continue
            for ln in p.read_text().splitlines():
                if not ln.strip():
                    continue
                r = json.loads(ln)
                for k in ("loss", "itc", "rtc", "image_tag", "region_tag"):
                    if k in r and "step" in r:
                        series.setdefault(k, {}).setdefault(f"{name} seed{i}", []).append(
                            (r["step"], r[k])
                        )
    keys = [k for k in ("loss", "itc", "rtc", "image_tag", "region_tag") if k in series]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3), squeeze=False)
    # One colour per run across all panels (a panel with only UMG terms must not recolour them).
    names = sorted({lab for per in series.values() for lab in per})
    color = {lab: plt.get_cmap("tab10")(i % 10) for i, lab in enumerate(names)}
    for ax, k in zip(axes[0], keys):
        for lab, pts in sorted(series[k].items()):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2, label=lab, color=color[lab],
                    ls="-" if lab.startswith("umg") else "--")  # fmt: skip
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def claim(ours: list[dict], base: list[dict]) -> list[str]:
    """The demo's claim, checked on the means over seeds: UMG-CLIP beats the baseline on box
    top-1 and semseg mIoU, and keeps retrieval (no R@k mean falls by more than one query's
    worth). Each line also says whether the difference exceeds the seed spreads added."""
    from umgclip.eval.report import QUERY_COUNTS, mean_spread

    def stats(k: str) -> tuple[float, float, float]:
        a, sa = mean_spread([m[k] for m in ours])
        b, sb = mean_spread([m[k] for m in base])
        return a, b, sa + sb

    multi = len(ours) > 1
    lines = []
    for k in ("regions/box_top1", "semseg/mIoU"):
        a, b, spread = stats(k)
        verdict = "holds" if a > b else "DOES NOT hold"
        if multi and a > b:
            verdict += (
                " (beyond the seed spread)" if a - b > spread else " (within the seed spread)"
            )
        lines.append(f"- `{k}`: {a:.2f} vs {b:.2f} ({a - b:+.2f}) -> {verdict}")
    drops = []
    for k in (k for k in QUERY_COUNTS if k.startswith("retrieval/")):
        a, b, spread = stats(k)
        one = 100.0 / ours[0][QUERY_COUNTS[k]]
        if a - b < -one:
            noise = "; within the seed spread" if multi and b - a <= spread else ""
            drops.append(f"`{k}` {a - b:+.2f} (one query = {one:.2f}{noise})")
    lines.append(
        "- retrieval kept (no R@k drop larger than one query): "
        + ("holds" if not drops else "DOES NOT hold: " + "; ".join(drops))
    )
    return lines


def write_report(
    out: Path,
    seeds: list[int],
    results: dict[str, list[dict]],
    rows: list[dict],
    timings: dict[str, float],
    index: dict[str, Any],
) -> Path:
    from umgclip.eval.evaluate import CORE_KEYS
    from umgclip.eval.report import comparison_table

    ours, base = results["umg"], results["clip"]
    extra_keys = [
        "tagging/num_classes", "semseg/num_classes", "semseg/pixel_acc", "regions/num_masks",
    ]  # fmt: skip
    lines = [
        "# umgclip demo: UMG-CLIP vs a plain CLIP baseline on COCO (val split)",
        "",
        f"Seeds: {', '.join(map(str, seeds))}. Both models: umg-lite (EfficientNet-Lite0 + "
        "MiniLM), the same data, steps, batch and frozen layers; the baseline trains with the "
        "image-text loss only, UMG-CLIP with image-text + region-text + image-tag + region-tag. "
        "Cells are mean ± half-range over seeds; `difference` is UMG-CLIP minus baseline. "
        "`queries` is the number of evaluated items (images for i2t/tagging/semseg, captions for "
        "t2i, boxes/masks for regions); one query is worth 100/queries points.",
        "",
        f"Data: {index.get('counts', {}).get('images_train', '?')} train / "
        f"{index.get('counts', {}).get('images_val', '?')} val images "
        "(split by a hash of the COCO image id).",
        "",
        "## Metrics",
        "",
        comparison_table(ours, base, CORE_KEYS),
        "",
        "## The claim",
        "",
        *claim(ours, base),
        "",
        "## Per seed",
        "",
        "| model | seed | " + " | ".join(f"`{k}`" for k in CORE_KEYS) + " |",
        "|---|---|" + "---|" * len(CORE_KEYS),
    ]
    for name, ms in (("UMG-CLIP", ours), ("CLIP", base)):
        for s, m in zip(seeds, ms):
            lines.append(
                f"| {name} | {s} | " + " | ".join(f"{m.get(k, float('nan')):.2f}" for k in CORE_KEYS)
                + " |"
            )  # fmt: skip
    lines += ["", "Other counts (seed " + str(seeds[0]) + "): "]
    lines.append(
        ", ".join(
            f"`{k}` {ours[0].get(k, float('nan')):.1f} / {base[0].get(k, float('nan')):.1f}"
            for k in extra_keys
        )
        + " (UMG-CLIP / CLIP)."
    )
    lines += ["", "## Training curves", "", "![training curves](curves.png)", ""]
    lines += [
        "## Predictions on four val images",
        "",
        "Left: UMG-CLIP, right: CLIP baseline (seed " + str(seeds[0]) + "). Vocabulary: the 133 "
        "COCO panoptic classes; segmentation = argmax of dense features vs the class prompts; "
        "boxes = the image's ground-truth thing boxes (up to 6), each labelled by the model. "
        "Titles show the top-3 image tags.",
        "",
    ]
    for r in rows:
        gt = ", ".join(t[0] for t in r["gt"] if t)
        lines += [
            f"### {r['key']} (ground-truth boxes: {gt})",
            "",
            f"![{r['key']}](overlays/{r['png'].name})",
            "",
        ]
    lines += ["## Timing", ""]
    lines += [f"- {k}: {v:.0f} s" for k, v in timings.items()]
    lines += ["", "Reproduce: `make demo` (or `umgclip demo --fresh`)."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    t_start = time.perf_counter()
    out = Path(args.out)
    repo = _repo_root()
    try:
        root = find_data()
        configs = {name: repo / cfg for name, cfg in MODELS}
        if args.umg_config:
            configs["umg"] = Path(args.umg_config)
        if args.clip_config:
            configs["clip"] = Path(args.clip_config)
        missing = [str(p) for p in configs.values() if not p.is_file()]
        if missing:
            raise DemoError(f"config file(s) not found: {missing} (run from the checkout)")
    except DemoError as e:
        print(f"umgclip demo: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    shards = out / "data" / "coco_mg"
    index = ensure_imported(root, shards, args.fresh)
    timings["import"] = time.perf_counter() - t0
    extra = list(args.set or [])
    if args.steps:
        extra.append(f"schedule.steps={args.steps}")
    results: dict[str, list[dict]] = {name: [] for name, _ in MODELS}
    run_dirs: dict[str, list[Path]] = {name: [] for name, _ in MODELS}
    finals: dict[str, Path] = {}
    n_jobs = len(args.seeds) * len(MODELS)
    i = 0
    for seed in args.seeds:
        for name, _ in MODELS:
            i += 1
            _say(f"({i}/{n_jobs}) {name} seed {seed}")
            run_dir = out / "runs" / f"{name}-seed{seed}"
            t0 = time.perf_counter()
            final = train_run(name, configs[name], seed, run_dir, shards, extra, args.fresh)
            timings[f"train {name} seed {seed}"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            m = eval_run(
                name,
                seed,
                final,
                shards,
                out / "eval" / f"{name}-seed{seed}.json",
                args.fresh,
                args.eval_max_images,
            )
            timings[f"eval {name} seed {seed}"] = time.perf_counter() - t0
            results[name].append(m)
            run_dirs[name].append(run_dir)
            finals.setdefault(name, final)
        # A partial report after every seed: a long demo shows its figures as they come.
        done = args.seeds[: len(results["umg"])]
        curves_figure(run_dirs, out / "curves.png")
        write_report(out, list(done), results, [], timings, index)
        _say(f"partial report for seed(s) {done}: {out / 'report.md'}")
    t0 = time.perf_counter()
    curves_figure(run_dirs, out / "curves.png")
    rows = overlays(finals, shards, out / "overlays", args.fresh)
    timings["curves + overlays"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    report = write_report(out, list(args.seeds), results, rows, timings, index)
    from umgclip.eval.report import comparison_table

    print(comparison_table(results["umg"], results["clip"]))
    print("\n".join(claim(results["umg"], results["clip"])))
    _say(f"report: {report} (total {timings['total']:.0f}s)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="train UMG-CLIP and a CLIP baseline on COCO, evaluate, write a report"
    )
    p.add_argument("--out", default="runs/demo", help="demo folder (report.md goes here)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--fresh", action="store_true", help="redo every step instead of reusing")
    p.add_argument("--steps", type=int, default=None, help="training steps for both models")
    p.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="extra training-config override applied to both models (same budget)",
    )  # fmt: skip
    p.add_argument("--umg-config", default=None, help=f"default: {MODELS[0][1]}")
    p.add_argument("--clip-config", default=None, help=f"default: {MODELS[1][1]}")
    p.add_argument(
        "--eval-max-images", type=int, default=None, help="evaluate only N val images (smoke runs)"
    )
    p.set_defaults(func=run_demo)
