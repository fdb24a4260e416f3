"""
The plumbing that oisd.py needs and a reader of the method does not: the command line (--key=value for
every Config field, --help built from the config's comments) and its checks, device and precision, the
shared run environment (Env), timing, atomic files, checkpoints and resume, the warm-up cache, compile,
the checks that stop a run with one line when a number turns non-finite, progress lines, the table and
the lens picture (lens.png), and the bookkeeping of the control arms and diagnostics (train_for, alignment_evidence).

    from harness import Env, autocast, write_atomic

Imports run one way: oisd.py imports this file; this file never imports oisd.py. Where a piece needs the
method's tables (PRESETS, ARMS, arm_config: oisd.METHOD) or functions (rl_loss), oisd.py passes them in.
"""

import argparse
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import GPTConfig
from tasks import completion_texts, get_tokenizer, heldout_keys, heldout_split, make_task, trainable_size


# -----------------------------------------------------------------------------
# The command line: --key=value for every Config field, --help built from the config's comments.

@dataclass
class RunConfig:
    """The fields of a run that are not the method; oisd.Config adds the method's own."""
    # run
    out_dir: str = "out"             # checkpoints, metrics.jsonl and results.json go here
    seed: int = 0                    # every random stream of a run derives from (seed, its purpose)
    device: str = "auto"             # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    precision: str = "auto"          # auto (bf16 autocast on a GPU with native bf16, else fp32) | fp32 | bf16 (emulated on a CPU)
    compile: bool = False            # torch.compile the training forward (pays on a GPU; compile time is not train time)
    arms: str = "grpo,oisd,oisd_pos"  # arms to train, names from ARMS; arm:1+3 also sets align_layers=1,3
    resume: bool = False             # continue each arm from its checkpoint in out_dir
    preset: str = ""                 # gpu: a larger model and a harder task for one consumer GPU (PRESETS)


class ConfigError(ValueError):
    pass


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line, raised, instead of usage text and sys.exit
        raise ConfigError(message)


def parse_bool(text):
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError(text)
    return text.lower() in ("true", "1")


parse_bool.__name__ = "true/false"  # argparse names the type in its message: "invalid true/false value"


def field_groups(cls):
    """[(group title, [(field, one-line help)])] read from the class source: '# title' lines open a group,
    each field's trailing comment is its help. Subclasses (research/experiments.py) add their own groups."""
    groups, fields = [], {f.name: f for f in dataclasses.fields(cls)}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        for line in inspect.getsource(klass).splitlines():
            header = re.fullmatch(r"    # (.+)", line)
            field = re.fullmatch(r"    (\w+): \w+ = .*?#\s*(.+)", line)
            if header:
                groups.append((header.group(1), []))
            elif field and field.group(1) in fields:
                groups[-1][1].append((fields[field.group(1)], field.group(2)))
    return groups


def parse_args(argv, cls, prog, **method):
    """A cls from --key=value flags (bools also as a bare --key), after the --preset if one is given.
    --help prints every flag and exits 0. Raises ConfigError (one line) on any bad flag or value.
    method: the method's tables that the checks need (presets, arms, no_layers, arm_config; see validate)."""
    presets = method["presets"]
    chosen = [arg.partition("=")[2] for arg in argv if arg.startswith("--preset=")]
    if "--preset" in argv:  # argparse would take '--preset gpu' too, after the defaults were already chosen
        raise ConfigError("write --preset=NAME (with '='), e.g. --preset=gpu")
    if chosen and chosen[-1] and chosen[-1] not in presets:
        raise ConfigError(f"--preset: unknown preset {chosen[-1]!r}; choose from {', '.join(presets)}")
    defaults = cls(**presets[chosen[-1]]) if chosen and chosen[-1] else cls()
    parser = ArgumentParser(prog=prog, usage="%(prog)s [--key=value ...]", allow_abbrev=False, description=sys.modules[cls.__module__].__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    for title, fields in field_groups(cls):
        group = parser.add_argument_group(title)
        for f, meaning in fields:
            default = getattr(defaults, f.name)
            kind = type(default)
            extra = dict(nargs="?", const=True, type=parse_bool) if kind is bool else dict(type=kind)
            group.add_argument(f"--{f.name}", default=default, metavar=kind.__name__,
                               help=f"{meaning} (default: {default!r})", **extra)
    cfg = cls(**vars(parser.parse_args(argv)))
    validate(cfg, **method)
    return cfg


# Inclusive ranges of the numeric flags: anything outside is refused before work starts.
RANGES = dict(seed=(0, 2**31 - 1), digits=(1, 9), terms=(2, 10), block_size=(2, 4096), n_layer=(2, 96),
              n_head=(1, 128), n_embd=(1, 16384), sft_lr=(1e-12, 1.0), sft_batch=(1, 65536),
              sft_max_steps=(1, 10**7), sft_eval_every=(1, 10**7), rl_steps=(0, 10**7),
              prompts_per_step=(1, 65536), group_size=(2, 4096), temperature=(1e-3, 100.0),
              max_new_tokens=(0, 4096), rl_lr=(1e-12, 1.0), clip_eps=(1e-6, 0.999), num_iterations=(1, 1000),
              kl_beta=(0.0, 1e6), grad_clip=(1e-8, 1e6), lambda_logit=(0.0, 1e6), lambda_attn=(0.0, 1e6),
              lambda_exit_ce=(0.0, 1e6), sft_target_acc=(1e-9, 1.0), eval_every=(1, 10**7),
              eval_size=(1, 500), log_every=(1, 10**7), ckpt_every=(1, 10**7))
CHOICES = dict(device=("auto", "cpu", "cuda", "mps"), precision=("auto", "fp32", "bf16"), exit_norm=("own", "ln_f", "ln_f_frozen"),
               task=("add", "chain"), loss_reduction=("token", "sequence"),
               adv_weighting=("signed", "positive", "none"))
MAX_GIB = 32  # a run whose rough memory estimate (estimated_gib) is larger is refused before it starts


def estimated_gib(cfg):
    """A rough upper estimate of a run's peak memory in GiB: fp32 weights, gradients and two AdamW moments
    (16 bytes a parameter), plus the activations of the largest training batch (about 20 floats per token,
    layer and unit of width, and the attention rows of every head)."""
    params = 12 * cfg.n_layer * cfg.n_embd**2
    rows = max(cfg.sft_batch, cfg.prompts_per_step * cfg.group_size)
    T = cfg.block_size
    activations = 4 * rows * cfg.n_layer * (20 * T * cfg.n_embd + 2 * cfg.n_head * T * T)
    return (16 * params + activations) / 2**30


def validate(cfg, presets, arms, no_layers, arm_config):
    """Raise ConfigError naming the first bad value: non-finite numbers, values out of range, impossible
    combinations, unknown names. From the method (oisd.py): presets (PRESETS), arms (ARMS), no_layers (the
    arms that align no layer) and arm_config(cfg, arm) (the config of an arm)."""
    for key, (lo, hi) in RANGES.items():
        value = getattr(cfg, key)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ConfigError(f"--{key} must be a finite number in [{lo}, {hi}], got {value}")
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
    if estimated_gib(cfg) > MAX_GIB:
        raise ConfigError(f"this model and batch need roughly {estimated_gib(cfg):.0f} GiB (n_layer, n_embd, block_size, "
                          f"sft_batch, prompts_per_step x group_size); at most {MAX_GIB} GiB is allowed")
    if (cfg.device == "cuda" and not torch.cuda.is_available()) or (cfg.device == "mps" and not torch.backends.mps.is_available()):
        raise ConfigError(f"--device={cfg.device} is not available on this machine")
    device = pick_device(cfg)
    if cfg.precision == "bf16" and not (device == "cpu" or (device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False))):
        raise ConfigError(f"--precision=bf16 needs a CPU (emulated) or a GPU with native bf16; {device} has none")
    try:
        layers = [int(x) for x in cfg.align_layers.split(",")]
    except ValueError:
        raise ConfigError(f"--align_layers expects comma-separated integers, got {cfg.align_layers!r}") from None
    if len(set(layers)) != len(layers) or not all(1 <= layer < cfg.n_layer for layer in layers):
        raise ConfigError(f"--align_layers: {cfg.align_layers!r} must list distinct layers in 1..{cfg.n_layer - 1}")
    check_arms(cfg, presets, arms, no_layers, arm_config)
    if cfg.preset and cfg.preset not in presets:
        raise ConfigError(f"--preset: unknown preset {cfg.preset!r}; choose from {', '.join(presets)}")
    try:
        task = make_task(cfg.task, **task_options(cfg))
        heldout_split(task)  # too small a task has no room for the held-out problems
    except ValueError as e:
        raise ConfigError(f"--task: {e}") from None
    if 0 < cfg.max_new_tokens < task.completion_tokens:
        raise ConfigError(f"--max_new_tokens {cfg.max_new_tokens} cannot hold a correct completion "
                          f"({task.completion_tokens} tokens with EOS): every reward would be 0")
    longest = len(task.sample(random.Random(0))[0]) + (cfg.max_new_tokens or task.completion_tokens + 2)
    if longest > cfg.block_size:
        raise ConfigError(f"--block_size {cfg.block_size} is too small for prompt + max_new_tokens = {longest}")


def check_arms(cfg, presets, arms, no_layers, arm_config):
    """Raise ConfigError unless --arms names known arms, each once, with valid layers, grpo before sft_more."""
    names = cfg.arms.split(",")
    if len(set(names)) != len(names):
        raise ConfigError(f"--arms lists an arm twice: {cfg.arms!r}")
    for arm in names:
        name, colon, layers = arm.partition(":")
        if name not in arms:
            raise ConfigError(f"--arms: unknown arm {arm!r}; choose from {', '.join(arms)}")
        if colon and name in no_layers:
            raise ConfigError(f"--arms: {name} aligns no layer, so {arm!r} means nothing; write {name}")
        if colon and not re.fullmatch(r"[1-9]\d*(\+[1-9]\d*)*", layers):
            raise ConfigError(f"--arms: {arm!r}: write the layers as arm:1 or arm:1+3")
        if colon:
            validate(arm_config(dataclasses.replace(cfg, arms="grpo"), arm), presets, arms, no_layers, arm_config)
    if "sft_more" in names and "grpo" not in names[: names.index("sft_more")]:
        raise ConfigError("--arms: sft_more runs for as long as grpo did, so grpo must come before it")


def refuse(message):
    """Exit with status 2 and one line: the invocation is wrong, and no work has been done."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def check_out_dir(path):
    """Exit 2 with one line unless `path` is (or can be made) a writable directory."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        refuse(f"--out_dir={path} is not a usable directory ({e.strerror or type(e).__name__})")


def setup(argv, cls, prog, validate_more=None, **method):
    """Parse and check every flag (exit 2 with one line on a bad one; validate_more checks the flags a
    subclass of Config adds), check out_dir, print the run's facts. Returns the Env."""
    try:
        cfg = parse_args(argv, cls, prog, **method)
        if validate_more:
            validate_more(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    check_out_dir(cfg.out_dir)
    env = Env(cfg)
    print(f"device: {env.device} | precision: {env.precision} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    return env


def task_options(cfg):
    return dict(digits=cfg.digits) if cfg.task == "add" else dict(terms=cfg.terms, digits=cfg.digits)


def stream_seed(seed, purpose):
    """The seed of one random stream: a hash of (run seed, purpose), so that no two streams of any two
    seeds coincide (seed 1's warm-up is not seed 0's RL prompts, and so on)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "big") >> 1


# -----------------------------------------------------------------------------
# Device, precision, timing, and what every stage shares

def pick_device(cfg):
    if cfg.device != "auto":
        return cfg.device
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def pick_precision(cfg, device):
    """'bf16' or 'fp32': auto means bf16 only on a GPU with native bf16 (not emulated)."""
    if cfg.precision != "auto":
        return cfg.precision
    return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"


def autocast(env):
    """bf16 autocast where the run's precision is bf16 (on a CPU it is emulated); plain fp32 elsewhere.
    The exit heads and the attention probabilities for the loss stay in fp32 either way (model.py)."""
    if env.precision == "bf16":
        return torch.autocast(env.device, dtype=torch.bfloat16)
    return nullcontext()


def now(device):
    """Wall time, after waiting for queued GPU work so that phases are timed honestly."""
    if device == "cuda":
        torch.cuda.synchronize()
    elif device == "mps":
        torch.mps.synchronize()
    return time.perf_counter()


class Env:
    """What every stage shares: config, device, precision, task, tokenizer and the fixed problem sets."""

    def __init__(self, cfg):
        self.cfg, self.device = cfg, pick_device(cfg)
        self.precision = pick_precision(cfg, self.device)
        self.task = make_task(cfg.task, **task_options(cfg))
        self.tok = get_tokenizer()
        self.eos_id = self.tok.eot_token
        test, self.val = heldout_split(self.task)
        self.exclude = heldout_keys(self.task, test + self.val)  # training never samples any reordering of these
        self.test = test[: cfg.eval_size]
        self.prompt_len = len(self.task.sample(random.Random(0))[0])
        self.max_new = cfg.max_new_tokens or self.task.completion_tokens + 2

    def model_config(self, cfg):
        return GPTConfig(vocab_size=self.tok.n_vocab, block_size=cfg.block_size,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, exit_norm=cfg.exit_norm)

    def describe(self):
        return (f"task {self.cfg.task} {task_options(self.cfg)}: {self.task.size:,} problems, "
                f"{trainable_size(self.task, self.exclude):,} trainable (every reordering of the "
                f"{len(self.exclude)} held-out ones excluded)")

    def prompts(self, problems):
        """list of (prompt, answer) -> (B, P) token ids on the device."""
        return torch.tensor([self.tok.encode(p) for p, _ in problems], device=self.device)

    def solutions(self, problems):
        """Worked solutions: inputs (B, P+C-1) and targets (B, P+C-1), -1 on the prompt (not learned)."""
        seq = torch.tensor([self.tok.encode(p + self.task.solution(p)) + [self.eos_id] for p, _ in problems],
                           device=self.device)  # (B, P+C)
        targets = seq[:, 1:].clone()
        targets[:, : self.prompt_len - 1] = -1
        return seq[:, :-1], targets

    def completions(self, seq):
        """seq: (N, P+R) -> the N completions as text, cut after the first EOS (tasks.completion_texts)."""
        return completion_texts(self.tok, seq[:, self.prompt_len:])


def make_optimizer(model, lr, device):
    """AdamW; the fused kernel where there is one (a third of the optimizer time on this CPU)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             fused=device in ("cpu", "cuda"))


# -----------------------------------------------------------------------------
# Non-finite numbers stop the run with one line

def check_finite(name, value):
    """Raise FloatingPointError naming `name` if the tensor `value` holds a NaN or an inf."""
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"{name} is not finite")


def check_step(stats, model):
    """After an RL step: raise FloatingPointError naming the first non-finite number among its loss terms
    (stats' loss_*), then its gradient norm, then the model's weights. Returns stats."""
    for name, value in [(k, v) for k, v in stats.items() if k.startswith("loss_")] + [("the gradient norm", stats["grad_norm"])]:
        if not math.isfinite(value):
            raise FloatingPointError(f"{name} is not finite")
    check_weights(model)
    return stats


def check_weights(model):
    """Raise FloatingPointError if any weight of the model is a NaN or an inf."""
    check_finite("the weights", torch.stack(torch._foreach_norm(list(model.parameters()))))


@contextmanager
def stop_if_not_finite(where, hint):
    """Turn a FloatingPointError inside into an exit with one line naming where it happened and what to try."""
    try:
        yield
    except FloatingPointError as e:
        sys.exit(f"error: {where}: {e}; stopping ({hint})")


def train_for(seconds, device, step_fn, name, hint):
    """Call step_fn() until `seconds` of its own time are spent (a wall-clock budget, the control arm
    sft_more's); a non-finite number stops the run with one line naming the step. Returns (steps, seconds)."""
    spent, step = 0.0, 0
    while spent < seconds:
        step += 1
        t0 = now(device)
        with stop_if_not_finite(f"{name} step {step}", hint):
            step_fn()
        spent += now(device) - t0
    return step, spent


def alignment_evidence(cfg, model, weights, advantages, terms, jsd, mask):
    """The diag_* numbers of oisd.diagnose, from one batch's alignment weights and advantages (N,), loss
    terms, and per-position logit JSD (N, R) of the first aligned exit vs the final layer:
    diag_w_group_sum, the mean over groups of the sum of the weights (about 0 for signed weights);
    diag_align_grad_norm and diag_grpo_grad_norm, the gradient norms of the alignment terms and of GRPO;
    diag_jsd_adv_corr, the correlation between the advantage and the rollout's mean JSD, pooled over the
    batch's rollouts with A != 0 (across prompts, so the JSD's spread between prompts dilutes it;
    research/gradients.py measures it within groups, and how far the rollouts' gradients cancel)."""
    align = cfg.lambda_logit * terms.get("logit", 0.0) + cfg.lambda_attn * terms.get("attn", 0.0)
    out = {"w_group_sum": weights.view(-1, cfg.group_size).sum(1).mean().item(),
           "align_grad_norm": grad_norm(align, model), "grpo_grad_norm": grad_norm(terms["grpo"], model)}
    per_rollout = (jsd * mask).sum(1) / mask.sum(1)
    informative = advantages != 0
    if informative.sum() > 2:
        out["jsd_adv_corr"] = torch.corrcoef(torch.stack([per_rollout[informative], advantages[informative]]))[0, 1].item()
    return {f"diag_{k}": v for k, v in out.items()}


def grad_norm(loss, model):
    """The norm of the gradient of loss over the model's trainable weights, leaving no gradient behind;
    0.0 if loss is not a tensor (a term that is switched off)."""
    if not torch.is_tensor(loss):
        return 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.sqrt(sum(g.square().sum() for g in grads if g is not None)).item()


# -----------------------------------------------------------------------------
# Files and checkpoints

def write_atomic(path, content):
    """Write content (a str as text, anything else with torch.save) to a temporary file of this process,
    then rename: a reader, or a run killed mid-write, never sees a half-written file, and processes
    writing the same file do not share a temporary one."""
    tmp = f"{path}.{os.getpid()}.tmp"
    if isinstance(content, str):
        with open(tmp, "w") as f:
            f.write(content)
    else:
        torch.save(content, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device, keys=("model",)):
    """torch.load, or exit with one clear line if the file is unreadable or lacks one of `keys`."""
    try:
        ck = torch.load(path, map_location=device, weights_only=True)
        missing = [k for k in keys if k not in ck]
    except Exception as e:  # any unreadable file: one clear line instead of a deep traceback
        sys.exit(f"error: checkpoint {path} is corrupt or unreadable ({type(e).__name__}); delete it and rerun")
    if missing:
        sys.exit(f"error: checkpoint {path} lacks {', '.join(missing)}; delete it and rerun")
    return ck


# -----------------------------------------------------------------------------
# The warm-up cache

# What the warm-up's weights depend on: these config fields, and the machine facts in warmup_key().
WARMUP_FIELDS = ["seed", "task", "digits", "terms", "block_size", "n_layer", "n_head", "n_embd", "sft_lr",
                 "sft_batch", "sft_target_acc", "sft_max_steps", "sft_eval_every", "max_new_tokens"]


def warmup_key(env):
    """Everything that changes the warm-up's weights: its config fields, the device, the precision, the
    torch version and the thread count (rounding differs with each, and the warm-up amplifies it)."""
    return dict({k: getattr(env.cfg, k) for k in WARMUP_FIELDS}, device=env.device, precision=env.precision,
                torch=str(torch.__version__), threads=torch.get_num_threads())


def warmup_path(env):
    """The warm-up's cache file in out_dir, named by a hash of warmup_key()."""
    return os.path.join(env.cfg.out_dir, f"warmup-{hashlib.sha1(json.dumps(warmup_key(env)).encode()).hexdigest()[:10]}.pt")


def cached_warmup(env):
    """The cached warm-up weights if this very warm-up (warmup_key) ran before in out_dir, else None."""
    path = warmup_path(env)
    if not os.path.exists(path):
        return None
    ck = load_checkpoint(path, env.device, ("model", "key"))
    if ck["key"] != warmup_key(env):
        sys.exit(f"error: {path} was made with other settings; delete it and rerun")
    print(f"warm-up: reusing {path}")
    return ck["model"]


def save_warmup(env, state, val_acc, steps):
    """Cache the warm-up's weights under warmup_key(); say so, and what to try, if it missed its target."""
    cfg = env.cfg
    if val_acc < cfg.sft_target_acc:
        print(f"warm-up: validation accuracy {val_acc:.1%} did not reach {cfg.sft_target_acc:.0%} in {cfg.sft_max_steps} "
              "steps: this seed missed the sudden jump in accuracy the warm-up usually makes, and RL from a model "
              "that is almost never right has little to reinforce. Going on from here; for a usable start try "
              "another --seed or a larger --sft_max_steps (research/experiments.py --skip_missed gives such a seed no RL)")
    write_atomic(warmup_path(env), {"model": state, "key": warmup_key(env), "config": dataclasses.asdict(cfg),
                                    "val_acc": val_acc, "steps": steps})


# -----------------------------------------------------------------------------
# Checkpoints of the arms, and resume

# Config fields that may change between a run and its --resume: how often things happen, how long it runs.
RESUMABLE = {"rl_steps", "eval_every", "log_every", "ckpt_every", "resume", "arms", "out_dir", "preset"}
ARM_KEYS = ("model", "optimizer", "step", "result", "train_seconds", "rng", "gen", "config", "device", "precision",
            "warmup_key")
SFT_MORE_KEYS = ("result", "config", "budget", "device", "precision", "warmup_key")


def run_fields(cfg):
    """The fields of the method's config (oisd.Config, the class built directly on RunConfig): the flags a
    subclass adds for measurement (research/experiments.py's) never block a resume."""
    return dataclasses.fields(next(k for k in type(cfg).__mro__ if RunConfig in k.__bases__))


def check_resumable(env, cfg, ck, path, rl_steps=None):
    """Exit 2 with one line unless checkpoint ck, of the arm whose config is cfg, can continue this run
    exactly: the same arm config beyond RESUMABLE, device and precision (random streams and numerics differ
    on others), the same warm-up (its key holds the thread count), and not already past rl_steps."""
    differ = [f.name for f in run_fields(cfg)
              if f.name not in RESUMABLE and ck["config"].get(f.name) != getattr(cfg, f.name)]
    differ += [name for name, value in (("device", env.device), ("precision", env.precision),
                                        ("warm-up (thread count, torch version)", warmup_key(env)))
               if ck.get(name if name in ("device", "precision") else "warmup_key") != value]
    if differ:
        refuse(f"{path} was made with other settings ({', '.join(differ)}); use another --out_dir or run without "
               "--resume (or with the settings it was made with, such as OMP_NUM_THREADS)")
    if rl_steps is not None and ck["step"] > rl_steps:
        refuse(f"{path} is at step {ck['step']}, past --rl_steps={rl_steps}; use another --out_dir")


def preflight(env, arm_config):
    """With --resume, check every arm checkpoint already in out_dir before any work starts.
    arm_config(cfg, arm): the config of an arm."""
    for arm in env.cfg.arms.split(",") if env.cfg.resume else []:
        path = os.path.join(env.cfg.out_dir, f"{arm}.pt")
        if os.path.exists(path):
            keys = ARM_KEYS if arm != "sft_more" else SFT_MORE_KEYS
            check_resumable(env, arm_config(env.cfg, arm), load_checkpoint(path, env.device, keys), path,
                            None if arm == "sft_more" else env.cfg.rl_steps)


def start_run(env, arm_config):
    """Make out_dir, print the task, and with --resume check every arm's checkpoint before any work
    starts (arm_config(cfg, arm): an arm's config). Returns the start time."""
    os.makedirs(env.cfg.out_dir, exist_ok=True)
    t0 = time.time()
    print(env.describe())
    preflight(env, arm_config)
    return t0


def save_arm(env, cfg, path, model, opt, step, result, train_seconds, rng, gen):
    """An RL arm's checkpoint: everything --resume needs to continue exactly (weights, optimizer, both
    random streams), with the config and the machine facts it must match."""
    write_atomic(path, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "result": result,
                        "train_seconds": train_seconds, "rng": rng.getstate(), "gen": gen.get_state(),
                        "config": dataclasses.asdict(cfg), "device": env.device, "precision": env.precision,
                        "warmup_key": warmup_key(env)})


def resume_arm(env, cfg, arm, path, model, opt, rng, gen):
    """With --resume and a checkpoint at path: check it, load it into model, opt, rng and gen, and return
    (step, result, train_seconds); else None (a fresh start)."""
    if not (cfg.resume and os.path.exists(path)):
        return None
    ck = load_checkpoint(path, env.device, ARM_KEYS)
    check_resumable(env, cfg, ck, path, cfg.rl_steps)
    try:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError) as e:
        sys.exit(f"error: checkpoint {path} does not fit this config ({str(e).splitlines()[0]}); "
                 "use another --out_dir or run without --resume")
    rng.setstate(ck["rng"])
    gen.set_state(ck["gen"].cpu())
    print(f"{arm}: resumed from {path} at step {ck['step']}")
    return ck["step"], ck["result"], ck["train_seconds"]


def reuse_sft_more(env, path, budget):
    """With --resume, the result of a finished sft_more arm at path trained for this budget, else None."""
    if not (env.cfg.resume and os.path.exists(path)):
        return None
    ck = load_checkpoint(path, env.device, SFT_MORE_KEYS)
    check_resumable(env, env.cfg, ck, path)
    if ck["budget"] == budget:
        print(f"sft_more: reusing {path}")
        return ck["result"]
    print(f"sft_more: {path} had a budget of {ck['budget']:.1f}s, grpo now trained {budget:.1f}s: training again")
    return None


def save_sft_more(env, path, model, steps, result, budget, log):
    """Print and log the finished sft_more arm (steps supervised steps, result), and save it at path."""
    print(f"  sft_more {steps} supervised steps in {result['train_seconds']:.0f}s | held-out acc "
          f"{result[f'acc_L{env.cfg.n_layer}']:6.1%}")
    log({"arm": "sft_more", "step": steps, **result})
    write_atomic(path, {"model": model.state_dict(), "result": result, "config": dataclasses.asdict(env.cfg),
                        "budget": budget, "device": env.device, "precision": env.precision,
                        "warmup_key": warmup_key(env)})


# -----------------------------------------------------------------------------
# Progress lines and the table

class Progress:
    """Means of an arm's step stats since the last progress line; every log_every steps (and at the last)
    a line with reward, held-out accuracy, loss terms, speed and time left, also logged as train_*."""

    def __init__(self, arm, cfg, step, log):
        self.arm, self.cfg, self.log, self.sums, self.last = arm, cfg, log, {}, (step, time.time())

    def update(self, step, stats, result):
        cfg = self.cfg
        for name, value in stats.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        if not (step % cfg.log_every == 0 or step == cfg.rl_steps):
            return
        n, seconds = step - self.last[0], time.time() - self.last[1]
        means = {k: v / n for k, v in self.sums.items()}
        print(f"{self.arm:>10} step {step:4d}/{cfg.rl_steps} | reward {means['reward']:.2f} | "
              f"held-out acc {result[f'acc_L{cfg.n_layer}']:6.1%} | "
              + " ".join(f"{k[5:]} {v:+.4f}" for k, v in means.items() if k.startswith("loss_"))
              + f" | {n / seconds:4.1f} steps/s {self.sums['tokens'] / seconds:5.0f} tok/s"
              + f" | eta {(cfg.rl_steps - step) * seconds / n:4.0f}s")
        self.log({"arm": self.arm, "step": step, **{f"train_{k}": v for k, v in means.items()}})
        self.sums, self.last = {}, (step, time.time())


class MetricsLog:
    """log(record) appends record to out_dir/metrics.jsonl as one JSON line, flushed; a fresh run (no
    --resume) starts the file afresh."""

    def __init__(self, cfg):
        self.file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a" if cfg.resume else "w")

    def __call__(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def save_results(cfg, rows, t0):
    """Print the table of rows and write it to out_dir/results.json; t0: when the run started."""
    print()
    print_table(rows, cfg.n_layer)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\ntotal time {time.time() - t0:.0f}s; metrics in {cfg.out_dir}/metrics.jsonl, results in {cfg.out_dir}/results.json")


def print_table(rows, n_layer):
    """rows: {name: evaluation dict} -> held-out greedy accuracy of the final layer and of each exit, as
    trained and through the logit lens (the trained ln_f)."""
    exits = range(n_layer - 1, 0, -1)
    print("held-out greedy accuracy: the final layer; each exit as trained; each exit through the trained ln_f (lens)")
    print(f"{'':<16}{'final':>8}" + "".join(f"{f'exit L{l}':>9}" for l in exits) + "".join(f"{f'lens L{l}':>9}" for l in exits))
    for name, res in rows.items():
        print(f"{name:<16}{res[f'acc_L{n_layer}']:8.1%}" + "".join(f"{res[f'acc_L{l}']:9.1%}" for l in exits)
              + "".join(f"{res[f'lens_acc_L{l}']:9.1%}" for l in exits))


# -----------------------------------------------------------------------------
# The lens picture: one held-out problem read at every exit of every row of the table (out_dir/lens.png)

@torch.inference_mode()
def lens_grid(env, model, problem):
    """What each exit head, as trained, predicts along the model's own greedy completion of problem (prompt,
    answer): one teacher-forced forward over prompt + completion (cut just after its first EOS: R tokens),
    read at the R positions that predict the completion. Returns (tokens, probs, completion): tokens[l-1][t]
    is layer l's top-1 token at response position t as text ('EOS' for the end of text), probs (L, R) its
    probability, completion the completion's text."""
    L, P = model.config.n_layer, env.prompt_len
    with autocast(env):
        seq, _ = model.generate(env.prompts([problem]), env.max_new, temperature=0, eos_id=env.eos_id)
        response = seq[0, P:].tolist()
        R = response.index(env.eos_id) + 1 if env.eos_id in response else len(response)
        exits = model(seq[:, : P + R - 1], exit_layers=range(1, L + 1))[1]
    probs, top = torch.stack([exits[l][0, P - 1:].float().softmax(-1) for l in range(1, L + 1)]).max(-1)  # (L, R)
    tokens = [["EOS" if t == env.eos_id else env.tok.decode([t]) for t in row] for row in top.tolist()]
    return tokens, probs.cpu(), env.completions(seq)[0]


def lens_models(env, rows, warm_state, load_policy, arm_config):
    """{row: model} for every row of the table whose model can be read back: the warm-up start as RL starts
    (load_policy(env, cfg, state): exit norms copies of ln_f), and each arm (arm_config(cfg, arm)) whose
    checkpoint in out_dir holds this very row's result (a stale one from another run does not)."""
    models = {}
    for name, result in rows.items():
        start = name == "warm-up start"
        model = load_policy(env, env.cfg if start else arm_config(env.cfg, name), warm_state)
        path = os.path.join(env.cfg.out_dir, f"{name}.pt")
        if not start:
            ck = load_checkpoint(path, env.device, ("model", "result")) if os.path.exists(path) else None
            if ck is None or ck["result"] != result:
                continue
            model.load_state_dict(ck["model"])
        models[name] = model.eval()
    return models


def draw_lens(env, grids, problem, path):
    """One panel per row of grids ({name: lens_grid(...)}): layers up the side (the final layer on top),
    response positions along, each cell the top-1 token shaded by its probability (bold: the final layer's
    token); written to path as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    L, R = len(next(iter(grids.values()))[0]), max(len(g[0][0]) for g in grids.values())
    ncols = 1 if len(grids) < 3 else 2
    nrows = -(-len(grids) // ncols)
    fig = Figure(figsize=(ncols * (1.3 + 0.5 * R) + 1.2, nrows * (0.8 + 0.5 * L) + 0.8), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax, (name, (tokens, probs, completion)) in zip(axes, grids.items()):
        image = ax.imshow(probs.numpy(), origin="lower", cmap="viridis", vmin=0, vmax=1)
        for l, row in enumerate(tokens):
            for t, token in enumerate(row):
                ax.text(t, l, token, ha="center", va="center", fontsize=11, color="black" if probs[l, t] > 0.6 else "white",
                        fontweight="bold" if token == tokens[-1][t] else "normal")
        right = env.task.reward(completion, problem[1]) == 1.0
        answer = completion.replace(env.tok.decode([env.eos_id]), "")
        ax.set_title(f"{name}: {'right' if right else 'wrong'} ({answer})", fontsize=10)
        ax.set_xlim(-0.5, R - 0.5)
        ax.set_xticks(range(len(tokens[0])), [str(t + 1) for t in range(len(tokens[0]))], fontsize=8)
        ax.set_yticks(range(L), [f"L{l}" for l in range(1, L)] + [f"final (L{L})"], fontsize=8)
        ax.set_xlabel("response position", fontsize=8)
    for ax in axes[len(grids):]:  # the spare panel of an odd count
        ax.axis("off")
    fig.colorbar(image, ax=fig.axes, label="probability of the top-1 token", shrink=0.8)
    fig.suptitle(f"held-out {problem[0]}{env.task.solution(problem[0])}: each exit's top-1 next token along the model's "
                 "own greedy completion\n(bold: the final layer's token)", fontsize=10)
    tmp = f"{path}.{os.getpid()}.tmp"  # as write_atomic: never a half-written picture
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, path)


def save_lens_picture(env, rows, warm_state, load_policy, arm_config):
    """Draw out_dir/lens.png (draw_lens) for the first held-out problem and every row of the table whose model
    can be read back (lens_models), and say so in one line. Needs matplotlib: without it one line says how
    to get it, and the run goes on. Changes no number of the run and leaves the global random stream as it was."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("lens.png skipped: pip install matplotlib to draw it")
        return
    path, problem = os.path.join(env.cfg.out_dir, "lens.png"), env.test[0]
    try:  # a picture must never cost the run (or a grid) its results
        with torch.random.fork_rng(devices=[]):  # building a GPT draws its initial weights from the global stream
            models = lens_models(env, rows, warm_state, load_policy, arm_config)
            grids = {name: lens_grid(env, model, problem) for name, model in models.items()}
        draw_lens(env, grids, problem, path)
    except Exception as e:
        print(f"lens.png skipped: {type(e).__name__}: {e}")
        return
    print(f"saved {path}: held-out {problem[0]} read at every exit of {', '.join(grids)}")


# -----------------------------------------------------------------------------
# Compile: fixed shapes, compiled before the timed steps

class PaddedForward:
    """The compiled model behind the model's own call signature: a call after cached positions (the response
    part of oisd.forward_responses; not the prompt pass that fills an empty cache) is padded with EOS to
    `length` positions, so the compiled graph always
    sees the same shapes and never recompiles, and every output is cut back to the positions asked for
    (causal attention: no asked-for position sees the padding)."""

    def __init__(self, model, length, eos_id):
        self.compiled, self.length, self.eos_id = torch.compile(model, dynamic=False), length, eos_id
        self.config = model.config

    def __call__(self, idx, cache=None, **kwargs):
        T = idx.size(1)
        if cache is None or cache.length() == 0 or T == self.length:
            return self.compiled(idx, cache=cache, **kwargs)
        keys = cache.length() + T
        logits, exits, attns = self.compiled(F.pad(idx, (0, self.length - T), value=self.eos_id), cache=cache, **kwargs)
        return (logits[:, :T], {l: x[:, :T] for l, x in exits.items()},
                {l: a[:, :, :T, :keys] for l, a in attns.items()})


def compile_forward(env, cfg, model, loss_fn, name=None):
    """torch.compile the training forward for fixed shapes (PaddedForward) and compile it now, forward and
    backward, on a dummy batch through loss_fn (oisd.rl_loss or the arm's loss; no optimizer step), so that
    compile time stays out of the timed RL steps. Prints the time it took if name (the arm) is given.
    Returns (the compiled forward, seconds spent compiling)."""
    t0 = now(env.device)
    torch._dynamo.reset()  # every arm compiles afresh: the previous arms' graphs would count toward the recompile limit
    N, P, R = cfg.prompts_per_step * cfg.group_size, env.prompt_len, env.max_new
    forward = PaddedForward(model, R, env.eos_id)
    seq = torch.full((N, P + R), env.eos_id, device=env.device)
    ones = torch.ones(N, R, device=env.device)
    with autocast(env):
        total, _ = loss_fn(cfg, forward, seq, P, 0 * ones, ones[:, 0], ones)
    total.backward()
    model.zero_grad(set_to_none=True)
    seconds = now(env.device) - t0
    if name:
        print(f"{name}: compiled in {seconds:.1f}s (not counted as training time)")
    return forward, seconds
