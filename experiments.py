"""
Measurement tools behind two flags of oisd.py; the method itself is all in oisd.py.

    python oisd.py --bench                     # seconds per RL step by phase, GRPO vs GRPO+OISD, KV cache vs naive
    python oisd.py --seeds=0,1,2,3,4 --resume  # every arm on every seed, then tables with intervals, and plots

The plots need matplotlib (pip install matplotlib); without it they are skipped.
"""

import dataclasses
import json
import math
import os
import random

import numpy as np
import torch

from model import GPT
from oisd import (ARMS, Env, arm_config, autocast, layer_list, load_checkpoint, load_policy, make_optimizer, now,
                  rl_step, run_seed, sample_problems, warmup)
from tasks import EOS


def bench(env):
    """Time RL steps in steady state from a random init: median seconds per phase over bench_steps steps
    (after 5 unmeasured ones) for plain GRPO and GRPO+OISD, stepped alternately so that both see the same
    machine load; then the KV-cache sampler against the naive loop that re-runs the whole prefix per token.
    On CUDA also the achieved training TFLOP/s and the peak memory."""
    cfg, dev = env.cfg, env.device
    arms = {}
    for arm in ("grpo", "oisd"):
        acfg = arm_config(cfg, arm)
        torch.manual_seed(cfg.seed)
        model = GPT(env.model_config(acfg)).to(dev)
        arms[arm] = dict(cfg=acfg, model=model, opt=make_optimizer(model, cfg.rl_lr, dev),
                         forward=torch.compile(model) if cfg.compile else model,
                         gen=torch.Generator(dev).manual_seed(cfg.seed), times=[], tokens=[])
    rng, peak = random.Random(cfg.seed), {}
    for i in range(5 + cfg.bench_steps):
        problems = sample_problems(env.task, rng, cfg.prompts_per_step, env.exclude)
        for arm, a in arms.items():
            if dev == "cuda":
                torch.cuda.reset_peak_memory_stats()
            stats, seconds = rl_step(env, a["cfg"], a["model"], a["opt"], problems, a["gen"], a["forward"])
            if dev == "cuda":
                peak[arm] = torch.cuda.max_memory_allocated() / 2**30
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
            # tokens trained per step, an upper bound: each prompt once per group, then R <= max_new per rollout
            trained = cfg.prompts_per_step * (env.prompt_len - 1) + n * env.max_new
            med["train TFLOP/s"] = 6 * n_params * trained / med["fwd_bwd"] / 1e12
            med["peak GiB"] = peak[arm]
        rows[arm] = med
    print(f"\nRL step: median of {cfg.bench_steps} steps after 5 unmeasured ones; {n} completions per step")
    print(f"{'':<16}{'grpo':>12}{'oisd':>12}{'oisd/grpo':>12}")
    for key in rows["grpo"]:
        g, o = rows["grpo"][key], rows["oisd"][key]
        label = key + " s" if key in ("rollout", "fwd_bwd", "optim", "step") else key
        print(f"{label:<16}{g:12.4f}{o:12.4f}{o / g:12.2f}")
    model, gen = arms["grpo"]["model"], arms["grpo"]["gen"]
    prompts = env.prompts(sample_problems(env.task, rng, cfg.prompts_per_step, env.exclude))
    runs = {True: [], False: []}
    for _ in range(10):
        for use_cache in runs:
            t0 = now(dev)
            with autocast(dev):
                model.generate(prompts, env.max_new, cfg.temperature, cfg.group_size, None, gen, use_cache=use_cache)
            runs[use_cache].append(now(dev) - t0)
    cached, naive = float(np.median(runs[True][2:])), float(np.median(runs[False][2:]))
    tokens = n * env.max_new
    print(f"\nsampler, {n} completions x {env.max_new} tokens (no early stop), median of 8 runs:")
    print(f"  KV cache {cached:.4f} s ({tokens / cached:.0f} tok/s) | naive loop {naive:.4f} s "
          f"({tokens / naive:.0f} tok/s) | speed-up {naive / cached:.2f}x")
    return rows


def run_grid(cfg):
    """Experiment mode (--seeds): for each seed, the warm-up and every arm in out_dir/seed<s>; then the
    summary tables (printed, and saved as summary.md and summary.json) and the plots."""
    per_seed = {}
    for seed in [int(x) for x in cfg.seeds.split(",")]:
        print(f"\n=== seed {seed} ===")
        per_seed[seed] = run_seed(Env(dataclasses.replace(cfg, seed=seed, out_dir=os.path.join(cfg.out_dir, f"seed{seed}"))))
    summary = summarize(per_seed, cfg.n_layer)
    print(f"\n{len(per_seed)} seeds, held-out greedy accuracy (%), means over seeds:")
    text = print_summary(summary, cfg.n_layer, layer_list(cfg)[0])
    arms = cfg.arms.split(",")
    text += "\n\nAlignment diagnostics (mean over seeds and evaluation steps):\n\n" + diagnostics_table(cfg, per_seed, arms)
    text += "\n\nEarly exit, greedy accuracy (%) and time to sample the held-out set:\n\n" + early_exit_table(
        summary, cfg.n_layer, ["warm-up start"] + arms)
    print(text[text.index("\n\nAlignment"):])
    with open(os.path.join(cfg.out_dir, "summary.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "per_seed": per_seed, "summary": summary}, f, indent=1)
    with open(os.path.join(cfg.out_dir, "summary.md"), "w") as f:
        f.write(text + "\n")
    print(f"saved {cfg.out_dir}/summary.json and summary.md")
    make_plots(Env(cfg), list(per_seed), arms)


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond 30, the normal's 1.96)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def summarize(per_seed, n_layer):
    """per_seed: {seed: {row: evaluation}} -> {row: summary}: mean and std over seeds of the final-layer
    accuracy, the paired difference to grpo on the same seeds with a 95% t-interval, and means of the
    per-layer accuracy, exit agreement and JSD, response length, sampling time and training time."""
    seeds, L = list(per_seed), n_layer
    out = {}
    for row in per_seed[seeds[0]]:
        evals = [per_seed[s][row] for s in seeds]
        acc = np.array([e[f"acc_L{L}"] for e in evals])
        summary = {"n": len(seeds), "final_mean": acc.mean(), "final_std": acc.std(ddof=1) if len(acc) > 1 else 0.0}
        if "grpo" in per_seed[seeds[0]] and row != "grpo" and len(seeds) > 1:
            diff = acc - np.array([per_seed[s]["grpo"][f"acc_L{L}"] for s in seeds])
            half = (T95[len(diff) - 2] if len(diff) <= 31 else 1.96) * diff.std(ddof=1) / np.sqrt(len(diff))
            summary.update(diff_mean=diff.mean(), diff_lo=diff.mean() - half, diff_hi=diff.mean() + half)
        for key in evals[0]:
            summary[key] = float(np.mean([e.get(key, np.nan) for e in evals]))
        out[row] = {k: float(v) for k, v in summary.items()}
    return out


def print_summary(summary, n_layer, aligned):
    """The experiment table, as markdown. aligned: the layer whose top-1 agreement with the final is shown."""
    exits = range(n_layer - 1, 0, -1)
    lines = ["| arm | final layer, mean ± std | vs grpo (paired, 95% CI) | "
             + " | ".join(f"exit L{l}" for l in exits) + f" | agree L{aligned} | length | train s |",
             "|---|---|---|" + "---|" * len(exits) + "---|---|---|"]
    for row, s in summary.items():
        diff = f"{100 * s['diff_mean']:+.1f} [{100 * s['diff_lo']:+.1f}, {100 * s['diff_hi']:+.1f}]" if "diff_mean" in s else ""
        agree = f"{100 * s[f'agree_L{aligned}']:.1f}" if not math.isnan(s.get(f"agree_L{aligned}", math.nan)) else ""
        lines.append(f"| {row} | {100 * s['final_mean']:.1f} ± {100 * s['final_std']:.1f} | {diff} | "
                     + " | ".join(f"{100 * s[f'acc_L{l}']:.1f}" for l in exits)
                     + f" | {agree} | {s['len']:.2f} | {s.get('train_seconds', math.nan):.0f} |")
    text = "\n".join(lines)
    print(text)
    return text


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
    """Means over seeds and evaluation steps of the diagnose() records in each seed's metrics.jsonl."""
    keys = ["w_group_sum", "jsd_adv_corr", "align_grad_norm", "grpo_grad_norm"]
    lines = ["| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for arm in arms:
        records = [r for r in read_metrics(cfg, seeds) if r["arm"] == arm and "diag_w_group_sum" in r]
        if records:
            lines.append(f"| {arm} | " + " | ".join(f"{np.mean([r.get('diag_' + k, np.nan) for r in records]):.4f}"
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
                     + " | ".join(f"{100 * summary[a][f'acc_L{layer}']:.1f}" for a in shown) + " |")
    return "\n".join(lines)


def make_plots(env, seeds, arms):
    """PNGs next to the summary, if matplotlib is installed: accuracy vs step per arm (final layer and the
    aligned exit, mean over seeds with a band of one standard deviation); early-exit accuracy per layer per arm; and one
    held-out prompt's head-averaged attention in the aligned and the final layer, before and after RL."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    cfg, L = env.cfg, env.cfg.n_layer
    aligned = layer_list(cfg)[0]
    records = read_metrics(cfg, seeds)
    curves = [a for a in arms if a != "sft_more" and ":" not in a]  # the arms that align the same layer
    colors = dict(zip(["warm-up start"] + list(arms), plt.cm.tab20(np.linspace(0, 1, 20))))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, layer in zip(axes, (L, aligned)):
        for arm in curves:
            by_step = {}
            for r in records:
                if r["arm"] in (arm, "warm-up start") and f"acc_L{layer}" in r and (r["step"] % cfg.eval_every == 0
                                                                                      or r["step"] == cfg.rl_steps):
                    by_step.setdefault(r["step"], []).append(r[f"acc_L{layer}"])  # one per seed
            steps = sorted(by_step)
            values = [np.array(by_step[t]) * 100 for t in steps]
            mean, std = np.array([v.mean() for v in values]), np.array([v.std() for v in values])
            ax.plot(steps, mean, label=arm, color=colors[arm])
            ax.fill_between(steps, mean - std, mean + std, color=colors[arm], alpha=0.08)
        ax.set(xlabel="RL step", ylabel="held-out greedy accuracy (%)",
               title="final layer" if layer == L else f"early exit at layer {layer} (the aligned layer)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "accuracy_vs_step.png"), dpi=90)
    summary = json.load(open(os.path.join(cfg.out_dir, "summary.json")))["summary"]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in ["warm-up start"] + list(arms):
        ax.plot(range(1, L + 1), [100 * summary[arm][f"acc_L{l}"] for l in range(1, L + 1)], marker="o", label=arm,
                color=colors[arm])
    ax.set(xlabel="exit layer (blocks run)", ylabel="held-out greedy accuracy (%)", xticks=range(1, L + 1),
           title=f"early-exit accuracy, mean of {len(seeds)} seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "exit_accuracy.png"), dpi=90)
    # attention of one held-out prompt, seed `seeds[0]`
    seed_dir = os.path.join(cfg.out_dir, f"seed{seeds[0]}")
    shown = [a for a in ("grpo", "oisd", "oisd_pos") if a in arms]
    prompt = env.prompts(env.test[:1])
    fig, axes = plt.subplots(2, 1 + len(shown), figsize=(3.2 * (1 + len(shown)), 6.4))
    seed_env = Env(dataclasses.replace(cfg, seed=seeds[0], out_dir=seed_dir))
    warm_state = warmup(seed_env)  # the cached checkpoint of that seed
    for col, arm in enumerate(["warm-up start"] + shown):
        model = load_policy(seed_env, arm_config(seed_env.cfg, arm if arm in ARMS else "grpo"), warm_state)
        if arm != "warm-up start":
            model.load_state_dict(load_checkpoint(os.path.join(seed_dir, f"{arm}.pt"), env.device)["model"])
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


