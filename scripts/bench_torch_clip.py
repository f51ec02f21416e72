#!/usr/bin/env python3
"""Naive PyTorch CLIP loss (full B x B logits), forward + backward, fp32 with TF32 off: the
baseline that `tessera cuda bench-loss` is compared against in scripts/gpu-check.sh.

Usage: bench_torch_clip.py --batch 4096,16384 --dim 512 [--reps 5] [--json out.jsonl]
Prints one line per size; OOM is reported, not raised."""
import argparse
import json
import sys

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", default="16384")
    p.add_argument("--dim", default="512")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--scale", type=float, default=14.3)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("torch: no CUDA device", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    rows = []
    print(f"{'B':>8} {'d':>5} {'ms(med)':>10} {'peak MiB':>10} {'loss':>12}  (torch {torch.__version__}, naive fp32)")
    for b in [int(x) for x in a.batch.split(",")]:
        for d in [int(x) for x in a.dim.split(",")]:
            g = torch.Generator(device=dev).manual_seed(1)
            try:
                img = torch.nn.functional.normalize(torch.randn(b, d, device=dev, generator=g), dim=1)
                txt = torch.nn.functional.normalize(torch.randn(b, d, device=dev, generator=g), dim=1)
                img.requires_grad_(True)
                txt.requires_grad_(True)
                labels = torch.arange(b, device=dev)

                def step():
                    img.grad = None
                    txt.grad = None
                    logits = a.scale * img @ txt.t()
                    loss = 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                                  + torch.nn.functional.cross_entropy(logits.t(), labels))
                    loss.backward()
                    return loss

                step()
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(max(1, a.reps)):
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    loss = step()
                    e.record()
                    e.synchronize()
                    times.append(s.elapsed_time(e))
                times.sort()
                med = times[len(times) // 2]
                peak = torch.cuda.max_memory_allocated() / 2**20
                row = {"b": b, "d": d, "impl": "torch-naive-fp32", "ms_median": med, "peak_mib": peak,
                       "loss": float(loss)}
                print(f"{b:>8} {d:>5} {med:>10.3f} {peak:>10.1f} {float(loss):>12.6f}")
            except torch.OutOfMemoryError:
                row = {"b": b, "d": d, "impl": "torch-naive-fp32", "oom": True}
                print(f"{b:>8} {d:>5} {'OOM':>10}")
            rows.append(row)
            img = txt = None
            torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
