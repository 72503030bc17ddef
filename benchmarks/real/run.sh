#!/usr/bin/env bash
# The SmolLM2-135M-Instruct run of BENCHMARKS.md ("Real model"): base eval, GRPO / RLSD / OPSD through `rlsd train`
# (full fine-tuning, same budget), evals after. Run from the repository root on 2 CPU cores:
#   bash benchmarks/real/run.sh && python benchmarks/real/collect.py && .venv/bin/rlsd bench report
# Round 1 (BENCHMARKS.md section 10): the defaults (STEPS=3, N=4, THREADS=2; results in benchmarks/real/).
# Round 2 (BENCHMARKS.md section 10, round 2): ROUND=round2 STEPS=60 N=8 THREADS=1, after diagnostics.py on
# 146 x 4 completions; results in benchmarks/real/round2/, then python benchmarks/real/collect.py --round round2.
# THREADS=1 keeps a step's time steady when another process shares the 2 cores (benchmarks/real/contention.py).
set -euo pipefail
ROOT=$(pwd)
RLSD=$ROOT/.venv/bin/rlsd
MODEL=$ROOT/runs/smollm2                   # rlsd model smollm2 --output runs/smollm2
DATA=$ROOT/runs/arith-add0                 # python benchmarks/real/make_arith.py --level add0 --out runs/arith-add0
ROUND=${ROUND:-}                            # sub-folder of benchmarks/real/ (and runs/real/) for a later round
OUT=$ROOT/runs/real${ROUND:+/$ROUND}
DEST=$ROOT/benchmarks/real${ROUND:+/$ROUND}
STEPS=${STEPS:-3}
N=${N:-4}                                   # held-out samples per problem
THREADS=${THREADS:-2}
TAG=${TAG:-}                                # e.g. TAG=-12 STEPS=12 METHODS="grpo rlsd": a second round
COMMON=(--system_prompt "" --instruction "Answer with the number.")
export OMP_NUM_THREADS=$THREADS
mkdir -p "$OUT" "$DEST/logs" "$DEST/runs"
cd "$ROOT/benchmarks/real"                  # real_reward.py is imported from the current folder
evaluate() {  # model name
  /usr/bin/time -f "%e s wall" nice -n 5 "$RLSD" eval --model "$2" --dataset "$DATA/test.jsonl" "${COMMON[@]}" \
    --reward real_reward.last_integer --n "$N" --max_new_tokens 48 --temperature 1.0 --seed 0 --batch_size 68 \
    --output "$OUT/eval-$1" --overwrite > "$DEST/logs/eval-$1.log" 2>&1
  cp "$OUT/eval-$1/summary.json" "$DEST/eval-$1.json"
}
[ -f "$DEST/eval-base.json" ] || evaluate base "$MODEL"
for METHOD in ${METHODS:-rlsd grpo opsd}; do
  /usr/bin/time -f "%e s wall" nice -n 5 "$RLSD" train --model_name_or_path "$MODEL" \
    --dataset_name "$DATA/train.jsonl" "${COMMON[@]}" --reward_funcs real_reward.last_integer \
    --output_dir "$OUT/$METHOD$TAG" --overwrite_output_dir true --credit "$METHOD" --teacher initial \
    --max_steps "$STEPS" --per_device_train_batch_size 8 --num_generations 4 --max_completion_length 48 \
    --learning_rate 1e-5 --use_cpu true --bf16 false --report_to none --logging_steps 1 --save_strategy no \
    --gradient_checkpointing false --seed 0 > "$DEST/logs/train-$METHOD$TAG.log" 2>&1 || echo "train $METHOD$TAG failed" >> "$DEST/logs/failures.txt"
  mkdir -p "$DEST/runs/$METHOD$TAG"
  python3 - "$DEST/logs/train-$METHOD$TAG.log" "$DEST/runs/$METHOD$TAG/log_history.json" <<'PY' || true
import ast, json, pathlib, re, sys
history = []
for line in pathlib.Path(sys.argv[1]).read_text(errors="replace").splitlines():
    match = re.search(r"(\{'.*\})\s*$", line)
    if match and ("'loss'" in match.group(1) or "train_runtime" in match.group(1)):
        row = ast.literal_eval(match.group(1))
        history.append({k: float(v) if isinstance(v, str) and re.fullmatch(r"[-+0-9.eE]+|nan|inf", v) else v
                        for k, v in row.items()})
pathlib.Path(sys.argv[2]).write_text(json.dumps(history, indent=1))
PY
  evaluate "$METHOD$TAG" "$OUT/$METHOD$TAG"
done
