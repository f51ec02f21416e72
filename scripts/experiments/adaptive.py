#!/usr/bin/env python3
"""Adaptive batch experiment for issue 6 item 3 (standard library only).

Fixed small, fixed large and adaptive (gns.adaptive) global batch on the synthetic contrastive
task and on the digits classifier: steps and examples until a target is first reached. Each run
goes to DIR/<task>/<variant>/seed<seed>/ (command.txt, config.toml, metrics.jsonl,
summary.json); DIR/runs.csv has one row per run and DIR/summary.md the tables of
docs/EXPERIMENTS.md.

Usage: python3 scripts/experiments/adaptive.py [--tasks contrastive,digits] [--out DIR]
Re-running reuses finished runs (delete DIR to start over).
"""
import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time

# Per task: the small batch B0 and its learning rate lr0 (SGD, momentum 0.9, 10 warm-up steps,
# then constant), the large batch, the adaptive range, and the targets. "large" keeps lr0;
# "large-sqrt" and "adaptive" scale it by sqrt(B / B0) (the adaptive run's gns.adaptive.lr_rule);
# "adaptive-noise" by McCandlish's (1 + B_simple/B0) / (1 + B_simple/B).
TASKS = {
    "contrastive": {
        "config": [],
        "small": 64, "large": 1024, "max": 2048, "lr": 0.1,
        "steps": {"small": 1500, "large": 200, "large-sqrt": 200, "adaptive": 400, "adaptive-noise": 400},
        "eval_every": 10,
        # Held-out recall@1 (1000 pairs): the training loss of InfoNCE depends on the batch
        # (ln B at chance), so it is no common target across batch sizes.
        "targets": [("recall@1", ">=", 0.45), ("recall@1", ">=", 0.50)],
        "seeds": [0, 1],
    },
    "digits": {
        "config": ["--config", "examples/digits-classifier.toml"],
        "small": 32, "large": 1024, "max": 1500, "lr": 0.05,
        "steps": {"small": 1000, "large": 150, "large-sqrt": 150, "adaptive": 400, "adaptive-noise": 400},
        "eval_every": 5,
        # Cross-entropy is a mean over examples: its minibatch value estimates the same loss at
        # every batch size. Smoothed over the last 10 steps.
        "targets": [("train_loss", "<=", 0.1), ("train_loss", "<=", 0.01), ("accuracy", ">=", 0.95)],
        "seeds": [0, 1, 2],
    },
}
VARIANTS = ["small", "large", "large-sqrt", "adaptive", "adaptive-noise"]


def run_sets(task, variant, seed, out):
    t = TASKS[task]
    small, large = t["small"], t["large"]
    lr = t["lr"]
    s = {
        "run.steps": str(t["steps"][variant]),
        "run.seed": str(seed),
        "run.eval_every": str(t["eval_every"]),
        "run.log_every": "1",
        "run.out_dir": json.dumps(out),
        "optim.name": '"sgd"',
        "optim.warmup_steps": "10",
        "optim.schedule": '"constant"',
        "gns.reduce_every": "5",
        "gns.ema_decay": "0.95",
        "checkpoint.enabled": "false",
    }
    if variant == "small":
        s.update({"batch.global": str(small), "optim.lr": repr(lr)})
    elif variant == "large":
        s.update({"batch.global": str(large), "optim.lr": repr(lr)})
    elif variant == "large-sqrt":
        s.update({"batch.global": str(large), "optim.lr": repr(lr * (large / small) ** 0.5)})
    else:
        s.update({
            "batch.global": str(small), "optim.lr": repr(lr),
            "gns.adaptive.enabled": "true", "gns.adaptive.max": str(t["max"]),
            "gns.adaptive.every": "20", "gns.adaptive.start_step": "20",
            "gns.adaptive.lr_rule": '"noise"' if variant == "adaptive-noise" else '"sqrt"',
        })
    return s


def run_one(binary, task, variant, seed, root):
    out = os.path.join(root, task, variant, f"seed{seed}")
    summary_path = os.path.join(out, "summary.json")
    if os.path.exists(summary_path):
        return out
    os.makedirs(out, exist_ok=True)
    cmd = [binary, "run", "--nproc", "2"] + TASKS[task]["config"]
    for k, v in run_sets(task, variant, seed, out).items():
        cmd += ["--set", f"{k}={v}"]
    with open(os.path.join(out, "command.txt"), "w") as f:
        f.write(" ".join(cmd) + "\n")
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr[-3000:])
        raise SystemExit(f"run failed: {' '.join(cmd)}")
    line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
    with open(summary_path, "w") as f:
        f.write(line + "\n")
    print(f"{task} {variant} seed {seed}: {time.time() - t0:.1f} s", flush=True)
    return out


def read_run(out):
    """Per step: (samples, smoothed training loss); eval lines by step."""
    steps, evals = {}, {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for line in f:
            v = json.loads(line)
            if v.get("eval"):
                evals[v["step"]] = v
            elif "loss" in v and "samples" in v:
                steps[v["step"]] = (v["samples"], v["loss"], v.get("batch"))
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return steps, evals, summary


def first_reach(steps, evals, metric, op, target):
    """(step, samples) when the metric first meets the target, or None."""
    ok = (lambda x: x >= target) if op == ">=" else (lambda x: x <= target)
    if metric == "train_loss":
        window = []
        for s in sorted(steps):
            window = (window + [steps[s][1]])[-10:]
            if len(window) == 10 and ok(sum(window) / 10):
                return s, steps[s][0]
        return None
    for s in sorted(evals):
        if metric in evals[s] and ok(evals[s][metric]) and s in steps:
            return s, steps[s][0]
    return None


def fmt_mean(xs, digits=0):
    if not xs:
        return "–"
    m = statistics.mean(xs)
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{m:,.{digits}f} ± {sd:,.{digits}f}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", default="contrastive,digits")
    ap.add_argument("--out", default="runs/experiments/adaptive")
    a = ap.parse_args()
    binary = os.environ.get("TESSERA", "target/release/tessera")
    rows, md = [], []
    for task in a.tasks.split(","):
        t = TASKS[task]
        md.append(f"#### {task}\n")
        header = "| variant | " + " | ".join(
            f"{m} {op} {v}: steps | examples" for m, op, v in t["targets"]) + \
            " | final metric | examples run | train s |"
        md.append(header)
        md.append("|" + "---|" * (2 + 2 * len(t["targets"]) + 2))
        metric = "recall@1" if task == "contrastive" else "accuracy"
        for variant in VARIANTS:
            per_target = [([], [], 0) for _ in t["targets"]]
            finals, totals, secs = [], [], []
            for seed in t["seeds"]:
                out = run_one(binary, task, variant, seed, a.out)
                steps, evals, summary = read_run(out)
                row = {"task": task, "variant": variant, "seed": seed,
                       "final_" + metric: summary.get(metric), "samples": summary.get("samples"),
                       "steps": summary.get("steps"), "train_seconds": summary.get("train_seconds"),
                       "last_batch": summary.get("global_batch")}
                for i, (m, op, v) in enumerate(t["targets"]):
                    r = first_reach(steps, evals, m, op, v)
                    row[f"{m}{op}{v}_step"] = r[0] if r else ""
                    row[f"{m}{op}{v}_examples"] = r[1] if r else ""
                    if r:
                        per_target[i][0].append(r[0])
                        per_target[i][1].append(r[1])
                        per_target[i] = (per_target[i][0], per_target[i][1], per_target[i][2] + 1)
                rows.append(row)
                finals.append(summary.get(metric) or 0.0)
                totals.append(summary.get("samples") or 0)
                secs.append(summary.get("train_seconds") or 0.0)
            cells = []
            n = len(t["seeds"])
            for st, ex, hit in per_target:
                note = "" if hit == n else f" ({hit}/{n} reached)"
                cells.append((fmt_mean(st) + note) if st else f"not reached (0/{n})")
                cells.append(fmt_mean(ex) if ex else "–")
            md.append(f"| {variant} | " + " | ".join(cells) +
                      f" | {fmt_mean(finals, 3)} | {fmt_mean(totals)} | {fmt_mean(secs, 1)} |")
        md.append("")
    os.makedirs(a.out, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("task", "variant", "seed"), k))
    with open(os.path.join(a.out, "runs.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
