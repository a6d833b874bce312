#!/usr/bin/env bash
# Presets for hiper.py. Extra arguments pass through to hiper.py (--name value overrides any field).
#   bash train.sh            offline CPU demo: demo.py generates ALFWorld games, builds a tiny model and its supervised
#                            warm start on walkthroughs; then hiper.py trains it; prints the paired verdict, runs/demo/
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
SHAPE=(--data_dir "$DATA" --history 1 --max_turns 20)  # 20-turn episodes, one history record (demo.py and hiper.py)
# demo.py: the games (once), a tiny model, and its supervised warm start (8 epochs: ~7 of the demo's 20 minutes)
KIT=("${SHAPE[@]}" --sft_epochs "${SFT_EPOCHS:-8}")
# hiper.py on the CPU: a time-out is terminal, as in the official runs; a critic that learns the returns' scale
# (its own learning rate, two passes per batch, a wide value clip) for two iterations (the demo: one) before the
# actor moves; an actor learning rate for a 0.7M-parameter model (3e-4 and up made it worse, results/README.md);
# every held-out game played twice, paired before/after
RL=("${SHAPE[@]}" --env_max_steps 20 --max_new_tokens 40 --minibatch 64 --microbatch 16 --save_every 5
    --critic_warmup 2 --critic_epochs 2 --critic_lr 2e-3 --value_clip 10 --actor_lr 1e-4 --eval_episodes 2)

case "$preset" in
  demo)  # ~19 min: 3 iterations of 16 episodes (the first critic-only); each validation plays 120 episodes (~2.5 min)
    run=${RUN:-runs/demo}
    python demo.py "${KIT[@]}" --run_dir "$run"
    python hiper.py "${RL[@]}" --n_envs 16 --iters 3 --eval_every 3 --critic_warmup 1 --model "$run/warm-start" \
      --run_dir "$run" "$@"
    python report.py "$run" ;;
  compare)  # ~1 h 50 min, resumable: HiPER, flat GAE, GRPO from one warm start, 3 seeds, 8 iterations of 16 episodes
    root=${RUN:-runs/compare}
    python demo.py "${KIT[@]}" --run_dir $root/warm
    for seed in 1 2 3; do
      for adv in hae gae grpo; do
        run=$root/$adv-s$seed
        [ -f $run/curve.png ] || { python hiper.py "${RL[@]}" --n_envs 16 --iters 8 --eval_every 8 \
          --model $root/warm/warm-start --run_dir $run --adv $adv --seed $seed --resume "$@" && python report.py $run; }
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
