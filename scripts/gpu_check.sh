#!/usr/bin/env bash
# One prepared check of the suite on a GPU machine, in under 11 minutes:
#   1. install (skipped when the suite already imports; offline from wheels in .whl/ when present)
#   2. the GPU: name, memory, a bf16 matmul
#   3. experiment=smoke with trainer=gpu (bf16-mixed): base stage + 2-task stream end to end on the GPU, under
#      SFT and under GRPO (rollouts, reference model and evaluation on the GPU); a SIGKILL-and-resume
#      comparison on the GPU (checkpoints holding CUDA tensors and CUDA RNG states)
#      and with trainer=fsdp on the one GPU (the FSDP2 path: sharded copy per fit, NCCL, bf16 autocast);
#      GRPO with rollout_backend=vllm when vLLM is installed (otherwise the step says it is skipped)
#   4. scripts/bench_scale.py for a ~0.5B-parameter random-weight Qwen2 (Qwen2.5-0.5B's shape): SFT and GRPO
#      tokens/s and MFU against the bf16 matmul peak measured in the same run
#   5. scripts/real_check.py: experiment=real_math_grpo (GSM8K -> MATH fixture rows, 512-token rollouts, the
#      harness probe) on a random Qwen2.5-0.5B-shaped model, with vLLM rollouts and evaluation when installed:
#      train/eval seconds, the evaluation share and generated tokens/s
# usage: bash scripts/gpu_check.sh [--dry-run] [OUT_DIR]     (OUT_DIR default: $OUT or ./gpu_check_out)
set -uo pipefail
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_DIR=${1:-${OUT:-gpu_check_out}}
PY=${PYTHON:-python3}
STATUS=0

step() {  # step NAME TIMEOUT_S CMD...: run (or, with --dry-run, print) one timed step, keep going on failure
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*"
    [ $DRY = 1 ] && return 0
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" = 0 ] || STATUS=1
    return 0
}

mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ $DRY = 0 ] && ! $PY -c "import cl.run" 2>/dev/null; then
    if [ -d .whl ]; then
        echo "== install: wheels from .whl/ (offline)"
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/cl-site .whl/*.whl || exit 2
        export PYTHONPATH="$PYTHONPATH:/tmp/cl-site"
    else
        echo "== install: pip install -e ."
        $PY -m pip install -q -e . || exit 2
    fi
    $PY -c "import cl.run" || { echo "error: the suite does not import after installing"; exit 2; }
fi
if [ $DRY = 0 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: no CUDA GPU visible to torch; this check needs one (scripts/bench_scale.py runs on CPUs)"
    exit 3
fi
[ $DRY = 0 ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

step smoke_sft 75 $PY -m cl.run experiment=smoke trainer=gpu logger=none \
    "hydra.run.dir=$OUT_DIR/smoke_sft" "cache_dir=$OUT_DIR/cache"
step smoke_grpo 45 $PY -m cl.run experiment=smoke trainer=gpu logger=none objective=grpo objective.group_size=4 \
    stream.steps_per_task=10 "hydra.run.dir=$OUT_DIR/smoke_grpo" "cache_dir=$OUT_DIR/cache"
step smoke_fsdp 45 $PY -m cl.run experiment=smoke trainer=fsdp trainer.devices=1 logger=none objective=grpo \
    objective.group_size=4 stream.steps_per_task=10 "hydra.run.dir=$OUT_DIR/smoke_fsdp" "cache_dir=$OUT_DIR/cache"
if [ $DRY = 1 ] || $PY -c "import vllm" 2>/dev/null; then
    step vllm_rollouts 45 $PY -m cl.run experiment=smoke trainer=gpu logger=none objective=grpo objective.group_size=4 \
        objective.rollout_backend=vllm stream.steps_per_task=10 "hydra.run.dir=$OUT_DIR/vllm" "cache_dir=$OUT_DIR/cache"
else
    echo "== vllm_rollouts: skipped (vLLM is not installed here)"
fi
step resume 80 $PY scripts/resume_check.py "$OUT_DIR/resume" experiment=smoke trainer=gpu logger=none \
    stream.steps_per_task=40 checkpoint.every_n_steps=7 eval.every_n_steps=10 "cache_dir=$OUT_DIR/cache"
step scale_qwen0.5b 160 $PY scripts/bench_scale.py --device cuda --precision bf16-mixed --sizes qwen0.5b \
    --parts sft,grpo --batch-size 16 --seq-len 512 --steps 10 --warmup 3 --prompts 16 --group 8 --new-tokens 64 \
    --json "$OUT_DIR/scale.json"
VLLM_FLAGS=""
if [ $DRY = 0 ] && $PY -c "import vllm" 2>/dev/null; then VLLM_FLAGS="--rollouts vllm --eval-backend vllm"; fi
step real_math 150 $PY scripts/real_check.py --size 0.5b --device cuda --steps 4 $VLLM_FLAGS --out "$OUT_DIR/real"
[ $DRY = 0 ] && echo "== gpu_check: $([ $STATUS = 0 ] && echo passed || echo FAILED) in $SECONDS s"
exit $STATUS
