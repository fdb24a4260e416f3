"""
OISD: On-Policy Internal Self-Distillation (arXiv 2605.29089), at a scale a laptop can run.

    python oisd.py          # warm-up, then GRPO vs GRPO+OISD vs GRPO+OISD(positive), ~2 min on 2 CPU cores
    python oisd.py --help   # every flag, its type, default and meaning

Stage 1 (warm-up): supervised next-token training on worked solutions, stopped as soon as greedy accuracy
on a small validation set reaches sft_target_acc, so the policy is partly right and RL has work to do.
Stage 2 (RL): GRPO on the final layer, plus OISD's two terms, which pull a chosen intermediate layer's
exit distribution and attention pattern (the student) toward the final layer's (the teacher, detached),
weighted per rollout by its GRPO advantage:

    L = L_GRPO + lambda_logit * L_logit + lambda_attn * L_attn

Every arm starts from the same warm-up checkpoint with the same seed, prompts and step budget.
Simplifications, stated up front: prompts of a task all have the same length (no left padding); the
reward is 0/1 exact match; one optimizer step per rollout batch unless num_iterations > 1; old
log-probabilities are the sampler's own, recorded at rollout time. This file is the method, read top to
bottom; the plumbing (command line, checkpoints, resume, caches, timing, compile) is in harness.py.
"""

import dataclasses
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

import harness
from harness import Env  # noqa: F401  (what every stage shares; the extras import it as oisd.Env)
from harness import (MetricsLog, Progress, RunConfig, alignment_evidence, autocast, cached_warmup, check_finite, check_step,
                     check_weights, compile_forward, make_optimizer, now, resume_arm, reuse_sft_more, save_arm, save_results,
                     save_sft_more, save_warmup, stop_if_not_finite, stream_seed, train_for)
from model import GPT, KVCache, logit_lens
from tasks import batch_rewards, sample_problems


@dataclasses.dataclass
class Config(RunConfig):  # the run's own fields (out_dir, seed, device, arms, resume, ...) are in harness.RunConfig
    # task
    task: str = "add"                # add | chain (running sums written out: 012+034+056= -> 0046,0102)
    digits: int = 3                  # digits per operand
    terms: int = 3                   # operands of the chain task
    # model
    block_size: int = 32             # positions; must hold prompt + max_new_tokens
    n_layer: int = 4                 # transformer blocks
    n_head: int = 4                  # attention heads per block
    n_embd: int = 128                # residual stream width
    exit_norm: str = "own"           # own: each exit head has its own LayerNorm | ln_f: the logit lens | ln_f_frozen: the lens, detached
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
    adv_weighting: str = "signed"    # signed: A | positive: max(A, 0) | none: 1
    lambda_exit_ce: float = 0.0      # a control: cross-entropy on worked solutions for the aligned exits
    # evaluation and logging
    eval_every: int = 50             # RL steps between held-out evaluations
    eval_size: int = 500             # held-out problems evaluated (the first eval_size of 500)
    log_every: int = 25              # RL steps between progress lines
    ckpt_every: int = 50             # RL steps between checkpoints


ARMS = {  # each arm is the config with these fields replaced
    "grpo": dict(lambda_logit=0.0, lambda_attn=0.0),
    "oisd": dict(adv_weighting="signed"),
    "oisd_pos": dict(adv_weighting="positive"),
    "oisd_none": dict(adv_weighting="none"),
    "logit_only": dict(adv_weighting="signed", lambda_attn=0.0),
    "attn_only": dict(adv_weighting="signed", lambda_logit=0.0),
    "oisd_lens": dict(adv_weighting="signed", exit_norm="ln_f"),  # the paper's reading: the logit lens
    "oisd_pos_lens": dict(adv_weighting="positive", exit_norm="ln_f"),
    "oisd_lens_frozen": dict(adv_weighting="signed", exit_norm="ln_f_frozen"),  # the lens, its head not trained
    # two controls: GRPO with its exits trained by cross-entropy instead of by the teacher (with_exit_ce), and
    "grpo_ce_exits": dict(lambda_logit=0.0, lambda_attn=0.0, lambda_exit_ce=1.0),
    "sft_more": dict(),  # no RL at all: the warm-up continued for as long as grpo trained (continue_warmup)
}
NO_LAYERS = ("grpo", "sft_more")  # arms that align no layer: an arm:layers suffix would mean nothing


def arm_config(cfg, arm):
    """The config of an arm: 'oisd_pos' or, with the aligned layers set, 'oisd_pos:1+3'."""
    name, _, layers = arm.partition(":")
    overrides = dict(ARMS[name], **({"align_layers": layers.replace("+", ",")} if layers else {}))
    return dataclasses.replace(cfg, **overrides)


def layer_list(cfg):
    """The aligned layers of a config as ints: align_layers '1,3' -> [1, 3]."""
    return [int(x) for x in cfg.align_layers.split(",")]


PRESETS = {  # a preset replaces these defaults first; flags given with it still win
    "gpu": dict(task="chain", terms=4, digits=3, n_layer=8, n_head=8, n_embd=512, align_layers="4",
                block_size=64, sft_lr=3e-4, sft_batch=256, prompts_per_step=32, group_size=16, rl_lr=3e-5, rl_steps=500),
}
METHOD = dict(presets=PRESETS, arms=ARMS, no_layers=NO_LAYERS, arm_config=arm_config)  # for harness's flag checks

# -----------------------------------------------------------------------------
# The loss terms: small pure functions. N = rollouts in the batch, R = response positions, V = vocab.

def masked_mean(values, mask, reduction="token"):
    """values, mask: (N, R). 'token': sum over every unmasked position / their count (long answers weigh more);
    'sequence': mean over each row's unmasked positions, then over rows. Masked positions are selected out
    (torch.where), so an inf or NaN there cannot leak in; a count of 0 counts as 1 (an empty mask gives 0, not
    NaN). Returns a scalar."""
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
    positive: max(A, 0); none: 1 (plain on-policy distillation)."""
    if mode == "signed":
        return advantages
    if mode == "positive":
        return advantages.clamp_min(0)
    if mode == "none":
        return torch.ones_like(advantages)
    raise ValueError(f"unknown weighting {mode!r}: signed, positive or none")


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
    sampled them (the sampler and the training forward compute the same function, so the ratio is 1, to
    rounding, at the first of num_iterations updates and the clip acts only on later ones; with
    num_iterations = 1 the gradient is the plain policy gradient of -A * logp, though the value is -A);
    advantages: (N,), one per rollout, shared by its tokens; mask: (N, R) response mask.
    Per token: -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A) + kl_beta * k3, ratio = exp(logp - old_logp); k3 (only
    with ref_logp and kl_beta > 0) = exp(ref - logp) - (ref - logp) - 1 estimates KL(current || ref) on tokens sampled
    from the current policy. Log-ratios are zeroed at masked positions before exp (the tokens after EOS may be
    improbable enough to overflow) and the k3 log-ratio is clamped to [-20, 20]. Reduced by masked_mean(reduction).
    Returns a scalar."""
    valid = mask > 0
    ratio = torch.where(valid, logp - old_logp, 0.0).exp()
    adv = advantages.unsqueeze(1)  # (N, 1)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    if kl_beta > 0:
        log_r = torch.where(valid, ref_logp - logp, 0.0).clamp(-20, 20)
        per_token = per_token + kl_beta * (log_r.exp() - log_r - 1)
    return masked_mean(per_token, mask, reduction)


def logit_alignment_loss(student_logits, teacher_logits, weights, mask, reduction="token"):
    """OISD logit term. student_logits: (N, R, V) exit logits of the aligned layer l (p_l); teacher_logits:
    (N, R, V) final-layer logits (p_L). Only the teacher's outputs are detached, its weights are not frozen:
    the final layer still trains through L_GRPO, and this term's gradient reaches the exit norm, blocks
    1..l, wpe and the tied wte/lm_head. weights: (N,) per rollout (see alignment_weights); mask: (N, R).
    Per position: weight * JSD(p_l, p_L) (student, teacher; JSD is symmetric), both at temperature 1 (not
    the sampling one); masked_mean."""
    jsd = js_divergence(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.detach().float(), -1))
    return masked_mean(weights.unsqueeze(1) * jsd, mask, reduction)


def attention_alignment_loss(student_attn, teacher_attn, weights, mask, reduction="token"):
    """OISD attention term. student_attn, teacher_attn: (N, nh, R, K) attention probabilities of the aligned
    layer and the final layer (teacher detached here) at the R positions that predict response tokens, over
    K keys; head h is matched to head h. The causal mask makes the later keys exactly 0 in both (read them
    through safe_log). Per position: weight * JSD over keys, averaged over heads; masked_mean."""
    jsd = js_divergence(safe_log(student_attn), safe_log(teacher_attn.detach())).mean(dim=1)  # (N, R)
    return masked_mean(weights.unsqueeze(1) * jsd, mask, reduction)


# -----------------------------------------------------------------------------
# Stage 1: supervised warm-up

def sft_step(env, model, opt, rng):
    """One supervised step on sft_batch fresh worked solutions (the prompt is not learned); returns the loss."""
    inputs, targets = env.solutions(sample_problems(env.task, rng, env.cfg.sft_batch, env.exclude))
    with autocast(env):
        loss = supervised_loss(model(inputs)[0], targets)
    check_finite("the supervised loss", loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    check_weights(model)
    return loss


def warmup(env):
    """Train from scratch on worked solutions until validation accuracy >= sft_target_acc (at most
    sft_max_steps steps); cached in out_dir (harness.warmup_key). Returns the model's state dict."""
    cfg, cached = env.cfg, cached_warmup(env)
    if cached is not None:
        return cached
    torch.manual_seed(stream_seed(cfg.seed, "init"))
    model = GPT(env.model_config(cfg)).to(env.device)
    opt = make_optimizer(model, cfg.sft_lr, env.device)
    rng, t0 = random.Random(stream_seed(cfg.seed, "warmup")), time.time()
    for step in range(1, cfg.sft_max_steps + 1):
        with stop_if_not_finite(f"warm-up step {step}", "try a lower --sft_lr"):
            loss = sft_step(env, model, opt, rng)
        if step % cfg.sft_eval_every == 0 or step == cfg.sft_max_steps:
            acc = evaluate(env, model, env.val, layers=[])[f"acc_L{cfg.n_layer}"]
            print(f"warm-up step {step:4d} | loss {loss.item():.3f} | val acc {acc:6.1%} | {time.time() - t0:5.1f}s")
            if acc >= cfg.sft_target_acc:
                break
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("exit_ln")}  # exits untrained here
    save_warmup(env, state, acc, step)  # and says what to try if the target was missed
    return state


def load_policy(env, cfg, state):
    """The policy RL starts from: a GPT with the warm-up weights (state), every exit head starting as the
    logit lens of its layer (each own exit norm a copy of ln_f: the warm-up never trained them)."""
    model = GPT(env.model_config(cfg)).to(env.device)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("exit_ln") for k in missing), (missing, unexpected)
    model.reset_exit_heads()
    return model


# -----------------------------------------------------------------------------
# Stage 2: GRPO + OISD

def rollout(env, cfg, model, problems, generator):
    """Sample group_size completions per problem from the final layer, and score them.
    Returns seq (N, P+R), the rollout log-probs old_logp (N, R), rewards (N,)."""
    with autocast(env):
        seq, old_logp = model.generate(env.prompts(problems), env.max_new, cfg.temperature, cfg.group_size,
                                       env.eos_id, generator)
    seq, old_logp = seq.clone(), old_logp.clone()  # out of inference mode, so autograd may read them
    return seq, old_logp, batch_rewards(env.task, env.tok, seq[:, env.prompt_len:], problems, cfg.group_size)


def forward_responses(cfg, model, seq, prompt_len):
    """The model on the rollouts seq (N, P+R), group_size rows per prompt, at the R positions that predict
    response tokens: final logits (N, R, V), exit logits {l: (N, R, V)} of the aligned layers, attention
    rows {l: (N, nh, R, P+R-1)} of the aligned layers and the last one (each only if its term is on).
    Fast and exact: the prompt (less its last token) runs once per group, its keys and values shared by
    the group's rollouts, as in the sampler (test_shared_prompt_forward_equals_full_forward)."""
    L, layers, P = model.config.n_layer, layer_list(cfg), prompt_len
    cache = KVCache()
    model(seq[:: cfg.group_size, : P - 1], cache=cache)  # (N/G, P-1): fills the cache
    cache.repeat_interleave(cfg.group_size)
    return model(seq[:, P - 1: -1], cache=cache,  # (N, R): last prompt token + response
                 exit_layers=layers if cfg.lambda_logit > 0 else (),
                 attn_layers=(*layers, L) if cfg.lambda_attn > 0 else ())


def rl_loss(cfg, model, seq, prompt_len, old_logp, advantages, mask, ref_logp=None):
    """The OISD objective on one batch of rollouts, term by term as in the README's table.
    seq: (N, P+R); old_logp, mask: (N, R); advantages: (N,). With several aligned layers each OISD term
    is the mean over them. Returns (total loss, {term: scalar})."""
    L, layers = model.config.n_layer, layer_list(cfg)
    logits, exits, attns = forward_responses(cfg, model, seq, prompt_len)
    teacher = logits.detach()  # the final layer teaches; only its outputs are detached, it still trains by GRPO
    weights = alignment_weights(advantages, cfg.adv_weighting)  # (N,) one per rollout
    logp = token_logprobs(logits, seq[:, prompt_len:], cfg.temperature)  # (N, R)
    terms = {"grpo": grpo_loss(logp, old_logp, advantages, mask, cfg.clip_eps, ref_logp, cfg.kl_beta,
                               cfg.loss_reduction)}
    if cfg.lambda_logit > 0:  # student: the exit of each aligned layer
        terms["logit"] = sum(logit_alignment_loss(exits[layer], teacher, weights, mask, cfg.loss_reduction)
                             for layer in layers) / len(layers)
    if cfg.lambda_attn > 0:  # student: each aligned layer's attention rows; teacher: the last layer's
        teacher_attn = attns[L].detach()
        terms["attn"] = sum(attention_alignment_loss(attns[layer], teacher_attn, weights, mask, cfg.loss_reduction)
                            for layer in layers) / len(layers)
    total = terms["grpo"] + cfg.lambda_logit * terms.get("logit", 0.0) + cfg.lambda_attn * terms.get("attn", 0.0)
    return total, terms


def rl_step(env, cfg, model, opt, problems, generator, forward=None, ref=None, loss_fn=rl_loss):
    """One GRPO(+OISD) step on `problems`: sample, reward, group advantages, then num_iterations updates.
    forward: the model as the loss calls it (the compiled one, if any); ref: the frozen model of the KL
    term (kl_beta > 0), else None; loss_fn: rl_loss, or the control arm's (step_loss). Returns the
    step's stats {name: float}."""
    P, forward = env.prompt_len, model if forward is None else forward
    seq, old_logp, rewards = rollout(env, cfg, model, problems, generator)  # sample, reward: (N, P+R), (N, R), (N,)
    advantages = group_advantages(rewards, cfg.group_size, cfg.scale_advantages)  # (N,)
    mask = response_mask(seq[:, P:], env.eos_id)  # (N, R)
    ref_logp = None if ref is None else reference_logprobs(env, cfg, ref, seq)  # (N, R)
    for _ in range(cfg.num_iterations):
        with autocast(env):
            total, terms = loss_fn(cfg, forward, seq, P, old_logp, advantages, mask, ref_logp)
        opt.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
    stats = {"reward": rewards.mean(), "tokens": mask.sum(), "grad_norm": grad_norm,
             **{f"loss_{k}": v for k, v in terms.items()}}
    return {k: v.item() for k, v in stats.items()}


def reference_logprobs(env, cfg, ref, seq):
    """(N, R) log-probs of the response tokens under ref, the frozen warm-up model of the KL term."""
    P = env.prompt_len
    with torch.no_grad(), autocast(env):
        return token_logprobs(ref(seq[:, :-1])[0][:, P - 1:], seq[:, P:], cfg.temperature)


def step_loss(env, cfg, problems):
    """The loss of an arm's step: rl_loss, or the control arm grpo_ce_exits' (with_exit_ce)."""
    return rl_loss if cfg.lambda_exit_ce == 0 else with_exit_ce(env, problems)


def with_exit_ce(env, problems):
    """The loss of the control arm grpo_ce_exits: rl_loss plus lambda_exit_ce times the mean cross-entropy
    of the aligned exits on this step's worked solutions (the exits trained without a teacher)."""
    def loss(cfg, model, *batch):
        total, terms = rl_loss(cfg, model, *batch)
        inputs, targets = env.solutions(problems)
        exits = model(inputs, exit_layers=layer_list(cfg))[1]
        terms["exit_ce"] = sum(supervised_loss(x, targets) for x in exits.values()) / len(exits)
        return total + cfg.lambda_exit_ce * terms["exit_ce"], terms
    return loss


def train_arm(env, arm, warm_state, start, log):
    """Train one arm from the warm-up weights for rl_steps steps, evaluating the final layer and the aligned
    exits every eval_every steps and every exit at the end (start: the warm-up model's evaluation).
    Checkpoints to out_dir/<arm>.pt, from which --resume continues exactly. Returns the final evaluation."""
    cfg = arm_config(env.cfg, arm)
    model = load_policy(env, cfg, warm_state)
    ref = load_policy(env, cfg, warm_state).eval() if cfg.kl_beta > 0 else None  # the KL term's frozen model
    opt = make_optimizer(model, cfg.rl_lr, env.device)
    rng = random.Random(stream_seed(cfg.seed, "rl_prompts"))  # the prompts: the same sequence in every arm
    gen = torch.Generator(env.device).manual_seed(stream_seed(cfg.seed, "rl_sampling"))  # the rollouts' noise
    path = os.path.join(cfg.out_dir, f"{arm}.pt")
    step, result, train_seconds = (resume_arm(env, cfg, arm, path, model, opt, rng, gen)
                                   or (0, dict(start, train_seconds=0.0), 0.0))
    forward = compile_forward(env, cfg, model, step_loss(env, cfg, env.val[: cfg.prompts_per_step]), arm)[0] if cfg.compile else None
    progress = Progress(arm, cfg, step, log)  # the progress line every log_every steps
    while step < cfg.rl_steps:
        step += 1
        problems = sample_problems(env.task, rng, cfg.prompts_per_step, env.exclude)
        t0 = now(env.device)
        with stop_if_not_finite(f"{arm} step {step}", "try a lower --rl_lr"):  # one line, naming the number
            stats = check_step(rl_step(env, cfg, model, opt, problems, gen, forward, ref, step_loss(env, cfg, problems)), model)
        train_seconds += now(env.device) - t0
        if step % cfg.eval_every == 0 or step == cfg.rl_steps:
            layers = None if step == cfg.rl_steps else sorted({*layer_list(cfg), cfg.n_layer})  # every exit at the end
            result = dict(evaluate(env, model, env.test, layers), train_seconds=train_seconds)
            log({"arm": arm, "step": step, **result})
            if cfg.lambda_logit > 0 or cfg.lambda_attn > 0:
                log({"arm": arm, "step": step, **diagnose(env, cfg, model, step)})
        progress.update(step, stats, result)
        if step % cfg.ckpt_every == 0 or step == cfg.rl_steps:
            save_arm(env, cfg, path, model, opt, step, result, train_seconds, rng, gen)
    return result


def continue_warmup(env, warm_state, seconds, log):
    """The control arm sft_more: no RL, the supervised warm-up continued for `seconds` of training time
    (the grpo arm's), evaluated like an RL arm. Cached in out_dir/sft_more.pt once finished."""
    cfg, path = env.cfg, os.path.join(env.cfg.out_dir, "sft_more.pt")
    result = reuse_sft_more(env, path, seconds)
    if result is None:
        model = load_policy(env, cfg, warm_state)
        opt, rng = make_optimizer(model, cfg.sft_lr, env.device), random.Random(stream_seed(cfg.seed, "sft_more"))
        step, spent = train_for(seconds, env.device, lambda: sft_step(env, model, opt, rng), "sft_more", "try a lower --sft_lr")
        result = dict(evaluate(env, model, env.test), train_seconds=spent)
        save_sft_more(env, path, model, step, result, seconds, log)  # prints its line, logs it, saves it
    return result


def diagnose(env, cfg, model, step):
    """How much the alignment terms actually pull, on a fresh batch with random streams of its own (by step):
    weights, advantages, loss terms and the first aligned exit's logit JSD to the final layer, turned into
    diag_* numbers by harness.alignment_evidence. Leaves no gradient behind."""
    P, purpose = env.prompt_len, f"diagnose/{step}"
    problems = sample_problems(env.task, random.Random(stream_seed(cfg.seed, purpose)), cfg.prompts_per_step, env.exclude)
    seq, old_logp, rewards = rollout(env, cfg, model, problems, torch.Generator(env.device).manual_seed(stream_seed(cfg.seed, purpose)))
    advantages = group_advantages(rewards, cfg.group_size, cfg.scale_advantages)
    mask = response_mask(seq[:, P:], env.eos_id)
    with autocast(env):
        _, terms = rl_loss(dataclasses.replace(cfg, kl_beta=0.0), model, seq, P, old_logp, advantages, mask)
    with torch.no_grad(), autocast(env):
        logits, exits, _ = model(seq[:, :-1], exit_layers=layer_list(cfg))
        jsd = js_divergence(F.log_softmax(exits[layer_list(cfg)[0]][:, P - 1:], -1), F.log_softmax(logits[:, P - 1:], -1))
    return alignment_evidence(cfg, model, alignment_weights(advantages, cfg.adv_weighting), advantages, terms, jsd, mask)


# -----------------------------------------------------------------------------
# Evaluation

@torch.inference_mode()
def evaluate(env, model, problems, layers=None, lens=True):
    """Greedy held-out accuracy of the final layer and of each exit head in `layers` (early exit: blocks
    1..l only) with its sampling time, and, on the final layer's own greedy completions, their mean length
    and the mean JSD and top-1 agreement of each exit with the final layer. If lens, the same accuracy and
    agreement for each exit read through the trained ln_f instead of its own norm (lens_*). A flat dict of floats."""
    L = model.config.n_layer
    layers = list(range(1, L + 1)) if layers is None else layers
    exits = [layer for layer in layers if layer < L]
    heads = {"": model}
    if lens and exits:
        heads["lens_"] = model if model.config.exit_norm != "own" else logit_lens(model)
    prompts, P, out = env.prompts(problems), env.prompt_len, {}
    with autocast(env):
        for layer in sorted(set(layers) | {L}, reverse=True):
            for name, head in heads.items():
                if layer == L and name:
                    continue  # the final layer has one head
                t0 = now(env.device)
                seq, _ = head.generate(prompts, env.max_new, temperature=0, eos_id=env.eos_id, exit_layer=layer)
                out[f"{name}sec_L{layer}"] = now(env.device) - t0  # greedy sampling time of the whole set
                out[f"{name}acc_L{layer}"] = batch_rewards(env.task, env.tok, seq[:, P:], problems, 1).mean().item()
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


def run_seed(env):
    """Warm-up, then every arm from that checkpoint; prints and saves the table. Returns {row: evaluation}."""
    cfg = env.cfg
    t0 = harness.start_run(env, arm_config)  # prints the task, checks every checkpoint to resume
    warm_state = warmup(env)
    log = MetricsLog(cfg)  # log(record): one line of out_dir/metrics.jsonl
    rows = {"warm-up start": evaluate(env, load_policy(env, cfg, warm_state), env.test)}
    log({"arm": "warm-up start", "step": 0, **rows["warm-up start"]})
    for arm in cfg.arms.split(","):
        if arm == "sft_more":
            rows[arm] = continue_warmup(env, warm_state, rows["grpo"]["train_seconds"], log)
        else:
            rows[arm] = train_arm(env, arm, warm_state, rows["warm-up start"], log)
    log.close()
    save_results(cfg, rows, t0)  # prints the table, writes results.json
    harness.save_lens_picture(env, rows, warm_state, load_policy, arm_config)  # lens.png: a held-out problem at every exit
    return rows


def setup(argv, cls=Config, prog="oisd.py", validate_more=None):
    """Parse and check every flag, exit 2 with one line on a bad one (harness.setup). Returns the Env."""
    return harness.setup(argv, cls, prog, validate_more, **METHOD)


def main(argv):
    run_seed(setup(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
