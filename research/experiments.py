"""
Measurement built on top of oisd.py (which never imports this file): grids of seeds with paired
intervals and power, the post-hoc exit probe, Avg@K and the chain task's step accuracy, a benchmark of
RL steps, self-speculative decoding with each arm's exits, and RESULTS.md.

    python research/experiments.py --seeds=0,1,2,3,4 --arms=grpo,oisd,oisd_pos --resume   # a grid, then tables and plots
    python research/experiments.py --bench                                                # seconds per RL step, by phase
    python research/experiments.py --speculative --out_dir=runs/depth --n_layer=8 ...     # time the exits as drafters
    python research/experiments.py --report=runs/add3,runs/chain --out_dir=research       # RESULTS.md from finished grids
    python research/experiments.py --help                                                 # every flag

Every flag of oisd.py works here too. The plots need matplotlib (pip install matplotlib); without it they
are skipped.
"""

import dataclasses
import glob
import hashlib
import inspect
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up
from harness import (MAX_GIB, ConfigError, Env, PaddedForward, autocast, check_step, load_checkpoint, make_optimizer, now, preflight,
                     refuse, stream_seed, warmup_path, write_atomic)
from model import GPT, KVCache
from oisd import (NO_LAYERS, Config, arm_config, evaluate, layer_list, load_policy, response_mask, rl_step, run_seed,
                  sample_problems, setup, warmup)
from speculative import speculative_generate
from tasks import EOS, batch_rewards


@dataclass
class ExpConfig(Config):
    # experiments
    seeds: str = "0"                 # seeds of the grid: every arm on every seed, then tables with paired intervals
    avg_k: int = 8                   # samples per held-out problem for Avg@K and pass@K, at the training temperature
    probe_steps: int = 500           # full-batch steps of the post-hoc exit probe, the same budget for every arm
    probe_lr: float = 0.1            # learning rate of the probe (it fits the exit norms only)
    probe_batches: int = 8           # rollout batches of the model's own samples the probe is fitted on
    bench: bool = False              # time RL steps from the warm-up checkpoint instead of running a grid
    bench_steps: int = 20            # measured steps per arm in --bench
    speculative: bool = False        # time self-speculative decoding with every arm's exits (after a grid)
    spec_problems: int = 100         # held-out problems timed per arm, exit layer and draft length
    spec_max_draft: int = 6          # draft lengths 1..spec_max_draft are timed
    spec_layers: str = ""            # exit layers tried as drafters, comma-separated (empty: every layer below the last)
    report: str = ""                 # comma-separated grid out_dirs: write out_dir/RESULTS.md from their summaries
    step_test: str = ""              # comma-separated chain grid out_dirs: the paired step-accuracy test of each arm against grpo
    skip_missed: bool = False        # a seed whose warm-up misses sft_target_acc is reported and gets no RL steps


EXP_RANGES = dict(avg_k=(1, 1024), probe_steps=(0, 10**6), probe_lr=(1e-9, 10.0), probe_batches=(1, 1000), bench_steps=(1, 10**5),
                  spec_problems=(2, 500), spec_max_draft=(1, 32))


def validate_experiment(cfg):
    """The experiment flags; harness.validate has checked the rest. Raises ConfigError."""
    for key, (lo, hi) in EXP_RANGES.items():
        value = getattr(cfg, key)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise ConfigError(f"--{key} must be a finite number in [{lo}, {hi}], got {value}")
    try:
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds expects comma-separated integers, got {cfg.seeds!r}") from None
    if len(set(seeds)) != len(seeds) or not all(0 <= s < 2**31 for s in seeds):
        raise ConfigError(f"--seeds must list distinct integers in [0, 2**31), got {cfg.seeds!r}")
    try:
        layers = spec_layers(cfg)
    except ValueError:
        raise ConfigError(f"--spec_layers expects comma-separated integers, got {cfg.spec_layers!r}") from None
    if not all(1 <= layer < cfg.n_layer for layer in layers):
        raise ConfigError(f"--spec_layers: every layer must be in 1..{cfg.n_layer - 1}, got {cfg.spec_layers!r}")
    for flag in ("report", "step_test"):
        for path in getattr(cfg, flag).split(",") if getattr(cfg, flag) else []:
            if not path or not os.path.exists(os.path.join(path, "summary.json")):
                raise ConfigError(f"--{flag}: {path!r} holds no summary.json (run its grid first)")
    if cfg.speculative and cfg.spec_problems > cfg.eval_size:
        raise ConfigError(f"--spec_problems ({cfg.spec_problems}) must be at most --eval_size ({cfg.eval_size})")
    if cfg.rl_steps < 1 and not (cfg.report or cfg.bench or cfg.step_test):
        raise ConfigError("--rl_steps must be >= 1 for a grid or --speculative: they measure trained arms")
    kv_gib = cfg.eval_size * cfg.avg_k * cfg.block_size * cfg.n_layer * cfg.n_embd * 8 / 2**30
    if kv_gib > MAX_GIB:
        raise ConfigError(f"--avg_k {cfg.avg_k} x --eval_size {cfg.eval_size} samples need a {kv_gib:.0f} GiB KV cache; "
                          f"at most {MAX_GIB} GiB")


def seed_envs(cfg):
    """One Env per seed, each in out_dir/seed<s>."""
    return {s: Env(dataclasses.replace(cfg, seed=s, out_dir=os.path.join(cfg.out_dir, f"seed{s}")))
            for s in (int(x) for x in cfg.seeds.split(","))}


def trained_model(env, arm):
    """The model an arm ended with, from out_dir/<arm>.pt; 'warm-up start' is the warm-up's model."""
    if arm == "warm-up start":
        return load_policy(env, env.cfg, warmup(env)).eval()
    path = os.path.join(env.cfg.out_dir, f"{arm}.pt")
    if not os.path.exists(path):
        refuse(f"{path} does not exist: run the grid with --arms={arm} first")
    ck = load_checkpoint(path, env.device)
    if arm != "sft_more" and ck.get("step") != env.cfg.rl_steps:
        refuse(f"{path} stopped at step {ck.get('step')} of {env.cfg.rl_steps}: finish the grid first (--resume)")
    model = GPT(env.model_config(arm_config(env.cfg, arm))).to(env.device)
    model.load_state_dict(ck["model"])
    return model.eval()


def model_digest(model):
    """A hash of every weight: a cached measurement is reused only for the very model it measured."""
    digest = hashlib.sha1()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# Measures of one trained model, beyond oisd.evaluate

def probe_exits(env, model, steps, lr, batches):
    """The post-hoc probe: a copy of the model whose exit norms restart as copies of the trained ln_f (the
    same start for every arm) and are then fitted, with the trunk and the unembedding frozen, to the
    model's own final layer: full-batch AdamW for `steps` steps on loss = mean over exits l < L of
    KL(final || exit l), over the positions that predict response tokens of `batches` x N of the model's
    own samples (training prompts, the training temperature; the seed's own stream (seed, 'probe')).
    The trunk runs once: its layer outputs are computed up front and reused. Returns the probed copy."""
    cfg, L, P = env.cfg, model.config.n_layer, env.prompt_len
    probe = GPT(dataclasses.replace(model.config, exit_norm="own")).to(env.device)
    probe.load_state_dict(model.state_dict(), strict=False)  # a logit-lens model has no exit norms to load
    probe.reset_exit_heads()
    probe.requires_grad_(False)
    probe.exit_ln.requires_grad_(True)
    rng = random.Random(stream_seed(cfg.seed, "probe"))
    gen = torch.Generator(env.device).manual_seed(stream_seed(cfg.seed, "probe"))
    hidden, teacher = {l: [] for l in range(1, L)}, []
    with torch.no_grad(), autocast(env):
        for _ in range(batches):
            prompts = env.prompts(sample_problems(env.task, rng, cfg.prompts_per_step, env.exclude))
            seq, _ = probe.generate(prompts, env.max_new, cfg.temperature, cfg.group_size, env.eos_id, gen)
            keep = response_mask(seq[:, P:], env.eos_id).bool()  # (N, R)
            x = probe.embed(seq[:, :-1])
            for layer in range(1, L + 1):
                x = probe.block(layer)(x)[0]
                if layer < L:
                    hidden[layer].append(x[:, P - 1:][keep].float())  # (positions, C)
            teacher.append(F.log_softmax(probe.exit_logits(x, L)[:, P - 1:][keep], -1))
    hidden, teacher = {l: torch.cat(h).clone() for l, h in hidden.items()}, torch.cat(teacher).clone()
    opt = make_optimizer(probe, lr, env.device)
    for _ in range(steps):
        loss = sum(F.kl_div(F.log_softmax(probe.exit_logits(h, l), -1), teacher, log_target=True, reduction="batchmean")
                   for l, h in hidden.items()) / (L - 1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe.eval()


@torch.inference_mode()
def sampled_and_step_metrics(env, model):
    """Avg@K (mean accuracy over K samples per held-out problem at the training temperature), pass@K (a
    problem counts if any of its K samples is right), and the process metrics of the greedy and the
    sampled completions: the fraction of intermediate running sums that are right (step_acc; chain task
    only) and the fraction of completions whose every number is right (all_steps). Samples use the
    seed's own stream (seed, 'avg_k'), the same for every arm."""
    cfg, test = env.cfg, env.test
    K = cfg.avg_k
    gen = torch.Generator(env.device).manual_seed(stream_seed(cfg.seed, "avg_k"))
    with autocast(env):
        greedy, _ = model.generate(env.prompts(test), env.max_new, temperature=0, eos_id=env.eos_id)
        sampled, _ = model.generate(env.prompts(test), env.max_new, cfg.temperature, K, env.eos_id, gen)
    rewards = batch_rewards(env.task, env.tok, sampled[:, env.prompt_len:], test, K).view(len(test), K)
    out = {"avgk": rewards.mean().item(), "passk": (rewards.max(1).values > 0).float().mean().item()}
    for name, seq, n in (("", greedy, 1), ("sampled_", sampled, K)):
        steps = [env.task.steps(c, p) for c, (p, _) in zip(env.completions(seq), (pr for pr in test for _ in range(n)))]
        out[f"{name}all_steps"] = float(np.mean([all(s) for s in steps]))
        if env.task.n_numbers > 1:
            out[f"{name}step_acc"] = float(np.mean([s[:-1] for s in steps]))
    return out


def measure_arm(env, arm):
    """Everything the grid adds to oisd's evaluation of an arm's final model: Avg@K, pass@K, step accuracy,
    and the held-out accuracy and agreement of every exit after the post-hoc probe (probe_*). Cached in
    out_dir/measure-<arm>.json under the settings it depends on and the digest of the model's weights."""
    cfg = env.cfg
    model = trained_model(env, arm)
    key = dict(avg_k=cfg.avg_k, probe_steps=cfg.probe_steps, probe_lr=cfg.probe_lr, probe_batches=cfg.probe_batches,
               eval_size=cfg.eval_size, temperature=cfg.temperature, model=model_digest(model))
    path = os.path.join(cfg.out_dir, f"measure-{arm.replace(' ', '_')}.json")
    cached = read_cache(path)
    if cached.get("key") == key:
        return cached["measures"]
    t0 = time.time()
    out = sampled_and_step_metrics(env, model)
    probe = probe_exits(env, model, cfg.probe_steps, cfg.probe_lr, cfg.probe_batches)
    probed = evaluate(env, probe, env.test, layers=list(range(1, cfg.n_layer)), lens=False)
    out.update({f"probe_{k}": v for k, v in probed.items() if k.startswith(("acc_L", "agree_L"))})
    print(f"  measured {arm} in {time.time() - t0:.0f}s: Avg@{cfg.avg_k} {out['avgk']:.1%}, pass@{cfg.avg_k} "
          f"{out['passk']:.1%}, probed exits " + " ".join(f"L{l} {out[f'probe_acc_L{l}']:.1%}" for l in range(1, cfg.n_layer)))
    write_atomic(path, json.dumps({"key": key, "measures": out}))
    return out


# -----------------------------------------------------------------------------
# The grid

def warmup_val_acc(env):
    """The warm-up's final validation accuracy (trains the warm-up if it is not cached). A seed's warm-up is
    never made twice under --skip_missed: if out_dir holds a warm-up made with other settings (another
    thread count, say), a second one could reach the target where the first missed, so this refuses."""
    os.makedirs(env.cfg.out_dir, exist_ok=True)
    if not os.path.exists(warmup_path(env)) and glob.glob(os.path.join(env.cfg.out_dir, "warmup-*.pt")):
        refuse(f"{env.cfg.out_dir} holds a warm-up made with other settings (OMP_NUM_THREADS, device, precision?); "
               "--skip_missed never makes a seed's warm-up twice: use the settings it was made with, or another --out_dir")
    warmup(env)
    return float(load_checkpoint(warmup_path(env), env.device, ("val_acc",))["val_acc"])


def run_grid(cfg):
    """For each seed, oisd's run (warm-up and every arm) in out_dir/seed<s>, then measure_arm for every
    row; then the summary tables (printed, and saved as summary.md and summary.json) and the plots.
    With --skip_missed a seed whose warm-up misses sft_target_acc gets no RL and is only listed."""
    per_seed, missed, envs = {}, {}, seed_envs(cfg)
    for env in envs.values():  # every seed's checkpoints are checked before any seed trains
        preflight(env, arm_config)
    for seed, env in envs.items():
        print(f"\n=== seed {seed} ===")
        acc = warmup_val_acc(env) if cfg.skip_missed else None
        if acc is not None and acc < cfg.sft_target_acc:
            missed[seed] = acc
            print(f"seed {seed}: warm-up missed ({acc:.1%} < {cfg.sft_target_acc:.0%}); no RL (--skip_missed)")
            continue
        rows = run_seed(env)
        per_seed[seed] = {arm: dict(ev, **measure_arm(env, arm)) for arm, ev in rows.items()}
        if acc is not None:
            per_seed[seed]["warm-up start"]["warmup_val_acc"] = acc
    missed_line = ("Seeds whose warm-up missed, with no RL: " + ", ".join(f"{s} ({a:.1%})" for s, a in missed.items())
                   + ".\n\n") if missed else ""
    if not per_seed:
        print("\n" + missed_line + "No seed reached the warm-up target: nothing to summarise.")
        write_atomic(os.path.join(cfg.out_dir, "summary.json"), json.dumps(
            {"config": dataclasses.asdict(cfg), "per_seed": {}, "summary": {}, "missed": missed}, indent=1))
        write_atomic(os.path.join(cfg.out_dir, "summary.md"), missed_line)
        return
    arms = cfg.arms.split(",")
    summary = summarize(per_seed, cfg.n_layer)
    shown = sorted({l for arm in arms if arm.partition(":")[0] not in NO_LAYERS
                    for l in layer_list(arm_config(cfg, arm))})
    text = (f"{len(per_seed)} seeds ({','.join(map(str, per_seed)) if missed else cfg.seeds}); held-out problems: {cfg.eval_size}; K = {cfg.avg_k}.\n\n"
            + missed_line + "Final layer, greedy and sampled:\n\n" + final_table(summary, cfg.avg_k)
            + "\n\nExits (%), each as trained / through the trained ln_f (lens) / after the post-hoc probe "
            f"({cfg.probe_steps} steps): held-out greedy accuracy, and the exit's top-1 agreement with the final layer "
            "on the final layer's own greedy completions (what greedy drafting's acceptance rate estimates; "
            "speculative.md has the rate itself):\n\n" + exit_table(summary, shown or [layer_list(cfg)[0]])
            + "\n\nAlignment diagnostics (mean over seeds and evaluation steps):\n\n" + diagnostics_table(cfg, list(per_seed), arms)
            + "\n\nEarly exit, greedy accuracy (%) and time to sample the held-out set:\n\n"
            + early_exit_table(summary, cfg.n_layer, ["warm-up start"] + arms))
    print("\n" + text)
    write_atomic(os.path.join(cfg.out_dir, "summary.json"),
                 json.dumps({"config": dataclasses.asdict(cfg), "per_seed": per_seed, "summary": summary,
                             "missed": missed}, indent=1))
    write_atomic(os.path.join(cfg.out_dir, "summary.md"), text + "\n")
    print(f"saved {cfg.out_dir}/summary.json and summary.md")
    make_plots(cfg, list(per_seed), arms, summary)


# Student's t quantiles for 1..30 degrees of freedom (beyond 30, the normal's): two-sided 95% (0.975) and
# one-sided 80% (0.80), for intervals and for the minimum detectable effect at 80% power.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
T80 = [1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870, 0.868, 0.866,
       0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856, 0.855, 0.855, 0.854, 0.854]


def t_quantile(table, df, normal):
    return table[df - 1] if df <= len(table) else normal


def min_detectable_effect(sd, n):
    """The smallest true mean paired difference that a two-sided 5% t-test on n pairs with this standard
    deviation of the differences detects with 80% power: (t_0.975 + t_0.80) * sd / sqrt(n), both with n-1
    degrees of freedom, the usual approximation to the noncentral t."""
    return (t_quantile(T975, n - 1, 1.960) + t_quantile(T80, n - 1, 0.8416)) * sd / math.sqrt(n)


def seeds_needed(sd, effect, most=1000):
    """Fewest seeds whose minimum detectable effect is at most `effect` (None beyond `most`)."""
    return next((n for n in range(2, most + 1) if min_detectable_effect(sd, n) <= effect), None)


def paired_interval(diff):
    """diff: (n,) paired differences, n >= 2 -> (mean, lower, upper, sd): the 95% t-interval of the mean,
    and the sample standard deviation of the differences."""
    sd, n = float(np.std(diff, ddof=1)), len(diff)
    half = t_quantile(T975, n - 1, 1.960) * sd / math.sqrt(n)
    return float(np.mean(diff)), float(np.mean(diff)) - half, float(np.mean(diff)) + half, sd


def incomplete_beta(x, a, b):
    """The regularized incomplete beta function I_x(a, b), by its continued fraction (modified Lentz),
    on the side of x where the fraction converges fast."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1.0 - incomplete_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny, f, c, d = 1e-300, 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_pvalue(t, df):
    """Two-sided p-value of a Student t statistic with df degrees of freedom: P(|T| >= |t|)."""
    return incomplete_beta(df / (df + t * t), df / 2, 0.5)


def wilcoxon_pvalue(diff):
    """Two-sided exact p-value of the Wilcoxon signed-rank test: zero differences dropped, tied |d| given
    their average rank, and every one of the 2^n sign patterns enumerated (n <= 20). The statistic is the
    sum of the positive ranks; p = P(|W+ - n(n+1)/4| >= observed) under random signs. Differences are
    rounded to 9 decimals first, so that 13.6 computed two ways is one tie."""
    d = np.round(np.asarray(diff, dtype=float), 9)  # differences equal up to float rounding are ties
    d = d[d != 0]
    n = len(d)
    if n == 0:
        return 1.0
    if n > 20:
        raise ValueError("exact Wilcoxon enumeration is for at most 20 non-zero differences")
    order = np.abs(d).argsort(kind="stable")
    ranks = np.empty(n)
    ranks[order] = np.arange(1, n + 1)
    for value in np.unique(np.abs(d)):  # average the ranks of ties
        ranks[np.abs(d) == value] = ranks[np.abs(d) == value].mean()
    signs = (np.arange(2 ** n)[:, None] >> np.arange(n)) & 1  # (2^n, n): every sign pattern
    centre = n * (n + 1) / 4
    observed = abs(ranks[d > 0].sum() - centre)
    return float(np.mean(np.abs(signs @ ranks - centre) >= observed - 1e-9))


def paired_test(diff):
    """diff: (n,) paired differences, n >= 2 -> the mean with its 95% t-interval, the t statistic and its
    two-sided p, the exact Wilcoxon signed-rank p, and the minimum detectable effect (80% power). With
    every difference equal (sd 0) t and p are undefined: NaN."""
    n = len(diff)
    if n < 2:
        raise ValueError("a paired test needs at least 2 pairs")
    mean, lo, hi, sd = paired_interval(diff)
    t = mean / (sd / math.sqrt(n)) if sd > 0 else math.nan
    return dict(n=n, mean=mean, lo=lo, hi=hi, sd=sd, t=t, p=t_pvalue(t, n - 1) if sd > 0 else math.nan,
                p_wilcoxon=wilcoxon_pvalue(diff), mde=min_detectable_effect(sd, n))


# The paper's reported gain, relative: OISD 64.75 against GRPO 55.08 average accuracy (Qwen3-4B, Avg@K).
PAPER_RELATIVE_GAIN = 64.75 / 55.08 - 1


def summarize(per_seed, n_layer):
    """per_seed: {seed: {row: measures}} -> {row: summary}: for the final layer's greedy accuracy (final)
    and Avg@K (avgk), the mean and std over seeds and, against grpo on the same seeds, the mean paired
    difference with its 95% t-interval, the minimum detectable effect (80% power) and the seeds an
    effect of the paper's relative size would need; and the mean over seeds of every other measure."""
    seeds, L = list(per_seed), n_layer
    out = {}
    for row in per_seed[seeds[0]]:
        evals = [per_seed[s][row] for s in seeds]
        summary = {"n": len(seeds)}
        for name, key in (("final", f"acc_L{L}"), ("avgk", "avgk")):
            values = np.array([e[key] for e in evals])
            summary[f"{name}_mean"], summary[f"{name}_std"] = values.mean(), values.std(ddof=1) if len(seeds) > 1 else 0.0
            if "grpo" in per_seed[seeds[0]] and row != "grpo" and len(seeds) > 1:
                grpo = np.array([per_seed[s]["grpo"][key] for s in seeds])
                mean, lo, hi, sd = paired_interval(values - grpo)
                paper = PAPER_RELATIVE_GAIN * grpo.mean()
                summary.update({f"{name}_diff": mean, f"{name}_lo": lo, f"{name}_hi": hi,
                                f"{name}_mde": min_detectable_effect(sd, len(seeds)), f"{name}_paper_effect": paper,
                                f"{name}_seeds_needed": seeds_needed(sd, paper) or math.nan})
        for key in evals[0]:
            summary[key] = float(np.mean([e.get(key, np.nan) for e in evals]))
        out[row] = {k: float(v) for k, v in summary.items()}
    return out


def pct(x):
    return "" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def diff_cell(s, name):
    """'+1.2 [-0.5, +2.9] (3.1)' in points: mean paired difference [95% CI] (minimum detectable effect),
    or '' for grpo itself."""
    if f"{name}_diff" not in s:
        return ""
    return (f"{100 * s[f'{name}_diff']:+.1f} [{100 * s[f'{name}_lo']:+.1f}, {100 * s[f'{name}_hi']:+.1f}] "
            f"({100 * s[f'{name}_mde']:.1f})")


def final_table(summary, k):
    """The final layer: greedy and Avg@K with paired differences to grpo, pass@K, step accuracy."""
    lines = [f"| arm | greedy, mean ± std | vs grpo [95% CI] (MDE) | Avg@{k} | vs grpo [95% CI] (MDE) | "
             f"pass@{k} | step acc | all steps | length | train s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        lines.append(f"| {row} | {pct(s['final_mean'])} ± {pct(s['final_std'])} | {diff_cell(s, 'final')} | "
                     f"{pct(s['avgk_mean'])} ± {pct(s['avgk_std'])} | {diff_cell(s, 'avgk')} | {pct(s['passk'])} | "
                     f"{pct(s.get('step_acc', math.nan))} | {pct(s['all_steps'])} | {s['len']:.2f} | "
                     f"{s.get('train_seconds', math.nan):.0f} |")
    return "\n".join(lines)


def exit_table(summary, shown):
    """Per arm and shown exit layer: held-out accuracy and top-1 agreement with the final layer, each as
    trained / lens / probe."""
    lines = ["| arm | " + " | ".join(f"exit L{l} accuracy | agree L{l}" for l in shown) + " |",
             "|---|" + "---|---|" * len(shown)]
    for row, s in summary.items():
        cells = [" / ".join(pct(s[f"{p}acc_L{l}"]) for p in ("", "lens_", "probe_")) + " | "
                 + " / ".join(pct(s[f"{p}agree_L{l}"]) for p in ("", "lens_", "probe_")) for l in shown]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_folders(folder, filename):
    """folder/seed<S>/filename, each seed's own file as research/assets/ keeps them -> [(S, path)] in increasing
    S, or exit 2 with one line if a seed folder holding filename is not named seed<integer>."""
    found = []
    for path in glob.glob(os.path.join(glob.escape(folder), "seed*", glob.escape(filename))):
        name = os.path.basename(os.path.dirname(path))
        if not re.fullmatch(r"seed[0-9]+", name):
            refuse(f"{os.path.dirname(path)}: a seed's folder is named seed<integer>, not {name!r}")
        found.append((str(int(name[4:])), path))
    return sorted(found, key=lambda sp: int(sp[0]))


def read_metrics(cfg, seeds):
    """The records of every seed's metrics.jsonl, with "seed" added; a record repeated by a resumed run
    (same seed, arm, step and kind of record) is kept once, the last."""
    unique = {}
    for seed in seeds:
        for line in open(os.path.join(cfg.out_dir, f"seed{seed}", "metrics.jsonl")):
            r = dict(json.loads(line), seed=seed)
            unique[(seed, r["arm"], r["step"], tuple(sorted(r)))] = r
    return list(unique.values())


def diagnostics_table(cfg, seeds, arms):
    """Means over seeds and evaluation steps of the diagnose() records in each seed's metrics.jsonl, of the
    records where a value is defined (a correlation is undefined when no group had distinct rewards)."""
    keys = ["w_group_sum", "jsd_adv_corr", "align_grad_norm", "grpo_grad_norm"]
    lines = ["| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    records = read_metrics(cfg, seeds)
    for arm in arms:
        mine = [r for r in records if r["arm"] == arm and "diag_w_group_sum" in r]
        if mine:
            lines.append(f"| {arm} | " + " | ".join(f"{np.nanmean([r.get('diag_' + k, np.nan) for r in mine]):.4f}"
                                                  for k in keys) + " |")
    return "\n".join(lines)


def early_exit_table(summary, n_layer, arms):
    """Greedy accuracy and sampling time of the held-out set when only blocks 1..l run, per arm."""
    shown = [a for a in arms if a in summary]
    lines = ["| exit layer | seconds (speed-up) | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
    full = np.mean([summary[a][f"sec_L{n_layer}"] for a in shown])
    for layer in range(n_layer, 0, -1):
        sec = np.mean([summary[a][f"sec_L{layer}"] for a in shown])
        lines.append(f"| {layer} | {sec:.3f} ({full / sec:.2f}x) | "
                     + " | ".join(pct(summary[a][f'acc_L{layer}']) for a in shown) + " |")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot drawing to files (the Agg backend), or None with a one-line note if it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return None
    return plt


def make_plots(cfg, seeds, arms, summary):
    """PNGs next to the summary, if matplotlib is installed: accuracy vs step per arm (final layer and the
    aligned exit, mean over seeds with a band of one standard deviation, ddof=1 as in the tables);
    exit accuracy per layer per arm, as trained and after the probe; and one held-out prompt's
    head-averaged attention in the aligned and the final layer, before and after RL."""
    plt = pyplot()
    if plt is None:
        return
    L, aligned = cfg.n_layer, layer_list(cfg)[0]
    records = read_metrics(cfg, seeds)
    # the arms evaluated every eval_every steps: every RL arm at the final layer; at the aligned exit, every
    # arm whose align_layers holds it (grpo inherits the default align_layers, so it is there too)
    curves = {L: [a for a in arms if a != "sft_more"],
              aligned: [a for a in arms if a != "sft_more" and aligned in layer_list(arm_config(cfg, a))]}
    colors = dict(zip(["warm-up start"] + list(arms), plt.cm.tab20(np.linspace(0, 1, 20))))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, layer in zip(axes, (L, aligned)):
        for arm in curves[layer]:
            by_step = {}
            for r in records:
                if r["arm"] in (arm, "warm-up start") and f"acc_L{layer}" in r and (r["step"] % cfg.eval_every == 0
                                                                                      or r["step"] == cfg.rl_steps):
                    by_step.setdefault(r["step"], []).append(r[f"acc_L{layer}"])  # one per seed
            steps = sorted(by_step)
            values = [np.array(by_step[t]) * 100 for t in steps]
            mean = np.array([v.mean() for v in values])
            std = np.array([v.std(ddof=1) if len(v) > 1 else 0.0 for v in values])
            ax.plot(steps, mean, label=arm, color=colors[arm])
            ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.08)
        ax.set(xlabel="RL step", ylabel="held-out greedy accuracy (%)",
               title="final layer" if layer == L else f"exit at layer {layer} as trained (the aligned layer)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "accuracy_vs_step.png"), dpi=90)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, prefix, title in zip(axes, ("", "probe_"), ("as trained", f"after the post-hoc probe ({cfg.probe_steps} steps)")):
        for arm in ["warm-up start"] + list(arms):
            ax.plot(range(1, L + 1), [100 * summary[arm][f"{prefix if l < L else ''}acc_L{l}"] for l in range(1, L + 1)],
                    marker="o", label=arm, color=colors[arm])
        ax.set(xlabel="exit layer (blocks run)", ylabel="held-out greedy accuracy (%)", xticks=range(1, L + 1),
               title=f"exits {title}, mean of {len(seeds)} seeds")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "exit_accuracy.png"), dpi=90)
    env = seed_envs(dataclasses.replace(cfg, seeds=str(seeds[0])))[seeds[0]]
    shown = [a for a in ("grpo", "oisd", "oisd_pos") if a in arms]
    prompt = env.prompts(env.test[:1])
    fig, axes = plt.subplots(2, 1 + len(shown), figsize=(3.2 * (1 + len(shown)), 6.4), squeeze=False)
    for col, arm in enumerate(["warm-up start"] + shown):
        model = trained_model(env, arm)
        with torch.inference_mode():
            seq, _ = model.generate(prompt, env.max_new, temperature=0, eos_id=env.eos_id)
            _, _, attns = model(seq[:, :-1], attn_layers=(aligned, L))
        labels = [env.tok.decode([t]).replace(EOS, "$") for t in seq[0, :-1].tolist()]
        for row, layer in enumerate((aligned, L)):
            ax = axes[row, col]
            ax.imshow(attns[layer][0].mean(0).float().cpu().numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(labels)), labels, fontsize=7)
            ax.set_yticks(range(len(labels)), labels, fontsize=7)
            ax.set_title(f"{arm}: layer {layer}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "attention.png"), dpi=90)
    print(f"saved plots in {cfg.out_dir}: accuracy_vs_step.png exit_accuracy.png attention.png")


# -----------------------------------------------------------------------------
# The benchmark

class StepPhases:
    """Seconds of one RL step by phase, measured from outside it: rollout, the sampler (model.generate,
    wrapped on this model); optim, the optimizer's step (its step hooks); fwd_bwd, the rest of the step
    (rewards, advantages, the loss's forward and backward, the gradient clip)."""

    def __init__(self, model, opt, device):
        self.device, self.seconds, self.started = device, {}, None
        generate = model.generate

        def timed_generate(*args, **kwargs):
            t0 = now(device)
            out = generate(*args, **kwargs)
            self.seconds["rollout"] += now(device) - t0
            return out
        model.generate = timed_generate  # this instance only
        opt.register_step_pre_hook(lambda *_: setattr(self, "started", now(device)))
        opt.register_step_post_hook(lambda *_: self.seconds.__setitem__("optim", self.seconds["optim"] + now(device) - self.started))

    def time(self, step_fn):
        """Run step_fn() -> its result and {rollout, fwd_bwd, optim} seconds."""
        self.seconds = {"rollout": 0.0, "optim": 0.0}
        t0 = now(self.device)
        out = step_fn()
        total = now(self.device) - t0
        return out, {"rollout": self.seconds["rollout"], "fwd_bwd": total - self.seconds["rollout"] - self.seconds["optim"],
                     "optim": self.seconds["optim"]}


@torch.inference_mode()
def naive_sample(model, prompts, max_new_tokens, temperature, num_samples, generator):
    """The sampler without a KV cache, for comparison: the whole prefix runs again for every new token."""
    seq = prompts.repeat_interleave(num_samples, dim=0)  # (N, P)
    for _ in range(max_new_tokens):
        logits = model(seq)[0][:, -1]  # (N, vocab)
        tok = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)  # (N, 1)
        seq = torch.cat([seq, tok], dim=1)
    return seq


def bench(env):
    """Time RL steps in steady state, starting from the warm-up checkpoint (so rewards and gradients are
    real): median seconds per phase over bench_steps steps (after 5 unmeasured ones) for plain GRPO and
    GRPO+OISD, stepped alternately so that both see the same machine load; then the KV-cache sampler
    against the naive loop that re-runs the whole prefix per token. On CUDA also the achieved training
    TFLOP/s and the peak memory."""
    cfg, dev = env.cfg, env.device
    warm_state, arms = warmup(env), {}
    for arm in ("grpo", "oisd"):
        acfg = arm_config(cfg, arm)
        model = load_policy(env, acfg, warm_state)
        opt = make_optimizer(model, cfg.rl_lr, dev)
        arms[arm] = dict(cfg=acfg, model=model, opt=opt, phases=StepPhases(model, opt, dev),
                         forward=PaddedForward(model, env.max_new, env.eos_id) if cfg.compile else None,
                         gen=torch.Generator(dev).manual_seed(stream_seed(cfg.seed, "bench")), times=[], tokens=[])
    rng, peak = random.Random(stream_seed(cfg.seed, "bench")), {}
    for i in range(5 + cfg.bench_steps):
        problems = sample_problems(env.task, rng, cfg.prompts_per_step, env.exclude)
        for arm, a in arms.items():
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            stats, seconds = a["phases"].time(lambda: check_step(rl_step(env, a["cfg"], a["model"], a["opt"], problems, a["gen"],
                                                                         a["forward"]), a["model"]))
            if dev == "cuda":
                peak[arm] = max(peak.get(arm, 0.0), torch.cuda.max_memory_allocated() / 2**30)
            if i >= 5:
                a["times"].append(seconds)
                a["tokens"].append(stats["tokens"])
    n, rows = cfg.prompts_per_step * cfg.group_size, {}
    for arm, a in arms.items():
        med = {k: float(np.median([t[k] for t in a["times"]])) for k in a["times"][0]}
        med["step"] = float(np.median([sum(t.values()) for t in a["times"]]))
        med["completions/s"] = n / med["step"]
        med["sampled tok/s"] = float(np.median(a["tokens"])) / med["rollout"]
        if dev == "cuda":
            n_params = sum(p.numel() for p in a["model"].parameters())
            # an estimate, 6 x parameters x tokens (attention and the OISD terms not counted); tokens trained per
            # step, an upper bound: each prompt once per group, then R <= max_new per rollout, num_iterations times
            trained = (cfg.prompts_per_step * (env.prompt_len - 1) + n * env.max_new) * cfg.num_iterations
            med["train TFLOP/s"] = 6 * n_params * trained / med["fwd_bwd"] / 1e12
            med["peak GiB"] = peak[arm]
        rows[arm] = med
    print(f"\nRL step from the warm-up checkpoint: median of {cfg.bench_steps} steps after 5 unmeasured ones; "
          f"{n} completions per step")
    print(f"{'':<16}{'grpo':>12}{'oisd':>12}{'oisd/grpo':>12}")
    for key in rows["grpo"]:
        g, o = rows["grpo"][key], rows["oisd"][key]
        label = key + " s" if key in ("rollout", "fwd_bwd", "optim", "step") else key
        print(f"{label:<16}{g:12.4f}{o:12.4f}{o / g:12.2f}")
    model, gen = arms["grpo"]["model"], arms["grpo"]["gen"]
    prompts = env.prompts(sample_problems(env.task, rng, cfg.prompts_per_step, env.exclude))
    samplers = {True: lambda: model.generate(prompts, env.max_new, cfg.temperature, cfg.group_size, None, gen),
                False: lambda: naive_sample(model, prompts, env.max_new, cfg.temperature, cfg.group_size, gen)}
    runs = {True: [], False: []}
    for _ in range(10):
        for use_cache, sample in samplers.items():
            t0 = now(dev)
            with autocast(env):
                sample()
            runs[use_cache].append(now(dev) - t0)
    cached, naive = float(np.median(runs[True][2:])), float(np.median(runs[False][2:]))
    tokens = n * env.max_new
    print(f"\nsampler, {n} completions x {env.max_new} tokens (no early stop), median of 8 runs:")
    print(f"  KV cache {cached:.4f} s ({tokens / cached:.0f} tok/s) | naive loop {naive:.4f} s "
          f"({tokens / naive:.0f} tok/s) | speed-up {naive / cached:.2f}x")
    return rows


# -----------------------------------------------------------------------------
# Self-speculative decoding: each arm's exits as drafters

@torch.inference_mode()
def pass_costs(env, model, prompt, draft_layer, max_draft, repeats=60):
    """Measured seconds (medians over `repeats`) of the pieces of decoding one sequence at batch 1, with a
    cache as long as the prompt: the prompt's pass (prefill), a plain decode step (every block and the head
    on one token, and the argmax read back as greedy_decode does), a draft step (blocks 1..l, the exit head
    and its argmax) and a verification (blocks l+1..L, the head and the argmaxes on m positions, m =
    1..max_draft+1). The pieces take turns within each repeat, so that all of them see the same machine
    load. Returns {prefill, full, draft, verify: [s for m = 1..max_draft+1]} (a list, so that it survives
    a JSON round-trip unchanged)."""
    L, l, dev = model.config.n_layer, draft_layer, env.device
    last = prompt[:, -1:]

    def draft(cache):
        x = model.embed(last, cache.length())
        for layer in range(1, l + 1):
            x = model.block(layer)(x, cache)[0]
        int(model.exit_logits(x, l)[0, -1].argmax())

    def verify(cache, m):
        x = model.embed(last, cache.length()).repeat(1, m, 1)  # (1, m, C): m positions' layer-l states
        for layer in range(l + 1, L + 1):
            x = model.block(layer)(x, cache)[0]
        model.exit_logits(x, L)[0].argmax(-1).tolist()

    pieces = {"prefill": lambda cache: int(model(prompt, cache=KVCache())[0][0, -1].argmax()),  # its own cache
              "full": lambda cache: int(model(last, cache=cache)[0][0, -1].argmax()), "draft": draft}
    pieces.update({f"verify {m}": (lambda cache, m=m: verify(cache, m)) for m in range(1, max_draft + 2)})
    times = {name: [] for name in pieces}
    for _ in range(repeats):
        for name, fn in pieces.items():
            cache = KVCache()
            model(prompt[:, :-1], cache=cache)
            t0 = now(dev)
            fn(cache)
            times[name].append(now(dev) - t0)
    med = {name: float(np.median(t)) for name, t in times.items()}
    return {"prefill": med["prefill"], "full": med["full"], "draft": med["draft"],
            "verify": [med[f"verify {m}"] for m in range(1, max_draft + 2)]}


def predicted_speedup(a, k, new_tokens, costs):
    """The speed-up of greedy self-speculation over plain decoding that the per-token acceptance rate a,
    the draft length k and the measured costs (pass_costs) predict, for `new_tokens` tokens per problem.
    After the prompt's pass gives the first token, each cycle drafts n = min(k, tokens left - 1) tokens
    (n+1 draft steps: the last draft's successor is verified too), verifies n+1 positions, and keeps
    j accepted drafts plus the full model's token with probability a^j (1 - a) for j < n, a^n for j = n.
    Every one of the n+1 draft steps is priced with its exit head although the last needs none (a slight
    overestimate of the cost, so of the time)."""
    expected = {0: 0.0}  # expected seconds to produce `left` more tokens
    for left in range(1, new_tokens):
        n = min(k, left - 1)
        keep = [a**j * (1 - a) for j in range(n)] + [a**n]
        expected[left] = ((n + 1) * costs["draft"] + costs["verify"][n]  # verify[n]: n + 1 positions
                          + sum(p * expected[left - j - 1] for j, p in enumerate(keep)))
    plain = costs["prefill"] + (new_tokens - 1) * costs["full"]
    return plain / (costs["prefill"] + expected[new_tokens - 1])


@torch.inference_mode()
def greedy_decode(model, idx, max_new_tokens, eos_id):
    """Plain greedy KV-cache decoding of one sequence and nothing else (no log-probabilities, tokens kept as
    Python ints as speculative_generate keeps them): the baseline the speculative timing divides by.
    idx: (1, P). Returns tokens (1, P+R), EOS included."""
    cache = KVCache()
    out = [int(model(idx, cache=cache)[0][0, -1].argmax())]
    while len(out) < max_new_tokens and out[-1] != eos_id:
        out.append(int(model(idx.new_tensor([[out[-1]]]), cache=cache)[0][0, -1].argmax()))
    return torch.cat([idx, idx.new_tensor([out])], dim=1)


@torch.inference_mode()
def time_speculative(env, model, problems, layer, max_draft):
    """Greedy decoding of each problem at batch 1, plain (greedy_decode) and self-speculative with the exit
    of `layer` drafting k = 1..max_draft tokens, each pair timed back to back, in alternating order from
    problem to problem, so both see the same machine load; one untimed run of each first, so that no
    timed run pays for first calls. Counts outputs that differ from plain decoding (there should be none).
    Returns {k: {plain, spec: per-problem seconds; stats: per-problem speculative_generate stats;
    mismatches}}."""
    rows = {k: dict(plain=[], spec=[], stats=[], mismatches=0) for k in range(1, max_draft + 1)}
    first = env.prompts([(problems[0][0], None)])
    for k in rows:  # untimed warm-up
        greedy_decode(model, first, env.max_new, env.eos_id)
        speculative_generate(model, first, env.max_new, layer, k, eos_id=env.eos_id)
    for i, (prompt, _) in enumerate(problems):
        idx = env.prompts([(prompt, None)])
        for k, row in rows.items():
            for which in (("plain", "spec") if i % 2 == 0 else ("spec", "plain")):
                t0 = now(env.device)
                if which == "plain":
                    plain = greedy_decode(model, idx, env.max_new, env.eos_id)
                else:
                    out, stats = speculative_generate(model, idx, env.max_new, layer, k, eos_id=env.eos_id)
                row[which].append(now(env.device) - t0)
            row["mismatches"] += not torch.equal(out, plain)
            row["stats"].append(stats)
    return rows


def spec_layers(cfg):
    return [int(x) for x in cfg.spec_layers.split(",")] if cfg.spec_layers else list(range(1, cfg.n_layer))


def speculative_code_digest():
    """A digest of the source of the code a speculative measurement runs (docstrings and comments
    included: a conservative key): all of model.py, speculative.py and tasks.py, the measuring code here, and
    the timing, autocast, prompt and seeding helpers of harness.py, so that cached measurements are redone
    after a change to any of them. Not covered: the rest of oisd.py and harness.py that the probe uses
    (response_mask, make_optimizer, Env's held-out split); delete the spec-*.json files after changing those."""
    parts = (sys.modules[GPT.__module__], sys.modules[speculative_generate.__module__],
             sys.modules[sample_problems.__module__], greedy_decode, time_speculative,
             pass_costs, predicted_speedup, measure_drafter, probe_exits, now, autocast, Env.prompts, stream_seed)
    return hashlib.sha256("".join(inspect.getsource(f) for f in parts).encode()).hexdigest()[:16]


def read_cache(path):
    """A cached {key, measures} (measure_arm, run_speculative), or {} if there is none; a corrupt file
    exits with one line."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError) as e:
        refuse(f"cannot read the cached measurements {path} ({type(e).__name__}); delete it to re-measure")
    if not isinstance(cached, dict):
        refuse(f"{path} does not hold cached measurements; delete it to re-measure")
    return cached


def run_speculative(cfg):
    """For every seed and arm of a finished grid in out_dir (greedy, batch 1): each exit layer in
    spec_layers as the drafter, as trained and after the post-hoc probe (measure_drafter). Measurements
    are cached per seed and arm in out_dir/seed<s>/spec-<arm>.json under what they depend on (the
    settings, the machine, device, precision, thread count and torch version, the code's digest, the
    model's config and weights; not the machine's load at the time), so seeds can be timed in separate
    processes and collected by one command over all of them. Writes speculative.md and speculative.json
    in out_dir, for the seeds of this command."""
    results = []
    machine = f"{platform.node()} {platform.processor() or platform.machine()} " + (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "")
    for seed, env in seed_envs(cfg).items():
        for arm in cfg.arms.split(","):
            model = trained_model(env, arm)
            c = env.cfg
            key = dict(task=c.task, digits=c.digits, terms=c.terms, max_new=env.max_new, temperature=c.temperature,
                       prompts_per_step=c.prompts_per_step, group_size=c.group_size, spec_problems=c.spec_problems,
                       spec_max_draft=c.spec_max_draft, probe_steps=c.probe_steps, probe_lr=c.probe_lr,
                       probe_batches=c.probe_batches, threads=torch.get_num_threads(), device=str(env.device),
                       precision=env.precision, machine=machine, torch=torch.__version__, code=SPEC_CODE,
                       model_config=dataclasses.asdict(model.config), model=model_digest(model))
            path = os.path.join(c.out_dir, f"spec-{arm.replace(' ', '_')}.json")
            cached = read_cache(path)
            done = cached.get("measures", {}) if cached.get("key") == key else {}
            wanted = [(d, l) for d in ("as trained", "probe") for l in spec_layers(cfg)]
            if any(d == "probe" and f"{d} L{l}" not in done for d, l in wanted):
                probed = probe_exits(env, model, c.probe_steps, c.probe_lr, c.probe_batches)
            for drafter, layer in wanted:
                if f"{drafter} L{layer}" not in done:
                    done[f"{drafter} L{layer}"] = measure_drafter(env, model if drafter == "as trained" else probed, layer)
                    write_atomic(path, json.dumps({"key": key, "measures": done}))
                x = dict(seed=seed, arm=arm, drafter=drafter, **done[f"{drafter} L{layer}"])
                results.append(x)
                print(f"seed {seed} {arm:>12} {drafter:>10} exit L{layer}: k {x['k']}, acceptance {x['acceptance']:.1%}, "
                      f"{x['tokens_per_pass']:.2f} tokens/pass, {x['ms_per_problem']:.2f} vs "
                      f"{x['plain_ms_per_problem']:.2f} ms: {x['speedup']:.2f}x (predicted {x['predicted']:.2f}x), "
                      f"{x['mismatches']} outputs differ from plain decoding")
    text = speculative_table(results)
    print("\n" + text)
    write_atomic(os.path.join(cfg.out_dir, "speculative.json"), json.dumps(results, indent=1))
    write_atomic(os.path.join(cfg.out_dir, "speculative.md"), text + "\n")
    print(f"saved {cfg.out_dir}/speculative.md and speculative.json")


def measure_drafter(env, model, layer):
    """The exit of `layer` as the drafter, draft lengths k = 1..spec_max_draft on spec_problems held-out
    problems. k is chosen on the first half of the problems; everything reported at that k (speed-up over
    plain greedy decoding, acceptance, tokens per pass, and the speed-up predicted from that acceptance and
    the measured per-pass costs, predicted_speedup) is measured on the second half (no winner's curse).
    Over all the problems: by_k, the speed-up and acceptance at every k, and acceptance_all_k, accepted /
    checked pooled over every k (the same draft lengths and problems for every model, so comparable across
    arms whatever k each chose)."""
    cfg = env.cfg
    problems = env.test[: cfg.spec_problems]
    half = len(problems) // 2
    rows = time_speculative(env, model, problems, layer, cfg.spec_max_draft)

    def total(row, name, part=slice(None)):
        return sum(st[name] for st in row["stats"][part])

    k = max(rows, key=lambda k: sum(rows[k]["plain"][:half]) / sum(rows[k]["spec"][:half]))
    r, second = rows[k], slice(half, None)
    a = total(r, "accepted", second) / max(total(r, "checked", second), 1)
    tokens, passes = total(r, "tokens", second), total(r, "passes", second)
    costs = pass_costs(env, model, env.prompts(problems[:1]), layer, k)
    return dict(layer=layer, k=k, acceptance=a, tokens_per_pass=tokens / passes, passes_per_token=passes / tokens,
                ms_per_problem=1e3 * float(np.mean(r["spec"][second])),
                plain_ms_per_problem=1e3 * float(np.mean(r["plain"][second])),
                speedup=sum(r["plain"][second]) / sum(r["spec"][second]),
                predicted=predicted_speedup(a, k, round(tokens / (len(problems) - half)), costs), costs=costs,
                acceptance_all_k=(sum(total(v, "accepted") for v in rows.values())
                                  / max(sum(total(v, "checked") for v in rows.values()), 1)),
                mismatches=sum(v["mismatches"] for v in rows.values()),
                by_k=[dict(k=j, speedup=sum(v["plain"]) / sum(v["spec"]), acceptance=total(v, "accepted") / max(total(v, "checked"), 1))
                      for j, v in rows.items()])


SPEC_CODE = speculative_code_digest()  # at import: the code as written, whatever is patched later


def speculative_table(results):
    """Means over all of an arm's seeds per (arm, drafter, exit layer) of the measurements at the chosen
    draft length k, the speed-up's standard deviation over seeds (blank with one seed), and, for every arm
    but grpo, the paired difference to grpo with the same drafter and exit, over the seeds both have
    [95% t-interval] (number of pairs), of the speed-up and of the acceptance pooled over all draft
    lengths (acceptance_all_k: the same draft lengths and problems for both arms, whatever k each chose)."""
    groups = {}
    for r in results:
        groups.setdefault((r["arm"], r["drafter"], r["layer"]), {})[r["seed"]] = r
    lines = ["| arm | drafter | exit | seeds | k | acceptance at k | tokens per full pass | full passes per token | "
             "ms per problem | plain ms | speed-up ± sd | predicted | vs grpo: speed-up (pairs) | vs grpo: acceptance "
             "over all k, points | outputs differing |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (arm, drafter, layer), by_seed in groups.items():
        rs = list(by_seed.values())
        m = {key: float(np.mean([r[key] for r in rs])) for key in ("k", "acceptance", "tokens_per_pass",
             "passes_per_token", "ms_per_problem", "plain_ms_per_problem", "speedup", "predicted")}
        sd = f" ± {np.std([r['speedup'] for r in rs], ddof=1):.2f}" if len(rs) > 1 else ""
        grpo = groups.get(("grpo", drafter, layer), {})
        paired = sorted(set(by_seed) & set(grpo))
        vs = ["", ""]
        if arm != "grpo" and len(paired) > 1:
            for i, (key, scale, fmt) in enumerate((("speedup", 1, "{:+.2f}"), ("acceptance_all_k", 100, "{:+.1f}"))):
                mean, lo, hi, _ = paired_interval(np.array([scale * (by_seed[s][key] - grpo[s][key]) for s in paired]))
                vs[i] = f"{fmt.format(mean)} [{fmt.format(lo)}, {fmt.format(hi)}]"
            vs[0] += f" ({len(paired)})"
        lines.append(f"| {arm} | {drafter} | L{layer} | {len(rs)} | {m['k']:.1f} | {100 * m['acceptance']:.1f}% | "
                     f"{m['tokens_per_pass']:.2f} | {m['passes_per_token']:.3f} | {m['ms_per_problem']:.2f} | "
                     f"{m['plain_ms_per_problem']:.2f} | {m['speedup']:.2f}x{sd} | {m['predicted']:.2f}x | "
                     f"{vs[0]} | {vs[1]} | {sum(r['mismatches'] for r in rs)} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# RESULTS.md

def headline_rows(c, summary, per_seed):
    """A grid's config, summary and per-seed measures -> (its setting in words, its rows of the headline
    table). The seeds are named, so that two grids of one setting (earlier seeds, fresh seeds) are told
    apart; beside each paired interval, the exact Wilcoxon signed-rank p of the same differences."""
    seeds = list(per_seed)

    def wilcoxon(arm, key):
        if arm == "grpo" or len(seeds) < 2:
            return ""
        diff = np.round([100 * (per_seed[s][arm][key] - per_seed[s]["grpo"][key]) for s in seeds], 6)
        return f"{wilcoxon_pvalue(diff):.3f}"

    setting = (f"{c['task']}, {c['terms'] if c['task'] == 'chain' else 2} terms of {c['digits']} digits, "
               f"{c['n_layer']} layers")
    rows = []
    for arm, s in summary.items():
        if arm == "warm-up start":
            continue
        layers = layer_list(arm_config(ExpConfig(**c), arm))
        probe = ", ".join(f"L{l} {pct(s.get(f'probe_acc_L{l}', math.nan))}" for l in layers)
        paper = (f"+{pct(s['avgk_paper_effect'])} ({s['avgk_seeds_needed']:.0f})"
                 if "avgk_paper_effect" in s and not math.isnan(s["avgk_seeds_needed"]) else
                 (f"+{pct(s['avgk_paper_effect'])} (>1000)" if "avgk_paper_effect" in s else ""))
        rows.append(f"| {setting} | {s['n']:.0f} ({','.join(seeds)}) | {arm} | {pct(s['final_mean'])} | {diff_cell(s, 'final')} | "
                    f"{wilcoxon(arm, 'acc_L' + str(c['n_layer']))} | {pct(s['avgk_mean'])} | {diff_cell(s, 'avgk')} | "
                    f"{wilcoxon(arm, 'avgk')} | {paper} | {probe} |")
    return setting, rows


def write_report(cfg):
    """RESULTS.md: a headline table across the grids named by --report (one row per setting and arm:
    paired differences to grpo in greedy accuracy and Avg@K, with intervals and minimum detectable
    effects, and the probed exit), then each grid's summary.md, speculative.md and step_test.md, as written."""
    lines = ["# Results", "", "Generated by `python research/experiments.py --report=" + cfg.report + "` from the grids' "
             "summary.json, summary.md, speculative.md and step_test.md files; every table below is a command's own output.", "",
             "## Headline: every setting, each arm against GRPO on the same seeds", "",
             "Differences in points (final layer), mean over seeds [95% t-interval] (minimum detectable effect at 80% "
             "power); `W p`: the two-sided exact Wilcoxon signed-rank p of the same paired differences; `paper-size` "
             "is the paper's relative gain (+17.6%) applied to GRPO's Avg@K here, and the seeds an effect that size "
             "would need at the observed spread.", "",
             "| setting | seeds | arm | greedy | vs grpo | W p | Avg@K | vs grpo | W p | paper-size (seeds needed) | probed exit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    sections = []
    for path in cfg.report.split(","):
        try:
            with open(os.path.join(path, "summary.json")) as f:
                saved = json.load(f)
            setting, rows = headline_rows(saved["config"], saved["summary"], saved["per_seed"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # corrupt or not a summary: one line
            refuse(f"--report: cannot read {os.path.join(path, 'summary.json')} ({type(e).__name__}); run its grid again")
        lines += rows
        body = open(os.path.join(path, "summary.md")).read()
        spec, steps = os.path.join(path, "speculative.md"), os.path.join(path, "step_test.md")
        if os.path.exists(spec):
            body += "\nSelf-speculative decoding (greedy, batch 1, CPU):\n\n" + open(spec).read()
        if os.path.exists(steps):
            body += "\nThe step-accuracy test (--step_test):\n\n" + open(steps).read()
        sections.append(f"## {setting} (`{path}`)\n\n{body}")
    text = "\n".join(lines) + "\n\n" + "\n".join(sections)
    path = os.path.join(cfg.out_dir, "RESULTS.md")
    write_atomic(path, text)
    print("\n".join(lines))
    print(f"\nwrote {path}")


def step_test(cfg):
    """The pre-registered test of the chain task's step accuracy (README, "A test fixed in advance"), for
    each grid named by --step_test and each arm in it against grpo on the same seeds: per seed, every row's
    greedy step accuracy and its change from the warm-up start; the paired test of the differences
    (arm - grpo); how many seeds each arm collapses on (loses more than 10 points of step accuracy against
    the warm-up start) with the exact two-sided sign test on the seeds where only one of the two collapses
    (None if there are none);
    final-layer greedy and Avg@K against grpo. Writes out_dir/step_test.md and .json and a plot of each
    arm's change against grpo's, one point per seed."""
    out, lines = {}, []
    for path in cfg.step_test.split(","):
        per_seed, missed, c = read_step_grid(path)
        seeds, L, rows = list(per_seed), c["n_layer"], list(per_seed[next(iter(per_seed))])
        arms = [r for r in rows if r not in ("warm-up start", "grpo")]
        lines += [f"## {path}: chain, {c['terms']} terms of {c['digits']} digits, {L} layers, {len(seeds)} seeds",
                  "", f"Settings: arms {c['arms']}, {c['rl_steps']} RL steps, aligned layer(s) {c['align_layers']}, "
                  f"lambda_logit {c['lambda_logit']}, lambda_attn {c['lambda_attn']}, warm-up target "
                  f"{c['sft_target_acc']:.0%} in at most {c['sft_max_steps']} steps; seeds run: {c['seeds']}.", "",
                  f"Missed warm-ups (no RL): {', '.join(f'{s} ({a:.1%})' for s, a in missed.items()) or 'none'}.", "",
                  "Greedy step accuracy (%) per seed, and its change from the warm-up start (points):", "",
                  "| seed | " + " | ".join(rows) + " | " + " | ".join(f"{r} change" for r in rows[1:])
                  + " | " + " | ".join(f"{a} - grpo" for a in arms) + " |", "|---" * (2 * len(rows) + len(arms)) + "|"]
        # in points, rounded so that equal counts are equal numbers (ties, and the 10-point collapse line)
        step = {r: np.round([100 * per_seed[s][r]["step_acc"] for s in seeds], 6) for r in rows}
        change = {r: np.round(step[r] - step["warm-up start"], 6) for r in rows}
        for i, s in enumerate(seeds):
            lines.append(f"| {s} | " + " | ".join(f"{step[r][i]:.1f}" for r in rows) + " | "
                         + " | ".join(f"{change[r][i]:+.1f}" for r in rows[1:]) + " | "
                         + " | ".join(f"{step[a][i] - step['grpo'][i]:+.1f}" for a in arms) + " |")
        lines += ["", "| row | step acc, mean | change from warm-up start [95% CI] | seeds losing > 10 points |",
                  "|---|---|---|---|"]
        result = {"setting": f"chain, {c['terms']} terms of {c['digits']} digits, {L} layers", "seeds": seeds,
                  "missed": missed, "step_acc": {r: step[r].tolist() for r in rows}, "arms": {}}
        for r in rows[1:]:
            ch = paired_test(change[r])
            lines.append(f"| {r} | {step[r].mean():.1f} | {ch['mean']:+.1f} [{ch['lo']:+.1f}, {ch['hi']:+.1f}] | "
                         f"{int((change[r] < -10).sum())} of {len(seeds)} |")
        for a in arms:
            test = paired_test(np.round(step[a] - step["grpo"], 6))
            only_grpo, only_arm = int(((change["grpo"] < -10) & (change[a] >= -10)).sum()), int(((change[a] < -10) & (change["grpo"] >= -10)).sum())
            sign_p = min(1.0, 2 * sum(math.comb(only_grpo + only_arm, k) for k in range(min(only_grpo, only_arm) + 1))
                         / 2 ** (only_grpo + only_arm)) if only_grpo + only_arm else None  # nothing to test
            finals = {m: paired_test(100 * np.array([per_seed[s][a][k] - per_seed[s]["grpo"][k] for s in seeds]))
                      for m, k in (("greedy", f"acc_L{L}"), ("avgk", "avgk"))}
            result["arms"][a] = dict(step=test, collapse={"only_grpo": only_grpo, "only_arm": only_arm, "sign_p": sign_p},
                                     **finals)
            lines += ["", f"**{a} - grpo, step accuracy** (n = {test['n']}): {test['mean']:+.1f} points "
                      f"[{test['lo']:+.1f}, {test['hi']:+.1f}], t = {test['t']:.2f}, p = {test['p']:.3f} (paired t, "
                      f"two-sided); Wilcoxon signed-rank p = {test['p_wilcoxon']:.3f}; minimum detectable effect "
                      f"{test['mde']:.1f}.", "",
                      f"Collapses (> 10 points lost) on one arm of the pair only: grpo on {only_grpo} of {test['n']} seeds, "
                      f"{a} on {only_arm}; " + (f"exact sign test p = {sign_p:.3f}." if sign_p is not None else
                      "no seed collapsed under one arm only, so the sign test has nothing to test.") + f" Final layer, {a} - grpo: greedy {finals['greedy']['mean']:+.1f} "
                      f"[{finals['greedy']['lo']:+.1f}, {finals['greedy']['hi']:+.1f}], Avg@{c['avg_k']} "
                      f"{finals['avgk']['mean']:+.1f} [{finals['avgk']['lo']:+.1f}, {finals['avgk']['hi']:+.1f}] points."]
        worst = seeds[int(change["grpo"].argmin())]
        lines += ["", f"One held-out problem of seed {worst} (grpo's largest loss of step accuracy) that grpo answers "
                  "right with a wrong running sum:", "", "```", *unfaithful_example(cfg, c, path, int(worst), rows), "```", ""]
        out[path] = result
    text = "\n".join(lines)
    print(text)
    write_atomic(os.path.join(cfg.out_dir, "step_test.md"), text + "\n")
    write_atomic(os.path.join(cfg.out_dir, "step_test.json"), json.dumps(out, indent=1))
    plot_step_changes(cfg, out)


def read_step_grid(path):
    """path/summary.json of a chain grid run with --skip_missed -> (per_seed, missed, config), or exit 2 with
    one line if it is not one: at least 2 and at most 20 seeds, the same rows on every seed, grpo and the
    warm-up start among them, step accuracy measured, and every included seed's warm-up at its target."""
    try:
        saved = json.load(open(os.path.join(path, "summary.json")))
        per_seed, missed, c = saved["per_seed"], saved.get("missed", {}), saved["config"]
        rows = list(per_seed[next(iter(per_seed))]) if per_seed else []
        ok = (2 <= len(per_seed) <= 20 and {"grpo", "warm-up start"} <= set(rows) and c["task"] == "chain"
              and all(list(r) == rows and all("step_acc" in m for m in r.values()) for r in per_seed.values()))
        reached = c["skip_missed"] and all(r["warm-up start"].get("warmup_val_acc", -1) >= c["sft_target_acc"]
                                           for r in per_seed.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        refuse(f"--step_test: {path}/summary.json is not a grid summary ({type(e).__name__}: {e})")
    if not ok:
        refuse(f"--step_test: {path} must be a chain grid of 2 to 20 seeds with grpo and the same arms on every seed")
    if not reached:
        refuse(f"--step_test: {path} was not collected with --skip_missed, or holds a seed whose warm-up missed")
    return per_seed, missed, c


def unfaithful_example(cfg, grid_config, path, seed, rows):
    """Lines showing the first held-out problem whose greedy grpo completion has the right final answer and
    a wrong running sum, with every row's completion of it, and how often grpo's right answers carry a
    wrong running sum on this seed. Needs the grid's checkpoints and its thread count (the warm-up cache
    is keyed on it); without them, one line that says so."""
    env = seed_envs(dataclasses.replace(ExpConfig(**grid_config), out_dir=path, seeds=str(seed), device=cfg.device))[seed]
    if not os.path.exists(warmup_path(env)):
        return [f"(no example: no warm-up of seed {seed} in {path} for {torch.get_num_threads()} threads on "
                f"{env.device}; run with the grid's OMP_NUM_THREADS and device)"]
    completions = {}
    for row in rows:
        with torch.inference_mode(), autocast(env):
            seq, _ = trained_model(env, row).generate(env.prompts(env.test), env.max_new, temperature=0, eos_id=env.eos_id)
        completions[row] = env.completions(seq)
    right = [i for i, (p, a) in enumerate(env.test) if env.task.reward(completions["grpo"][i], a) == 1]
    unfaithful = [i for i in right if not all(env.task.steps(completions["grpo"][i], env.test[i][0]))]
    lines = [f"grpo, seed {seed}: {len(unfaithful)} of its {len(right)} right answers carry a wrong running sum"]
    if unfaithful:
        prompt = env.test[unfaithful[0]][0]
        lines += [f"{'problem':>14}  {prompt}", f"{'solution':>14}  {prompt}{env.task.solution(prompt)}"]
        lines += [f"{row:>14}  {prompt}{completions[row][unfaithful[0]].replace(EOS, '')}" for row in rows]
    return lines


def plot_step_changes(cfg, results):
    """step_test.png (if matplotlib is installed): per grid, each arm's change in step accuracy from the
    warm-up start against grpo's on the same seed, one point per seed (labelled), with the diagonal: a point's
    height above it is the tested difference, arm - grpo."""
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 5), squeeze=False)
    for ax, (path, r) in zip(axes[0], results.items()):
        start = np.array(r["step_acc"]["warm-up start"])
        grpo = np.array(r["step_acc"]["grpo"]) - start
        for arm in r["arms"]:
            ax.scatter(grpo, np.array(r["step_acc"][arm]) - start, label=f"{arm} (one point per seed)")
            for seed, x, y in zip(r["seeds"], grpo, np.array(r["step_acc"][arm]) - start):
                ax.annotate(str(seed), (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
        lo, hi = min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])
        ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8,
                label="same change as grpo; height above it = arm - grpo")
        ax.axhline(-10, color="gray", lw=0.5, ls=":", label="-10 points: a collapse")
        ax.axvline(-10, color="gray", lw=0.5, ls=":")
        ax.set(xlabel="grpo: step accuracy minus the warm-up start's (points)",
               ylabel=f"{', '.join(r['arms'])}: step accuracy minus the warm-up start's (points)",
               title=f"{r['setting']}, {len(grpo)} seeds")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "step_test.png"), dpi=90)
    print(f"saved {cfg.out_dir}/step_test.png")


def main(argv):
    env = setup(argv, ExpConfig, "research/experiments.py", validate_experiment)
    cfg = env.cfg
    if cfg.report:
        write_report(cfg)
    elif cfg.step_test:
        step_test(cfg)
    elif cfg.bench:
        bench(env)
    elif cfg.speculative:
        run_speculative(cfg)
    else:
        run_grid(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
