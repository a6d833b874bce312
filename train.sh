#!/usr/bin/env bash
# Presets for hiper.py. Extra arguments pass through to hiper.py (--name value overrides any field).
#   bash train.sh            offline CPU demo (~25 min): demo.py generates ALFWorld games, builds a tiny model and its
#                            supervised warm start on walkthroughs of games of its own, whose demonstrator wastes turns;
#                            hiper.py trains it on other games; the paired verdict on 60 held-out games; runs/demo/
#   bash train.sh ladder T   CPU, a few minutes: one rung of the ladder of controlled tasks
#                            (T = fixed | read | stages | long | turn), its warm start then 11 iterations;
#                            runs/ladder-T/
#   bash train.sh ladder-compare   CPU: HiPER vs flat GAE vs GRPO on the stages rung, 5 seeds → results/ladder_*
#   bash train.sh ladder-long      CPU: the same on the long rung (8 lights, 14 steps), 10 seeds → results/ladder_long*
#   bash train.sh ladder-turn      CPU: HiPER vs flat GAE on rung d reworded (rung e), 10 seeds → results/ladder_turn*
#   bash train.sh ladder-critic    CPU: the same with a fitted critic (4 passes a batch, 2 critic-only iterations)
#   bash train.sh compare    CPU: HiPER vs flat PPO-GAE vs GRPO on the ALFWorld demo, 3 seeds → results/
#   bash train.sh alfworld   paper settings, ALFWorld (κ = −0.3, bootstrap_truncated on), vLLM; MODEL=... for 7B
#   bash train.sh webshop    paper settings, WebShop (κ = −3.5, bootstrap_truncated off), vLLM; needs WEBSHOP_PATH
#   bash train.sh gpu-check  2 iterations with vLLM on a random Qwen2.5-1.5B-shaped model: checks the GPU path;
#                            its figures → runs/gpu-check/gpu_check.json
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
# demo.py: the games (once), a tiny model, and its supervised warm start on walkthroughs of its own 360 games, which RL
# never plays, by a demonstrator that says `look` (a wasted turn) half the time: the flaw RL is to remove
KIT=(--data_dir "$DATA" --history 1 --dither 0.5 --sft_epochs "${SFT_EPOCHS:-4}")
# The CPU regime, found on the ladder's training episodes (results/README.md) and used by the ladder, its tests, the
# demo and the comparisons: a KL anchor of 0.5, 4 PPO epochs in minibatches of 16 turns at an actor learning rate
# of 3e-4, with AdamW's ε at 1e-2 so that weights with tiny gradients (the format's) barely move; a critic that
# learns the returns' scale (its own learning rate, two passes per batch, a wide value clip) for one iteration
# before the actor moves. Each departure from the paper's settings is a row of the README's differences table.
CPU=(--actor_lr 3e-4 --adam_eps 1e-2 --ppo_epochs 4 --minibatch 16 --microbatch 16 --kl_coef 0.5
     --critic_lr 2e-3 --critic_epochs 2 --value_clip 10 --critic_warmup 1)
# hiper.py on the ALFWorld demo: 20-turn episodes, a time-out terminal as in the official runs, every held-out game
# played twice; the CPU regime with one PPO epoch and one critic pass per batch at an actor learning rate of 1e-3
# (4 epochs cost 6 rollouts an update), and the paper's KL coefficient (0.5 held the warm start's flaw in place);
# micro-batches of 8 turns of like lengths pad less than one of 16 (the same gradient; bench_update.py times both)
RL=(--data_dir "$DATA" --history 1 --max_turns 20 --env_max_steps 20 --max_new_tokens 40 --save_every 5
    --eval_episodes 2 "${CPU[@]}" --actor_lr 1e-3 --ppo_epochs 1 --critic_epochs 1 --kl_coef 0.01 --microbatch 8)
# the ladder (demo.py's Fixed, Read, Stages, Long): a warm start that presses at random (fixed) or reads its light
# 40 % of the time (read, stages, long), then 64 episodes per iteration, one history record, the task's own step limit
ladder_kit() {  # the warm start of rung $1
  case $1 in
    fixed) echo --read_rate 0 --episodes 300 --sft_epochs 3 ;;
    read) echo --read_rate 0.4 --episodes 400 --sft_epochs 4 ;;
    stages) echo --read_rate 0.4 --episodes 200 --sft_epochs 4 ;;
    long|turn) echo --read_rate 0.4 --episodes 150 --sft_epochs 4 ;;
    *) echo "usage: bash train.sh ladder fixed|read|stages|long|turn [--field value ...]" >&2; exit 2 ;;
  esac
}
LADDER=(--n_envs 64 --history 1 --max_new_tokens 40 --iters 11 --eval_every 0 --save_every 100 "${CPU[@]}")

case "$preset" in
  demo)  # ~25 min on 2 cores: the kit (~16), then 8 iterations of 32 episodes (the first critic-only), validated before
    run=${RUN:-runs/demo}  # and after (past 8 iterations the step collapsed the policy: results/README.md)
    python demo.py "${KIT[@]}" --run_dir "$run"
    python hiper.py "${RL[@]}" --n_envs 32 --iters 8 --eval_every 8 --model "$run/warm-start" --run_dir "$run" "$@"
    python report.py "$run" ;;
  ladder)  # bash train.sh ladder fixed|read|stages|long|turn [--adv ...]: 2-4 min (long, turn: ~100 s an iteration)
    task=${1:-}; kit=$(ladder_kit "$task"); shift
    root=${RUN:-runs/ladder-$task}; env=demo:${task^}
    steps=$(python -c "import demo; print(demo.${task^}.max_steps)")  # the task's own step limit
    # shellcheck disable=SC2086  # $kit is a list of flags
    python demo.py --env "$env" $kit --run_dir "$root"
    python hiper.py --env "$env" --model "$root/warm-start" --max_turns "$steps" --env_max_steps "$steps" \
      "${LADDER[@]}" --run_dir "$root/rl" "$@" ;;
  ladder-compare)  # ~2 h on 2 cores, resumable: HiPER, flat GAE, GRPO on the stages rung, one warm start, 5 seeds
    root=${RUN:-runs/ladder-compare}
    for seed in 1 2 3 4 5; do
      for adv in hae gae grpo; do
        run=$root/$adv-s$seed
        [ -f "$run/done" ] || { RUN=$root bash "$0" ladder stages --adv "$adv" --seed "$seed" --run_dir "$run" \
          --iters 10 --n_envs 32 --eval_every 10 "$@" && touch "$run/done"; }
      done
    done
    python report.py --ladder "$root" results ;;
  ladder-long|ladder-turn|ladder-critic)  # ~3.5 h on one core, resumable (SEEDS="6 7 8 9 10" runs a subset: two
    name=${preset#ladder-}; rung=${name/critic/turn}; root=${RUN:-runs/$preset}  # shells, two cores): the long rung
    # (d), HiPER and flat GAE at 10 seeds, GRPO at 5 (rung e, reworded: HiPER and flat GAE only), one warm start; the
    # demo's step (1 PPO epoch, 1 critic pass, actor lr 1e-3, KL 0.01); rung d's HiPER seeds 1-5 also log the PG
    # variance under HAE and flat GAE. ladder-critic: rung e with a fitted critic, 4 critic passes a batch and 2
    # critic-only iterations first, 8 iterations (~13 min a run, ~4.5 h on one core)
    fit=$([ "$name" = critic ] && echo --critic_epochs 4 --critic_warmup 2 --iters 8 --eval_every 8 || true)
    # shellcheck disable=SC2046  # ladder_kit's flags
    python demo.py --env "demo:${rung^}" $(ladder_kit "$rung") --run_dir "$root"  # the warm start, built once
    for seed in ${SEEDS:-1 2 3 4 5 6 7 8 9 10}; do
      for adv in hae gae grpo; do
        run=$root/$adv-s$seed; diag=$([ "$rung$adv" = longhae ] && [ "$seed" -le 5 ] && echo --pg_variance || true)
        [ "$adv" = grpo ] && { [ "$seed" -gt 5 ] || [ "$rung" = turn ]; } && continue
        # shellcheck disable=SC2086  # $diag is empty or one flag, $fit empty or the critic's flags
        [ -f "$run/done" ] || { RUN=$root bash "$0" ladder "$rung" --adv "$adv" --seed "$seed" --run_dir "$run" \
          --iters 10 --n_envs 32 --eval_every 10 --eval_temperature 1 --ppo_epochs 1 --critic_epochs 1 \
          --actor_lr 1e-3 --kl_coef 0.01 $diag $fit "$@" && touch "$run/done"; }
      done
    done
    python report.py --ladder "$root" results "$name" ;;
  compare)  # ~2 h 10 min on one core beside another job (the kit 25 min, 9 runs of ~12 min), resumable (SEEDS="3"
    root=${RUN:-runs/compare}  # runs a subset: two shells): HiPER, flat GAE, GRPO from one warm start, 3 seeds
    python demo.py "${KIT[@]}" --run_dir $root/warm
    for seed in ${SEEDS:-1 2 3}; do
      for adv in hae gae grpo; do
        run=$root/$adv-s$seed
        [ -f $run/curve.png ] || { python hiper.py "${RL[@]}" --n_envs 32 --iters 8 --eval_every 8 \
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
  gpu-check)  # the GPU path without downloads: sleep/wake and weight sync, repeated validations, memory, phase times
    python bench_step.py --check --run_dir "${RUN:-runs/gpu-check}" ;;
  *) echo "usage: bash train.sh PRESET [--field value], PRESET one of: demo, ladder T, ladder-compare, ladder-long," \
       "ladder-turn, ladder-critic, compare, alfworld, webshop, gpu-check" >&2
     exit 2 ;;
esac
