"""
OISD: On-Policy Internal Self-Distillation (arXiv 2605.29089), at a scale a laptop can run.

    python oisd.py                       # warm-up, then GRPO vs GRPO+OISD vs GRPO+OISD(positive), ~3 min on 2 CPU cores
    python oisd.py --task=chain --rl_steps=500 --arms=grpo,oisd
    python oisd.py --bench               # seconds per RL step, split by phase, GRPO vs GRPO+OISD

Stage 1 (warm-up): supervised next-token training on worked solutions, stopped as soon as greedy accuracy
on a small validation set reaches sft_target_acc, so the policy is partly right and RL has work to do.
Stage 2 (RL): GRPO on the final layer, plus OISD's two terms, which pull a chosen intermediate layer's
exit distribution and attention pattern toward the final layer's (a detached teacher), weighted per
rollout by its GRPO advantage:

    L = L_GRPO + lambda_logit * L_logit + lambda_attn * L_attn

Every arm starts from the same warm-up checkpoint with the same seed, prompts and step budget.
Simplifications, stated up front: prompts of a task all have the same length (no left padding); the
reward is 0/1 exact match; one optimizer step per rollout batch unless num_iterations > 1; old
log-probabilities are the sampler's own, recorded at rollout time.
"""

import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache
from tasks import get_tokenizer, heldout_split, make_task, sample_problems


@dataclass
class Config:
    # run
    preset: str = ""               # gpu: a larger model and a harder task for one consumer GPU (PRESETS below)
    out_dir: str = "out"
    seed: int = 0
    device: str = "auto"           # auto (cuda, then mps, then cpu) | cpu | cuda | mps
    compile: bool = False          # torch.compile the training forward (GPU)
    arms: str = "grpo,oisd,oisd_pos"  # arms to train, names from ARMS; arm:1+3 also sets align_layers=1,3
    seeds: str = ""                # experiment mode: e.g. 0,1,2,3,4: every arm per seed, then a summary
    resume: bool = False           # continue each arm from its checkpoint in out_dir
    bench: bool = False            # time RL steps instead of training (see bench())
    bench_steps: int = 20          # measured steps per arm in --bench
    # task
    task: str = "add"              # add | chain
    digits: int = 3                # digits per operand
    terms: int = 3                 # operands of the chain task
    # model
    block_size: int = 32           # positions; must hold prompt + max_new_tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    exit_norm: str = "own"         # own: each exit head has its own LayerNorm | ln_f: logit lens
    # stage 1: supervised warm-up
    sft_lr: float = 1e-3
    sft_batch: int = 64
    sft_target_acc: float = 0.5    # stop once validation greedy accuracy reaches this
    sft_max_steps: int = 3000
    sft_eval_every: int = 20
    # stage 2: GRPO
    rl_steps: int = 400
    prompts_per_step: int = 16
    group_size: int = 8            # G rollouts per prompt
    temperature: float = 1.0       # sampling temperature; log-probs are taken at the same temperature
    max_new_tokens: int = 0        # 0: the task's completion length + 2
    rl_lr: float = 1e-4
    clip_eps: float = 0.2
    num_iterations: int = 1        # optimizer steps per rollout batch
    kl_beta: float = 0.0           # k3 estimate of KL(policy || frozen warm-up model)
    scale_advantages: bool = True  # divide by the group's reward std (GRPO); False: centred only, as in Dr. GRPO
    loss_reduction: str = "token"  # token: mean over all response tokens | sequence: per-sequence mean, then mean
    grad_clip: float = 1.0
    # OISD
    align_layers: str = "2"        # intermediate layer(s) taught by the final layer, comma-separated, 1..n_layer-1
    lambda_logit: float = 1.0
    lambda_attn: float = 0.1
    adv_weighting: str = "signed"  # signed: A | positive: max(A, 0) | abs: |A| | none: 1
    lambda_exit_ce: float = 0.0    # a control: cross-entropy on worked solutions for the aligned exits
    # evaluation and logging
    eval_every: int = 50
    eval_size: int = 500           # held-out problems evaluated (the first eval_size of 500)
    log_every: int = 25
    ckpt_every: int = 50


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


class ConfigError(ValueError):
    pass


def parse_args(argv):
    """--key=value for every Config field (bools also as a bare --key), after the --preset if one is
    given. Raises ConfigError."""
    cfg, fields = Config(), {f.name: f for f in dataclasses.fields(Config)}
    presets = [arg.partition("=")[2] for arg in argv if arg.startswith("--preset=")]
    if presets:
        if presets[-1] not in PRESETS:
            raise ConfigError(f"--preset: unknown preset {presets[-1]!r}; choose from {', '.join(PRESETS)}")
        cfg = dataclasses.replace(cfg, **PRESETS[presets[-1]])
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in fields:
            raise ConfigError(f"unknown argument {arg!r}; options are --" + " --".join(fields))
        kind = type(getattr(cfg, key))
        if kind is bool:
            if not eq:
                value = "true"
            if value.lower() not in ("true", "false", "1", "0"):
                raise ConfigError(f"--{key} expects true or false, got {value!r}")
            setattr(cfg, key, value.lower() in ("true", "1"))
            continue
        try:
            setattr(cfg, key, kind(value))
        except ValueError:
            raise ConfigError(f"--{key} expects {kind.__name__}, got {value!r}") from None
    validate(cfg)
    return cfg


def layer_list(cfg):
    return [int(x) for x in cfg.align_layers.split(",")]


def validate(cfg):
    """Raise ConfigError naming the first bad value."""
    positive = ["digits", "terms", "block_size", "n_layer", "n_head", "n_embd", "sft_batch", "sft_max_steps", "sft_eval_every",
                "prompts_per_step", "num_iterations", "bench_steps", "eval_every", "eval_size", "log_every", "ckpt_every",
                "sft_lr", "rl_lr", "temperature", "clip_eps", "grad_clip"]
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"--{key} must be > 0, got {getattr(cfg, key)}")
    for key in ["rl_steps", "max_new_tokens", "lambda_logit", "lambda_attn", "lambda_exit_ce", "kl_beta", "seed"]:
        if getattr(cfg, key) < 0:
            raise ConfigError(f"--{key} must be >= 0, got {getattr(cfg, key)}")
    choices = dict(device=("auto", "cpu", "cuda", "mps"), exit_norm=("own", "ln_f"),
                   loss_reduction=("token", "sequence"), adv_weighting=("signed", "positive", "abs", "none"))
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}; got {getattr(cfg, key)!r}")
    if cfg.group_size < 2:
        raise ConfigError(f"--group_size must be >= 2 (advantages compare rollouts of one prompt), got {cfg.group_size}")
    if cfg.n_layer < 2:
        raise ConfigError(f"--n_layer must be >= 2 (an intermediate layer to align), got {cfg.n_layer}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"--n_embd ({cfg.n_embd}) must be a multiple of --n_head ({cfg.n_head})")
    if not 0 < cfg.sft_target_acc <= 1:
        raise ConfigError(f"--sft_target_acc must be in (0, 1], got {cfg.sft_target_acc}")
    if (cfg.device == "cuda" and not torch.cuda.is_available()) or (cfg.device == "mps" and not torch.backends.mps.is_available()):
        raise ConfigError(f"--device={cfg.device} is not available on this machine")
    if cfg.eval_size > 500:
        raise ConfigError(f"--eval_size must be <= 500 (the held-out set), got {cfg.eval_size}")
    try:
        layers = layer_list(cfg)
    except ValueError:
        raise ConfigError(f"--align_layers expects comma-separated integers, got {cfg.align_layers!r}") from None
    for layer in layers:
        if not 1 <= layer < cfg.n_layer:
            raise ConfigError(f"--align_layers: layer {layer} is out of range 1..{cfg.n_layer - 1}")
    arms = cfg.arms.split(",")
    for arm in arms:
        if arm.partition(":")[0] not in ARMS:
            raise ConfigError(f"--arms: unknown arm {arm!r}; choose from {', '.join(ARMS)}")
        if ":" in arm:
            validate(arm_config(dataclasses.replace(cfg, arms="grpo"), arm))
    if "sft_more" in arms and "grpo" not in arms[: arms.index("sft_more")]:
        raise ConfigError("--arms: sft_more runs for as long as grpo did, so grpo must come before it")
    try:
        [int(seed) for seed in cfg.seeds.split(",") if cfg.seeds]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {cfg.seeds!r}") from None
    try:
        task = make_task(cfg.task, **task_options(cfg))
        heldout_split(task)  # too small a task has no room for the held-out problems
    except ValueError as e:
        raise ConfigError(f"--task: {e}") from None
    longest = len(task.sample(random.Random(0))[0]) + (cfg.max_new_tokens or task.completion_tokens + 2)
    if longest > cfg.block_size:
        raise ConfigError(f"--block_size {cfg.block_size} is too small for prompt + max_new_tokens = {longest}")


def task_options(cfg):
    return dict(digits=cfg.digits) if cfg.task == "add" else dict(terms=cfg.terms, digits=cfg.digits)


# -----------------------------------------------------------------------------
# The loss terms: small pure functions. N = rollouts in the batch, R = response positions, V = vocab.

def masked_mean(values, mask, reduction="token"):
    """values, mask: (N, R). 'token': sum over every unmasked position / their count (long answers weigh
    more); 'sequence': mean over each row's unmasked positions, then over rows. Returns a scalar."""
    if reduction == "token":
        return (values * mask).sum() / mask.sum().clamp_min(1)
    return ((values * mask).sum(1) / mask.sum(1).clamp_min(1)).mean()


def group_advantages(rewards, group_size, scale=True, eps=1e-4):
    """rewards: (N,) with N = groups * group_size, rollouts of one prompt consecutive.
    Returns (N,) advantages: reward minus its group's mean, divided by (group std + eps) if scale.
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
    logp: (N, R) current log-probs of the sampled tokens; old_logp: (N, R) the same under the rollout
    policy; advantages: (N,), one per rollout, shared by its tokens; mask: (N, R) response mask.
    Per token: -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) + kl_beta * k3, where
    k3 = exp(ref - logp) - (ref - logp) - 1 estimates KL(current || ref) on tokens sampled from the
    current policy. Reduced by masked_mean(reduction). Returns a scalar."""
    ratio = (logp - old_logp).exp()
    adv = advantages.unsqueeze(1)  # (N, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if kl_beta > 0:
        log_r = ref_logp - logp
        per_token = per_token + kl_beta * (log_r.exp() - log_r - 1)
    return masked_mean(per_token, mask, reduction)


def logit_alignment_loss(student_logits, teacher_logits, weights, mask, reduction="token"):
    """OISD logit term. student_logits: (N, R, V) exit logits of the aligned layer; teacher_logits: (N, R, V)
    final-layer logits (detached here: the teacher is not trained by this term); weights: (N,) per rollout
    (see alignment_weights); mask: (N, R). Per position: weight * JSD(teacher, student); masked_mean."""
    jsd = js_divergence(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.detach().float(), -1))
    return masked_mean(weights.unsqueeze(1) * jsd, mask, reduction)


def attention_alignment_loss(student_attn, teacher_attn, weights, mask, reduction="token"):
    """OISD attention term. student_attn, teacher_attn: (N, nh, R, K) attention probabilities of the aligned
    layer and the final layer (teacher detached here) for the R response query positions over K keys;
    head h is matched to head h. Per position: weight * JSD over keys, averaged over heads; masked_mean."""
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


def autocast(device):
    """bf16 autocast on a GPU that supports it; plain fp32 elsewhere."""
    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def now(device):
    """Wall time, after waiting for queued GPU work so that phases are timed honestly."""
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class Env:
    """What every stage shares: config, device, task, tokenizer and the fixed problem sets."""

    def __init__(self, cfg):
        self.cfg, self.device = cfg, pick_device(cfg)
        self.task = make_task(cfg.task, **task_options(cfg))
        self.tok = get_tokenizer()
        self.eos_id = self.tok.eot_token
        test, self.val = heldout_split(self.task)
        self.exclude = {p for p, _ in test + self.val}  # training never samples these prompts
        self.test = test[: cfg.eval_size]
        self.prompt_len = len(self.task.sample(random.Random(0))[0])
        self.max_new = cfg.max_new_tokens or self.task.completion_tokens + 2

    def model_config(self, cfg):
        return GPTConfig(vocab_size=self.tok.n_vocab, block_size=cfg.block_size,
                         n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, exit_norm=cfg.exit_norm)

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

    def rewards(self, seq, problems, group_size):
        """seq: (N, P+R) rollouts, group_size consecutive rows per problem -> (N,) rewards."""
        texts = []
        for row in seq[:, self.prompt_len:].tolist():
            end = row.index(self.eos_id) + 1 if self.eos_id in row else len(row)
            texts.append(self.tok.decode(row[:end]))
        answers = [a for _, a in problems for _ in range(group_size)]
        return torch.tensor([self.task.reward(t, a) for t, a in zip(texts, answers)], device=self.device)


def make_optimizer(model, lr, device):
    """AdamW; the fused kernel where there is one (a third of the optimizer time on this CPU)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, fused=device in ("cpu", "cuda"))


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


# -----------------------------------------------------------------------------
# Evaluation

@torch.inference_mode()
def evaluate(env, model, problems, layers=None):
    """Greedy held-out accuracy of the final layer and of each exit head in `layers` (early exit: blocks
    1..l only) with its sampling time, and, on the final layer's own greedy completions, their mean length
    and the mean JSD and top-1 agreement of each exit with the final layer. Returns a flat dict of floats."""
    L = model.config.n_layer
    layers = list(range(1, L + 1)) if layers is None else layers
    prompts, P, out = env.prompts(problems), env.prompt_len, {}
    with autocast(env.device):
        for layer in sorted(set(layers) | {L}, reverse=True):
            t0 = now(env.device)
            seq, _ = model.generate(prompts, env.max_new, temperature=0, eos_id=env.eos_id, exit_layer=layer)
            out[f"sec_L{layer}"] = now(env.device) - t0  # greedy sampling time of the whole set
            out[f"acc_L{layer}"] = env.rewards(seq, problems, 1).mean().item()
            if layer == L:
                final_seq = seq
        exits = [layer for layer in layers if layer < L]
        logits, exit_logits, _ = model(final_seq[:, :-1], exit_layers=exits)
    mask = response_mask(final_seq[:, P:], env.eos_id)
    out["len"] = mask.sum(1).mean().item()  # final layer's response length, EOS included
    teacher = F.log_softmax(logits[:, P - 1:].float(), -1)
    for layer in exits:
        student = F.log_softmax(exit_logits[layer][:, P - 1:].float(), -1)
        out[f"jsd_L{layer}"] = masked_mean(js_divergence(student, teacher), mask).item()
        out[f"agree_L{layer}"] = masked_mean((student.argmax(-1) == teacher.argmax(-1)).float(), mask).item()
    return out


# -----------------------------------------------------------------------------
# Stage 1: supervised warm-up

def sft_step(env, model, opt, rng):
    """One supervised step on sft_batch fresh worked solutions (the prompt is not learned). Returns the loss."""
    inputs, targets = env.solutions(sample_problems(env.task, rng, env.cfg.sft_batch, env.exclude))
    with autocast(env.device):
        loss = supervised_loss(model(inputs)[0], targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def warmup(env):
    """Train from scratch on worked solutions until validation accuracy >= sft_target_acc.
    Cached in out_dir by a hash of everything it depends on. Returns the model's state dict."""
    cfg = env.cfg
    keys = ["seed", "task", "digits", "terms", "block_size", "n_layer", "n_head", "n_embd", "sft_lr", "sft_batch",
            "sft_target_acc", "sft_max_steps", "sft_eval_every", "max_new_tokens"]
    tag = hashlib.sha1(json.dumps({k: getattr(cfg, k) for k in keys}).encode()).hexdigest()[:10]
    path = os.path.join(cfg.out_dir, f"warmup-{tag}.pt")
    if os.path.exists(path):
        print(f"warm-up: reusing {path}")
        return load_checkpoint(path, env.device)["model"]
    torch.manual_seed(cfg.seed)
    model = GPT(env.model_config(cfg)).to(env.device)
    opt = make_optimizer(model, cfg.sft_lr, env.device)
    rng, t0 = random.Random(cfg.seed + 1), time.time()
    for step in range(1, cfg.sft_max_steps + 1):
        loss = sft_step(env, model, opt, rng)
        if step % cfg.sft_eval_every == 0 or step == cfg.sft_max_steps:
            acc = evaluate(env, model, env.val, layers=[])[f"acc_L{cfg.n_layer}"]
            print(f"warm-up step {step:4d} | loss {loss.item():.3f} | val acc {acc:6.1%} | {time.time() - t0:5.1f}s")
            if acc >= cfg.sft_target_acc:
                break
    else:
        print(f"warm-up: validation accuracy {acc:.1%} did not reach {cfg.sft_target_acc:.0%} "
              f"in {cfg.sft_max_steps} steps; going on from here")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("exit_ln")}  # exits untrained here
    os.makedirs(cfg.out_dir, exist_ok=True)
    save_atomic({"model": state, "config": dataclasses.asdict(cfg), "val_acc": acc, "steps": step}, path)
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
    with autocast(env.device):
        seq, old_logp = model.generate(env.prompts(problems), env.max_new, cfg.temperature, cfg.group_size,
                                       env.eos_id, generator)
    seq, old_logp = seq.clone(), old_logp.clone()  # out of inference mode, so autograd may read them
    return seq, old_logp, env.rewards(seq, problems, cfg.group_size)


def rl_loss(cfg, model, seq, prompt_len, old_logp, advantages, mask, ref_logp=None):
    """The OISD objective on one batch of rollouts, group_size consecutive rows per prompt.
    seq: (N, P+R); old_logp, mask: (N, R); advantages: (N,). The prompt (less its last token) runs once per
    group and its keys and values are shared by the group's rollouts (as in the sampler); the rest runs
    per rollout and yields, at the R positions that predict response tokens, the final logits, the exit
    logits of the aligned layers and, if lambda_attn > 0, the attention of the aligned layers and the
    last layer. Returns (total loss, {term: scalar})."""
    L, layers, P = model.config.n_layer, layer_list(cfg), prompt_len
    cache = KVCache(L)
    with autocast(seq.device.type):
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


def rl_step(env, cfg, model, opt, problems, generator, forward=None, ref=None):
    """One GRPO(+OISD) step on `problems`: rollouts, group advantages, then num_iterations updates.
    forward: the (possibly compiled) model used for the training forward. ref: frozen model for the KL.
    Returns (stats: {name: float}, seconds: {rollout, fwd_bwd, optim})."""
    forward, P, dev = forward or model, env.prompt_len, env.device
    t0 = now(dev)
    seq, old_logp, rewards = rollout(env, cfg, model, problems, generator)
    advantages = group_advantages(rewards, cfg.group_size, cfg.scale_advantages)
    mask = response_mask(seq[:, P:], env.eos_id)
    ref_logp = None
    if ref is not None:
        with torch.no_grad(), autocast(dev):
            ref_logp = token_logprobs(ref(seq[:, :-1])[0][:, P - 1:], seq[:, P:], cfg.temperature)
    seconds = {"rollout": now(dev) - t0, "fwd_bwd": 0.0, "optim": 0.0}
    for _ in range(cfg.num_iterations):
        t0 = now(dev)
        total, terms = rl_loss(cfg, forward, seq, P, old_logp, advantages, mask, ref_logp)
        if cfg.lambda_exit_ce > 0:  # the control arm grpo_ce_exits
            inputs, targets = env.solutions(problems)
            with autocast(dev):
                exits = forward(inputs, exit_layers=layer_list(cfg))[1]
            terms["exit_ce"] = sum(supervised_loss(x, targets) for x in exits.values()) / len(exits)
            total = total + cfg.lambda_exit_ce * terms["exit_ce"]
        opt.zero_grad(set_to_none=True)
        total.backward()
        t1 = now(dev)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
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
    with torch.no_grad():
        logits, exits, _ = model(seq[:, :-1], exit_layers=layer_list(cfg))
        jsd = js_divergence(F.log_softmax(exits[layer_list(cfg)[0]][:, P - 1:], -1), F.log_softmax(logits[:, P - 1:], -1))
        per_rollout = (jsd * mask).sum(1) / mask.sum(1)
    informative = advantages != 0
    if informative.sum() > 2:
        out["jsd_adv_corr"] = torch.corrcoef(torch.stack([per_rollout[informative], advantages[informative]]))[0, 1].item()
    return out


# Fields that may change between a run and its --resume: how often things happen, and how long it runs.
RESUMABLE = {"rl_steps", "eval_every", "log_every", "ckpt_every", "resume", "arms", "seeds", "device", "compile",
             "out_dir", "bench", "bench_steps", "preset"}


def check_same_config(ck, cfg, path):
    """Exit with one line if the checkpoint was made with a config that differs beyond RESUMABLE."""
    differ = [k for k, v in dataclasses.asdict(cfg).items() if k not in RESUMABLE and ck["config"].get(k) != v]
    if differ:
        sys.exit(f"error: {path} was made with other settings ({', '.join(differ)}); "
                 "use another --out_dir or run without --resume")


def train_arm(env, arm, warm_state, start, log):
    """Train one arm from the warm-up weights for rl_steps steps, evaluating every eval_every steps.
    start: the warm-up model's evaluation. Checkpoints to out_dir/<arm>.pt; with --resume an
    interrupted arm continues where it stopped. Returns the final evaluation dict."""
    cfg = arm_config(env.cfg, arm)
    torch.manual_seed(cfg.seed)
    model = load_policy(env, cfg, warm_state)
    ref = load_policy(env, cfg, warm_state).eval() if cfg.kl_beta > 0 else None
    opt = make_optimizer(model, cfg.rl_lr, env.device)
    rng = random.Random(cfg.seed + 2)  # the prompts: the same sequence in every arm
    gen = torch.Generator(env.device).manual_seed(cfg.seed + 3)  # the rollouts' sampling noise
    path, step, result = os.path.join(cfg.out_dir, f"{arm}.pt"), 0, dict(start, train_seconds=0.0)
    if cfg.resume and os.path.exists(path):
        ck = load_checkpoint(path, env.device, ("model", "optimizer", "step", "result", "train_seconds", "rng", "gen",
                                                "config"))
        check_same_config(ck, cfg, path)
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
    else:
        train_seconds = 0.0  # time spent in RL steps, evaluation excluded
    forward = torch.compile(model) if cfg.compile else model
    sums, last = {}, (step, time.time())
    while step < cfg.rl_steps:
        step += 1
        problems = sample_problems(env.task, rng, cfg.prompts_per_step, env.exclude)
        stats, seconds = rl_step(env, cfg, model, opt, problems, gen, forward, ref)
        train_seconds += sum(seconds.values())
        for name, value in stats.items():
            if not math.isfinite(value):
                sys.exit(f"error: {arm} step {step}: {name} is {value}; stopping (try a lower --rl_lr)")
            sums[name] = sums.get(name, 0.0) + value
        if step % cfg.eval_every == 0 or step == cfg.rl_steps:
            result = dict(evaluate(env, model, env.test), train_seconds=train_seconds)
            log({"arm": arm, "step": step, **result})
            if cfg.lambda_logit > 0 or cfg.lambda_attn > 0:
                problems = sample_problems(env.task, random.Random(step), cfg.prompts_per_step, env.exclude)
                diag = diagnose(env, cfg, model, problems, torch.Generator(env.device).manual_seed(step))
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
                         "config": dataclasses.asdict(cfg)}, path)
    return result


def continue_warmup(env, warm_state, seconds, log):
    """The control arm sft_more: no RL, the supervised warm-up continued for `seconds` of training time
    (the grpo arm's), evaluated like an RL arm. Cached in out_dir/sft_more.pt once finished."""
    cfg, path = env.cfg, os.path.join(env.cfg.out_dir, "sft_more.pt")
    if cfg.resume and os.path.exists(path):
        ck = load_checkpoint(path, env.device, ("result", "config"))
        check_same_config(ck, cfg, path)
        print(f"sft_more: reusing {path}")
        return ck["result"]
    torch.manual_seed(cfg.seed)
    model = load_policy(env, cfg, warm_state)
    opt = make_optimizer(model, cfg.sft_lr, env.device)
    rng, spent, step = random.Random(cfg.seed + 4), 0.0, 0
    while spent < seconds:
        step += 1
        t0 = now(env.device)
        sft_step(env, model, opt, rng)
        spent += now(env.device) - t0
    result = dict(evaluate(env, model, env.test), train_seconds=spent)
    print(f"  sft_more {step} supervised steps in {spent:.0f}s | held-out acc {result[f'acc_L{cfg.n_layer}']:6.1%}")
    log({"arm": "sft_more", "step": step, **result})
    save_atomic({"model": model.state_dict(), "result": result, "config": dataclasses.asdict(cfg)}, path)
    return result


def print_table(rows, n_layer):
    """rows: {name: evaluation dict} -> a table of held-out accuracy of the final layer and each exit."""
    layers = range(n_layer, 0, -1)
    print(f"{'held-out greedy accuracy':<26}" + "".join(f"{'final' if l == n_layer else f'exit L{l}':>9}" for l in layers))
    for name, res in rows.items():
        print(f"{name:<26}" + "".join(f"{res[f'acc_L{l}']:9.1%}" for l in layers))


def run_seed(env):
    """Warm-up, then every arm from that checkpoint; prints and saves the table. Returns {row: evaluation}."""
    cfg = env.cfg
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.time()
    warm_state = warmup(env)
    metrics = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a")

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
    print()
    print_table(rows, cfg.n_layer)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\ntotal time {time.time() - t0:.0f}s; metrics in {cfg.out_dir}/metrics.jsonl, results in {cfg.out_dir}/results.json")
    return rows


def main(argv):
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    env = Env(cfg)
    print(f"device: {env.device} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    print("config: " + " ".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items()))
    if cfg.bench or cfg.seeds:
        import experiments  # the measurement tools: a benchmark, or a grid of seeds with tables and plots
        if cfg.bench:
            experiments.bench(env)
        else:
            experiments.run_grid(cfg)
    else:
        run_seed(env)


if __name__ == "__main__":
    main(sys.argv[1:])
