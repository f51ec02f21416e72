#!/usr/bin/env python3
"""Naive PyTorch CLIP loss (full B x B logits), forward + backward: the baseline that
`tessera cuda bench-loss` is compared against in scripts/gpu-check.sh.

fp32: features, logits and the softmax in fp32 with TF32 off. bf16: features in bf16, the
logit GEMM in bf16 (fp32 accumulation in cuBLAS), the logits upcast to fp32 for the
cross-entropy (what torch.autocast does for a bf16 CLIP model).

Usage: bench_torch_clip.py --batch 4096,16384 --dim 512 [--dtype fp32,bf16] [--reps 5]
                           [--json out.jsonl]
Prints one line per size; OOM is reported, not raised. Columns: B, d, dtype, median ms of
forward + backward (CUDA events, after --warmup untimed runs), peak MiB
(torch.cuda.max_memory_allocated, reset per size, inputs included), ws MiB (peak minus what the
input features hold: the loss's own memory, gradients of the features included, comparable with
Tessera's workspace), the loss, the implementation.

scripts/bench_infcl.py times inf-cl with the same harness (`bench_grid`)."""
import argparse
import gc
import json
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_list(text, kind, what):
    """'16384,65536' -> [16384, 65536]; exits with a message naming the flag on bad input."""
    try:
        vals = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sys.exit(f"--{what} {text!r}: expected comma-separated values")
    if not vals:
        sys.exit(f"--{what} is empty")
    return vals


def parse_dtypes(text):
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad or not names:
        sys.exit(f"--dtype {text!r}: expected a comma-separated subset of {','.join(DTYPES)}")
    return names


def is_oom(err):
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def header(title):
    print(title)
    print(f"{'B':>8} {'d':>5} {'dtype':<5} {'ms(med)':>10} {'ms(min)':>10} {'peak MiB':>10} "
          f"{'ws MiB':>10} {'loss':>12}  impl")


class Timer:
    """CUDA events on a GPU; on the CPU (a dry run of the harness) wall time, no memory."""

    def __init__(self, dev):
        self.cuda = dev.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def allocated(self):
        return torch.cuda.memory_allocated() if self.cuda else 0

    def reset_peak(self):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak(self):
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def time_ms(self, fn):
        if not self.cuda:
            t0 = time.perf_counter()
            out = fn()
            return out, (time.perf_counter() - t0) * 1e3
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        out = fn()
        e.record()
        e.synchronize()
        return out, s.elapsed_time(e)

    def release(self):
        if self.cuda:
            torch.cuda.empty_cache()


def mib(x):
    return f"{x:>10.1f}" if x is not None else f"{'-':>10}"


def bench_grid(impl, loss_fn, batches, dims, dtypes, reps, warmup, scale, device="cuda"):
    """Times `loss_fn(img, txt, labels, scale) -> scalar` forward + backward for every
    (B, d, dtype) on unit-norm random features; returns the JSON rows."""
    dev = torch.device(device)
    timer = Timer(dev)
    rows = []
    for b in batches:
        for d in dims:
            for dt in dtypes:
                name = f"{impl}-{dt}"
                img = txt = labels = loss = step = None
                try:
                    g = torch.Generator(device=dev).manual_seed(1)
                    f = torch.nn.functional
                    img = f.normalize(torch.randn(b, d, device=dev, generator=g), dim=1)
                    txt = f.normalize(torch.randn(b, d, device=dev, generator=g), dim=1)
                    img = img.to(DTYPES[dt]).requires_grad_(True)
                    txt = txt.to(DTYPES[dt]).requires_grad_(True)
                    labels = torch.arange(b, device=dev)

                    def step(img=img, txt=txt, labels=labels):
                        img.grad = None
                        txt.grad = None
                        out = loss_fn(img, txt, labels, scale)
                        out.backward()
                        return out

                    for _ in range(max(1, warmup)):
                        loss = step()
                    img.grad = txt.grad = None
                    loss = None
                    timer.sync()
                    base = timer.allocated()
                    timer.reset_peak()
                    times = []
                    for _ in range(max(1, reps)):
                        loss, ms = timer.time_ms(step)
                        times.append(ms)
                    times.sort()
                    med = times[len(times) // 2]
                    peak = timer.peak()
                    peak, ws = (None, None) if peak is None else (peak / 2**20,
                                                                  (peak - base) / 2**20)
                    row = {"b": b, "d": d, "dtype": dt, "impl": name, "ms_median": med,
                           "ms_min": times[0], "peak_mib": peak, "ws_mib": ws,
                           "loss": loss.item()}
                    print(f"{b:>8} {d:>5} {dt:<5} {med:>10.3f} {times[0]:>10.3f} {mib(peak)} "
                          f"{mib(ws)} {loss.item():>12.6f}  {name}")
                except (RuntimeError, MemoryError) as err:
                    if not is_oom(err):
                        raise
                    row = {"b": b, "d": d, "dtype": dt, "impl": name, "oom": True}
                    print(f"{b:>8} {d:>5} {dt:<5} {'OOM':>10} {'':>10} {'':>10} {'':>10} "
                          f"{'':>12}  {name}")
                rows.append(row)
                img = txt = labels = loss = step = None
                gc.collect()
                timer.release()
    return rows


def write_json(path, rows):
    if path:
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def naive_clip(img, txt, labels, scale):
    logits = (scale * img @ txt.t()).float()
    ce = torch.nn.functional.cross_entropy
    return 0.5 * (ce(logits, labels) + ce(logits.t(), labels))


def common_args(p):
    p.add_argument("--batch", default="16384", help="comma-separated B")
    p.add_argument("--dim", default="512", help="comma-separated d")
    p.add_argument("--dtype", default="fp32", help="comma-separated: fp32, bf16")
    p.add_argument("--reps", type=int, default=5, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before timing")
    p.add_argument("--scale", type=float, default=14.3, help="logit scale s")
    p.add_argument("--json", default=None, help="also write the rows as JSON lines here")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: a dry run of the harness (wall time, no memory figures)")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    a = p.parse_args()
    batches = parse_list(a.batch, int, "batch")
    dims = parse_list(a.dim, int, "dim")
    dtypes = parse_dtypes(a.dtype)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("torch: no CUDA device", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    header(f"torch {torch.__version__} on {device_name(a.device)}: naive CLIP loss "
           f"fwd+bwd, TF32 off, median of {a.reps}")
    rows = bench_grid("torch-naive", naive_clip, batches, dims, dtypes, a.reps, a.warmup,
                      a.scale, a.device)
    write_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
