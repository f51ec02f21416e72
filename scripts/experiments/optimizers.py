#!/usr/bin/env python3
"""Optimizer comparison for issue 5 item 5 (standard library only).

Runs the `tessera` binary over a grid of optimizer x learning rate x seed x global batch on the
digits classifier and on the synthetic contrastive task, caches each run's JSON summary under
runs/experiments/optimizers/, and writes runs.csv (one row per run) and summary.md (best learning
rate per optimizer and batch, mean +- std over seeds, loss at 25/50/75/100 % of training).

Usage: python3 scripts/experiments/optimizers.py [--tasks digits,contrastive] [--out DIR]
       [--variants V,...] [--seeds S,...] [--batches B,...] [--lrs LR,...]
Re-running reuses finished runs (delete DIR to start over). --variants may also name a task's
extra_variants (e.g. lars-x0.01: LARS with optim.excluded_lr_scale = 0.01); --lrs replaces the
learning-rate grid of the LARS family.
"""
import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time

# ---- the grid -------------------------------------------------------------------------------
# Per task: batches (global batch, steps, warm-up steps for the "with warm-up" variants), seeds,
# and the learning-rate grid of each optimizer family. Steps are chosen for equal epochs at both
# batches (digits: 1500 train examples, ~30 epochs; synthetic: 20000 pairs, 8 epochs).
TASKS = {
    "digits": {
        "config": ["--config", "examples/digits-classifier.toml"],
        "metric": "accuracy",
        "batches": [(64, 700, 117), (1500, 30, 5)],
        "seeds": [0, 1, 2],
        "lrs": {
            "sgd": [0.01, 0.03, 0.1, 0.3, 1.0],
            "lars": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0],
            "lamb": [0.001, 0.003, 0.01, 0.03, 0.1],
        },
        "variants": ["sgd", "lars", "lars-nowarmup", "lars-constant", "tvlars-l1e-3", "tvlars-lT5", "lamb"],
    },
    "contrastive": {
        "config": [],
        "metric": "recall@1",
        "batches": [(256, 625, 78), (4096, 40, 5)],
        "seeds": [0, 1],
        "lrs": {
            "sgd": [0.03, 0.1, 0.3, 1.0, 3.0],
            "lars": [0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
            "lamb": [0.001, 0.003, 0.01, 0.03, 0.1],
        },
        "variants": ["sgd", "lars", "lars-nowarmup", "tvlars-l1e-3", "tvlars-lT5", "lamb"],
        # With optim.excluded_lr_scale (suffix -x<scale>): the tensors without a trust ratio
        # (biases, LayerNorm, the logit scale) take lr * scale instead of lr. Run with
        # --variants ... --seeds 0,1,2 (see docs/EXPERIMENTS.md).
        "extra_variants": [f"{v}-x{x}" for x in ("0.1", "0.01")
                           for v in ("lars", "lars-nowarmup", "tvlars-l1e-3", "tvlars-lT5")]
                          + ["lars-constant-x0.01"],
    },
}


def variant_sets(variant, lr, steps, warmup):
    """The --set overrides of one variant (besides batch/steps/seed/out_dir)."""
    if "-x" in variant:
        base, scale = variant.rsplit("-x", 1)
        s = variant_sets(base, lr, steps, warmup)
        s["optim.excluded_lr_scale"] = scale
        return s
    s = {"optim.lr": repr(lr)}
    if variant == "sgd":
        s.update({"optim.name": "sgd", "optim.warmup_steps": str(warmup), "optim.schedule": '"cosine"'})
    elif variant == "lars":
        s.update({"optim.name": "lars", "optim.warmup_steps": str(warmup), "optim.schedule": '"cosine"'})
    elif variant == "lars-nowarmup":
        s.update({"optim.name": "lars", "optim.warmup_steps": "0", "optim.schedule": '"cosine"'})
    elif variant == "lars-constant":
        s.update({"optim.name": "lars", "optim.warmup_steps": str(warmup), "optim.schedule": '"constant"'})
    elif variant.startswith("tvlars"):
        # The authors' released code (tvlars-code): constant base rate, no warm-up; phi(t) is the
        # schedule. lambda either the authors' default 1e-3 or 5/steps (phi ends near exp(-5)).
        lam = 1e-3 if variant == "tvlars-l1e-3" else 5.0 / steps
        s.update({"optim.name": "tvlars-code", "optim.warmup_steps": "0",
                  "optim.schedule": '"constant"', "optim.tvlars_lambda": repr(lam)})
    elif variant == "lamb":
        s.update({"optim.name": "lamb", "optim.warmup_steps": str(warmup), "optim.schedule": '"cosine"'})
    else:
        raise ValueError(f"unknown variant {variant}")
    return s


def family(variant):
    if variant.startswith("lars") or variant.startswith("tvlars"):
        return "lars"
    return variant


def loss_points(metrics_path, steps):
    """Mean logged loss over the last max(1, steps/20) steps ending at 25/50/75/100 % of training."""
    losses = {}
    try:
        with open(metrics_path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if "step" in rec and "loss" in rec and rec["loss"] is not None:
                    losses[int(rec["step"])] = float(rec["loss"])
    except OSError:
        return [math.nan] * 4
    win = max(1, steps // 20)
    out = []
    for q in (0.25, 0.5, 0.75, 1.0):
        end = max(1, round(q * steps))
        vals = [losses[s] for s in range(end - win + 1, end + 1) if s in losses]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def run_one(binary, task, spec, batch, steps, warmup, variant, lr, seed, root):
    sets = variant_sets(variant, lr, steps, warmup)
    name = f"{task}/b{batch}/{variant}/lr{lr:g}/seed{seed}"
    out_dir = os.path.join(root, name)
    summary_path = os.path.join(out_dir, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    else:
        os.makedirs(out_dir, exist_ok=True)
        args = [binary, "run", "--nproc", "1", *spec["config"],
                "--set", f"batch.global={batch}", "--set", f"run.steps={steps}",
                "--set", f"run.seed={seed}", "--set", "run.eval_every=0",
                "--set", "run.log_every=1", "--set", f'run.out_dir="{out_dir}"']
        for k, v in sets.items():
            args += ["--set", f"{k}={v}"]
        with open(os.path.join(out_dir, "command.txt"), "w") as f:
            f.write(" ".join(a if " " not in a else repr(a) for a in args) + "\n")
        proc = subprocess.run(args, capture_output=True, text=True)
        summary = None
        for line in reversed(proc.stdout.strip().splitlines()):
            try:
                summary = json.loads(line)
                break
            except ValueError:
                continue
        if proc.returncode != 0 or summary is None:
            summary = {"error": (proc.stderr or proc.stdout)[-400:], "rc": proc.returncode}
        with open(summary_path, "w") as f:
            json.dump(summary, f)
    metric = summary.get(spec["metric"])
    metric = float(metric) if isinstance(metric, (int, float)) else math.nan
    loss = summary.get("loss")
    loss = float(loss) if isinstance(loss, (int, float)) else math.nan
    q = loss_points(os.path.join(out_dir, "metrics.jsonl"), steps)
    lam = sets.get("optim.tvlars_lambda", "")
    return {"task": task, "batch": batch, "steps": steps, "variant": variant,
            "optimizer": sets["optim.name"], "lr": lr, "warmup": sets["optim.warmup_steps"],
            "schedule": sets["optim.schedule"].strip('"'), "tvlars_lambda": lam,
            "excluded_lr_scale": sets.get("optim.excluded_lr_scale", "1"), "seed": seed,
            "metric_name": spec["metric"], "metric": metric, "final_loss": loss,
            "loss_q25": q[0], "loss_q50": q[1], "loss_q75": q[2], "loss_q100": q[3],
            "error": summary.get("error", "")[:200] if "error" in summary else ""}


def mean_std(xs):
    xs = [x for x in xs]
    if any(math.isnan(x) for x in xs):
        return math.nan, math.nan
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(rows):
    lines = []
    groups = {}
    for r in rows:
        groups.setdefault((r["task"], r["batch"], r["variant"]), {}).setdefault(r["lr"], []).append(r)
    lines.append("| task | batch | variant | lrs tried | best lr | metric mean ± std (seeds) "
                 "| loss @25/50/75/100 % (mean over seeds, best lr) |")
    lines.append("|---|---|---|---|---|---|---|")
    for (task, batch, variant), by_lr in groups.items():
        best_lr, best = None, (-1.0, 0.0)
        per_lr = []
        for lr, rs in sorted(by_lr.items()):
            m, s = mean_std([r["metric"] for r in rs])
            per_lr.append(f"{lr:g}:{'div' if math.isnan(m) else f'{m:.3f}'}")
            if not math.isnan(m) and m > best[0]:
                best_lr, best = lr, (m, s)
        if best_lr is None:
            lines.append(f"| {task} | {batch} | {variant} | {' '.join(per_lr)} | — | all diverged | |")
            continue
        rs = by_lr[best_lr]
        qs = []
        for key in ("loss_q25", "loss_q50", "loss_q75", "loss_q100"):
            vals = [r[key] for r in rs]
            qs.append("nan" if any(math.isnan(v) for v in vals) else f"{statistics.mean(vals):.3f}")
        edge = " (edge)" if best_lr in (min(by_lr), max(by_lr)) else ""
        lines.append(f"| {task} | {batch} | {variant} | {' '.join(per_lr)} | {best_lr:g}{edge} | "
                     f"{best[0]:.4f} ± {best[1]:.4f} (n={len(rs)}) | {' / '.join(qs)} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="digits,contrastive")
    ap.add_argument("--out", default="runs/experiments/optimizers")
    ap.add_argument("--binary", default=os.environ.get("TESSERA", "target/release/tessera"))
    ap.add_argument("--variants", default="",
                    help="comma list: run only these variants (may name extra_variants)")
    ap.add_argument("--seeds", default="", help="comma list: seeds instead of the task's")
    ap.add_argument("--batches", default="", help="comma list: global batches to run")
    ap.add_argument("--lrs", default="", help="comma list: learning rates of the lars family")
    args = ap.parse_args()
    rows = []
    for task in args.tasks.split(","):
        spec = TASKS[task]
        variants = spec["variants"]
        if args.variants:
            known = spec["variants"] + spec.get("extra_variants", [])
            variants = [v for v in args.variants.split(",") if v in known]
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else spec["seeds"]
        batches = spec["batches"]
        if args.batches:
            batches = [b for b in batches if str(b[0]) in args.batches.split(",")]
        for batch, steps, warmup in batches:
            for variant in variants:
                lrs = spec["lrs"][family(variant)]
                if args.lrs and family(variant) == "lars":
                    lrs = [float(x) for x in args.lrs.split(",")]
                for lr in lrs:
                    for seed in seeds:
                        t0 = time.time()
                        r = run_one(args.binary, task, spec, batch, steps, warmup, variant, lr, seed, args.out)
                        rows.append(r)
                        print(f"{task} b={batch} {variant} lr={lr:g} seed={seed}: "
                              f"{spec['metric']}={r['metric']:.4f} loss={r['final_loss']:.4f} "
                              f"({time.time() - t0:.1f}s){' ERROR ' + r['error'] if r['error'] else ''}",
                              flush=True)
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "runs.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    table = summarize(rows)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    print(f"wrote {csv_path} and {os.path.join(args.out, 'summary.md')}")


if __name__ == "__main__":
    sys.exit(main())
