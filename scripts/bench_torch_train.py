#!/usr/bin/env python3
"""One training step of Tessera's default dual encoder, re-implemented in PyTorch eager, timed:
the peer of the training-step target in issue 7 ("training step >= 1.2x PyTorch eager").

The model, loss and optimizer are those of the embedded default job (examples/default.toml,
rank/src/model/mod.rs, rank/src/optim/):
  - two towers 32 -> 128 (depth 2, pre-norm residual) -> 64, each:
        h = x W_in + b_in
        2x:  h = h + Linear(GELU_tanh(LayerNorm(h)))            (LayerNorm eps 1e-5)
        y = Linear(GELU_tanh(LayerNorm(h)))                       (its own LayerNorm)
        features = y / ||y||                                       (L2-normalised)
    weights N(0, 1/fan_in), the residual blocks' linears also / sqrt(depth); biases and
    LayerNorm beta 0, gamma 1;
  - a learnable logit scale s = exp(t), t = ln(1/0.07), clamped to t <= ln(100) after each step;
  - the symmetric CLIP loss 0.5 (CE(s A B^T, I) + CE(s B A^T, I)) over the batch;
  - SGD, momentum 0.9 (PyTorch form), weight decay 1e-4 on the weight matrices only (the
    ndim >= 2 tensors), lr 0.5 with 20 warm-up steps then cosine to 0 (set every step).
92,545 parameters, as Tessera's (checked against its params.f32 with --compare).

A step: gather the batch's rows from a 20,000 x 32 input table per tower, forward, loss,
backward, optimizer step, clamp, zero grads. The table is a learnable paired task made here
(a 16-d latent through two fixed random tanh maps, plus noise; seeded); with --compare Tessera
trains on the same rows (`tessera data import` into a shard), so the two last-step losses,
printed beside the times, check that both sides train the same model (their initial weights and
batch order differ, so they agree within the spread between seeds, not bitwise).
Steps are timed in blocks of 10 (one device sync at each block's end on CUDA); ms/step is the
median block after the first block, also the fastest such block and the mean of all. On a busy
machine wall time mostly measures the scheduler, so CPU time per step is reported too: this
process's (all threads) after the first block for PyTorch; for Tessera the CPU time of all its
processes (getrusage of children) in a full run minus that of a one-block run, per step.

--compare BIN also times Tessera's step on this machine, alternating with the PyTorch side for
--rounds rounds: `BIN run --nproc 1` on the same device (run.device) at the same batch and
thread count (run.threads), from
its metrics.jsonl (cumulative samples/s every 10 steps, evaluation excluded), the same
statistic (median 10-step block after the first). Tessera's step also updates its
gradient-noise-scale estimate (the default job has [gns] on; well under 1% of a step).

--malloc-keep runs both sides with glibc's malloc keeping freed memory (see its help): Tessera's
CPU step allocates its activations afresh every step, and with glibc's defaults a good part of
the step goes to page faults (docs/BENCHMARKS.md).

Usage: bench_torch_train.py [--device cpu|cuda] [--threads N] [--batch 512] [--steps 300]
                            [--compare target/release/tessera --rounds 3] [--malloc-keep]
                            [--json out.jsonl]"""
import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-5
TASK_ROWS = 20000
KEEP_TUNABLES = ("glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=268435456:"
                 "glibc.malloc.top_pad=67108864")
LOGIT_SCALE_INIT = math.log(1 / 0.07)
BLOCK = 10


class Unit(nn.Module):
    """Linear(act(norm(h)))."""

    def __init__(self, fan_in, fan_out, std):
        super().__init__()
        self.ln = nn.LayerNorm(fan_in, eps=LN_EPS)
        self.lin = nn.Linear(fan_in, fan_out)
        init_linear(self.lin, std)

    def forward(self, h):
        return self.lin(F.gelu(self.ln(h), approximate="tanh"))


def init_linear(lin, std):
    with torch.no_grad():
        lin.weight.normal_(0.0, std)
        lin.bias.zero_()


class Tower(nn.Module):
    def __init__(self, input_dim=32, width=128, depth=2, output_dim=64):
        super().__init__()
        self.inp = nn.Linear(input_dim, width)
        init_linear(self.inp, 1.0 / math.sqrt(input_dim))
        block_std = 1.0 / math.sqrt(width) / math.sqrt(depth) if depth else 0.0
        self.blocks = nn.ModuleList([Unit(width, width, block_std) for _ in range(depth)])
        self.head = Unit(width, output_dim, 1.0 / math.sqrt(width))

    def forward(self, x):
        h = self.inp(x)
        for u in self.blocks:
            h = h + u(h)
        return F.normalize(self.head(h), dim=1)


class DualEncoder(nn.Module):
    def __init__(self, input_dim=32, width=128, depth=2, output_dim=64,
                 logit_scale_init=LOGIT_SCALE_INIT):
        super().__init__()
        self.a = Tower(input_dim, width, depth, output_dim)
        self.b = Tower(input_dim, width, depth, output_dim)
        self.t = nn.Parameter(torch.tensor(float(logit_scale_init)))

    def forward(self, xa, xb):
        return self.a(xa), self.b(xb), self.t.exp()


def clip_loss(fa, fb, scale):
    logits = scale * fa @ fb.t()
    labels = torch.arange(fa.shape[0], device=fa.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def lr_at(step, peak, warmup, total):
    """Tessera's warm-up + cosine schedule (rank/src/optim/schedule.rs), min ratio 0."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = total - (warmup + 1)
    if span <= 0:
        return peak
    progress = min((step - warmup) / span, 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_task(n=TASK_ROWS, dim=32, latent=16, noise=0.5, seed=1):
    """A learnable paired task: z ~ N(0, I_latent); a = tanh(z Wa), b = tanh(z Wb), + noise."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, generator=g)
    wa = torch.randn(latent, dim, generator=g) / math.sqrt(latent)
    wb = torch.randn(latent, dim, generator=g) / math.sqrt(latent)
    a = torch.tanh(2 * z @ wa) + noise * torch.randn(n, dim, generator=g)
    b = torch.tanh(2 * z @ wb) + noise * torch.randn(n, dim, generator=g)
    return a.contiguous(), b.contiguous()


def write_shard(bin_path, a, b, folder):
    """The task as a Tessera shard (via .npy files and `tessera data import`)."""
    import numpy as np

    pa, pb = os.path.join(folder, "a.npy"), os.path.join(folder, "b.npy")
    np.save(pa, a.numpy().astype(np.float32))
    np.save(pb, b.numpy().astype(np.float32))
    shard = os.path.join(folder, "train.shard")
    cmd = [bin_path, "data", "import", "--a", pa, "--b", pb, "--out", shard,
           "--provenance", "scripts/bench_torch_train.py make_task"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_torch_train: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return shard


def run_steps(a):
    """--steps rounded up to whole blocks, at least two."""
    return max(-(-a.steps // BLOCK) * BLOCK, 2 * BLOCK)


def block_stats(block_ms):
    """{ms_median, ms_min: of the blocks after the first; ms_mean: of all} in ms/step. On a
    busy machine the fastest block is the one least disturbed by other work."""
    tail = block_ms[1:] if len(block_ms) > 1 else block_ms
    return {"ms_median": statistics.median(tail), "ms_min": min(tail),
            "ms_mean": statistics.fmean(block_ms)}


def torch_run(a, dev, task):
    torch.manual_seed(a.seed)
    model = DualEncoder().to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": 1e-4},
                           {"params": rest, "weight_decay": 0.0}], lr=0.5, momentum=0.9)
    data_a, data_b = (x.to(dev) for x in task)
    n = data_a.shape[0]
    t_max = math.log(100.0)
    steps = run_steps(a)
    perm, row = torch.randperm(n, device=dev), 0
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    block_ms, loss = [], None
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        if row + a.batch > n:
            perm, row = torch.randperm(n, device=dev), 0
        idx = perm[row:row + a.batch]
        row += a.batch
        lr = lr_at(step, 0.5, 20, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        fa, fb, scale = model(data_a[idx], data_b[idx])
        loss = clip_loss(fa, fb, scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.t.clamp_(max=t_max)
        if (step + 1) % BLOCK == 0:
            sync()
            t1 = time.perf_counter()
            block_ms.append((t1 - t0) * 1e3 / BLOCK)
            t0 = t1
            if step + 1 == BLOCK:
                c0 = time.process_time()
    # CPU time of this process (all its threads) per step after the first block.
    cpu_ms = (time.process_time() - c0) * 1e3 / (steps - BLOCK)
    return {"impl": "torch-eager", **block_stats(block_ms), "cpu_ms": cpu_ms, "steps": steps,
            "params": n_params, "final_loss": loss.item()}


def tessera_run(a, out_dir, shard):
    """One `tessera run --nproc 1` at the same batch and threads; ms/step from metrics.jsonl."""
    steps = run_steps(a)
    def cmd_for(n):
        return [a.compare, "run", "--nproc", "1",
                "--set", "data.source=shards", "--set", f"data.train={shard}",
                "--set", f"data.eval={shard}", "--set", "eval.max_examples=1000",
                "--set", f"run.steps={n}", "--set", "run.eval_every=0",
                "--set", f"run.log_every={BLOCK}", "--set", f"run.threads={a.threads}",
                "--set", f"batch.global={a.batch}", "--set", "checkpoint.enabled=false",
                "--set", f"run.out_dir={out_dir}",
                # The same device as the PyTorch side: on CUDA the model, the fused loss and
                # the optimizer run on the GPU (docs/GPU.md).
                "--set", f'run.device="{a.device}"']

    cpu_s = []
    # The short run (BLOCK steps) first: its CPU time (launcher, coordinator, start-up, one
    # block, the final evaluation) taken from the full run's leaves the steps after the first
    # block, as on the PyTorch side.
    for n in (BLOCK, steps):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        cmd = cmd_for(n)
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if r.returncode != 0:
            sys.exit(f"bench_torch_train: {' '.join(cmd)} failed ({r.returncode}):\n"
                     f"{r.stderr[-2000:]}")
        cpu_s.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    cpu_ms = max(0.0, cpu_s[1] - cpu_s[0]) * 1e3 / (steps - BLOCK)
    points = [(0, 0.0)]
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            m = json.loads(line)
            if "samples_per_s" in m and m.get("step", 0) % BLOCK == 0:
                points.append((m["step"], m["samples"] / m["samples_per_s"]))
    if len(points) < 3:
        sys.exit(f"bench_torch_train: {out_dir}/metrics.jsonl has too few samples_per_s lines")
    block_ms = [(t1 - t0) * 1e3 / (s1 - s0)
                for (s0, t0), (s1, t1) in zip(points, points[1:])]
    n_params = os.path.getsize(os.path.join(out_dir, "params.f32")) // 4
    final = None
    for line in r.stdout.splitlines():
        if line.startswith("{") and '"train_seconds"' in line:
            final = json.loads(line).get("loss")
    return {"impl": "tessera", **block_stats(block_ms), "cpu_ms": cpu_ms, "steps": steps,
            "params": n_params, "final_loss": final}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads for torch (torch.set_num_threads) and run.threads "
                        "for Tessera")
    p.add_argument("--batch", type=int, default=512,
                   help="rows per step (512: the default job's global batch, the per-rank "
                        "batch of --nproc 1)")
    p.add_argument("--steps", type=int, default=300, help="steps per timed run")
    p.add_argument("--seed", type=int, default=1,
                   help="torch init and batch order (some seeds collapse the temperature "
                        "on this task at lr 0.5, in Tessera too (its seed 2); 1 does not)")
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls")
    p.add_argument("--compare", default=None, metavar="TESSERA_BIN",
                   help="also time `TESSERA_BIN run --nproc 1`, alternating (CPU only)")
    p.add_argument("--rounds", type=int, default=3, help="alternations with --compare")
    p.add_argument("--json", default=None, help="also write the rows as JSON lines here")
    p.add_argument("--malloc-keep", action="store_true",
                   help="run both sides with glibc's malloc told to keep freed memory "
                        f"(GLIBC_TUNABLES={KEEP_TUNABLES}): no per-step page faults from "
                        "activation buffers returned to the kernel and faulted in again")
    a = p.parse_args()
    if a.malloc_keep and os.environ.get("GLIBC_TUNABLES") != KEEP_TUNABLES:
        # glibc reads its tunables at process start: run this script again with them set (the
        # Tessera processes it starts inherit them).
        env = dict(os.environ, GLIBC_TUNABLES=KEEP_TUNABLES)
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    if a.threads < 1 or not 2 <= a.batch <= TASK_ROWS or a.steps < 1 or a.rounds < 1:
        sys.exit(f"--threads and --rounds must be >= 1, --batch in 2..={TASK_ROWS}, "
                 f"--steps >= 1")
    if a.device == "cuda" and not torch.cuda.is_available():
        print("torch: no CUDA device", file=sys.stderr)
        return 1
    if a.compare and not (os.path.isfile(a.compare) and os.access(a.compare, os.X_OK)):
        sys.exit(f"--compare {a.compare}: not an executable (build: cargo build --release "
                 f"-p tessera-launch)")
    torch.set_num_threads(a.threads)
    torch.backends.cuda.matmul.allow_tf32 = a.tf32
    torch.backends.cudnn.allow_tf32 = a.tf32
    dev = torch.device(a.device)
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"cpu, {a.threads} thread(s)"
    if a.malloc_keep:
        where += ", malloc keeps freed memory"
    print(f"default dual encoder, batch {a.batch}, {run_steps(a)} steps per run, "
          f"torch {torch.__version__} on {where}; ms/step of {BLOCK}-step blocks after the first: "
          f"median / fastest (mean of all); CPU ms/step of all threads and processes")
    rows = []
    task = make_task()
    with tempfile.TemporaryDirectory(prefix="tessera-train-bench-") as tmp:
        shard = write_shard(a.compare, *task, tmp) if a.compare else None
        for rnd in range(a.rounds if a.compare else 1):
            got = []
            if a.compare:
                got.append(tessera_run(a, os.path.join(tmp, f"run{rnd}"), shard))
            got.append(torch_run(a, dev, task))
            line = [f"round {rnd + 1}:"]
            for r in got:
                r.update({"round": rnd + 1, "batch": a.batch, "threads": a.threads,
                          "device": a.device, "malloc_keep": a.malloc_keep})
                rows.append(r)
                line.append(f"{r['impl']} {r['ms_median']:.3f} / {r['ms_min']:.3f} "
                            f"({r['ms_mean']:.3f}) ms/step, cpu {r['cpu_ms']:.3f} ms, "
                            f"loss {r['final_loss']:.3f}")
            if len(got) == 2:
                line.append("torch/tessera " + " / ".join(
                    f"{got[1][k] / got[0][k]:.2f}x" for k in ("ms_median", "ms_min", "cpu_ms")))
                if got[0]["params"] != got[1]["params"]:
                    sys.exit(f"parameter counts differ: tessera {got[0]['params']}, torch "
                             f"{got[1]['params']}: the re-implementation no longer matches the "
                             f"default model")
            print("  ".join(line), flush=True)
    if a.compare:
        for key, what in (("ms_median", "median blocks"), ("ms_min", "fastest blocks"),
                          ("cpu_ms", "CPU time per step")):
            ratios = [t[key] / s[key] for s, t in zip(rows[0::2], rows[1::2])]
            print(f"Tessera throughput / PyTorch eager, {what}: median "
                  f"{statistics.median(ratios):.2f}x over {len(ratios)} rounds (each: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)})")
        print(f"parameters: {rows[0]['params']} in both")
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
