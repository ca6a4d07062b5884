#!/usr/bin/env bash
# One command for a day with a GPU: everything that needs one, inside one 10-minute call.
#
#   bash gpu_day.sh            (from the repository root, on the GPU machine)
#
# Written for the lent machines' stack (torch 2.11 + CUDA 13, triton 3.6, numpy 2.5, no
# network) and an H100. Each part runs under `timeout` with its own budget (seconds below,
# ~9 minutes in all), so one part that hangs or overruns cannot take the rest with it; a part
# that fails is recorded and the next one runs. Writes, under results/ (RESULTS_DIR=...):
#   gpu_day_<date>.md          the summary: device, driver, torch/triton/numpy versions, date,
#                              each part's status, seconds, and the headline numbers
#   gpu_day_<date>/            every part's log and bench.py's JSON/Markdown
# Nothing here is a measurement until this script has run on a GPU; see README "GPU day".
set -u
cd "$(dirname "$0")"
DATE=$(date -u +%Y-%m-%d_%H%M)
RES=${RESULTS_DIR:-results}
OUT="$RES/gpu_day_$DATE"
SUMMARY="$RES/gpu_day_$DATE.md"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
PY=${PYTHON:-python3}
START=$(date +%s)

# budgets (s): the sum stays under 600 with room for start-up
B_ENV=20; B_TESTS=120; B_KERNEL=200; B_MODEL=90; B_MEMORY=60; B_GPT=45; B_VIT=45

{
  echo "# GPU day $DATE"
  echo
  echo "Command: \`bash gpu_day.sh\` at commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
  echo
} > "$SUMMARY"

part() {  # part NAME BUDGET CMD...: run, log, record status and seconds
  local name=$1 budget=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name (budget ${budget}s): $*"
  timeout --kill-after=10 "$budget" "$@" > "$OUT/$name.log" 2>&1
  local rc=$? t=$(( $(date +%s) - t0 ))
  local status=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="timed out"
  [ $rc -ne 0 ] && [ "$status" = ok ] && status="failed (rc $rc)"
  echo "| $name | $status | $t | \`$*\` |" >> "$OUT/parts.md"
  tail -n 15 "$OUT/$name.log"
}

# 1. the environment
part env "$B_ENV" bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; \
  $PY -c 'import torch, triton, numpy, platform; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__, \"numpy\", numpy.__version__, \"python\", platform.python_version()); p = torch.cuda.get_device_properties(0); print(p.name, p.multi_processor_count, \"SMs\", getattr(p, \"L2_cache_size\", 0) // 2**20, \"MiB L2\")'"

# 2. tests: the GPU tests compiled (not interpreted), then the CPU suite of the kernel, bench
#    and layers under the interpreter (the triton 3.6 + numpy 2.x interpreter path included)
part tests_gpu "$((B_TESTS * 2 / 3))" env TRITON_INTERPRET=0 $PY -m pytest -q -x tests/test_kernel.py -k "gpu or sm90" -p no:cacheprovider
part tests_cpu "$((B_TESTS / 3))" env TRITON_INTERPRET=1 OMP_NUM_THREADS=4 $PY -m pytest -q tests/test_kernel.py tests/test_dyt.py -k "not gpu and not sm90" -p no:cacheprovider

# 3. bench.py: kernel level (default: LLaMA-7B 4096^2 in bf16/fp32, ViT-B bf16; events + CUDA
#    graphs; copy ceilings; host cost), with the backward's pipelining depths 1 and 3 beside 2
part bench_kernel "$B_KERNEL" $PY bench.py --out "$OUT" --bwd-stages 1,3
# the paper's Table 7 (LLaMA 7B, bf16, one 4096-token sequence), 20 passes to fit the budget
part bench_model "$B_MODEL" $PY bench.py --model --out "$OUT" --passes 20 --warmup 2
part bench_memory "$B_MEMORY" $PY bench.py --memory --out "$OUT"

# 4. a few steps of each trainer on the GPU: bf16, torch.compile; the GPT also under FSDP2 at
# world size 1 (train_vit.py has no FSDP: ViTs up to L train with DDP, and it refuses --fsdp)
part train_gpt "$B_GPT" $PY train_gpt.py --norm dyt --dtype bf16 --compile --fsdp --max_steps 20 \
  --eval_interval 10 --log_interval 5 --out_dir "$OUT/gpt_dyt"
# no network there: a tiny random Fashion-MNIST-format set (the trainer's own IDX reader)
$PY - "$OUT/fmnist" <<'EOF'
import gzip, os, struct, sys
import numpy as np
d = sys.argv[1]; os.makedirs(d, exist_ok=True); rng = np.random.default_rng(0)
for stem, n in (("train", 2048), ("t10k", 512)):
    with gzip.open(os.path.join(d, f"{stem}-images-idx3-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, n, 28, 28) + rng.integers(0, 256, (n, 28, 28), dtype=np.uint8).tobytes())
    with gzip.open(os.path.join(d, f"{stem}-labels-idx1-ubyte.gz"), "wb") as f:
        f.write(struct.pack(">II", 0x801, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
EOF
part train_vit "$B_VIT" $PY train_vit.py --norm dyt --dtype bf16 --compile --max_steps 20 \
  --eval_interval 10 --log_interval 5 --data_dir "$OUT/fmnist" --out_dir "$OUT/vit_dyt"

# 5. the summary
{
  echo "## Environment"; echo; echo '```'; cat "$OUT/env.log"; echo '```'; echo
  echo "## Parts"; echo
  echo "| part | status | seconds | command |"; echo "|---|---|---|---|"; cat "$OUT/parts.md"; echo
  echo "Total: $(( $(date +%s) - START )) s."; echo
  echo "## Kernel level (bench.py), headline rows"; echo
  if ls "$OUT"/bench_*.md >/dev/null 2>&1; then
    f=$(ls "$OUT"/bench_*.md | grep -v -e model -e memory | head -1)
    [ -n "$f" ] && { grep -E "^\| (set|---)" "$f" | head -2; grep -E "^\| llama7b \| 4096x4096 \| bf16 " "$f"; echo; grep -E "^- host cost" "$f"; }
  fi
  echo; echo "## Model level (Table 7) and memory"; echo
  for f in "$OUT"/bench_model_*.md "$OUT"/bench_memory_*.md; do [ -f "$f" ] && { grep -E "^\|" "$f"; echo; }; done
  echo "## Trainers"; echo
  for n in train_gpt train_vit; do echo "$n:"; echo '```'; grep -iE "step|loss|error|Traceback" "$OUT/$n.log" | tail -n 6; echo '```'; done
} >> "$SUMMARY"
echo "wrote $SUMMARY and $OUT/"
