"""The plumbing of hiper.py that a reader of the method can skip: torchrun and FSDP2 (each a no-op in a single
process), the vLLM engine and its in-memory weight sync (vLLM imported only with --backend vllm), crash-safe
checkpoints, progress bars and the W&B or TensorBoard logger. None of it changes what is computed; hiper.py imports
what it uses from here."""
import contextlib
import dataclasses
import itertools
import os
import pickle
import shutil
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import envs


# ---- torchrun and FSDP2 (each a no-op in a single process) ----

def world():
    """(rank, world size); (0, 1) without torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def init_distributed(cfg):
    """This process's device; under torchrun also the process group (NCCL on GPUs, gloo on CPUs)."""
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if device == "cuda":
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return device


def close_distributed():
    """The process groups: an in-process vLLM engine's first (its teardown then destroys the default group, and at
    exit finds nothing left to destroy), then the default one (torchrun's) if still there."""
    if "vllm" in sys.modules:  # --backend vllm
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
        cleanup_dist_env_and_memory()
    if dist.is_initialized():
        dist.destroy_process_group()


def from_pretrained(cls, path, device, **kwargs):
    """`cls.from_pretrained(path, **kwargs)` on `device`. Under torchrun only rank 0 reads it, into host memory; the
    other ranks build it on the meta device, and `shard` gives every rank its shards of rank 0's weights: no GPU
    ever holds a whole model, and one host copy is made, not one per rank (7B in fp32: 30 GB each)."""
    if world()[0] == 0:
        model = cls.from_pretrained(path, **kwargs)
        return model.to(device) if world()[1] == 1 else model
    from transformers import AutoConfig
    with torch.device("meta"):
        return cls.from_config(kwargs.pop("config", None) or AutoConfig.from_pretrained(path), **kwargs)


def shard(device, *models):
    """FSDP2: every decoder layer, then the rest of each model, sharded over the ranks on `device`, the weights and
    buffers (rotary tables) those of rank 0 (`from_pretrained`). On GPU the gathered weights are bf16 and gradients
    reduce in fp32; the shards (the optimizer's master weights) stay fp32."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    rank, ws = world()
    for model in models if ws > 1 else ():
        full = model.state_dict() if rank == 0 else {}  # rank 0's CPU copy; the other ranks hold no weights
        buffers = [b.detach() for b in model.buffers()]  # rank 0's; non-persistent ones are not in `full`
        bf16 = torch.device(device).type == "cuda"
        mp = MixedPrecisionPolicy(torch.bfloat16 if bf16 else None, torch.float32 if bf16 else None)
        for part in [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] + [model]:
            fully_shard(part, mp_policy=mp)
        model.to_empty(device=device)  # every rank's shards allocated, uninitialised
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for b, b0 in zip(model.buffers(), buffers):
            if rank == 0:
                b.copy_(b0)
            dist.broadcast(b, src=0)


@contextlib.contextmanager
def unsharded(model):
    """Full weights on every rank for no-grad passes that ranks run different numbers of times (generation,
    scoring), so that no forward waits on another rank's collective."""
    parts = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in parts:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in parts:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP2's default: only the root stays gathered


def share(items):
    """This rank's contiguous share of a list (all of it in a single process)."""
    mine = envs.shares(len(items), world()[1])[world()[0]]
    return items[mine.start:mine.stop]


def gather(items):
    """Every rank's list, concatenated in rank order: the inverse of `share`."""
    if world()[1] == 1:
        return items
    parts = [None] * world()[1]
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


# ---- the vLLM engine and its weight sync (vLLM imported only with --backend vllm) ----

def vllm_engine(cfg, path, device):
    """A vLLM engine on the initial policy, in this process (weights then pass as tensors). On GPU it sleeps
    between rollouts, its weights and KV cache freed, so that actor, critic and engine share the GPU."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM
    cuda = device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else 0
    # torchrun: one engine per rank on its LOCAL_RANK's GPU, in the ranks' process group ("uni" would take GPU 0).
    # CPU: no chunked prefill, whose partial prefills rewind a seeded request's generator (CPU generators cannot)
    engine = LLM(path, dtype="bfloat16" if cuda else "float32", seed=cfg.seed, enable_sleep_mode=cuda,
                 max_model_len=cfg.max_prompt + cfg.max_new_tokens, gpu_memory_utilization=cfg.vllm_memory,
                 distributed_executor_backend="external_launcher" if world()[1] > 1 else "uni",
                 worker_extension_cls="plumbing.WeightSync", enable_chunked_prefill=cuda)
    if cuda:
        engine.sleep(level=1)  # level 1 keeps a CPU copy of every tensor: level 2 may lose buffers (rotary caches)
    # its weights and KV cache, which torch counts as allocated even while the engine sleeps (their pages unmapped)
    engine.allocated = torch.cuda.memory_allocated() - before if cuda else 0
    return engine


@contextlib.contextmanager
def awake(engine, policy):
    """The engine for one rollout: woken (GPU), loaded with the policy's current weights in memory, its prefix
    cache (computed with the old weights) dropped; asleep again afterwards."""
    cuda = policy.device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()  # the training step's cached blocks, for the engine
        engine.wake_up()
    # a module's weights at a time (torchrun: gathered from the shards; 7B's whole would take 30 GB of every GPU)
    for _, part in itertools.groupby(get_model_state_dict(policy).items(), key=lambda kv: kv[0].rsplit(".", 2)[0]):
        engine.collective_rpc("load_policy", args=([(k, w.full_tensor() if isinstance(w, DTensor) else w)
                                                    for k, w in part],))
    engine.reset_prefix_cache()
    try:
        yield
    finally:
        if cuda:
            engine.sleep(level=1)
            torch.cuda.reset_peak_memory_stats()  # memory_gb: the trainer's peak leaves the engine's rollout out


class WeightSync:
    """vLLM worker extension: writes HF-named weights into vLLM's modules (q, k, v fused into qkv_proj; gate, up into
    gate_up_proj). vLLM's CPU backend packs Linear weights and empties `weight`, so the packing is redone here."""
    FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def load_policy(self, weights):
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
        hf = dict(weights)
        for name, m in self.model_runner.model.named_modules():
            prefix, _, leaf = name.rpartition(".")
            loaded = False
            for p in ("weight", "bias"):
                src = [hf.get(f"{prefix}.{part}.{p}".lstrip(".")) for part in self.FUSED.get(leaf, (leaf,))]
                if getattr(m, p, None) is None or any(x is None for x in src):
                    continue
                new = torch.cat(src).to(getattr(m, p).dtype)
                if getattr(m, p).numel():
                    getattr(m, p).data[:len(new)].copy_(new)  # vLLM pads the vocabulary to a multiple of 64
                else:  # CPU: emptied after packing
                    setattr(m, p, torch.nn.Parameter(new, requires_grad=False))
                loaded = True
            if loaded and hasattr(m, "cpu_linear"):
                dispatch_cpu_unquantized_gemm(m, remove_weight=not isinstance(m, VocabParallelEmbedding))


def memory_gb(engine=None):
    """Peak memory in GiB. GPU: the trainer's since the last call or the engine's last sleep (torch's peak
    allocation less the engine's), and the engine's weights and KV cache apart; CPU: the process's peak RSS, an
    engine's included (ru_maxrss is in bytes on macOS, KiB elsewhere)."""
    if not torch.cuda.is_available():
        import resource
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return dict(peak_memory_gb=rss / 2 ** (30 if sys.platform == "darwin" else 20))
    peak = torch.cuda.max_memory_allocated() - (engine.allocated if engine else 0)
    torch.cuda.reset_peak_memory_stats()
    return dict(peak_memory_gb=peak / 2 ** 30, **{"engine_memory_gb": engine.allocated / 2 ** 30} if engine else {})


# ---- checkpoints ----

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # consolidated: resumes on any world size
RESUMABLE = ("iters", "resume", "save_every", "eval_every", "eval_episodes", "env_workers", "device",
             "logger")  # may change


def save_checkpoint(cfg, it, tok, policy, critic, actor_opt, critic_opt, rng):
    """<run>/checkpoint: policy/ (Hugging Face format) and state.pt (critic, optimizers, RNG, iteration, config),
    unsharded; written to checkpoint.tmp, then renamed into place, the previous one kept as checkpoint.prev until
    then. An optimizer that never stepped (critic warm-up) is saved as None: torch would give it a zero step."""
    opt_state = lambda model, opt: get_optimizer_state_dict(model, opt, options=FULL) if opt.state else None  # noqa
    state = dict(policy=get_model_state_dict(policy, options=FULL), critic=get_model_state_dict(critic, options=FULL),
                 actor_opt=opt_state(policy, actor_opt), critic_opt=opt_state(critic, critic_opt))
    if world()[0] == 0:
        ckpt = os.path.join(cfg.run_dir, "checkpoint")
        tmp, prev = ckpt + ".tmp", ckpt + ".prev"
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(os.path.join(tmp, "policy"), state_dict=state.pop("policy"))
        tok.save_pretrained(os.path.join(tmp, "policy"))
        torch.save(dict(state, rng=rng.getstate(), iteration=it, config=dataclasses.asdict(cfg)),
                   os.path.join(tmp, "state.pt"))  # written last: a folder with a readable state.pt is complete
        shutil.rmtree(prev, ignore_errors=True)
        if os.path.isdir(ckpt):
            os.replace(ckpt, prev)
        os.replace(tmp, ckpt)
        shutil.rmtree(prev, ignore_errors=True)


def load_checkpoint(cfg):
    """--resume: (folder, state) of <run>/checkpoint, or of checkpoint.prev if a crash left the newest one unreadable
    (reported by name); (None, None) if none. Stops if the saved config differs in a field that changes the run."""
    for path in (os.path.join(cfg.run_dir, name) for name in ("checkpoint", "checkpoint.prev")):
        if not os.path.isdir(path):
            continue
        try:
            state = torch.load(os.path.join(path, "state.pt"), weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
            print(f"--resume: {path} is incomplete or unreadable ({type(e).__name__}: {e}); trying the previous one")
            continue
        diff = [f"--{k} {v} (saved: {state['config'][k]})" for k, v in dataclasses.asdict(cfg).items()
                if k not in RESUMABLE and v != state["config"].get(k)]
        if diff:
            raise SystemExit(f"--resume: {path} was saved with other settings: {', '.join(diff)}")
        return path, state
    return None, None


# ---- progress bars and the W&B or TensorBoard logger ----

def progress(items, desc, status=None):
    """`items`, shown as a tqdm bar on rank 0 when stderr is a terminal (so never in CI logs or tests), `status()`
    its postfix at each step."""
    with tqdm(items, desc=desc, leave=False, disable=world()[0] > 0 or not sys.stderr.isatty()) as bar:
        for item in bar:
            if status:
                bar.set_postfix(status())
            yield item


def metric_logger(cfg):
    """--logger: a function that logs the numbers of a metrics.jsonl line (lists and None left out) at its iteration,
    or a validation's update count, to Weights & Biases (project "hiper", files under <run_dir>/wandb) or TensorBoard
    (<run_dir>/tensorboard). The package is imported only here; rank 0 logs, other ranks and no --logger: a no-op."""
    try:
        if cfg.logger == "wandb":
            import wandb
        elif cfg.logger == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise SystemExit(f"--logger {cfg.logger} needs the {cfg.logger} package ({e}): pip install {cfg.logger}")
    if not cfg.logger or world()[0] > 0:
        return lambda line: None
    numbers = lambda line: {k: v for k, v in line.items() if type(v) in (int, float)}  # noqa: E731
    step = lambda line: line.get("iteration", line.get("updates"))  # noqa: E731
    if cfg.logger == "wandb":
        wandb.init(project="hiper", name=os.path.basename(os.path.abspath(cfg.run_dir)), dir=cfg.run_dir,
                   config=dataclasses.asdict(cfg))
        return lambda line: wandb.log(numbers(line), step=step(line))
    writer = SummaryWriter(os.path.join(cfg.run_dir, "tensorboard"))

    def log(line):
        for k, v in numbers(line).items():
            writer.add_scalar(k, v, step(line))
        writer.flush()
    return log
