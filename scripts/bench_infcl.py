#!/usr/bin/env python3
"""inf-cl (PyPI inf-cl 1.2.1, Triton kernels) CLIP loss, forward + backward, on one GPU: the peer
that `tessera cuda bench-loss` is compared against (issue 7). Same harness, columns and JSON
rows as scripts/bench_torch_clip.py.

The loss is the symmetric CLIP loss built from inf-cl's public `cal_inf_loss(q, k, labels,
scale, head_dim)`, which computes one direction (rows of q against all of k) as the Inf-CLIP
training code uses it: 0.5 * (cal_inf_loss(img, txt) + cal_inf_loss(txt, img)). Without
torch.distributed it runs the single-GPU tiled kernels (`_flash_prob_forward/backward`).
head_dim is 256 (inf-cl's default; d must be a multiple of it: 512 and 768 are). Before timing
it checks the loss and both gradients against the naive loss at B = 2048 (exit 1 on a gross
mismatch). On a CPU, in Triton's interpreter, the forward of this combination matched the
naive loss to 1e-6 (B = 64..200, d = 256..768); the backward uses inline PTX and cannot run
there. inf-cl casts
its inputs to fp32 itself (`.float()`), so `--dtype bf16` means bf16 features in and out, fp32
inside; Triton's `tl.dot` on fp32 uses TF32 tensor cores (its default). The logit scale is
passed as a constant: inf-cl's gradient of a learnable scale needs an initialised process group
(it all-reduces it), and that gradient is one B x d dot product.

If `inf_cl` is not importable, the wheel is installed from target/peer-wheels/ (made by
scripts/fetch-peer-wheels.sh and carried to the GPU machine, see docs/GPU.md) with
`pip install --no-deps --no-index --target <tmp>`; it needs torch, triton and numpy already
installed.

Usage: bench_infcl.py --batch 16384,65536,262144 --dim 512,768 --dtype fp32,bf16 [--reps 5]
                      [--json out.jsonl] [--wheels target/peer-wheels]"""
import argparse
import atexit
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_torch_clip as harness  # noqa: E402  (same folder, after the path)
import torch

INFCL_VERSION = "1.2.1"


def import_infcl(wheels):
    """Imports inf_cl, installing the pinned wheel from `wheels` into a temporary folder first if
    needed. Returns the module, or exits with a message that names the fix."""
    try:
        import inf_cl

        return inf_cl
    except ImportError:
        pass
    found = sorted(glob.glob(os.path.join(wheels, f"inf_cl-{INFCL_VERSION}-*.whl")))
    if not found:
        sys.exit(f"bench_infcl: inf_cl is not installed and {wheels} holds no "
                 f"inf_cl-{INFCL_VERSION} wheel: run scripts/fetch-peer-wheels.sh on a machine "
                 f"with PyPI and carry target/peer-wheels to this one (docs/GPU.md)")
    target = tempfile.mkdtemp(prefix="tessera-infcl-")
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
           "--target", target, found[-1]]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if r.returncode != 0:
        # A pure-Python wheel is a zip of the installed files: without a working pip, unpack it.
        print(f"bench_infcl: {' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-500:]}; "
              f"unpacking the wheel instead", file=sys.stderr)
        try:
            with zipfile.ZipFile(found[-1]) as z:
                z.extractall(target)
        except (OSError, zipfile.BadZipFile) as e:
            sys.exit(f"bench_infcl: cannot unpack {found[-1]}: {e} (run "
                     f"scripts/fetch-peer-wheels.sh again to re-download and check it)")
    sys.path.insert(0, target)
    try:
        import inf_cl
    except ImportError as e:
        sys.exit(f"bench_infcl: installed {found[-1]} into {target} but importing it failed: "
                 f"{e} (inf-cl needs triton and numpy installed for this python)")
    print(f"bench_infcl: installed {os.path.basename(found[-1])} into {target}", file=sys.stderr)
    return inf_cl


def check_against_naive(loss_fn, scale, head_dim, b=2048, device="cuda"):
    """Before timing: the loss and both feature gradients of `loss_fn` against the naive fp32
    loss (TF32 off) at B = 2048, d = 2·head_dim. inf-cl's tiles use TF32, so they differ by
    about 1e-3; a gross difference means the timed function is not the CLIP loss."""
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(2)
    d = 2 * head_dim
    f = torch.nn.functional
    # Image features bunched around one direction, text features spread, each text near its
    # image: the two directions of the loss differ, so a one-directional loss fails the check.
    common = torch.randn(1, d, device=dev, generator=g)
    x = f.normalize(torch.randn(b, d, device=dev, generator=g) + 2 * common, dim=1)
    y = f.normalize(x + torch.randn(b, d, device=dev, generator=g), dim=1)
    img, txt = x.requires_grad_(True), y.requires_grad_(True)
    labels = torch.arange(b, device=dev)
    got = loss_fn(img, txt, labels, scale)
    got.backward()
    gi, gt = img.grad.clone(), txt.grad.clone()
    img.grad = txt.grad = None
    want = harness.naive_clip(img, txt, labels, scale)
    want.backward()
    e_loss = abs(got.item() - want.item()) / abs(want.item())
    e_img = ((gi - img.grad).norm() / img.grad.norm()).item()
    e_txt = ((gt - txt.grad).norm() / txt.grad.norm()).item()
    ok = e_loss < 1e-2 and e_img < 0.1 and e_txt < 0.1
    print(f"check vs naive fp32 at B={b}, d={d}: loss {got.item():.6f} vs {want.item():.6f} "
          f"(rel {e_loss:.1e}), d_img rel {e_img:.1e}, d_txt rel {e_txt:.1e}: "
          f"{'ok' if ok else 'MISMATCH (limits 1e-2 loss, 0.1 gradients)'}")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    harness.common_args(p)
    p.add_argument("--head-dim", type=int, default=256,
                   help="inf-cl's head_dim (16..256, must divide d)")
    p.add_argument("--wheels", default=os.path.join(HERE, "..", "target", "peer-wheels"),
                   help="folder with the inf-cl wheel (scripts/fetch-peer-wheels.sh)")
    a = p.parse_args()
    batches = harness.parse_list(a.batch, int, "batch")
    dims = harness.parse_list(a.dim, int, "dim")
    dtypes = harness.parse_dtypes(a.dtype)
    bad = [d for d in dims if d % a.head_dim]
    if bad:
        sys.exit(f"--dim {bad}: inf-cl needs d to be a multiple of --head-dim {a.head_dim}")
    # Imported (installed) first, so that a machine without a GPU still checks the wheel.
    infcl = import_infcl(os.path.normpath(a.wheels))
    version = getattr(infcl, "__version__", INFCL_VERSION)
    if a.device != "cuda" or not torch.cuda.is_available():
        print(f"bench_infcl: inf-cl {version} imports from {os.path.dirname(infcl.__file__)}; "
              f"its Triton kernels need a CUDA device and torch sees none", file=sys.stderr)
        return 1
    scale_t = {}

    def loss_fn(img, txt, labels, scale):
        # inf-cl wants the scale as a tensor (it passes it through an autograd Function); made
        # once, outside the timed region's host-to-device copies.
        s = scale_t.get(scale)
        if s is None:
            s = scale_t[scale] = torch.tensor(scale, device=img.device)
        return 0.5 * (infcl.cal_inf_loss(img, txt, labels=labels, scale=s, head_dim=a.head_dim)
                      + infcl.cal_inf_loss(txt, img, labels=labels, scale=s, head_dim=a.head_dim))

    if not check_against_naive(loss_fn, a.scale, a.head_dim):
        return 1
    harness.header(f"inf-cl {version} (torch {torch.__version__}) on "
                   f"{torch.cuda.get_device_name()}: symmetric CLIP loss fwd+bwd, "
                   f"median of {a.reps}")
    rows = harness.bench_grid("infcl", loss_fn, batches, dims, dtypes, a.reps, a.warmup, a.scale)
    harness.write_json(a.json, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
