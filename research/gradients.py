"""
Where OISD's gradient goes: the diagnostics of the plan "A test fixed in advance: OISD read the paper's way,
through the logit lens" (research/README.md, "Where the gradient goes" and "The strength of the terms"),
measured after a grid on its saved checkpoints. Every flag of the grid (research/experiments.py) works here.

    python research/gradients.py --out_dir=runs/lens_chain --task=chain --digits=3 --seeds=200,201 \
        --arms=grpo,oisd_lens,oisd_lens:1,oisd_pos_lens,oisd_lens_frozen

For each seed and arm, at two points, "start" (the warm-up model with the arm's config) and "end" (the arm's
final checkpoint out_dir/seed<S>/<arm>.pt), on diag_batches fresh batches of that model's own rollouts (stream
(seed, 'gradients/<b>'): the same prompts for every arm and point), all in fp32:
  1. share_<group>: the share of the alignment gradient's squared norm in each parameter group (GROUPS);
  2. drift_ln_f_weight, drift_ln_f_bias (end): ||ln_f_end - ln_f_warm|| / ||ln_f_warm||;
  3. corr_within: Pearson correlation of a rollout's mean logit JSD (first aligned exit vs final layer),
     demeaned within its group, with its advantage, over groups whose rewards differ; corr_pooled: the same
     without demeaning (oisd.diagnose's diag_jsd_adv_corr);
  4. cancel_<term>_group, cancel_<term>_batch: ||sum_i c_i|| / sum_i ||c_i||, c_i the gradient of rollout i's own
     contribution to the term (align or grpo), within each group and over the measured groups of a batch;
  5. update_<term>_<group> (end): the norm per group of AdamW's update lr * g / (sqrt(v_hat) + eps) for each
     term's gradient g (grpo, logit, attn; lambda-weighted, averaged over the batches), v_hat the arm's own
     bias-corrected second moment; ratio_<term>_<group>: that norm over GRPO's.
Writes out_dir/gradients.json (every number, per seed, arm and point) and out_dir/gradients.md (means over seeds).

    python research/gradients.py --merge=DIR    # DIR/seed*/gradients.json, one run per seed -> DIR/gradients.{json,md}
"""

import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up
import harness  # noqa: E402
from harness import ConfigError, load_checkpoint, make_optimizer, refuse, stream_seed, warmup_path, write_atomic  # noqa: E402
from oisd import (METHOD, alignment_weights, arm_config, group_advantages, js_divergence, layer_list,  # noqa: E402
                  load_policy, response_mask, rl_loss, rollout, warmup)
from experiments import ExpConfig, seed_envs, seed_folders, trained_model, validate_experiment, warmup_val_acc  # noqa: E402
from tasks import sample_problems  # noqa: E402


@dataclass
class GradConfig(ExpConfig):
    # gradients
    diag_batches: int = 4            # fresh rollout batches per arm and point (start, end)
    diag_groups: int = 4             # groups of each batch whose per-rollout gradients give the cancellation ratios


GROUPS = ("ln_f", "blocks_1..l", "blocks_above", "wte", "wpe", "exit_norms")
POINTS = ("start", "end")
WEIGHTED_TERMS = ("logit", "attn")  # the alignment terms, each times its lambda


def validate_gradients(cfg):
    """The grid's flags (validate_experiment) and this script's own. Raises ConfigError."""
    validate_experiment(cfg)
    for key in ("diag_batches", "diag_groups"):
        if not 1 <= getattr(cfg, key) <= 10**4:
            raise ConfigError(f"--{key} must be in [1, 10000], got {getattr(cfg, key)}")
    if "sft_more" in cfg.arms.split(","):
        raise ConfigError("--arms: sft_more has no RL checkpoint (no optimizer state, no alignment): leave it out")


# -----------------------------------------------------------------------------
# Parameters and their groups

def trainable(model):
    """[(name, parameter)] of the model's trainable parameters, in model.parameters() order (the tied
    lm_head.weight appears once, as transformer.wte.weight): the order of make_optimizer's AdamW."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def param_group(name, top):
    """The group (GROUPS) of a parameter name; top: the deepest aligned layer l (with one aligned layer, that
    layer): transformer.h.0 .. h.{l-1} are 'blocks_1..l', the rest of transformer.h 'blocks_above'."""
    if name.startswith("transformer.ln_f."):
        return "ln_f"
    if name.startswith("transformer.h."):
        return "blocks_1..l" if int(name.split(".")[2]) < top else "blocks_above"
    if name.startswith("exit_ln."):
        return "exit_norms"
    return {"transformer.wte.weight": "wte", "transformer.wpe.weight": "wpe"}[name]


def group_sqnorms(named, tensors, top):
    """named: [(name, parameter)], tensors: one per parameter (a gradient or an update) -> {group: sum of
    squares of its tensors} over every group of GROUPS (0.0 for a group with no parameter here)."""
    out = dict.fromkeys(GROUPS, 0.0)
    for (name, _), t in zip(named, tensors):
        out[param_group(name, top)] += t.double().square().sum().item()
    return out


def shares(sqnorms):
    """{group: squared norm} -> {group: its share of the total} (sums to 1; nan everywhere if the total is 0)."""
    total = sum(sqnorms.values())
    return {k: v / total if total > 0 else math.nan for k, v in sqnorms.items()}


def grads(loss, params, retain=True):
    """The gradient of a scalar loss w.r.t. each of params, zeros where the loss does not reach a parameter."""
    out = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


# -----------------------------------------------------------------------------
# A batch and its terms

def fp32(env):
    """A shallow copy of env that samples and computes in fp32 (the measurements); env keeps the run's
    precision, which names its warm-up cache."""
    out = copy.copy(env)
    out.precision = "fp32"
    return out


def diag_batch(env, cfg, model, b):
    """Fresh rollout batch b of model's own samples, as oisd.rl_step makes one: prompts from
    random.Random(stream_seed(seed, 'gradients/b')), sampling noise from a generator seeded the same. Returns
    {seq (N, P+R), old_logp (N, R), rewards (N,), advantages (N,), mask (N, R), P: the prompt length}."""
    purpose = f"gradients/{b}"
    problems = sample_problems(env.task, random.Random(stream_seed(cfg.seed, purpose)), cfg.prompts_per_step, env.exclude)
    gen = torch.Generator(env.device).manual_seed(stream_seed(cfg.seed, purpose))
    seq, old_logp, rewards = rollout(env, cfg, model, problems, gen)
    return dict(seq=seq, old_logp=old_logp, rewards=rewards, P=env.prompt_len,
                advantages=group_advantages(rewards, cfg.group_size, cfg.scale_advantages),
                mask=response_mask(seq[:, env.prompt_len:], env.eos_id))


def weighted_terms(cfg, model, batch):
    """oisd.rl_loss's terms on batch (kl_beta off: the KL term is not measured), each as it enters the loss:
    {'grpo': L_GRPO, 'logit': lambda_logit * L_logit, 'attn': lambda_attn * L_attn}, switched-off terms absent.
    Scalars, with their graph."""
    _, terms = rl_loss(dataclasses.replace(cfg, kl_beta=0.0), model, batch["seq"], batch["P"], batch["old_logp"],
                       batch["advantages"], batch["mask"])
    lambdas = {"grpo": 1.0, "logit": cfg.lambda_logit, "attn": cfg.lambda_attn}
    return {k: lambdas[k] * v for k, v in terms.items()}


def terms_on(cfg):
    """The terms an arm's loss has: 'grpo', then those of WEIGHTED_TERMS whose lambda is > 0."""
    return ["grpo"] + [t for t in WEIGHTED_TERMS if getattr(cfg, f"lambda_{t}") > 0]


def aligned(cfg):
    """Whether the arm has an alignment term."""
    return len(terms_on(cfg)) > 1


def term_gradients(cfg, model, batch):
    """The batch gradient of each weighted term (weighted_terms) and of their alignment sum 'align'
    (lambda_logit * logit + lambda_attn * attn, if any): {term: [one tensor per trainable parameter]}."""
    terms, params = weighted_terms(cfg, model, batch), [p for _, p in trainable(model)]
    out = {k: grads(loss, params) for k, loss in terms.items()}
    if aligned(cfg):
        out["align"] = [sum(parts) for parts in zip(*(out[k] for k in WEIGHTED_TERMS if k in out))]
    return out


def row(batch, i):
    """Rollout i of batch alone: the same dict with (1, ...) tensors."""
    return {k: v[i: i + 1] if torch.is_tensor(v) else v for k, v in batch.items()}


def rollout_scales(mask, reduction):
    """mask: (N, R) -> (N,) s_i with masked_mean(values, mask) = sum_i s_i * masked_mean(values[i], mask[i]):
    'token': s_i = tokens of rollout i / tokens of the batch; 'sequence': 1 / N."""
    if reduction == "token":
        return mask.sum(1) / mask.sum().clamp_min(1)
    return torch.full((mask.size(0),), 1.0 / mask.size(0), device=mask.device)


def rollout_gradients(cfg, model, batch, rows):
    """c_i for each rollout i in rows: the gradient, flattened over every trainable parameter (D,), of rollout
    i's own contribution to each term: 'grpo', and 'align' (if on). Its contribution is the term on rollout i
    alone (rl_loss with group_size 1) times rollout_scales' s_i, so the batch's term is exactly the sum over
    every i (with the token reduction: w_i * sum_t jsd_it * mask_it / total tokens). A rollout whose weight is
    0 (advantage 0 for grpo, alignment weight 0 for align) gets a zero vector without a backward pass.
    One forward and backward per rollout. Returns {term: (len(rows), D)}."""
    params = [p for _, p in trainable(model)]
    D = sum(p.numel() for p in params)
    scales = rollout_scales(batch["mask"], cfg.loss_reduction)
    weights = {"grpo": batch["advantages"], "align": alignment_weights(batch["advantages"], cfg.adv_weighting)}
    single = dataclasses.replace(cfg, group_size=1)
    out = {k: [] for k in ("grpo", "align") if k == "grpo" or aligned(cfg)}
    for i in rows:
        terms = weighted_terms(single, model, row(batch, i))
        losses = {"grpo": terms["grpo"], "align": sum(terms[k] for k in WEIGHTED_TERMS if k in terms)}
        for k in out:
            if weights[k][i] == 0:
                out[k].append(torch.zeros(D, device=params[0].device))
            else:
                out[k].append(scales[i] * torch.cat([g.flatten() for g in grads(losses[k], params)]))
    return {k: torch.stack(v) for k, v in out.items()}


# -----------------------------------------------------------------------------
# The measures

def nanmean(values):
    """The mean of the non-nan numbers in values; nan if there are none."""
    ok = [v for v in values if not math.isnan(v)]
    return float(np.mean(ok)) if ok else math.nan


def cancellation_ratio(c):
    """c: (n, D), one vector per rollout -> ||sum_i c_i|| / sum_i ||c_i||: 1 when all point the same way,
    about 0 when they cancel; nan when every c_i is 0."""
    total = c.double().norm(dim=1).sum()
    return (c.double().sum(0).norm() / total).item() if total > 0 else math.nan


def cancellations(c, group_size):
    """c: (n, D) per-rollout gradients of whole groups (group_size consecutive rows each) -> (the ratio of
    each group with any nonzero c_i: a list, the ratio over all n rows)."""
    groups = [cancellation_ratio(g) for g in c.split(group_size)]
    return [r for r in groups if not math.isnan(r)], cancellation_ratio(c)


@torch.no_grad()
def rollout_jsd(cfg, model, batch):
    """(N,): each rollout's mean, over its response positions (mask), of the logit JSD between the first
    aligned layer's exit and the final layer, both at temperature 1 (as oisd.diagnose computes it)."""
    P, layer, mask = batch["P"], layer_list(cfg)[0], batch["mask"]
    logits, exits, _ = model(batch["seq"][:, :-1], exit_layers=[layer])
    jsd = js_divergence(F.log_softmax(exits[layer][:, P - 1:], -1), F.log_softmax(logits[:, P - 1:], -1))  # (N, R)
    return (jsd * mask).sum(1) / mask.sum(1)


def pearson(x, y):
    """Pearson correlation of two (n,) tensors; nan if n < 3 or either has no spread."""
    if x.numel() < 3 or x.std() == 0 or y.std() == 0:
        return math.nan
    return torch.corrcoef(torch.stack([x.double(), y.double()]))[0, 1].item()


def jsd_adv_correlations(jsd, advantages, rewards, group_size):
    """jsd, advantages, rewards: (N,), group_size consecutive rollouts a group (several batches may be
    concatenated). Over the rollouts of groups whose rewards are not all equal: corr_within, the correlation
    of the JSD minus its group's mean with the advantage (centred within the group already); corr_pooled,
    the same without demeaning; corr_n, the number of such rollouts."""
    r = rewards.view(-1, group_size)
    informative = (r != r[:, :1]).any(1).repeat_interleave(group_size)  # (N,)
    j = jsd.view(-1, group_size)
    demeaned = (j - j.mean(1, keepdim=True)).view(-1)
    return {"corr_within": pearson(demeaned[informative], advantages[informative]),
            "corr_pooled": pearson(jsd[informative], advantages[informative]), "corr_n": int(informative.sum())}


def adam_update(opt, p, g):
    """The update AdamW's second moment gives the gradient g (shaped like p): lr * g / (sqrt(v_hat) + eps),
    v_hat = exp_avg_sq / (1 - beta2**step) from opt's state of p; lr, beta2 and eps from p's param group.
    (No first moment, no weight decay: what this gradient alone moves, scaled as AdamW scales it.)"""
    group = next(gr for gr in opt.param_groups if any(q is p for q in gr["params"]))
    state, beta2 = opt.state[p], group["betas"][1]
    v_hat = state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))
    return group["lr"] * g / (v_hat.sqrt() + group["eps"])


def update_norms(opt, named, gradient, top):
    """{group: L2 norm of adam_update over the group's parameters} for one term's gradient (one tensor per
    parameter of named). A parameter with no optimizer state (it never had a gradient in training, such as
    an untrained exit norm) is left out."""
    updates = [adam_update(opt, p, g) if opt.state.get(p) else torch.zeros_like(g) for (_, p), g in zip(named, gradient)]
    return {k: math.sqrt(v) for k, v in group_sqnorms(named, updates, top).items()}


def ln_f_drift(model, warm_state):
    """How far ln_f moved over RL: ||end - warm|| / ||warm|| of its weight and of its bias."""
    out = {}
    for part in ("weight", "bias"):
        warm, end = warm_state[f"transformer.ln_f.{part}"].float(), getattr(model.transformer.ln_f, part).detach().float()
        out[f"drift_ln_f_{part}"] = ((end - warm).norm() / warm.norm()).item()
    return out


def measure_point(env, cfg, model, opt=None):
    """Every measure of one model (the arm's config cfg) on diag_batches fresh batches (env in fp32): the
    alignment gradient's group shares (share_*, mean over batches of each batch's shares, and align_sqnorm,
    the mean total) if the arm aligns; corr_* pooled over the batches; cancel_<term>_group (the mean over the
    groups, of every batch, with any nonzero weight) and cancel_<term>_batch (mean over batches) on the first
    diag_groups groups of each batch; and with opt (the arm's optimizer, at the end), update_<term>_<group>
    of each term's batch-averaged gradient and ratio_<term>_<group> = update / GRPO's update, where GRPO's
    is nonzero. Returns a flat dict {name: number}."""
    G, B, top, named = cfg.group_size, cfg.diag_batches, max(layer_list(cfg)), trainable(model)
    rows = range(min(cfg.diag_groups, cfg.prompts_per_step) * G)
    mean_grads, batch_shares, group_ratios, batch_ratios, pooled = {}, [], {}, {}, []
    for b in range(B):
        batch = diag_batch(env, cfg, model, b)
        for k, g in term_gradients(cfg, model, batch).items():
            mean_grads[k] = [m + x / B for m, x in zip(mean_grads.get(k, [0.0] * len(g)), g)]
            if k == "align":
                sq = group_sqnorms(named, g, top)
                batch_shares.append(dict(shares(sq), align_sqnorm=sum(sq.values())))
        for k, c in rollout_gradients(cfg, model, batch, rows).items():
            per_group, whole = cancellations(c, G)
            group_ratios.setdefault(k, []).extend(per_group)
            batch_ratios.setdefault(k, []).append(whole)
        pooled.append((rollout_jsd(cfg, model, batch), batch["advantages"], batch["rewards"]))
    out = {f"share_{k}" if k in GROUPS else k: nanmean([s[k] for s in batch_shares]) for k in [*GROUPS, "align_sqnorm"]
           if batch_shares}
    out.update(jsd_adv_correlations(*(torch.cat(x) for x in zip(*pooled)), G))
    for k in group_ratios:
        out[f"cancel_{k}_group"], out[f"cancel_{k}_batch"] = nanmean(group_ratios[k]), nanmean(batch_ratios[k])
    out["cancel_rollouts"] = len(rows)
    if opt is not None:
        present = {param_group(name, top) for name, _ in named}
        norms = {k: update_norms(opt, named, mean_grads[k], top) for k in terms_on(cfg)}
        for k, by_group in norms.items():
            out.update({f"update_{k}_{g}": v for g, v in by_group.items() if g in present})
            if k != "grpo":
                out.update({f"ratio_{k}_{g}": v / norms["grpo"][g] for g, v in by_group.items()
                            if g in present and norms["grpo"][g] > 0})
    return out


def measure_arm(env, arm, warm_state):
    """Both points of one arm on one seed: {'start': measure_point of the warm-up model with the arm's config,
    'end': measure_point of the arm's final checkpoint with its optimizer state, and ln_f_drift}."""
    cfg, path = arm_config(env.cfg, arm), os.path.join(env.cfg.out_dir, f"{arm}.pt")
    end = trained_model(env, arm)  # exits 2 with one line if missing or not at rl_steps
    opt = make_optimizer(end, cfg.rl_lr, env.device)
    opt.load_state_dict(load_checkpoint(path, env.device, ("optimizer",))["optimizer"])
    env32 = fp32(env)
    return {"start": measure_point(env32, cfg, load_policy(env, cfg, warm_state)),
            "end": dict(measure_point(env32, cfg, end, opt), **ln_f_drift(end, warm_state))}


# -----------------------------------------------------------------------------
# The run and its tables

def preflight(envs, arms):
    """Before any work, for every seed: its warm-up must be cached (else exit 2 with one line: it would be
    trained again, with other settings); a seed whose warm-up missed sft_target_acc is skipped under
    --skip_missed; every arm's checkpoint must exist at rl_steps (trained_model exits 2 with one line).
    Returns {seed: missed warm-up's validation accuracy}."""
    missed = {}
    for seed, env in envs.items():
        if not os.path.exists(warmup_path(env)):
            refuse(f"no warm-up of seed {seed} in {env.cfg.out_dir} for {torch.get_num_threads()} threads on {env.device}, "
                   f"{env.precision}: run the grid first, or run this with the grid's OMP_NUM_THREADS, device and precision")
        if env.cfg.skip_missed and (acc := warmup_val_acc(env)) < env.cfg.sft_target_acc:
            missed[seed] = acc
            continue
        for arm in arms:
            trained_model(env, arm)
    return missed


def finite_or_none(value):
    """A number for JSON: nan and inf become None (null); None (read back from a saved run) stays None."""
    return value if value is None or isinstance(value, int) or math.isfinite(value) else None


def mean_cell(values):
    """One table cell: the mean of the finite values among one per seed (None or absent: not finite), '(k)'
    after it if only k are finite; '-' if none is."""
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return "-"
    return f"{np.mean(ok):.4g}" + (f" ({len(ok)})" if len(ok) < len(values) else "")


def md_table(headings, rows):
    """Markdown lines of a table: headings, then rows (lists of cells)."""
    return ["| " + " | ".join(headings) + " |", "|---" * len(headings) + "|"] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def tables(per_seed, arms, cfg):
    """gradients.md's text: means over seeds of every measure, by arm and point, with the number of seeds."""
    def cells(arm, point, keys):
        got = [per_seed[s][arm][point] for s in per_seed]
        return [len(got)] + [mean_cell([m.get(k) for m in got]) for k in keys]

    n_groups = min(cfg.diag_groups, cfg.prompts_per_step)
    lens = [a for a in arms if aligned(arm_config(cfg, a))]
    lines = [f"# Where the gradient goes: {len(per_seed)} seed(s), {', '.join(map(str, per_seed))}", "",
             f"{cfg.diag_batches} fresh batches of {cfg.prompts_per_step} x {cfg.group_size} rollouts per arm and point, fp32; "
             f"'start' is the warm-up model with the arm's config, 'end' the arm after {cfg.rl_steps} RL steps. Each cell is "
             "the mean over seeds ('(k)': only k seeds had a finite value). l is the aligned layer (the deepest, with several).", "",
             "## 1. The alignment gradient's squared norm: share per parameter group (mean over batches)", "",
             *md_table(["arm", "point", "seeds", *GROUPS, "squared norm"],
                       [[a, p, *cells(a, p, [f"share_{g}" for g in GROUPS] + ["align_sqnorm"])] for a in lens for p in POINTS]),
             "", "## 2. ln_f drift over RL: ||end - warm-up|| / ||warm-up||", "",
             *md_table(["arm", "seeds", "weight", "bias"], [[a, *cells(a, "end", ["drift_ln_f_weight", "drift_ln_f_bias"])] for a in arms]),
             "", "## 3, 4. JSD-advantage correlation (first aligned exit vs final layer) and cancellation ratios", "",
             f"corr_within: the rollout's mean JSD demeaned within its group; corr_pooled: not demeaned; both over groups whose "
             f"rewards differ, pooled over the batches. cancel: ||sum_i c_i|| / sum_i ||c_i|| over the per-rollout gradients "
             f"of the first {n_groups} groups of each batch only ({n_groups * cfg.group_size} of "
             f"{cfg.prompts_per_step * cfg.group_size} rollouts): per group (mean over groups with a nonzero weight) and over "
             "those groups together (batch).", "",
             *md_table(["arm", "point", "seeds", "corr_within", "corr_pooled", "cancel_align_group", "cancel_align_batch",
                        "cancel_grpo_group", "cancel_grpo_batch"],
                       [[a, p, *cells(a, p, ["corr_within", "corr_pooled", "cancel_align_group", "cancel_align_batch",
                                             "cancel_grpo_group", "cancel_grpo_batch"])] for a in arms for p in POINTS]),
             "", "## 5. AdamW update per term and parameter group at the end: ||lr g / (sqrt(v_hat) + eps)||", "",
             "g: the term's gradient (lambda-weighted), averaged over the batches; v_hat: the arm's own bias-corrected "
             "second moment. ratio: the alignment term's update norm over GRPO's, in the same group.", "",
             *md_table(["arm", "term", "seeds", *GROUPS],
                       [[a, t, *cells(a, "end", [f"update_{t}_{g}" for g in GROUPS])] for a in arms for t in terms_on(arm_config(cfg, a))]
                       + [[a, f"{t} / grpo", *cells(a, "end", [f"ratio_{t}_{g}" for g in GROUPS])] for a in lens
                          for t in terms_on(arm_config(cfg, a))[1:]])]
    return "\n".join(lines) + "\n"


def save(cfg, per_seed, missed):
    """Write out_dir/gradients.json (every number; nan as null) and out_dir/gradients.md (tables); returns the md text."""
    clean = {s: {a: {p: {k: finite_or_none(v) for k, v in m.items()} for p, m in pts.items()} for a, pts in arms.items()}
             for s, arms in per_seed.items()}
    write_atomic(os.path.join(cfg.out_dir, "gradients.json"), json.dumps(
        {"config": dataclasses.asdict(cfg), "per_seed": clean, "missed": missed}, indent=1))
    text = tables(clean, cfg.arms.split(","), cfg) if per_seed else "No seed to measure.\n"
    write_atomic(os.path.join(cfg.out_dir, "gradients.md"), text)
    return text


def merge(folder):
    """folder/seed*/gradients.json (one run of this script per seed, each kept there: checkpoints do not outlive a
    working session) -> folder/gradients.json and gradients.md over all of them, as one run over every seed would
    write them. Exit 2 with one line if none is there, their settings (but seeds and out_dir) differ, or a seed
    is in two of them. Returns the md text."""
    parts = seed_folders(folder, "gradients.json")
    if not parts:
        refuse(f"--merge: {folder} holds no seed*/gradients.json")
    per_seed, missed, config, fields = {}, {}, None, {f.name for f in dataclasses.fields(GradConfig)}
    for seed, path in parts:
        try:
            with open(path) as f:
                saved = json.load(f)
            part, part_missed = dict(saved["per_seed"]), dict(saved["missed"])
            settings = {k: v for k, v in dict(saved["config"]).items() if k not in ("seeds", "out_dir")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            refuse(f"--merge: {path} is not this script's gradients.json ({type(e).__name__})")
        if set(part) | set(part_missed) != {seed} or len(part) + len(part_missed) != 1:
            refuse(f"--merge: {path} measured seeds {sorted({*part, *part_missed})} (valid and missed), not its folder's {seed} alone")
        if not set(settings) <= fields:
            refuse(f"--merge: {path} was measured with settings this script lacks ({', '.join(sorted(set(settings) - fields))})")
        if config is not None and settings != config:
            refuse(f"--merge: {path} was measured with other settings than {parts[0][1]}")
        if seed in per_seed or seed in missed:
            refuse(f"--merge: seed {seed} is in two folders ({path} and another)")
        per_seed.update(part)
        missed.update(part_missed)
        config = settings
    seeds = sorted([*per_seed, *missed], key=int)
    cfg = GradConfig(**dict(config, seeds=",".join(seeds), out_dir=folder))
    return save(cfg, {s: per_seed[s] for s in seeds if s in per_seed}, missed)


def main(argv):
    if len(argv) == 1 and argv[0].startswith("--merge="):
        print(merge(argv[0].split("=", 1)[1]))
        return
    env = harness.setup(argv, GradConfig, "research/gradients.py", validate_gradients, **METHOD)
    cfg, arms = env.cfg, env.cfg.arms.split(",")
    envs = seed_envs(cfg)
    missed = preflight(envs, arms)
    per_seed = {}
    for seed, senv in envs.items():
        if seed in missed:
            print(f"seed {seed}: warm-up missed ({missed[seed]:.1%}); not measured (--skip_missed)")
            continue
        warm_state = warmup(senv)
        per_seed[seed] = {}
        for arm in arms:
            t0 = time.time()
            per_seed[seed][arm] = measure_arm(senv, arm, warm_state)
            print(f"seed {seed} {arm}: start and end measured in {time.time() - t0:.0f}s")
        save(cfg, per_seed, missed)  # after every seed: a stopped run keeps what it measured
    print("\n" + save(cfg, per_seed, missed))
    print(f"wrote {cfg.out_dir}/gradients.json and {cfg.out_dir}/gradients.md")


if __name__ == "__main__":
    main(sys.argv[1:])
