#!/usr/bin/env bash
# The GPU check of issue 11, one script, under 8 minutes on one GPU (each step has its own time limit):
#  1. U-ViT-S/2 and DiT-S/2 training-step throughput and MFU in bf16, without and with torch.compile
#     (benchmarks/bench_backbones.py; the peak is measured by the script on 8192^2 bf16 matmuls);
#  2. the trainer for 300 steps launched by torchrun with one process (U-ViT-S/2 on the embedded digits, so no
#     download; train.precision=auto, which is bf16 on a GPU that has it). With one process the trainer joins no
#     process group and does not wrap the model in DDP (vitdiff.trainer._init_distributed): this checks the
#     torchrun launch path and the GPU precision choice, not gradient all-reduce.
# Results: experiments/results/gpu/*.json. Usage, from anywhere:  bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
OUT=experiments/results/gpu
mkdir -p "$OUT"

"$PYTHON" - > "$OUT/environment.json" <<'EOF'
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported()}, indent=1))
EOF
cat "$OUT/environment.json"

# 1. Throughput and MFU, bf16, ours alone (peers need diffusers; the ratios are the CPU benchmark's job).
for compile in "" "--compile"; do
  name="backbones_bf16${compile:+_compile}"
  timeout 170 "$PYTHON" benchmarks/bench_backbones.py --device cuda --models U-ViT-S/2 DiT-S/2 --precisions bf16 \
    --no-peers --batch 128 --rounds 5 --steps 10 --warmup 5 --peak-size 8192 --json $compile > "$OUT/$name.json"
  cat "$OUT/$name.json"
done

# 2. The trainer under torchrun, 300 steps.
run_dir="$(mktemp -d)"
timeout 120 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m vitdiff.trainer \
  experiments/cifar10_uvit_s2.yaml data.dataset=digits data.num_workers=2 steps=300 warmup_steps=50 \
  log_every=50 ckpt_every=300 sample_every=0 progress=false precision=auto "out_dir=$run_dir"
"$PYTHON" - "$run_dir/metrics.jsonl" > "$OUT/trainer_torchrun_300steps.json" <<'EOF'
import json, sys
print(json.dumps([json.loads(line) for line in open(sys.argv[1]) if line.strip()], indent=1))
EOF
cat "$OUT/trainer_torchrun_300steps.json"
rm -rf "$run_dir"
