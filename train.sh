#!/usr/bin/env bash
# Presets for hiper.py. Extra arguments pass through to hiper.py (--name value overrides any field).
#   bash train.sh            offline CPU demo: demo.py generates ALFWorld games, builds a tiny model and its supervised
#                            warm start on walkthroughs; then hiper.py trains it; prints before/after, writes runs/demo/
#   bash train.sh compare    CPU: HiPER vs flat PPO-GAE vs GRPO from one warm start, 3 seeds → results/
#   bash train.sh alfworld   paper settings, ALFWorld (κ = −0.3, bootstrap_truncated on), vLLM; MODEL=... for 7B
#   bash train.sh webshop    paper settings, WebShop (κ = −3.5, bootstrap_truncated off), vLLM; needs WEBSHOP_PATH
#   bash train.sh gpu-check  2 iterations with vLLM on a random Qwen2.5-1.5B-shaped model: checks the GPU path
# RUN=dir changes the run folder; SFT_EPOCHS=n the demo's warm-start epochs. NGPUS=n (GPUs per node) and NNODES=m
# (run the same command on every node, with MASTER_ADDR set to the first node) launch the GPU presets with torchrun:
# one process per GPU, FSDP2.
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-demo}
[ $# -gt 0 ] && shift
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
LAUNCH=(python)
[ "${NGPUS:-1}${NNODES:-1}" = 11 ] || LAUNCH=(torchrun --nnodes "${NNODES:-1}" --nproc_per_node "${NGPUS:-1}"
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-localhost}:${MASTER_PORT:-29500}" --rdzv_id hiper)
DATA=data/alfworld
# the CPU demo's settings: 20-turn episodes (a time-out is terminal, as in the official runs), one history record,
# a 0.7M-parameter model, lr for its size
DEMO=(--data_dir "$DATA" --history 1 --max_turns 20 --env_max_steps 20 --max_new_tokens 40 --n_envs 16 --minibatch 64
      --microbatch 16 --actor_lr 5e-4 --critic_lr 5e-4 --save_every 5 --iters 8 --eval_every 8)
# demo.py: the games (once), a tiny model, and its supervised warm start (8 epochs: ~7 of the 20 minutes)
KIT=(--data_dir "$DATA" --history 1 --max_turns 20 --sft_epochs "${SFT_EPOCHS:-8}")

case "$preset" in
  demo)
    run=${RUN:-runs/demo}
    python demo.py "${KIT[@]}" --run_dir "$run"
    python hiper.py "${DEMO[@]}" --model "$run/warm-start" --run_dir "$run" "$@"
    python report.py "$run" ;;
  compare)
    root=${RUN:-runs/compare}
    python demo.py "${KIT[@]}" --run_dir $root/warm
    for seed in 1 2 3; do
      for adv in hae gae grpo; do
        run=$root/$adv-s$seed
        [ -f $run/curve.png ] || { python hiper.py "${DEMO[@]}" --model $root/warm/warm-start --run_dir $run \
          --adv $adv --seed $seed "$@" && python report.py $run; }
      done
    done
    python report.py --compare $root results ;;
  alfworld)
    run=${RUN:-runs/alfworld}
    "${LAUNCH[@]}" hiper.py --env alfworld --model "$MODEL" --run_dir "$run" --backend vllm --kappa -0.3 \
      --grad_checkpointing true --bootstrap_truncated true "$@"
    python report.py "$run" ;;
  webshop)
    run=${RUN:-runs/webshop}
    "${LAUNCH[@]}" hiper.py --env webshop --model "$MODEL" --run_dir "$run" --backend vllm --kappa -3.5 \
      --grad_checkpointing true --bootstrap_truncated false "$@"
    python report.py "$run" ;;
  gpu-check)  # the GPU path without downloads: vLLM sleep/wake and weight sync, phase times, peak memory (~8 min)
    python bench_step.py --check ;;
  *) echo "usage: bash train.sh [demo|compare|alfworld|webshop|gpu-check] [--field value ...]" >&2; exit 2 ;;
esac
