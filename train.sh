#!/usr/bin/env bash
# Presets for hiper.py. Extra arguments pass through to hiper.py (--name value overrides any field).
#   bash train.sh            offline CPU demo: generated ALFWorld games + a tiny model built locally
#   bash train.sh alfworld   paper settings, ALFWorld (κ = −0.3, bootstrap_truncated on); MODEL=... for 7B
#   bash train.sh webshop    paper settings, WebShop (κ = −3.5, bootstrap_truncated off); needs WEBSHOP_PATH
set -euo pipefail
cd "$(dirname "$0")"
preset=${1:-demo}
[ $# -gt 0 ] && shift
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
case "$preset" in
  demo)
    data=data/alfworld
    if [ ! -d "$data/json_2.1.1/train" ]; then
      python -c "import envs
for split in ('train', 'valid_seen', 'valid_unseen'):
    envs.generate_alfworld_games('$data', 4 if split == 'train' else 2, seed=0, split=split, max_receptacles=8, n_distractors=3)"
    fi
    exec python hiper.py --tiny --data_dir "$data" --run runs/demo --iters 10 --n_envs 8 --max_turns 8 \
      --max_new_tokens 48 --minibatch 32 --microbatch 8 --eval_every 5 --actor_lr 1e-4 --critic_lr 1e-4 "$@" ;;
  alfworld)
    exec python hiper.py --env alfworld --model "$MODEL" --run runs/alfworld --kappa -0.3 --grad_checkpointing true \
      --bootstrap_truncated true "$@" ;;
  webshop)
    exec python hiper.py --env webshop --model "$MODEL" --run runs/webshop --kappa -3.5 --grad_checkpointing true \
      --bootstrap_truncated false --eval_split test "$@" ;;
  *) echo "usage: bash train.sh [demo|alfworld|webshop] [--field value ...]" >&2; exit 2 ;;
esac
