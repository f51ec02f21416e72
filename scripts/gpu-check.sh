#!/usr/bin/env bash
# The one script a GPU session runs (issue 7): library discovery, the NVRTC kernel check, the
# GPU self-test (every kernel vs the CPU device and an f64 reference, cuBLAS, the fused CLIP
# loss vs the CPU tiled loss, every NCCL collective at world size 1), the NCCL all-reduce
# bandwidth over every GPU of the machine (raw NCCL vs Tessera's NcclComm), training on the GPU
# against the CPU (scripts/gpu-train-check.sh; with several GPUs also one rank per GPU over
# NCCL), a timing of the fused loss (every
# precision, bf16 included) against a naive PyTorch CLIP loss, and the peers: inf-cl (its wheel
# carried in target/peer-wheels, see docs/GPU.md), the naive loss in bf16, and the default
# model's training step in PyTorch eager. Our bf16 loss runs at every size where inf-cl and the
# naive loss run in bf16 (B = 16k, 64k; d = 512, 768).
# Every step has a timeout; the whole run stays well under 6 minutes.
# Prints a short table last. Logs and JSON go to a temporary folder (named in the table); with
# $OUT set, they are packed there as one archive, gpu-check.tar.gz (the device tool brings back
# only a few files).
#
# Usage: scripts/gpu-check.sh [path-to-tessera-binary]   (default target/release/tessera)
# The binary is a prebuilt x86-64 release build (the GPU machine has no Rust toolchain).
set -uo pipefail
cd "$(dirname "$0")/.."

bin="${1:-target/release/tessera}"
[[ -x "$bin" ]] || { echo "gpu-check: $bin is not an executable (build: cargo build --release -p tessera-launch)" >&2; exit 2; }
out="$(mktemp -d)"
export PYTHONUNBUFFERED=1
summary=()
status=0

# All steps together stay under this many seconds (a step gets at most what is left).
deadline=$((SECONDS + ${GPU_CHECK_BUDGET_S:-330}))

# step NAME SECONDS CMD... (scripts/gpu-steps.sh)
source scripts/gpu-steps.sh

step version 10 "$bin" --version
step nvidia-smi 30 nvidia-smi
step probe 60 "$bin" cuda probe
step check-kernels 120 "$bin" cuda check-kernels --arch sm_80,sm_90 --resource-usage
step selftest 180 "$bin" cuda selftest --json "$out/selftest.json"
# All-reduce over every GPU (--world 0); with several, a 256 MiB size too, where bus bandwidth
# (issue 7's target: Tessera >= 0.97x raw NCCL) is near its peak.
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')
if ((gpus > 1)); then
    step nccl-bench 60 "$bin" cuda nccl-bench --world 0 --bytes 1M,64M,256M --iters 20 --warmup 5 --timeout-s 30 --json "$out/nccl-bench.jsonl"
else
    step nccl-bench 30 "$bin" cuda nccl-bench --world 0 --bytes 1M,64M --iters 20 --warmup 5 --timeout-s 20 --json "$out/nccl-bench.jsonl"
fi
step train-cuda 150 scripts/gpu-train-check.sh "$bin" "$out" 50
precs=fp32,tf32x3,tf32,bf16
step bench-loss 150 "$bin" cuda bench-loss --batch 4096,16384 --dim 512,768 --mode both --precision "$precs" --reps 5 --json "$out/bench-loss.jsonl"
step bench-loss-64k 120 "$bin" cuda bench-loss --batch 65536 --dim 512 --mode both --precision "$precs" --reps 2 --json "$out/bench-loss-64k.jsonl"
# Issue 7's target size, B = 64k, d = 768, which the steps above leave out: bf16 (what the peers'
# bf16 rows compare with) and tf32 (inf-cl computes its tiles in TF32 whatever the input type).
step bench-64k-768 60 "$bin" cuda bench-loss --batch 65536 --dim 768 --mode both --precision bf16,tf32 --reps 2 --json "$out/bench-64k-768.jsonl"
# SigLIP's GPU blocks (siglip_bwd*: the loss and both gradients in one pass) beside the fused
# CLIP loss, same sizes, same run: about 4/5 of CLIP's time deterministic, 3/4 fast if the
# kernels run as CLIP's backward does (GEMM-equivalents 4 vs 5 and 3 vs 4).
step bench-siglip 60 "$bin" cuda bench-loss --loss clip,siglip --batch 16384 --dim 768 --mode both --precision bf16,tf32 --reps 3 --json "$out/bench-siglip.jsonl"
if python3 -c "import torch" 2>/dev/null; then
    step bench-torch 120 python3 scripts/bench_torch_clip.py --batch 4096,16384,65536 --dim 512,768 --reps 5 --json "$out/bench-torch.jsonl"
fi
# Peers (issue 7): inf-cl 1.2.1 from the wheel carried in target/peer-wheels (docs/GPU.md), the
# naive PyTorch loss in bf16, and one training step of the default dual encoder in PyTorch eager
# against Tessera's on the GPU.
if python3 -c "import torch, triton" 2>/dev/null; then
    step bench-infcl 90 python3 scripts/bench_infcl.py --batch 16384,65536 --dim 512,768 --dtype fp32,bf16 --reps 3 --json "$out/bench-infcl.jsonl"
else
    summary+=("$(printf '%-14s %-12s %5ss' bench-infcl "NO-TRITON" 0)")
fi
if python3 -c "import torch" 2>/dev/null; then
    step torch-bf16 60 python3 scripts/bench_torch_clip.py --batch 16384,65536 --dim 512,768 --dtype bf16 --reps 3 --json "$out/torch-bf16.jsonl"
    # Tessera's GPU step (run.device = "cuda": model, fused loss, optimizer on the GPU) and
    # PyTorch eager's, alternating, same batch and data: the training-step target.
    step train-torch 90 python3 scripts/bench_torch_train.py --device cuda --steps 200 --compare "$bin" --rounds 2 --json "$out/train-torch.jsonl"
fi

echo
echo "=== selftest table"
sed -n '/^group /,/checks, .* failed$/p' "$out/selftest.log" 2>/dev/null
echo "=== NCCL all-reduce over $gpus GPU(s): raw NCCL vs Tessera's NcclComm (vs_raw: busbw ratio, algbw at world 1)"
sed -n '/^ *bytes path/,/^cuda nccl-bench/p' "$out/nccl-bench.log" 2>/dev/null
echo "=== training on the GPU(s) vs on the CPU"
grep -h '^train-check:' "$out/train-cuda.log" 2>/dev/null
echo "=== fused loss (tessera) vs naive PyTorch fp32, fwd+bwd ms (median)"
grep -hE '^ +[0-9]+ +[0-9]+ ' "$out/bench-loss.log" "$out/bench-loss-64k.log" "$out/bench-64k-768.log" 2>/dev/null
[[ -f "$out/bench-torch.log" ]] && grep -hE '^ +[0-9]+ +[0-9]+ ' "$out/bench-torch.log"
echo "=== peers: inf-cl 1.2.1 and naive PyTorch bf16, fwd+bwd ms (median), peak / workspace MiB"
grep -hE '^ +[0-9]+ +[0-9]+ ' "$out/bench-infcl.log" "$out/torch-bf16.log" 2>/dev/null
echo "--- tessera bf16 and tf32 at the same sizes (B d mode prec ms(med) ms(min) fwd(med) bwd(med) TFLOP/s ws MiB loss)"
grep -hE '^ +(16384|65536) +[0-9]+ +[a-z]+ +(bf16|tf32) ' "$out/bench-loss.log" "$out/bench-loss-64k.log" "$out/bench-64k-768.log" 2>/dev/null
echo "=== SigLIP's one pass beside CLIP, B = 16384, d = 768 (columns as bench-loss prints them, the last: clip or siglip)"
grep -hE '^ +[0-9]+ +[0-9]+ ' "$out/bench-siglip.log" 2>/dev/null
echo "=== training step, default dual encoder: Tessera (run.device = cuda) vs PyTorch eager on this GPU"
grep -hE '^(round |Tessera throughput)' "$out/train-torch.log" 2>/dev/null
echo "=== gpu-check summary (logs in $out)"
printf '%s\n' "${summary[@]}"
pack_logs gpu-check "$out"
[[ $status -eq 0 ]] && echo "gpu-check: PASS" || echo "gpu-check: FAIL"
exit $status
