#!/usr/bin/env bash
# The GPU work of a session that is lent a GPU, in stages that each fit one device command (10 minutes).
# Run from the repository root on the GPU machine; results and logs go to $OUT (bench/results without it).
#
# A session has 15 device-minutes, the machine's start (1-2 minutes) included. Run `first`, then at once,
# while the machine is still warm, `second`; give the machine back after it. On the first H100 run
# (8759dcb) the old `first` took 163 s (the gpu tests 106 s) and `second` 41 s, so each stage now holds
# more; every step has its own timeout and the stage budget caps the whole.
#
#   bash bench/gpu_session.sh first   <sha>   (<= 450 s) install the checkout (no deps), the gpu-marked tests
#                                             (<= 230 s), bench/sampler.py --targets, bench/sampler_plans.py
#                                             (CAP and warps per batch size), then bench/decode.py for
#                                             7b+1.5b: base, rast-seq, rast, hf-rast at batch 1, 8, 32 and
#                                             128, base and rast profiled: every shape that issues 2 and 4 set
#                                             a target on; then base, rast and rast-spec at batch 1 and 32
#                                             again with LM-like logits (--logit-std 5), where the sampler
#                                             takes its one-read path as with real checkpoints (a round
#                                             samples γ + 1 times, so flat logits cost it most), rast
#                                             profiled at batch 32, where rast / hf-rast has a target
#   bash bench/gpu_session.sh second  <sha>   (<= 300 s) 14b+7b base and rast at batch 1 and 32, with the
#                                             large model in FP8 too (base-fp8, rast-fp8), and 32b+7b in
#                                             FP8 (its bf16 triple does not fit 80 GB), 7b+1.5b
#                                             rast-no-ahead, rast-unstacked and rast-spec at batch 1 and 32
#                                             (against first's rast rows: what async scheduling, the stacked
#                                             small models and a speculative round cost or buy; a round of
#                                             35 ms at batch 1 on the H100 at 8759dcb, profiled), then
#                                             bench/gemm.py, bench/attention.py and bench/layer_ops.py
#
# With more device time, the full suites:
#   bash bench/gpu_session.sh tests   <sha>            install the checkout (no deps), every gpu-marked test
#   bash bench/gpu_session.sh kernels <sha>            bench/attention.py, layer_ops.py, sampler.py,
#                                                      sampler_fastpath.py, logit_adjust.py, host_path.py
#   bash bench/gpu_session.sh decode  <sha> <pairing>  bench/decode.py --profile for one pairing (7b+1.5b, ...)
#   bash bench/gpu_session.sh unfused <sha> <pairing>  base and rast at batch 1 and 32 with --layer-ops torch
#   bash bench/gpu_session.sh skinny  <sha>            decode_linear="skinny" (rast_kernels.skinny_linear) against
#                                                      cuBLAS: its gpu tests, bench/gemm.py (impl skinny rows),
#                                                      7b+1.5b base and rast at batch 1 and 4 both ways
#   bash bench/gpu_session.sh throughput <sha>         bench/throughput.py --quick: 200 requests of 512 + 512 tokens
#   bash bench/gpu_session.sh moe     <sha>            the MoE tests (kernels, engine), bench/moe.py, then
#                                                      bench/decode.py for qwen3-30b-a3b+1.7b (Qwen3-30B-A3B
#                                                      steered by a Qwen3-1.7B pair): base and rast, its
#                                                      experts in bf16 and in FP8, batch 1 and 32
#   bash bench/gpu_session.sh lora    <sha>            bench/decode.py: 7b+1.5b against 7b+1.5b-lora (the RL
#                                                      model a rank-64 LoRA adapter sharing its base's weights),
#                                                      rast and rast-unstacked at batch 1 and 32, base once;
#                                                      bench/lora_kernel.py: the slot deltas alone, gathered
#                                                      against the torch path; bench/weight_sync.py: R's
#                                                      load_weights, sleep and wake_up against their copy
#                                                      floors; bench/lora_modules.py: 1-8 adapters chosen
#                                                      per request
#
# <sha> is the commit being measured (the copy of the tree there has no git metadata). Each stage writes
# one log, <stage>.log, plus the JSON/PNG of its benchmarks: at most 8 files, the most that come back
# (first and second write exactly 8: a benchmark added to either needs its files made room for).
set -uo pipefail

stage=${1:?stage: first | second | tests | kernels | decode | unfused | skinny | throughput | moe | lora}
export RAST_COMMIT=${2:?the commit being measured}
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # rast_kernels and bench even without the install
log="$out/$stage.log"
case "$stage" in first) default=450 ;; second) default=300 ;; *) default=570 ;; esac
budget=${STAGE_SECONDS:-$default}  # the whole stage, inside the device's 600 s per command
deadline=$((SECONDS + budget))
left() { local l=$((deadline - SECONDS)); echo $((l > 1 ? l : 1)); }  # timeout 0 would mean no limit
part() { local s=$(( $(left) * $1 / $2 )); echo $((s > 1 ? s : 1)); }  # a share of what is left, >= 1 s
upto() { local l; l=$(left); echo $((l < $1 ? l : $1)); }  # at most $1 s, and never past the deadline

{
  echo "stage $stage at commit $RAST_COMMIT"
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
  python3 -c "import torch, triton, transformers, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)"
  python3 -c "import setuptools; print('setuptools', setuptools.__version__)"
} 2>&1 | tee "$log"

install() {
  # pyproject's SPDX license string needs setuptools >= 77; an older image's builds this throwaway copy with
  # the license table it used to have (the same metadata), since the device cannot fetch a newer setuptools
  if ! python3 -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 77)"; then
    sed -i 's/^license = "\(.*\)"$/license = { text = "\1" }/' pyproject.toml
    echo "setuptools < 77: built with the license table" | tee -a "$log"
  fi
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee -a "$log"
  python3 -c "import rast_kernels, rast_engine; print('imports: ok')" 2>&1 | tee -a "$log"
}
gpu_tests() {  # the decode path first: the benchmarks after it mean nothing if it is wrong
  timeout "$1" python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors --durations=15 \
    tests/test_gpu_engine.py tests/test_layer_kernels.py tests/test_paged_attention.py tests/test_attention_backends.py \
    tests/test_sampler_params.py tests/test_sampler.py tests/test_sampler_triton_plans.py tests/test_sampler_verify.py \
    tests/test_sampler_proven_draw.py tests/test_logprobs.py tests/test_logits_processors.py \
    tests/test_speculative_graphs.py tests/test_structured.py tests/test_structured_speculative.py \
    tests/test_fp8_linear.py tests/test_fp8_models.py \
    tests/test_fp8_cast.py tests/test_fp8_kv_cache.py tests/test_fp8_kv_models.py tests/test_kv_sizing.py \
    tests/test_ops.py tests/test_sliding_window.py tests/test_moe_kernel.py tests/test_gpu_lora.py \
    tests/test_lora_slots_kernel.py tests/test_engine_release.py tests/test_sleep_mode.py \
    tests/test_weight_updates.py 2>&1 | tee -a "$log"
}
decode() {  # decode <seconds> <bench/decode.py arguments...>
  local seconds=$1
  shift
  timeout "$seconds" python3 bench/decode.py --quick --commit "$RAST_COMMIT" --out "$out" "$@" 2>&1 | tee -a "$log"
}

case "$stage" in
  first)
    install
    gpu_tests "$(upto 230)"
    timeout "$(upto 60)" python3 bench/sampler.py --targets --out "$out" 2>&1 | tee -a "$log"
    timeout "$(upto 120)" python3 bench/sampler_plans.py --out "$out" 2>&1 | tee -a "$log"
    decode "$(part 2 3)" --pairings 7b+1.5b --modes base rast-seq rast hf-rast --batches 1 8 32 128 \
      --profile --profile-modes base rast
    decode "$(left)" --pairings 7b+1.5b --modes base rast rast-spec --batches 1 32 --logit-std 5 \
      --name decode-peaked --profile --profile-modes rast --profile-batch 32
    ;;
  second)
    install
    # base-fp8 / rast-fp8: the large model's projections in FP8; 32B + Δ7B fits one 80 GB GPU only so
    # (its bf16 modes are skipped there for memory)
    decode "$(part 1 3)" --pairings 14b+7b 32b+7b --modes base rast base-fp8 rast-fp8 --batches 1 32 \
      --name decode-large
    decode "$(part 1 2)" --pairings 7b+1.5b --modes rast-no-ahead rast-unstacked rast-spec --batches 1 32 \
      --name decode-ab --profile --profile-modes rast-spec
    timeout "$(part 1 3)" python3 bench/gemm.py --out "$out" 2>&1 | tee -a "$log"
    timeout "$(part 2 3)" python3 bench/attention.py --out "$out" 2>&1 | tee -a "$log"
    timeout "$(left)" python3 bench/layer_ops.py --out "$out" 2>&1 | tee -a "$log"
    ;;
  tests)
    install
    gpu_tests "$(left)"
    ;;
  kernels)
    timeout "$(part 1 3)" python3 bench/attention.py --out "$out" 2>&1 | tee -a "$log"
    timeout "$(upto 90)" python3 bench/layer_ops.py --out "$out" 2>&1 | tee -a "$log"
    timeout "$(part 2 3)" python3 bench/sampler.py --out "$out" 2>&1 | tee -a "$log"
    timeout "$(part 1 2)" python3 bench/sampler_fastpath.py --out "$out" 2>&1 | tee -a "$log"
    timeout "$(upto 60)" python3 bench/logit_adjust.py --out "$out" 2>&1 | tee -a "$log"
    timeout "$(left)" python3 bench/host_path.py --out "$out" 2>&1 | tee -a "$log"  # compiles fp32 kernels
    ;;
  decode)
    pairing=${3:?pairing, e.g. 7b+1.5b}
    timeout "$(left)" python3 bench/decode.py --pairings "$pairing" --profile --commit "$RAST_COMMIT" \
      --out "$out" 2>&1 | tee -a "$log"
    ;;
  throughput)  # offline throughput, base vs rast, 200 requests of 512 + 512 tokens (a third session's stage)
    install
    timeout "$(left)" python3 bench/throughput.py --quick --range-ratio 0.5 --commit "$RAST_COMMIT" --out "$out" 2>&1 | tee -a "$log"
    ;;
  moe)  # a mixture of experts as the large model (a later session's stage)
    install
    timeout "$(upto 150)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_moe_kernel.py \
      tests/test_moe_engine.py tests/test_gpu_engine.py -k "moe or mixtral" 2>&1 | tee -a "$log"
    timeout "$(upto 90)" python3 bench/moe.py --out "$out" 2>&1 | tee -a "$log"
    decode "$(left)" --pairings qwen3-30b-a3b+1.7b --modes base rast base-fp8 rast-fp8 --batches 1 32 \
      --name decode-moe --profile --profile-modes rast
    ;;
  lora)  # what sharing the base's weights buys a LoRA RL model (a later session's stage)
    install
    decode "$(part 1 3)" --pairings 7b+1.5b --modes base rast rast-unstacked --batches 1 32 --name decode-lora-full
    decode "$(part 1 2)" --pairings 7b+1.5b-lora --modes rast rast-unstacked --batches 1 32 --name decode-lora \
      --profile --profile-modes rast
    timeout "$(upto 90)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu_lora.py \
      tests/test_lora_slots_kernel.py 2>&1 | tee -a "$log"
    timeout "$(upto 60)" python3 bench/lora_kernel.py --out "$out" 2>&1 | tee -a "$log"  # slot deltas alone
    timeout "$(upto 90)" python3 bench/weight_sync.py --out "$out" 2>&1 | tee -a "$log"  # an RL loop's syncs
    timeout "$(left)" python3 bench/lora_modules.py --out "$out" 2>&1 | tee -a "$log"  # adapters chosen per request
    ;;
  skinny)  # decode_linear="skinny" against cuBLAS: the kernel's numerics, the projections alone, then decode
    install
    timeout "$(upto 60)" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_skinny_linear.py 2>&1 \
      | tee -a "$log"
    timeout "$(upto 150)" python3 bench/gemm.py --out "$out" 2>&1 | tee -a "$log"
    decode "$(part 1 2)" --pairings 7b+1.5b --modes base rast --batches 1 4 --logit-std 5 --name decode-linear-torch
    decode "$(left)" --pairings 7b+1.5b --modes base rast --batches 1 4 --logit-std 5 --decode-linear skinny \
      --profile --profile-modes rast
    ;;
  unfused)
    pairing=${3:?pairing, e.g. 7b+1.5b}
    timeout "$(left)" python3 bench/decode.py --pairings "$pairing" --modes base rast --batches 1 32 \
      --layer-ops torch --profile --profile-modes rast --commit "$RAST_COMMIT" --out "$out" 2>&1 | tee -a "$log"
    ;;
  *)
    echo "unknown stage $stage (first | second | tests | kernels | decode | unfused | skinny | throughput | moe |" \
      "lora)" | tee -a "$log"
    exit 2
    ;;
esac
