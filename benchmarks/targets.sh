#!/usr/bin/env bash
# The measurements behind the GPU performance targets (docs/performance.md), in one go on one host
# with 4 GPUs: every comparison runs its baseline in the same launch, on the same cards.
#
#   bash benchmarks/targets.sh OUT_DIR                 # 4 GPUs, about 12 minutes on 4 x H200
#   SMOKE=1 bash benchmarks/targets.sh OUT_DIR         # CPU, tiny models, 2 processes: checks the script
#   ONLY="large large_compile" bash benchmarks/targets.sh OUT_DIR   # some steps only (names below)
#
# OUT_DIR gets one JSON per launch (named after its step) and log.txt. ONLY= splits the steps over
# several jobs where a job's time is limited.
set -uo pipefail
out=${1:?usage: targets.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
B=benchmarks/distill_throughput.py
launch() {  # N processes: accelerate on GPUs; on CPU accelerate would start one process, so torchrun
  local n=$1; shift
  if [ "${SMOKE:-0}" = 1 ]; then torchrun --standalone --nproc_per_node "$n" "$@"
  else accelerate launch --num_machines 1 --mixed_precision no --dynamo_backend no --num_processes "$n" "$@"; fi
}
if [ "${SMOKE:-0}" = 1 ]; then
  small=(--pair tiny --device cpu --micro-batch 2 --warmup 1 --steps 2 --timing-steps 1)
  large=("${small[@]}") large4=("${small[@]}") prof=("${small[@]}") gpus2="" gpus4="" n4=2 dpo=(--tiny --device cpu --workdir "$out/dpo_work" --sides distill)
else
  small=(--pair 0.3b-1.4b --micro-batch 4 8 --steps 20)
  prof=(--pair 0.3b-1.4b --micro-batch 4 --steps 6)
  large=(--pair 1b-7b --micro-batch 8 --warmup 2 --steps 6 --timing-steps 2)
  large4=(--pair 1b-7b --micro-batch 4 --warmup 2 --steps 6 --timing-steps 2)
  gpus2=0,1 gpus4=0,1,2,3 n4=4 dpo=()
fi
status=0
step() {  # name, visible devices, then the command
  local name=$1 devices=$2; shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  echo "=== $name $(date +%T)" | tee -a "$out/log.txt"
  if ! CUDA_VISIBLE_DEVICES=$devices "$@" >> "$out/log.txt" 2>&1; then
    echo "=== $name FAILED (see log.txt)" | tee -a "$out/log.txt"; status=1
  fi
}
# >= 3x the naive loop at the small pair, modes interleaved against drift
step small "$gpus2" launch 2 $B "${small[@]}" --modes naive replicated naive replicated --out "$out/small.json"
# DPO against TRL, same models and data, each side in its own launch
step dpo "$gpus2" python benchmarks/dpo.py --num-processes 2 "${dpo[@]}" --out "$out/dpo.json"
# the reward model against TRL's RewardTrainer, the same way
step reward "$gpus2" python benchmarks/reward.py --num-processes 2 "${dpo[@]}" --out "$out/reward.json"
# RLOO (the GRPO trainer with TRL's RLOO keys) against TRL's RLOOTrainer without vLLM, the same way
step rloo "$gpus2" python benchmarks/rloo.py --num-processes 2 "${dpo[@]}" --out "$out/rloo.json"
# compiled decoder layers, against the same launch's naive loop
step small_compile "$gpus2" launch 2 $B "${small[@]}" --modes naive replicated \
  --set student.compile=true teacher.compile=true --out "$out/small_compile.json"
# where ours spends the step on the GPU: torch.profiler's busy share and top kernels, mb 4
step small_profile "$gpus2" launch 2 $B "${prof[@]}" --modes replicated --profile "$out/profile" --out "$out/small_profile.json"
# >= 40% MFU at the large pair; the sharded teacher against the replicated one; the naive loop
step large "$gpus4" launch $n4 $B "${large[@]}" --modes replicated sharded naive --out "$out/large.json"
step large_compile "$gpus4" launch $n4 $B "${large[@]}" --modes replicated \
  --set student.compile=true teacher.compile=true --out "$out/large_compile.json"
# the sharded teacher's forward against the replicated one at micro-batch 4 as well, both pairs
step large_mb4 "$gpus4" launch $n4 $B "${large4[@]}" --modes replicated sharded --out "$out/large_mb4.json"
step small_sharded "$gpus2" launch 2 $B "${small[@]}" --modes replicated sharded --out "$out/small_sharded.json"
# weak scaling: the large pair on 2 GPUs, against `large` on 4
step large_2gpu "$gpus2" launch 2 $B "${large[@]}" --modes replicated --out "$out/large_2gpu.json"
grep -h '"summary"' -A12 "$out"/*.json 2>/dev/null | head -80
exit $status
