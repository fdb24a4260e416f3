"""
OISD: On-Policy Internal Self-Distillation (arXiv 2605.29089), at a scale a laptop can run.

    python oisd.py                       # warm-up, then GRPO vs GRPO+OISD vs GRPO+OISD(positive), ~3 min on 2 CPU cores
    python oisd.py --task=chain --rl_steps=500 --arms=grpo,oisd
    python oisd.py --help                # every flag, its type, default and meaning

Stage 1 (warm-up): supervised next-token training on worked solutions, stopped as soon as greedy accuracy
on a small validation set reaches sft_target_acc, so the policy is partly right and RL has work to do.
Stage 2 (RL): GRPO on the final layer, plus OISD's two terms, which pull a chosen intermediate layer's
exit distribution and attention pattern toward the final layer's (a detached teacher), weighted per
rollout by its GRPO advantage:

    L = L_GRPO + lambda_logit * L_logit + lambda_attn * L_attn

Every arm starts from the same warm-up checkpoint with the same seed, prompts and step budget.
Simplifications, stated up front: prompts of a task all have the same length (no left padding); the
reward is 0/1 exact match; one optimizer step per rollout batch unless num_iterations > 1; old
log-probabilities are the sampler's own, recorded at rollout time. Measurement built on top of this
file (grids of seeds, probes, Avg@K, benchmarks, speculative decoding) lives in experiments.py.
"""

import argparse
import copy
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
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache
from tasks import get_tokenizer, heldout_keys, heldout_split, make_task, sample_problems, trainable_size


@dataclass
class Config:
    # run
    out_dir: str = "out"             # checkpoints, metrics.jsonl and results.json go here
    seed: int = 0                    # every random stream of a run derives from (seed, its purpose)
    device: str = "auto"             # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    precision: str = "auto"          # auto (bf16 autocast on a GPU with native bf16, else fp32) | fp32 | bf16 (emulated on a CPU)
    compile: bool = False            # torch.compile the training forward (pays on a GPU; compile time is not train time)
    arms: str = "grpo,oisd,oisd_pos"  # arms to train, names from ARMS; arm:1+3 also sets align_layers=1,3
    resume: bool = False             # continue each arm from its checkpoint in out_dir
    preset: str = ""                 # gpu: a larger model and a harder task for one consumer GPU (PRESETS)
    # task
    task: str = "add"                # add | chain (running sums written out: 12+34+56= -> 046,102)
    digits: int = 3                  # digits per operand
    terms: int = 3                   # operands of the chain task
    # model
    block_size: int = 32             # positions; must hold prompt + max_new_tokens
    n_layer: int = 4                 # transformer blocks
    n_head: int = 4                  # attention heads per block
    n_embd: int = 128                # residual stream width
    exit_norm: str = "own"           # own: each exit head has its own LayerNorm | ln_f: the logit lens
    # stage 1: supervised warm-up
    sft_lr: float = 1e-3             # AdamW learning rate of the warm-up
    sft_batch: int = 64              # worked solutions per warm-up step
    sft_target_acc: float = 0.5      # stop once validation greedy accuracy reaches this
    sft_max_steps: int = 3000        # stop here even if the target is not reached
    sft_eval_every: int = 20         # warm-up steps between validation checks
    # stage 2: GRPO
    rl_steps: int = 400              # RL steps per arm
    prompts_per_step: int = 16       # prompts per RL step
    group_size: int = 8              # G rollouts per prompt
    temperature: float = 1.0         # sampling temperature; log-probs are taken at the same temperature
    max_new_tokens: int = 0          # 0: the task's completion length + 2
    rl_lr: float = 1e-4              # AdamW learning rate of RL
    clip_eps: float = 0.2            # PPO clip range of the ratio
    num_iterations: int = 1          # optimizer steps per rollout batch
    kl_beta: float = 0.0             # weight of the k3 estimate of KL(policy || frozen warm-up model)
    scale_advantages: bool = True    # divide by the group's reward std (GRPO); false: centred only, as in Dr. GRPO
    loss_reduction: str = "token"    # token: mean over all response tokens | sequence: per-sequence mean, then mean
    grad_clip: float = 1.0           # gradient-norm clip
    # OISD
    align_layers: str = "2"          # intermediate layer(s) taught by the final layer, comma-separated, 1..n_layer-1
    lambda_logit: float = 1.0        # weight of the logit alignment term
    lambda_attn: float = 0.1         # weight of the attention alignment term
    adv_weighting: str = "signed"    # signed: A | positive: max(A, 0) | abs: |A| | none: 1
    lambda_exit_ce: float = 0.0      # a control: cross-entropy on worked solutions for the aligned exits
    # evaluation and logging
    eval_every: int = 50             # RL steps between held-out evaluations
    eval_size: int = 500             # held-out problems evaluated (the first eval_size of 500)
    log_every: int = 25              # RL steps between progress lines
    ckpt_every: int = 50             # RL steps between checkpoints


# Each arm is the config with these fields replaced.
ARMS = {
    "grpo": dict(lambda_logit=0.0, lambda_attn=0.0),
    "oisd": dict(adv_weighting="signed"),
    "oisd_pos": dict(adv_weighting="positive"),
    "oisd_abs": dict(adv_weighting="abs"),
    "oisd_none": dict(adv_weighting="none"),
    "logit_only": dict(adv_weighting="signed", lambda_attn=0.0),
    "attn_only": dict(adv_weighting="signed", lambda_logit=0.0),
    "oisd_lens": dict(adv_weighting="signed", exit_norm="ln_f"),
    # controls: plain GRPO with the exits trained by supervised cross-entropy instead of by the teacher;
    # and no RL at all, the supervised warm-up continued for as long as the grpo arm trained
    "grpo_ce_exits": dict(lambda_logit=0.0, lambda_attn=0.0, lambda_exit_ce=1.0),
    "sft_more": dict(),  # run by continue_warmup(), not by train_arm()
}
NO_LAYERS = ("grpo", "sft_more")  # arms that align no layer: an arm:layers suffix would mean nothing


def arm_config(cfg, arm):
    """The config of an arm: 'oisd_pos' or, with the aligned layers set, 'oisd_pos:1+3'."""
    name, _, layers = arm.partition(":")
    overrides = dict(ARMS[name], **({"align_layers": layers.replace("+", ",")} if layers else {}))
    return dataclasses.replace(cfg, **overrides)


# A preset replaces these defaults first; flags given with it still win.
PRESETS = {
    "gpu": dict(task="chain", terms=4, digits=3, n_layer=8, n_head=8, n_embd=512, align_layers="4",
                block_size=64, sft_lr=3e-4, sft_batch=256, prompts_per_step=32, group_size=16, rl_lr=3e-5, rl_steps=500),
}


# -----------------------------------------------------------------------------
# The command line: --key=value for every Config field, --help built from the comments above.

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
    each field's trailing comment is its help. Subclasses (experiments.py) add their own groups."""
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


def parse_args(argv, cls=Config, prog="oisd.py"):
    """A cls from --key=value flags (bools also as a bare --key), after the --preset if one is given.
    --help prints every flag and exits 0. Raises ConfigError (one line) on any bad flag or value."""
    presets = [arg.partition("=")[2] for arg in argv if arg.startswith("--preset=")]
    if "--preset" in argv:  # argparse would take '--preset gpu' too, after the defaults were already chosen
        raise ConfigError("write --preset=NAME (with '='), e.g. --preset=gpu")
    if presets and presets[-1] and presets[-1] not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {presets[-1]!r}; choose from {', '.join(PRESETS)}")
    defaults = cls(**PRESETS[presets[-1]]) if presets and presets[-1] else cls()
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
    validate(cfg)
    return cfg


def layer_list(cfg):
    return [int(x) for x in cfg.align_layers.split(",")]


# Inclusive ranges of the numeric flags: anything outside is refused before work starts.
RANGES = dict(seed=(0, 2**31 - 1), digits=(1, 9), terms=(2, 10), block_size=(2, 4096), n_layer=(2, 96),
              n_head=(1, 128), n_embd=(1, 16384), sft_lr=(1e-12, 1.0), sft_batch=(1, 65536),
              sft_max_steps=(1, 10**7), sft_eval_every=(1, 10**7), rl_steps=(0, 10**7),
              prompts_per_step=(1, 65536), group_size=(2, 4096), temperature=(1e-3, 100.0),
              max_new_tokens=(0, 4096), rl_lr=(1e-12, 1.0), clip_eps=(1e-6, 0.999), num_iterations=(1, 1000),
              kl_beta=(0.0, 1e6), grad_clip=(1e-8, 1e6), lambda_logit=(0.0, 1e6), lambda_attn=(0.0, 1e6),
              lambda_exit_ce=(0.0, 1e6), sft_target_acc=(1e-9, 1.0), eval_every=(1, 10**7),
              eval_size=(1, 500), log_every=(1, 10**7), ckpt_every=(1, 10**7))
CHOICES = dict(device=("auto", "cpu", "cuda", "mps"), precision=("auto", "fp32", "bf16"), exit_norm=("own", "ln_f"),
               task=("add", "chain"), loss_reduction=("token", "sequence"),
               adv_weighting=("signed", "positive", "abs", "none"))
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


def validate(cfg):
    """Raise ConfigError naming the first bad value: non-finite numbers, values out of range, impossible
    combinations, unknown names."""
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
        layers = layer_list(cfg)
    except ValueError:
        raise ConfigError(f"--align_layers expects comma-separated integers, got {cfg.align_layers!r}") from None
    if len(set(layers)) != len(layers) or not all(1 <= layer < cfg.n_layer for layer in layers):
        raise ConfigError(f"--align_layers: {cfg.align_layers!r} must list distinct layers in 1..{cfg.n_layer - 1}")
    arms = cfg.arms.split(",")
    if len(set(arms)) != len(arms):
        raise ConfigError(f"--arms lists an arm twice: {cfg.arms!r}")
    for arm in arms:
        name, colon, layers = arm.partition(":")
        if name not in ARMS:
            raise ConfigError(f"--arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
        if colon and name in NO_LAYERS:
            raise ConfigError(f"--arms: {name} aligns no layer, so {arm!r} means nothing; write {name}")
        if colon and not re.fullmatch(r"[1-9]\d*(\+[1-9]\d*)*", layers):
            raise ConfigError(f"--arms: {arm!r}: write the layers as arm:1 or arm:1+3")
        if colon:
            validate(arm_config(dataclasses.replace(cfg, arms="grpo"), arm))
    if "sft_more" in arms and "grpo" not in arms[: arms.index("sft_more")]:
        raise ConfigError("--arms: sft_more runs for as long as grpo did, so grpo must come before it")
    if cfg.preset and cfg.preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
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


def task_options(cfg):
    return dict(digits=cfg.digits) if cfg.task == "add" else dict(terms=cfg.terms, digits=cfg.digits)


def stream_seed(seed, purpose):
    """The seed of one random stream: a hash of (run seed, purpose), so that no two streams of any two
    seeds coincide (seed 1's warm-up is not seed 0's RL prompts, and so on)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "big") >> 1


# -----------------------------------------------------------------------------
# The loss terms: small pure functions. N = rollouts in the batch, R = response positions, V = vocab.

def masked_mean(values, mask, reduction="token"):
    """values, mask: (N, R). 'token': sum over every unmasked position / their count (long answers weigh
    more); 'sequence': mean over each row's unmasked positions, then over rows. Masked positions are
    selected out (torch.where), so an inf or NaN there cannot leak in. Returns a scalar."""
    values = torch.where(mask > 0, values, 0.0)
    if reduction == "token":
        return values.sum() / mask.sum().clamp_min(1)
    return (values.sum(1) / mask.sum(1).clamp_min(1)).mean()


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """rewards: (N,) with N = groups * group_size, rollouts of one prompt consecutive.
    Returns (N,) advantages: reward minus its group's mean, divided by (group std + eps) if scale, with the
    sample standard deviation (G - 1 in the denominator, torch's default) and eps = 1e-4.
    A group whose rewards are all equal gets exactly zero (it says nothing about which rollout is better)."""
    r = rewards.view(-1, group_size)  # (groups, G)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    return adv.masked_fill(all_equal, 0.0).view(-1)


def alignment_weights(advantages, mode):
    """(N,) advantages -> (N,) per-rollout weights of the OISD terms.
    signed: A (the paper's wording: pull toward the teacher on good rollouts, push away on bad ones);
    positive: max(A, 0); abs: |A|; none: 1 (plain on-policy distillation)."""
    if mode == "signed":
        return advantages
    if mode == "positive":
        return advantages.clamp_min(0)
    if mode == "abs":
        return advantages.abs()
    return torch.ones_like(advantages)


def js_divergence(logp, logq, dim=-1):
    """Jensen-Shannon divergence in nats between distributions given as log-probabilities, reduced
    (summed) over `dim`: 1/2 KL(p||m) + 1/2 KL(q||m), m = (p+q)/2, in [0, ln 2].
    -inf entries (zero probability, e.g. masked attention keys) contribute 0; neither the value nor the
    gradient is ever NaN."""
    p, q = logp.exp(), logq.exp()
    m = (p + q) / 2
    logm = m.clamp_min(torch.finfo(m.dtype).tiny).log()
    # 0 * log 0 = 0: replace -inf by 0 where the probability is 0, so that no 0 * inf appears
    logp, logq = logp.masked_fill(p == 0, 0.0), logq.masked_fill(q == 0, 0.0)
    return 0.5 * (p * (logp - logm)).sum(dim) + 0.5 * (q * (logq - logm)).sum(dim)


def safe_log(probs):
    """log of probabilities with log 0 = -inf and a zero gradient there (plain .log() would give 0 * inf = NaN)."""
    zero = probs == 0
    return probs.float().masked_fill(zero, 1.0).log().masked_fill(zero, float("-inf"))


def supervised_loss(logits, targets):
    """logits: (B, T, V), targets: (B, T) with -1 where nothing is learned -> mean cross-entropy."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


def token_logprobs(logits, tokens, temperature=1.0):
    """logits: (N, R, V) predicting tokens: (N, R) -> (N, R) log-probabilities at the sampling temperature."""
    return F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def response_mask(completion, eos_id):
    """completion: (N, R) sampled tokens -> (N, R) float mask, 1 up to and including the first EOS.
    A row without EOS (truncated) is all ones."""
    is_eos = (completion == eos_id).int()
    eos_before = is_eos.cumsum(dim=1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).float()


def grpo_loss(logp, old_logp, advantages, mask, clip_eps=0.2, ref_logp=None, kl_beta=0.0, reduction="token"):
    """PPO-clipped GRPO surrogate (DeepSeekMath), to be minimised.
    logp: (N, R) current log-probs of the sampled tokens; old_logp: (N, R) the same under the policy that
    sampled them (the sampler and the training forward compute the same function, so the ratio is 1 at
    the first of num_iterations updates and the clip acts only on later ones; with num_iterations = 1 the
    gradient is the plain policy gradient of -A * logp, though the value is -A); advantages: (N,), one
    per rollout, shared by its tokens; mask: (N, R) response mask.
    Per token: -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) + kl_beta * k3, where
    k3 = exp(ref - logp) - (ref - logp) - 1 estimates KL(current || ref) on tokens sampled from the
    current policy. Log-ratios are zeroed at masked positions before exp (the tokens after EOS may be
    improbable enough to overflow) and the k3 log-ratio is clamped to [-20, 20]. Reduced by
    masked_mean(reduction). Returns a scalar."""
    valid = mask > 0
    ratio = torch.where(valid, logp - old_logp, 0.0).exp()
    adv = advantages.unsqueeze(1)  # (N, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if kl_beta > 0:
        log_r = torch.where(valid, ref_logp - logp, 0.0).clamp(-20, 20)
        per_token = per_token + kl_beta * (log_r.exp() - log_r - 1)
    return masked_mean(per_token, mask, reduction)


def logit_alignment_loss(student_logits, teacher_logits, weights, mask, reduction="token"):
    """OISD logit term. student_logits: (N, R, V) exit logits of the aligned layer; teacher_logits: (N, R, V)
    final-layer logits. Only the teacher's outputs are detached, its weights are not frozen: the final
    layer still trains through L_GRPO, and this term's gradient reaches the exit norm, blocks 1..l, wpe and
    the tied wte/lm_head. weights: (N,) per rollout (see alignment_weights); mask: (N, R).
    Per position: weight * JSD(teacher, student), both at temperature 1 (not the sampling temperature);
    masked_mean."""
    jsd = js_divergence(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.detach().float(), -1))
    return masked_mean(weights.unsqueeze(1) * jsd, mask, reduction)


def attention_alignment_loss(student_attn, teacher_attn, weights, mask, reduction="token"):
    """OISD attention term. student_attn, teacher_attn: (N, nh, R, K) attention probabilities of the aligned
    layer and the final layer (teacher detached here) at the R positions that predict response tokens, over
    K keys; head h is matched to head h. Per position: weight * JSD over keys, averaged over heads; masked_mean."""
    jsd = js_divergence(safe_log(student_attn), safe_log(teacher_attn.detach())).mean(dim=1)  # (N, R)
    return masked_mean(weights.unsqueeze(1) * jsd, mask, reduction)


# -----------------------------------------------------------------------------
# Setup helpers

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
        """seq: (N, P+R) -> the N completions as text, cut after the first EOS."""
        texts = []
        for row in seq[:, self.prompt_len:].tolist():
            end = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            texts.append(self.tok.decode(row[:end]))
        return texts

    def rewards(self, seq, problems, group_size):
        """seq: (N, P+R) rollouts, group_size consecutive rows per problem -> (N,) rewards."""
        answers = [a for _, a in problems for _ in range(group_size)]
        return torch.tensor([self.task.reward(t, a) for t, a in zip(self.completions(seq), answers)], device=self.device)


def make_optimizer(model, lr, device):
    """AdamW; the fused kernel where there is one (a third of the optimizer time on this CPU)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                             fused=device in ("cpu", "cuda"))


def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interrupted save never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
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


def check_finite(name, value):
    """Raise FloatingPointError naming `name` if the tensor `value` holds a NaN or an inf."""
    if not bool(torch.isfinite(value).all()):
        raise FloatingPointError(f"{name} is not finite")


# -----------------------------------------------------------------------------
# Evaluation

def logit_lens(model):
    """A copy of the model whose exit heads all read through the trained ln_f (the logit lens), for a
    fair look at arms whose own exit norms were never trained (every arm without alignment)."""
    lens = copy.deepcopy(model)
    lens.config = dataclasses.replace(model.config, exit_norm="ln_f")
    return lens


@torch.inference_mode()
def evaluate(env, model, problems, layers=None, lens=True):
    """Greedy held-out accuracy of the final layer and of each exit head in `layers` (early exit: blocks
    1..l only) with its sampling time, and, on the final layer's own greedy completions, their mean length
    and the mean JSD and top-1 agreement of each exit with the final layer. If lens, the same accuracy and
    agreement for each exit read through the trained ln_f instead of the exit's own norm (lens_*).
    Returns a flat dict of floats."""
    L = model.config.n_layer
    layers = list(range(1, L + 1)) if layers is None else layers
    exits = [layer for layer in layers if layer < L]
    heads = {"": model}
    if lens and exits:
        heads["lens_"] = model if model.config.exit_norm == "ln_f" else logit_lens(model)
    prompts, P, out = env.prompts(problems), env.prompt_len, {}
    with autocast(env):
        for layer in sorted(set(layers) | {L}, reverse=True):
            for name, head in heads.items():
                if layer == L and name:
                    continue  # the final layer has one head
                t0 = now(env.device)
                seq, _ = head.generate(prompts, env.max_new, temperature=0, eos_id=env.eos_id, exit_layer=layer)
                out[f"{name}sec_L{layer}"] = now(env.device) - t0  # greedy sampling time of the whole set
                out[f"{name}acc_L{layer}"] = env.rewards(seq, problems, 1).mean().item()
                if layer == L:
                    final_seq = seq
        mask = response_mask(final_seq[:, P:], env.eos_id)
        out["len"] = mask.sum(1).mean().item()  # final layer's response length, EOS included
        for name, head in heads.items():
            logits, exit_logits, _ = head(final_seq[:, :-1], exit_layers=exits)
            teacher = F.log_softmax(logits[:, P - 1:], -1)
            for layer in exits:
                student = F.log_softmax(exit_logits[layer][:, P - 1:], -1)
                out[f"{name}agree_L{layer}"] = masked_mean((student.argmax(-1) == teacher.argmax(-1)).float(), mask).item()
                if not name:
                    out[f"jsd_L{layer}"] = masked_mean(js_divergence(student, teacher), mask).item()
    return out


# -----------------------------------------------------------------------------
# Stage 1: supervised warm-up

def sft_step(env, model, opt, rng):
    """One supervised step on sft_batch fresh worked solutions (the prompt is not learned). Raises
    FloatingPointError if the loss or the weights become non-finite. Returns the loss."""
    inputs, targets = env.solutions(sample_problems(env.task, rng, env.cfg.sft_batch, env.exclude))
    with autocast(env):
        loss = supervised_loss(model(inputs)[0], targets)
    check_finite("the supervised loss", loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    check_finite("the weights", torch.stack(torch._foreach_norm(list(model.parameters()))))
    return loss


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


def warmup(env):
    """Train from scratch on worked solutions until validation accuracy >= sft_target_acc.
    Cached in warmup_path(env); the stored key is compared on reuse.
    Returns the model's state dict."""
    cfg, key, path = env.cfg, warmup_key(env), warmup_path(env)
    if os.path.exists(path):
        ck = load_checkpoint(path, env.device, ("model", "key"))
        if ck["key"] != key:
            sys.exit(f"error: {path} was made with other settings; delete it and rerun")
        print(f"warm-up: reusing {path}")
        return ck["model"]
    torch.manual_seed(stream_seed(cfg.seed, "init"))
    model = GPT(env.model_config(cfg)).to(env.device)
    opt = make_optimizer(model, cfg.sft_lr, env.device)
    rng, t0 = random.Random(stream_seed(cfg.seed, "warmup")), time.time()
    for step in range(1, cfg.sft_max_steps + 1):
        try:
            loss = sft_step(env, model, opt, rng)
        except FloatingPointError as e:
            sys.exit(f"error: warm-up step {step}: {e}; stopping (try a lower --sft_lr)")
        if step % cfg.sft_eval_every == 0 or step == cfg.sft_max_steps:
            acc = evaluate(env, model, env.val, layers=[])[f"acc_L{cfg.n_layer}"]
            print(f"warm-up step {step:4d} | loss {loss.item():.3f} | val acc {acc:6.1%} | {time.time() - t0:5.1f}s")
            if acc >= cfg.sft_target_acc:
                break
    else:
        print(f"warm-up: validation accuracy {acc:.1%} did not reach {cfg.sft_target_acc:.0%} in {cfg.sft_max_steps} "
              "steps: this seed missed the sharp transition, and RL from a model that is almost never right has "
              "little to reinforce. Going on from here; to get a usable start try another --seed or a larger "
              "--sft_max_steps (experiments.py --skip_missed gives such a seed no RL)")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("exit_ln")}  # exits untrained here
    save_atomic({"model": state, "key": key, "config": dataclasses.asdict(cfg), "val_acc": acc, "steps": step}, path)
    return state


def load_policy(env, cfg, state):
    """A GPT with the warm-up weights and every exit head starting as the logit lens of its layer."""
    model = GPT(env.model_config(cfg)).to(env.device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("exit_ln") for k in missing), (missing, unexpected)
    model.reset_exit_heads()
    return model


# -----------------------------------------------------------------------------
# Stage 2: GRPO + OISD

def rollout(env, cfg, model, problems, generator):
    """Sample group_size completions per problem from the final layer.
    Returns seq (N, P+R), the rollout log-probs old_logp (N, R), rewards (N,)."""
    with autocast(env):
        seq, old_logp = model.generate(env.prompts(problems), env.max_new, cfg.temperature, cfg.group_size,
                                       env.eos_id, generator)
    seq, old_logp = seq.clone(), old_logp.clone()  # out of inference mode, so autograd may read them
    return seq, old_logp, env.rewards(seq, problems, cfg.group_size)


def rl_loss(cfg, model, seq, prompt_len, old_logp, advantages, mask, ref_logp=None):
    """The OISD objective on one batch of rollouts, group_size consecutive rows per prompt.
    seq: (N, P+R); old_logp, mask: (N, R); advantages: (N,). The prompt (less its last token) runs once per
    group and its keys and values are shared by the group's rollouts (as in the sampler); the rest runs
    per rollout and yields, at the R positions that predict response tokens, the final logits, the exit
    logits of the aligned layers and, if lambda_attn > 0, the attention rows of the aligned layers and
    the last layer. With several aligned layers each OISD term is the mean over them.
    Returns (total loss, {term: scalar})."""
    L, layers, P = model.config.n_layer, layer_list(cfg), prompt_len
    cache = KVCache()
    model(seq[:: cfg.group_size, : P - 1], cache=cache)  # (N/G, P-1): fills the cache
    cache.repeat_interleave(cfg.group_size)
    logits, exits, attns = model(seq[:, P - 1: -1], cache=cache,  # (N, R): last prompt token + response
                                 exit_layers=layers if cfg.lambda_logit > 0 else (),
                                 attn_layers=(*layers, L) if cfg.lambda_attn > 0 else ())
    logp = token_logprobs(logits, seq[:, P:], cfg.temperature)  # (N, R)
    terms = {"grpo": grpo_loss(logp, old_logp, advantages, mask, cfg.clip_eps, ref_logp, cfg.kl_beta,
                               cfg.loss_reduction)}
    weights = alignment_weights(advantages, cfg.adv_weighting)
    if cfg.lambda_logit > 0:
        terms["logit"] = sum(logit_alignment_loss(exits[layer], logits, weights, mask, cfg.loss_reduction)
                             for layer in layers) / len(layers)
    if cfg.lambda_attn > 0:  # attention rows (N, nh, R, P+R-1) over every earlier key, prompt included
        terms["attn"] = sum(attention_alignment_loss(attns[layer], attns[L], weights, mask, cfg.loss_reduction)
                            for layer in layers) / len(layers)
    total = terms["grpo"] + cfg.lambda_logit * terms.get("logit", 0.0) + cfg.lambda_attn * terms.get("attn", 0.0)
    return total, terms


def pad_rollouts(seq, old_logp, length, eos_id):
    """Pad rollouts to `length` positions with EOS (log-prob 0), after every row's EOS, so masked out:
    the compiled forward then always sees the same shapes and never recompiles."""
    extra = length - seq.size(1)
    return F.pad(seq, (0, extra), value=eos_id), F.pad(old_logp, (0, extra))


def compile_forward(env, cfg, model):
    """torch.compile the training forward for fixed shapes and compile it now, forward and backward, on a
    dummy batch (no optimizer step), so that compile time stays out of the timed RL steps.
    Returns (the compiled model, seconds spent compiling)."""
    t0 = now(env.device)
    torch._dynamo.reset()  # every arm compiles afresh: the previous arms' graphs would count toward the recompile limit
    forward = torch.compile(model, dynamic=False)
    N, P, R = cfg.prompts_per_step * cfg.group_size, env.prompt_len, env.max_new
    seq = torch.full((N, P + R), env.eos_id, device=env.device)
    ones = torch.ones(N, R, device=env.device)
    with autocast(env):
        total, _ = rl_loss(cfg, forward, seq, P, 0 * ones, ones[:, 0], ones)
        if cfg.lambda_exit_ce > 0:
            total = total + forward(env.solutions(env.val[: cfg.prompts_per_step])[0], exit_layers=layer_list(cfg))[0].sum()
    total.backward()
    model.zero_grad(set_to_none=True)
    return forward, now(env.device) - t0


def rl_step(env, cfg, model, opt, problems, generator, forward=None, ref=None):
    """One GRPO(+OISD) step on `problems`: rollouts, group advantages, then num_iterations updates.
    forward: the compiled model for the training forward (rollouts are then padded to fixed shapes).
    ref: frozen model for the KL. Raises FloatingPointError naming the first non-finite loss term,
    gradient or weight. Returns (stats: {name: float}, seconds: {rollout, fwd_bwd, optim})."""
    P, dev = env.prompt_len, env.device
    t0 = now(dev)
    seq, old_logp, rewards = rollout(env, cfg, model, problems, generator)
    if forward is not None:
        seq, old_logp = pad_rollouts(seq, old_logp, P + env.max_new, env.eos_id)
    forward = model if forward is None else forward
    advantages = group_advantages(rewards, cfg.group_size, cfg.scale_advantages)
    mask = response_mask(seq[:, P:], env.eos_id)
    ref_logp = None
    if ref is not None:
        with torch.no_grad(), autocast(env):
            ref_logp = token_logprobs(ref(seq[:, :-1])[0][:, P - 1:], seq[:, P:], cfg.temperature)
    seconds = {"rollout": now(dev) - t0, "fwd_bwd": 0.0, "optim": 0.0}
    for _ in range(cfg.num_iterations):
        t0 = now(dev)
        with autocast(env):
            total, terms = rl_loss(cfg, forward, seq, P, old_logp, advantages, mask, ref_logp)
            if cfg.lambda_exit_ce > 0:  # the control arm grpo_ce_exits
                inputs, targets = env.solutions(problems)
                exits = forward(inputs, exit_layers=layer_list(cfg))[1]
                terms["exit_ce"] = sum(supervised_loss(x, targets) for x in exits.values()) / len(exits)
                total = total + cfg.lambda_exit_ce * terms["exit_ce"]
        for name, value in terms.items():
            check_finite(f"loss_{name}", value)
        opt.zero_grad(set_to_none=True)
        total.backward()
        t1 = now(dev)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        check_finite("the gradient norm", grad_norm)
        opt.step()
        check_finite("the weights", torch.stack(torch._foreach_norm(list(model.parameters()))))
        seconds["fwd_bwd"] += t1 - t0
        seconds["optim"] += now(dev) - t1
    stats = {"reward": rewards.mean(), "tokens": mask.sum(), "grad_norm": grad_norm,
             **{f"loss_{k}": v for k, v in terms.items()}}
    return {k: v.item() for k, v in stats.items()}, seconds


def diagnose(env, cfg, model, problems, generator):
    """Evidence on how much the alignment terms actually pull, on one fresh batch of rollouts: the mean
    over groups of the sum of the alignment weights (about 0 for signed weights), the correlation over
    rollouts between the advantage and the rollout's mean logit JSD (aligned exit vs final layer: if it is
    small, signed pulls and pushes on similar rollouts cancel), and the gradient norms of the alignment
    terms and of the GRPO term. Leaves no gradient behind."""
    P = env.prompt_len
    seq, old_logp, rewards = rollout(env, cfg, model, problems, generator)
    advantages = group_advantages(rewards, cfg.group_size, cfg.scale_advantages)
    weights = alignment_weights(advantages, cfg.adv_weighting)
    mask = response_mask(seq[:, P:], env.eos_id)
    with autocast(env):
        _, terms = rl_loss(dataclasses.replace(cfg, kl_beta=0.0), model, seq, P, old_logp, advantages, mask)
    params = [p for p in model.parameters() if p.requires_grad]

    def grad_norm(loss):
        if not torch.is_tensor(loss):
            return 0.0
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.sqrt(sum(g.square().sum() for g in grads if g is not None)).item()

    align = cfg.lambda_logit * terms.get("logit", 0.0) + cfg.lambda_attn * terms.get("attn", 0.0)
    out = {"w_group_sum": weights.view(-1, cfg.group_size).sum(1).mean().item(),
           "align_grad_norm": grad_norm(align), "grpo_grad_norm": grad_norm(terms["grpo"])}
    with torch.no_grad(), autocast(env):
        logits, exits, _ = model(seq[:, :-1], exit_layers=layer_list(cfg))
        jsd = js_divergence(F.log_softmax(exits[layer_list(cfg)[0]][:, P - 1:], -1), F.log_softmax(logits[:, P - 1:], -1))
        per_rollout = (jsd * mask).sum(1) / mask.sum(1)
    informative = advantages != 0
    if informative.sum() > 2:
        out["jsd_adv_corr"] = torch.corrcoef(torch.stack([per_rollout[informative], advantages[informative]]))[0, 1].item()
    return out


# Config fields that may change between a run and its --resume: how often things happen, how long it runs.
RESUMABLE = {"rl_steps", "eval_every", "log_every", "ckpt_every", "resume", "arms", "out_dir", "preset"}
ARM_KEYS = ("model", "optimizer", "step", "result", "train_seconds", "rng", "gen", "config", "device", "precision",
            "warmup_key")


def check_resumable(env, arm, ck, path, rl_steps=None):
    """Exit 2 with one line unless checkpoint ck of `arm` can continue this run exactly: the same arm config
    beyond RESUMABLE, device and precision (random streams and numerics differ on others), the same
    warm-up (its key holds the thread count), and not already past rl_steps."""
    cfg = arm_config(env.cfg, arm)
    differ = [f.name for f in dataclasses.fields(Config)
              if f.name not in RESUMABLE and ck["config"].get(f.name) != getattr(cfg, f.name)]
    differ += [name for name, value in (("device", env.device), ("precision", env.precision),
                                        ("warm-up (thread count, torch version)", warmup_key(env)))
               if ck.get(name if name in ("device", "precision") else "warmup_key") != value]
    if differ:
        refuse(f"{path} was made with other settings ({', '.join(differ)}); use another --out_dir or run without "
               "--resume (or with the settings it was made with, such as OMP_NUM_THREADS)")
    if rl_steps is not None and ck["step"] > rl_steps:
        refuse(f"{path} is at step {ck['step']}, past --rl_steps={rl_steps}; use another --out_dir")


def preflight(env):
    """With --resume, check every arm checkpoint already in out_dir before any work starts."""
    for arm in env.cfg.arms.split(",") if env.cfg.resume else []:
        path = os.path.join(env.cfg.out_dir, f"{arm}.pt")
        if os.path.exists(path):
            keys = ARM_KEYS if arm != "sft_more" else ("result", "config", "budget", "device", "precision", "warmup_key")
            check_resumable(env, arm, load_checkpoint(path, env.device, keys), path,
                            None if arm == "sft_more" else env.cfg.rl_steps)


def train_arm(env, arm, warm_state, start, log):
    """Train one arm from the warm-up weights for rl_steps steps, evaluating the final layer and the aligned
    exits every eval_every steps and every exit at the end.
    start: the warm-up model's evaluation. Checkpoints to out_dir/<arm>.pt; with --resume an
    interrupted arm continues where it stopped, exactly as if it had not stopped (same device only:
    the random streams of one device cannot be continued on another). Returns the final evaluation dict."""
    cfg = arm_config(env.cfg, arm)
    model = load_policy(env, cfg, warm_state)
    ref = load_policy(env, cfg, warm_state).eval() if cfg.kl_beta > 0 else None
    opt = make_optimizer(model, cfg.rl_lr, env.device)
    rng = random.Random(stream_seed(cfg.seed, "rl_prompts"))  # the prompts: the same sequence in every arm
    gen = torch.Generator(env.device).manual_seed(stream_seed(cfg.seed, "rl_sampling"))  # the rollouts' noise
    path, step, result, train_seconds = os.path.join(cfg.out_dir, f"{arm}.pt"), 0, dict(start, train_seconds=0.0), 0.0
    if cfg.resume and os.path.exists(path):
        ck = load_checkpoint(path, env.device, ARM_KEYS)
        check_resumable(env, arm, ck, path, cfg.rl_steps)
        try:
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        except (RuntimeError, ValueError) as e:
            sys.exit(f"error: checkpoint {path} does not fit this config ({str(e).splitlines()[0]}); "
                     "use another --out_dir or run without --resume")
        rng.setstate(ck["rng"])
        gen.set_state(ck["gen"].cpu())
        step, result, train_seconds = ck["step"], ck["result"], ck["train_seconds"]
        print(f"{arm}: resumed from {path} at step {step}")
    forward, compile_seconds = compile_forward(env, cfg, model) if cfg.compile else (None, 0.0)
    if cfg.compile:
        print(f"{arm}: compiled in {compile_seconds:.1f}s (not counted as training time)")
    sums, last = {}, (step, time.time())
    while step < cfg.rl_steps:
        step += 1
        problems = sample_problems(env.task, rng, cfg.prompts_per_step, env.exclude)
        try:
            stats, seconds = rl_step(env, cfg, model, opt, problems, gen, forward, ref)
        except FloatingPointError as e:
            sys.exit(f"error: {arm} step {step}: {e}; stopping (try a lower --rl_lr)")
        train_seconds += sum(seconds.values())
        for name, value in stats.items():
            sums[name] = sums.get(name, 0.0) + value
        if step % cfg.eval_every == 0 or step == cfg.rl_steps:
            layers = None if step == cfg.rl_steps else sorted({*layer_list(cfg), cfg.n_layer})  # every exit at the end
            result = dict(evaluate(env, model, env.test, layers), train_seconds=train_seconds)
            log({"arm": arm, "step": step, **result})
            if cfg.lambda_logit > 0 or cfg.lambda_attn > 0:
                purpose = f"diagnose/{step}"
                problems = sample_problems(env.task, random.Random(stream_seed(cfg.seed, purpose)),
                                           cfg.prompts_per_step, env.exclude)
                diag = diagnose(env, cfg, model, problems,
                                torch.Generator(env.device).manual_seed(stream_seed(cfg.seed, purpose)))
                log({"arm": arm, "step": step, **{f"diag_{k}": v for k, v in diag.items()}})
        if step % cfg.log_every == 0 or step == cfg.rl_steps:
            n, seconds = step - last[0], time.time() - last[1]
            means = {k: v / n for k, v in sums.items()}
            print(f"{arm:>10} step {step:4d}/{cfg.rl_steps} | reward {means['reward']:.2f} | "
                  f"held-out acc {result[f'acc_L{cfg.n_layer}']:6.1%} | "
                  + " ".join(f"{k[5:]} {v:+.4f}" for k, v in means.items() if k.startswith("loss_"))
                  + f" | {n / seconds:4.1f} steps/s {sums['tokens'] / seconds:5.0f} tok/s"
                  + f" | eta {(cfg.rl_steps - step) * seconds / n:4.0f}s")
            log({"arm": arm, "step": step, **{f"train_{k}": v for k, v in means.items()}})
            sums, last = {}, (step, time.time())
        if step % cfg.ckpt_every == 0 or step == cfg.rl_steps:
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "result": result,
                         "train_seconds": train_seconds, "rng": rng.getstate(), "gen": gen.get_state(),
                         "config": dataclasses.asdict(cfg), "device": env.device, "precision": env.precision,
                         "warmup_key": warmup_key(env)}, path)
    return result


def continue_warmup(env, warm_state, seconds, log):
    """The control arm sft_more: no RL, the supervised warm-up continued for `seconds` of training time
    (the grpo arm's), evaluated like an RL arm. Cached in out_dir/sft_more.pt once finished."""
    cfg, path = env.cfg, os.path.join(env.cfg.out_dir, "sft_more.pt")
    if cfg.resume and os.path.exists(path):
        ck = load_checkpoint(path, env.device, ("result", "config", "device", "precision", "warmup_key", "budget"))
        check_resumable(env, "sft_more", ck, path)
        if ck["budget"] == seconds:
            print(f"sft_more: reusing {path}")
            return ck["result"]
        print(f"sft_more: {path} had a budget of {ck['budget']:.1f}s, grpo now trained {seconds:.1f}s: training again")
    model = load_policy(env, cfg, warm_state)
    opt = make_optimizer(model, cfg.sft_lr, env.device)
    rng, spent, step = random.Random(stream_seed(cfg.seed, "sft_more")), 0.0, 0
    while spent < seconds:
        step += 1
        t0 = now(env.device)
        try:
            sft_step(env, model, opt, rng)
        except FloatingPointError as e:
            sys.exit(f"error: sft_more step {step}: {e}; stopping (try a lower --sft_lr)")
        spent += now(env.device) - t0
    result = dict(evaluate(env, model, env.test), train_seconds=spent)
    print(f"  sft_more {step} supervised steps in {spent:.0f}s | held-out acc {result[f'acc_L{cfg.n_layer}']:6.1%}")
    log({"arm": "sft_more", "step": step, **result})
    save_atomic({"model": model.state_dict(), "result": result, "config": dataclasses.asdict(cfg), "budget": seconds,
                 "device": env.device, "precision": env.precision, "warmup_key": warmup_key(env)}, path)
    return result


def print_table(rows, n_layer):
    """rows: {name: evaluation dict} -> held-out greedy accuracy of the final layer and of each exit, as
    trained and through the logit lens (the trained ln_f)."""
    exits = range(n_layer - 1, 0, -1)
    print("held-out greedy accuracy: the final layer; each exit as trained; each exit through the trained ln_f (lens)")
    print(f"{'':<16}{'final':>8}" + "".join(f"{f'exit L{l}':>9}" for l in exits) + "".join(f"{f'lens L{l}':>9}" for l in exits))
    for name, res in rows.items():
        print(f"{name:<16}{res[f'acc_L{n_layer}']:8.1%}" + "".join(f"{res[f'acc_L{l}']:9.1%}" for l in exits)
              + "".join(f"{res[f'lens_acc_L{l}']:9.1%}" for l in exits))


def run_seed(env):
    """Warm-up, then every arm from that checkpoint; prints and saves the table. Returns {row: evaluation}."""
    cfg = env.cfg
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.time()
    print(env.describe())
    preflight(env)
    warm_state = warmup(env)
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a" if cfg.resume else "w")  # a fresh run starts afresh

    def log(record):
        metrics.write(json.dumps(record) + "\n")
        metrics.flush()

    rows = {"warm-up start": evaluate(env, load_policy(env, cfg, warm_state), env.test)}
    log({"arm": "warm-up start", "step": 0, **rows["warm-up start"]})
    for arm in cfg.arms.split(","):
        if arm == "sft_more":
            rows[arm] = continue_warmup(env, warm_state, rows["grpo"]["train_seconds"], log)
        else:
            rows[arm] = train_arm(env, arm, warm_state, rows["warm-up start"], log)
    metrics.close()
    print()
    print_table(rows, cfg.n_layer)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\ntotal time {time.time() - t0:.0f}s; metrics in {cfg.out_dir}/metrics.jsonl, results in {cfg.out_dir}/results.json")
    return rows


def setup(argv, cls=Config, prog="oisd.py", validate_more=None):
    """Parse and check every flag (exit 2 with one line on a bad one; validate_more checks the flags a
    subclass of Config adds), check out_dir, print the run's facts. Returns the Env."""
    try:
        cfg = parse_args(argv, cls, prog)
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


def main(argv):
    run_seed(setup(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
