#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, make the 8B-shaped checkpoint
# once, run the named items in order (each under what is left of the call's time), and pack
# every log and result into one archive under $OUT (the device returns few files a call).
#
#   here:   ../shared/tools/device-wheels.sh pytest pluggy iniconfig   # .whl/, ~55 MB
#   device: bash benchmarks/gpu_session.sh SECONDS ITEM...           # carry [".whl"]
#
# Items (docs/benchmark-history.md, "Next GPU session", says which to run first):
#   gpu-tests  pytest -m gpu over the engine, models, parallel and disagg tests (≈3 min);
#              gpu-tests:EXPR runs those whose names match the pytest -k expression EXPR
#   pp         benchmarks.parallel pp: PP=2 with two batches in the stages vs one (≈1 min)
#   parallel   benchmarks.parallel allreduce,dense,pp: async scheduling on/off, NCCL priority and CTAs, PP batches (≈10 min)
#   tp-pp      parallel without the normal-priority TP=2 engine and the even PP partition (≈5 min)
#   tp64       benchmarks.parallel allreduce,dense at batch 64 only: TP=1 vs TP=2 (and with the all-reduce fused
#              with the add and RMSNorm) and the prefill overlap (≈4 min)
#   shard      one GPU: benchmarks.parallel shard: TP=1 beside one TP=2 rank's part of the model, decode and prefill,
#              with each one's top kernels per decode step (≈4 min)
#   moe        benchmarks.parallel moe: EP=2 vs TP=2 (graphs and eager), 8 layers (≈4 min)
#   disagg     benchmarks.disagg: KV transfer per layer and stacked vs raw NCCL, TTFT 1P1D vs colocated (≈2 min)
#   serve      benchmarks.serve: 1P1D vs two colocated replicas through HTTP up to saturation (≈7 min);
#              serve:R1,R2,... at those request rates
#   serve1:R1,R2,...  one GPU: benchmarks.serve's colocated-1 (one mixed instance) at those rates, with a step
#              budget of 8192 tokens (the two-GPU sweeps' colocated) and of 2048 (examples/colocated.yaml) (≈6 min)
#   serve1-admit:R1,R2,...[:BUDGET]  one GPU: colocated-1 with admission on (as serve-admit), BUDGET tokens a
#              step (default 8192) (≈3 min)
#   prefill-budget  one GPU: benchmarks.prefill_budget, prompt tokens/s and first-token times per step budget (≈2 min)
#   sender-host  one GPU: benchmarks.sender_host, the KV sender's host time per gather and post (≈1.5 min)
#   gemm       one GPU: benchmarks.gemm, each decode projection (whole, one TP=2 rank's share) by cuBLAS, cuBLASLt and
#              with its weight stored the other way, against HBM bandwidth (≈2 min)
#   fused-norm   one GPU: the fused all-reduce + add + RMSNorm kernel with its ranks emulated on streams:
#              its GPU tests, then benchmarks.fused_norm (≈1 min)
#   serve-admit  the sweep past saturation with admission on (queue wait, decode step) (≈6 min);
#              serve-admit:R1,R2,... at those request rates
#   ab-engine:TGZ  (AB_ROUNDS=N: N rounds, default 2) an A/B of two trees in one call: TGZ (a `git archive REV cluster | gzip` of the tree before)
#              and this tree, in turn, twice each: benchmarks.engine's batch-1 and batch-128 decode steps, 2k
#              prefill and offline throughput, no transformers baseline (≈6 min)
#   scale-out  one GPU: benchmarks.scale_out, an 8B instance's cold start and two scale-outs beside it
#              (decision to serving, by phase) (≈3 min)
#   scale-out-ab:TGZ  (AB_ROUNDS=N) scale-out on the tree before (TGZ) and this one, B A per round (≈3 min a round)
#   autoscale-serve  one GPU: benchmarks.autoscale_serve, a ~1B model in quarter-GPU instances, a burst
#              (8, 32, 8 req/s) through HTTP: autoscaled against 4 and 1 static instances (≈6 min)
#   decode-profile:TGZ[:BATCH]  (AB_ROUNDS=N) one GPU: benchmarks.decode_profile on the tree before (TGZ, as ab-engine)
#              and this one, B A per round (AB_ORDER=after-first: A B): a decode step at BATCH (default 128) by synchronized step, host function and kernel (≈4 min)
#   ab-serve:TGZ:RATE  the same A/B for one colocated instance through HTTP at RATE req/s (2k in, 256 out,
#              2,048-token steps, admission on), B A B A (≈8 min)
set -uo pipefail
budget=${1:?seconds this call may run}; shift
start=$(date +%s)
out=${OUT:-/tmp/out}
mkdir -p "$out/work"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > "$out/work/pip.log" 2>&1 || { echo "wheel install failed"; tail -5 "$out/work/pip.log"; }
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
  PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
left() { echo $(( budget - ($(date +%s) - start) - 15 )); }  # 15 s kept for packing

run_item() {  # name, command...
  local name=$1; shift
  local secs; secs=$(left)
  if (( secs < 30 )); then echo "$name: skipped, $secs s left"; return; fi
  echo "== $name (up to ${secs}s) =="
  ( cd "$out/work" && timeout "$secs" "$@" ) > "$out/work/$name.log" 2>&1
  echo "$name: exit $? after $(( $(date +%s) - start ))s"; tail -4 "$out/work/$name.log"
}

tree_of() {  # the tree a `git archive ... cluster | gzip` holds, extracted once: its `cluster` goes first on PYTHONPATH
  local dir=/tmp/ab-$(basename "$1" .tgz)
  [[ -d $dir/cluster ]] || { mkdir -p "$dir" && tar -xzf "$1" -C "$dir"; }
  echo "$dir"
}

run_ab() {  # name, before-tree, command...: B A B A, each run with its own tree's `cluster`
  local name=$1 before=$2; shift 2
  for round in $(seq 1 "${AB_ROUNDS:-2}"); do
    PYTHONPATH=$before:$PYTHONPATH run_item "$name-before-$round" "$@" --out "$name-before-$round.json"
    run_item "$name-after-$round" "$@" --out "$name-after-$round.json"
  done
}

need_llama() {
  [[ -d /tmp/llama8b ]] || python3 -c "from cluster.models.make import make_llama3_8b_shape; make_llama3_8b_shape('/tmp/llama8b')" \
    > "$out/work/make_llama8b.log" 2>&1
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$out/work/gpus.txt" 2>&1
# the hardware limits (HBM bandwidth, bf16 matmul) of this machine, in every call: the figures are set against them
python3 -c "import json; from benchmarks.hardware import measure; print(json.dumps(measure()))" \
  > "$out/work/hardware.json" 2> "$out/work/hardware.log"
for item in "$@"; do
  case $item in
    gpu-tests|gpu-tests:*)
               k=(); [[ $item == gpu-tests:* ]] && k=(-k "${item#gpu-tests:}")
               # -v: each result as it ends; faulthandler: every thread's stack if a test outlasts 120 s (a
               # call killed at its limit prints no failure report, and 2026-11-30's last call lost its reasons)
               LLM_CLUSTER_REPORT_AT_ONCE=1 run_item gpu-tests python3 -m pytest -v -rfE -m gpu -p no:cacheprovider -o faulthandler_timeout=120 "${k[@]}" \
                 "$PWD/tests/engine" "$PWD/tests/models" "$PWD/tests/ops" "$PWD/tests/parallel" "$PWD/tests/disagg" ;;
    parallel)  need_llama; run_item parallel python3 -m benchmarks.parallel --parts allreduce,dense,pp \
                 --llama-dir /tmp/llama8b --steps 8 --tp2-normal-priority --tp2-nccl-ctas 8 --out parallel.jsonl ;;
    tp-pp)     need_llama; run_item parallel python3 -m benchmarks.parallel --parts allreduce,dense,pp \
                 --llama-dir /tmp/llama8b --steps 8 --tp2-nccl-ctas 8 --pp-partitions balanced --out parallel.jsonl ;;
    pp)        need_llama; run_item pp python3 -m benchmarks.parallel --parts pp --llama-dir /tmp/llama8b --steps 8 \
                 --profile --out pp.jsonl ;;
    tp64)      need_llama; run_item parallel python3 -m benchmarks.parallel --parts allreduce,dense --batches 64 \
                 --llama-dir /tmp/llama8b --steps 8 --tp2-fused-norm --out parallel.jsonl ;;
    shard)     need_llama; run_item shard python3 -m benchmarks.parallel --parts shard --llama-dir /tmp/llama8b \
                 --steps 8 --profile --out shard.jsonl ;;
    moe)       run_item moe python3 -m benchmarks.parallel --parts moe --moe-layers 8 --steps 8 --out moe.jsonl ;;
    disagg)    need_llama; run_item disagg python3 -m benchmarks.disagg --model /tmp/llama8b --out disagg.json ;;
    serve|serve:*)
               # one prefill GPU saturates near 18 req/s of 2k-token prompts, two colocated near 40: the default
               # rates sweep both knees; serve:R1,R2,... picks others
               rates=4,8,12,16,24,32,48; [[ $item == serve:* ]] && rates=${item#serve:}
               need_llama; run_item serve python3 -m benchmarks.serve --model /tmp/llama8b \
                 --rates "$rates" --num-requests 800 --duration-s 15 --low-duration-s 10 --out-dir serve ;;
    serve1:*)  need_llama
               for budget in 8192 2048; do
                 run_item "serve1-$budget" python3 -m benchmarks.serve --model /tmp/llama8b --deployments colocated-1 \
                   --rates "${item#serve1:}" --num-requests 400 --duration-s 15 --low-duration-s 8 \
                   --max-num-batched-tokens "$budget" --out-dir "serve1-$budget"
               done ;;
    serve1-admit:*) need_llama; rest=${item#serve1-admit:}; rates=${rest%%:*}; budget=8192
               [[ $rest == *:* ]] && budget=${rest#*:}
               run_item "serve1-admit-$budget" python3 -m benchmarks.serve --model /tmp/llama8b \
                 --deployments colocated-1 --rates "$rates" --num-requests 600 --duration-s 15 --low-duration-s 8 \
                 --max-num-batched-tokens "$budget" --max-queue-wait-s 0.1 --max-decode-step-ms 30 \
                 --out-dir "serve1-admit-$budget" ;;
    prefill-budget) need_llama; run_item prefill-budget python3 -m benchmarks.prefill_budget --model /tmp/llama8b \
                 --out prefill_budget.json ;;
    fused-norm) # one GPU, ranks emulated on streams: the fused all-reduce + add + RMSNorm kernel's tests (a hang in
               # its flag handshake would spin for ever: 120 s at most), then its cost per call beside the norm alone
               run_item fused-norm-tests timeout 120 python3 -m pytest -v -rfE -m gpu -p no:cacheprovider \
                 "$PWD/tests/parallel/test_one_shot_norm_gpu.py"
               run_item fused-norm timeout 150 python3 -m benchmarks.fused_norm --num-warps default,4,16 \
                 --out fused_norm.jsonl ;;
    gemm)      # one GPU: the decode projections of Llama-3-8B whole and as a TP=2 rank's share, three ways, set
               # against the HBM bandwidth measured above
               hbm=$(python3 -c "import json; print(json.load(open('$out/work/hardware.json'))['hbm_gb_s'])" 2>/dev/null)
               run_item gemm python3 -m benchmarks.gemm ${hbm:+--hbm-gb-s "$hbm"} --out gemm.jsonl ;;
    ab-engine:*) need_llama; before=$(tree_of "$PWD/${item#ab-engine:}")
               run_ab engine "$before" python3 -m benchmarks.engine --model /tmp/llama8b --batch-sizes 1,128 \
                 --hf-batch 0 --requests 256 ;;
    decode-profile:*) need_llama; rest=${item#decode-profile:}; before=$(tree_of "$PWD/${rest%%:*}"); batch=128
               [[ $rest == *:* ]] && batch=${rest#*:}
               sides="before after"; [[ ${AB_ORDER:-} == after-first ]] && sides="after before"
               for round in $(seq 1 "${AB_ROUNDS:-2}"); do
                 for side in $sides; do
                   tree=$PYTHONPATH; [[ $side == before ]] && tree=$before:$PYTHONPATH
                   PYTHONPATH=$tree run_item "profile-$side-$round" python3 -m benchmarks.decode_profile \
                     --model /tmp/llama8b --batch "$batch" --out "profile-$side-$round.json"
                 done
               done ;;
    ab-serve:*) need_llama; rest=${item#ab-serve:}; before=$(tree_of "$PWD/${rest%%:*}"); rate=${rest#*:}
               for round in $(seq 1 "${AB_ROUNDS:-2}"); do
                 for side in before after; do
                   tree=$PYTHONPATH; [[ $side == before ]] && tree=$before:$PYTHONPATH
                   PYTHONPATH=$tree run_item "serve-$side-$round" python3 -m benchmarks.serve --model /tmp/llama8b \
                     --deployments colocated-1 --rates "$rate" --num-requests 400 --duration-s 15 --low-duration-s 8 \
                     --max-num-batched-tokens 2048 --max-queue-wait-s 0.1 --max-decode-step-ms 30 \
                     --out-dir "serve-$side-$round"
                 done
               done ;;
    autoscale-serve) run_item autoscale-serve python3 -m benchmarks.autoscale_serve --model /tmp/llama1b --make-model \
                 --rates 8,32,8 --duration-s 30 --input-len 1024 --output-len 128 --slo-ttft-ms 300 --slo-tpot-ms 30 \
                 --out-dir autoscale_serve ;;
    scale-out-ab:*) need_llama; before=$(tree_of "$PWD/${item#scale-out-ab:}")
               for round in $(seq 1 "${AB_ROUNDS:-2}"); do
                 PYTHONPATH=$before:$PYTHONPATH run_item "scale-out-before-$round" python3 -m benchmarks.scale_out \
                   --model /tmp/llama8b --gpu-share 0.45 --kv-gib 8 --repeats 2 --out "scale-out-before-$round.json"
                 run_item "scale-out-after-$round" python3 -m benchmarks.scale_out --model /tmp/llama8b --gpu-share 0.45 \
                   --kv-gib 8 --repeats 2 --out "scale-out-after-$round.json"
               done ;;
    scale-out) need_llama; run_item scale-out python3 -m benchmarks.scale_out --model /tmp/llama8b --gpu-share 0.45 \
                 --kv-gib 8 --repeats 2 --out scale_out.json ;;
    sender-host) need_llama; run_item sender-host python3 -m benchmarks.sender_host --model /tmp/llama8b --out sender_host.json ;;
    serve-admit|serve-admit:*) # the same past saturation with admission on (api.max_queue_wait_s 0.1: the 0.4 s TTFT
               # target less a prefill step of four 2k prompts, ~0.21 s, and the hand-over; max_decode_step_ms
               # 30 of the 40 ms TPOT one): goodput should hold near capacity past saturation
               rates=16,24,32,48,64; [[ $item == serve-admit:* ]] && rates=${item#serve-admit:}
               need_llama; run_item serve-admit python3 -m benchmarks.serve --model /tmp/llama8b \
                 --rates "$rates" --num-requests 800 --duration-s 15 --low-duration-s 10 --max-queue-wait-s 0.1 --prefill-max-num-batched-tokens 2048 \
                 --max-decode-step-ms 30 --out-dir serve-admit ;;
    *)         echo "unknown item $item" ;;
  esac
done
# each target's figure from what this call measured, in the call's output (the tail comes back)
python3 -m benchmarks.session_summary "$out/work" > "$out/work/summary.md" 2>&1; cat "$out/work/summary.md"
# a file comes back only under 16 MiB (2026-11-30: a serve call's archive did not): past it, each file
# over 1 MiB keeps its first and last 400 kB
tar -czf "$out/session.tar.gz" -C "$out" work
if (( $(stat -c %s "$out/session.tar.gz") > 15 * 1024 * 1024 )); then
  find "$out/work" -type f -size +1M | while read -r f; do
    echo "cut to fit: $f ($(stat -c %s "$f") bytes)"
    { head -c 400000 "$f"; printf '\n[... cut: the archive must stay under 16 MiB ...]\n'; tail -c 400000 "$f"; } > "$f.cut" && rm "$f"
  done
  tar -czf "$out/session.tar.gz" -C "$out" work
fi
rm -rf "$out/work"
echo "packed $out/session.tar.gz after $(( $(date +%s) - start ))s"
