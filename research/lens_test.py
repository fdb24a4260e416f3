"""
The report of the test fixed in advance "OISD read the paper's way, through the logit lens" (research/README.md,
#lens-test), from the grids' collected summaries: the primary test, the secondaries, the strength grids and
the gradient diagnostics (research/gradients.py's gradients.md, where it was run).

    python research/lens_test.py --chain=runs/lens_chain --addition=runs/lens_add3 \
        --strength=runs/lens_strength --out=runs/lens_test.md

Each grid must have been collected with --skip_missed over all of its seeds (research/experiments.py writes
summary.json), in one part or in several (dir1,dir2), or be a folder of its seeds' own summaries
(seed*/summary.json, as research/assets/lens/ keeps them, with each seed's log and exit status). Nothing is
reported before every grid is the plan's grid of its role and complete by the plan (--plan,
research/lens_plan.json by default: run with its settings; its valid seeds from its first, none skipped,
the last one valid; each kept log and exit status agreeing with its summary; its diagnostics, if any, of
exactly its valid seeds). Writes --out (markdown) and the same numbers as JSON next to it (.json).
"""

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the core, one folder up
from harness import parse_args, refuse, write_atomic  # noqa: E402
from oisd import METHOD, arm_config, layer_list  # noqa: E402
from experiments import PAPER_RELATIVE_GAIN, ExpConfig, paired_test, seed_folders  # noqa: E402
from gradients import GradConfig, finite_or_none, tables  # noqa: E402

PRIMARY = "oisd_lens"  # the confirmatory comparison: final-layer Avg@K, oisd_lens - grpo, on the chain


def grid_parts(paths):
    """'dir' or 'dir1,dir2' -> [(summary.json, seed or None, dir)], the grid's parts. A dir holding no
    summary.json but seed<S>/summary.json (each seed's own, as its process wrote it and research/assets/lens/
    keeps it) gives one part per seed, with the seed its folder names."""
    parts = []
    for path in paths.split(","):
        kept = seed_folders(path, "summary.json")
        if os.path.exists(os.path.join(path, "summary.json")) or not kept:
            parts.append((os.path.join(path, "summary.json"), None, path))
        else:
            parts += [(summary, seed, path) for seed, summary in kept]
    return parts


def is_number(v):
    """A finite real number (not a bool, a string or null)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_grid(paths, grid):
    """'dir' or 'dir1,dir2' (one grid collected in parts, e.g. over two working sessions; see grid_parts) ->
    (per_seed {seed: {row: measures}}, missed {seed: acc}, config, dirs {dir: (its valid seeds, its missed
    seeds)}), or exit 2 with one line. `grid` is the plan's grid it must be: every part ran with its settings
    (planned_config), a --skip_missed collection whose rows are the warm-up start and its arms, every measure
    the report reads a finite number (a part may hold only missed seeds; a seed's own folder, only that seed);
    the parts share no seed; and the grid is complete by the plan (check_complete)."""
    per_seed, missed, expected, dirs = {}, {}, planned_config(grid), {}
    rows, L = {"warm-up start", *expected["arms"].split(",")}, expected["n_layer"]
    needed = {"avgk", f"acc_L{L}", *(f"{kind}acc_L{l}" for kind in ("", "lens_", "probe_") for l in range(1, L)),
              *(["step_acc"] if expected["task"] == "chain" else [])}  # what the report reads of an arm
    for summary, folder_seed, top in grid_parts(paths):
        path = os.path.dirname(summary)
        try:
            with open(summary) as f:
                saved = json.load(f)
            part, part_missed, c = dict(saved["per_seed"]), dict(saved.get("missed", {})), dict(saved["config"])
            [int(s) for s in (*part, *part_missed)]
            part_rows = [set(r) for r in part.values()]
            numbers = (all(is_number(m.get(k)) for row in part.values() for name, m in row.items()
                           if name != "warm-up start" for k in needed) and all(map(is_number, part_missed.values())))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            refuse(f"{path}/summary.json is not a grid summary ({type(e).__name__}); collect the grid first")
        differ = settings_differ(c, expected)
        if differ:
            refuse(f"{path}: it ran with other settings than the plan's grid {grid['out_dir']} "
                   f"({', '.join(f'{k}={c.get(k)!r}' for k in differ)}): only the grids fixed in advance are tested")
        if not (part or part_missed) or any(r != rows for r in part_rows):
            refuse(f"{path}: it holds no seed, or a seed without the rows {', '.join(sorted(rows))}: collect it again")
        if not numbers:
            refuse(f"{path}: a measure is missing or not a finite number (each arm's {', '.join(sorted(needed))}, "
                   "each missed warm-up's accuracy): nothing is tested on it")
        if set(part) & set(part_missed):
            refuse(f"{path}: seeds {sorted(set(part) & set(part_missed), key=int)} are both valid and missed")
        if folder_seed is not None and set(part) | set(part_missed) != {folder_seed}:
            refuse(f"{path}: the folder of seed {folder_seed} holds the summary of seeds {sorted({*part, *part_missed})}")
        if (set(part) | set(part_missed)) & (set(per_seed) | set(missed)):
            refuse(f"{path}: a seed of it is already in an earlier part")
        per_seed.update(part)
        missed.update(part_missed)
        valid_here, missed_here, _ = dirs.get(top, (set(), set(), False))
        dirs[top] = (valid_here | set(part), missed_here | set(part_missed), folder_seed is not None)
    if not per_seed:
        refuse(f"{paths}: no seed of this grid reached RL: nothing to test")
    check_complete(paths, per_seed, missed, grid, dirs)
    return (per_seed, missed, dict(expected, seeds=",".join(sorted([*per_seed, *missed], key=int))),
            {top: (valid, miss) for top, (valid, miss, _) in dirs.items()})


def read_plan(path):
    """The scheduler's plan (research/lens_plan.json) -> {role: grid or [grids]}, or exit 2 with one line.
    The roles follow from the plan: the chain grid runs --task=chain; the strength grids share their warm-ups
    with the addition grid; the addition grid is the other one."""
    try:
        with open(path) as f:
            grids = json.load(f)["grids"]
        for g in grids:
            planned_config(g)
            if not (isinstance(g["first_seed"], int) and isinstance(g["valid"], int) and g["valid"] > 0):
                raise TypeError
        strength = [g for g in grids if "share_warmup" in g]
        (chain,) = [g for g in grids if "--task=chain" in g["args"]]
        (addition,) = [g for g in grids if g not in strength and g is not chain]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        refuse(f"--plan={path} is not the lens test's plan: a chain grid, an addition grid and the strength grids "
               f"that share its warm-ups, each with first_seed and valid ({type(e).__name__})")
    if any(g["share_warmup"] != addition["out_dir"] for g in strength):
        refuse(f"--plan={path}: every strength grid must share the warm-ups of {addition['out_dir']}")
    return {"chain": chain, "addition": addition, "strength": strength}


def planned_config(grid):
    """The settings a planned grid's every seed ran with, as research/seed_scheduler.py runs it: the grid's
    args read by research/experiments.py's own flag parser (today's defaults otherwise), its out_dir and
    --skip_missed (--seeds and --resume aside). Raises ConfigError (a ValueError) on a bad arg."""
    return dict(parsed_flags(tuple(grid["args"])), out_dir=grid["out_dir"], skip_missed=True)


@functools.lru_cache(maxsize=None)
def parsed_flags(args):
    """research/experiments.py's settings from a tuple of its flags, as a dict (its checks take 0.1 s: once each)."""
    return dataclasses.asdict(parse_args(list(args), ExpConfig, "research/experiments.py", **METHOD))


def settings_differ(config, expected, aside=("seeds", "resume")):
    """The settings of a saved config that differ from expected, but those aside; a flag the config lacks
    (added after it was saved) is not compared."""
    return sorted(k for k in expected if k not in aside and k in config and config[k] != expected[k])


def check_complete(paths, per_seed, missed, grid, dirs):
    """Exit 2 with one line unless the grid holds exactly the plan's seeds: grid['valid'] valid ones, run from
    grid['first_seed'] with none skipped, the last one valid (research/seed_scheduler.py starts seeds in
    increasing order and none once enough are valid or running, so a complete grid ends on a valid seed).
    In each dir where seeds' logs and exit statuses are kept beside their folders (seed<S>.log, seed<S>.rc, as
    research/assets/lens/ keeps them; a dir of seed folders must keep them), every seed of that dir must have
    both, every kept seed a summary, every status must be 0, and a log must report a missed warm-up exactly
    when its summary does. dirs: {dir: (its valid seeds, its missed seeds, read from seed folders)}."""
    seeds = sorted(int(s) for s in [*per_seed, *missed])
    if (len(per_seed) != grid["valid"] or seeds != list(range(grid["first_seed"], seeds[-1] + 1))
            or str(seeds[-1]) not in per_seed):
        refuse(f"{paths}: {len(per_seed)} valid of seeds {','.join(map(str, seeds))}; the plan asks for {grid['valid']} "
               f"valid, run from {grid['first_seed']} with none skipped, the last one valid: the grid is not "
               "complete, and nothing is reported before it is")
    for path, (valid, miss, folders) in dirs.items():
        kept = {}
        for name in sorted(os.listdir(path)) if os.path.isdir(path) else []:
            m = re.fullmatch(r"seed([0-9]+)\.(rc|log)", name)
            if m:
                kept.setdefault(str(int(m[1])), {})[m[2]] = os.path.join(path, name)
        if not kept and not folders:
            continue  # collected in one command (research/experiments.py --seeds=...): its logs are not kept apart
        for s in sorted(set(kept) | valid | miss, key=int):
            files = kept.get(s, {})
            if set(files) != {"rc", "log"}:
                refuse(f"{path}: seed {s} has no kept {'log' if 'log' not in files else 'exit status'} (seed{s}.rc "
                       f"and seed{s}.log beside its folder)")
            if s not in valid and s not in miss:
                refuse(f"{files['rc']}: seed {s} ran but has no summary here: it did not finish; resume it")
            try:
                with open(files["rc"]) as f:
                    status = f.read().strip()
                with open(files["log"]) as f:
                    log_missed = f"seed {s}: warm-up missed" in f.read()
            except OSError as e:
                refuse(f"{path}: seed {s}'s kept log or exit status cannot be read ({e.strerror or type(e).__name__})")
            if status != "0":
                refuse(f"{files['rc']}: seed {s} ended with status {status!r}: resume it")
            if log_missed != (s in miss):
                refuse(f"{files['log']}: the log {'reports' if log_missed else 'does not report'} a missed warm-up and "
                       f"the summary {'does not' if log_missed else 'does'}")


def diagnostics(path, valid, missed, grid, title="Where the gradient goes"):
    """The diagnostics research/gradients.py kept in path (gradients.json; its tables rendered from it, so the
    text cannot disagree with the numbers), or [] if none is there. Exit 2 with one line unless they were
    measured on exactly path's valid seeds (as missed, none but its missed ones), with the planned grid's
    settings, on some of its arms."""
    js = os.path.join(path, "gradients.json")
    if not os.path.exists(js):
        if os.path.exists(os.path.join(path, "gradients.md")):
            refuse(f"{path}: gradients.md without its gradients.json: run research/gradients.py --merge={path}")
        return []
    try:
        with open(js) as f:
            saved = json.load(f)
        measured, unmeasured, config = dict(saved["per_seed"]), set(saved["missed"]), dict(saved["config"])
        cfg = GradConfig(**config)
    except (OSError, ValueError, KeyError, TypeError) as e:
        refuse(f"{js}: not research/gradients.py's diagnostics ({type(e).__name__}); run research/gradients.py --merge")
    if set(measured) != set(valid) or not unmeasured <= set(missed):
        refuse(f"{js}: it measured seeds {sorted(measured, key=int)}, the valid seeds here are {sorted(valid, key=int)}: "
               "run research/gradients.py on them again")
    expected = planned_config(grid)
    differ = settings_differ(config, expected, aside=("seeds", "resume", "out_dir", "arms"))
    if differ or not set(cfg.arms.split(",")) <= set(expected["arms"].split(",")):
        refuse(f"{js}: measured with other settings or arms than the plan's grid {grid['out_dir']} "
               f"({', '.join(differ) or 'arms'})")
    return [f"{title} ({os.path.join(path, 'gradients.md')}):", "",
            tables(dict(sorted(measured.items(), key=lambda sm: int(sm[0]))), cfg.arms.split(","), cfg).strip(), ""]


def compare(per_seed, arm, base, key):
    """The paired test (in points) of measure `key`, arm - base, over the seeds of per_seed (sorted)."""
    seeds = sorted(per_seed, key=int)
    return paired_test(np.round(100 * np.array([per_seed[s][arm][key] - per_seed[s][base][key] for s in seeds]), 6))  # k/500 ties stay ties


def cell(t):
    """'+1.2 [-0.5, +2.9], p 0.21 / 0.25 (MDE 3.1)': mean [95% t-interval], paired t p / Wilcoxon p (MDE)."""
    p = "n/a" if math.isnan(t["p"]) else f"{t['p']:.3f}"
    return f"{t['mean']:+.1f} [{t['lo']:+.1f}, {t['hi']:+.1f}], p {p} / {t['p_wilcoxon']:.3f} (MDE {t['mde']:.1f})"


def mean_pct(per_seed, row, key):
    return 100 * float(np.mean([per_seed[s][row][key] for s in per_seed]))


def primary(per_seed, c):
    """The confirmatory test and its verdict, by the rule fixed in advance."""
    t = compare(per_seed, PRIMARY, "grpo", "avgk")
    paper = 100 * PAPER_RELATIVE_GAIN * float(np.mean([per_seed[s]["grpo"]["avgk"] for s in per_seed]))
    if t["p"] < 0.05:
        verdict = "helps" if t["mean"] > 0 else "hurts"
    else:
        verdict = "no effect shown"
    seeds = sorted(per_seed, key=int)
    diffs = ", ".join(f"{s}: {100 * (per_seed[s][PRIMARY]['avgk'] - per_seed[s]['grpo']['avgk']):+.1f}" for s in seeds)
    lines = [f"**Primary (confirmatory): chain, final-layer Avg@{c['avg_k']}, {PRIMARY} - grpo, n = {t['n']}.** "
             f"{t['mean']:+.1f} points [{t['lo']:+.1f}, {t['hi']:+.1f}] (95% t-interval), t = {t['t']:.2f}, "
             f"p = {t['p']:.3f} (paired t, two-sided), Wilcoxon signed-rank p = {t['p_wilcoxon']:.3f} (exact), "
             f"minimum detectable effect {t['mde']:.1f} points (80% power, two-sided α = 0.05, at the observed spread). Verdict by the rule fixed in advance: "
             f"**{verdict}**.", "",
             f"Per seed (points): {diffs}.", "",
             f"The paper's relative gain (+{100 * PAPER_RELATIVE_GAIN:.1f}%) at this grpo's Avg@{c['avg_k']} is "
             f"+{paper:.1f} points; the interval {'excludes' if t['hi'] < paper or t['lo'] > paper else 'does not exclude'} it."]
    return lines, dict(t, verdict=verdict, paper_effect=paper)


def arm_table(per_seed, c, arms, base="grpo"):
    """Every arm against `base`: Avg@K and greedy (final layer), and each aligned exit as trained, through
    ln_f (lens) and probed, as means over seeds (the base's at the same layer beside it)."""
    L, k = c["n_layer"], c["avg_k"]
    lines = [f"| arm | Avg@{k} | vs {base} | greedy | vs {base} | aligned exit: as trained, lens, probe ({base}'s) |",
             "|---|---|---|---|---|---|"]
    out = {}
    for arm in arms:
        avgk, greedy = compare(per_seed, arm, base, "avgk"), compare(per_seed, arm, base, f"acc_L{L}")
        layers = layer_list(arm_config(ExpConfig(**c), arm)) if arm != "grpo_ce_exits" else list(range(1, L))
        exits = "; ".join(
            f"L{l} " + ", ".join(f"{mean_pct(per_seed, arm, f'{kind}acc_L{l}'):.1f} ({mean_pct(per_seed, base, f'{kind}acc_L{l}'):.1f})"
                                 for kind in ("", "lens_", "probe_")) for l in layers)
        lines.append(f"| {arm} | {mean_pct(per_seed, arm, 'avgk'):.1f} | {cell(avgk)} | "
                     f"{mean_pct(per_seed, arm, f'acc_L{L}'):.1f} | {cell(greedy)} | {exits} |")
        out[arm] = dict(avgk=avgk, greedy=greedy)
    return lines, out


def step_lines(per_seed, arms):
    """The chain's greedy step accuracy, each arm against grpo."""
    lines = ["| arm | step acc | vs grpo |", "|---|---|---|"]
    out = {}
    for arm in ["grpo", *arms]:
        t = compare(per_seed, arm, "grpo", "step_acc") if arm != "grpo" else None
        lines.append(f"| {arm} | {mean_pct(per_seed, arm, 'step_acc'):.1f} | {cell(t) if t else ''} |")
        out[arm] = t
    return lines, out


def measured(row):
    """A row's measures without its wall-clock timings (sec_L*, lens_sec_L*, *_seconds), which differ between
    two evaluations of the very same model."""
    return {k: v for k, v in row.items() if not (k.startswith(("sec_L", "lens_sec_L")) or k.endswith("seconds"))}


def strength_lines(strength_dir, add_per_seed, add_missed, planned):
    """Each strength grid of the plan (strength_dir/<its out_dir's last name>; nothing else may be there) with
    its one arm against grpo of the addition grid on the same seeds (the same warm-ups, checked: the warm-up
    start's measures must be identical): per-seed differences and their mean, exploratory (3 seeds: no test)."""
    lines = ["| grid | arm | lambda | seeds | Avg@K - grpo, per seed (mean) | greedy - grpo (mean) | aligned exit - grpo's (mean) |",
             "|---|---|---|---|---|---|---|"]
    out, diags, names = {}, [], {os.path.basename(g["out_dir"]): g for g in planned}
    there = sorted(os.listdir(strength_dir)) if os.path.isdir(strength_dir) else []
    if sorted(names) != [n for n in there if os.path.isdir(os.path.join(strength_dir, n))]:
        refuse(f"--strength={strength_dir} holds {', '.join(there) or 'nothing'}; the plan's strength grids are "
               f"{', '.join(sorted(names))}, each in its own folder: every one of them, nothing else")
    for name, g in sorted(names.items()):
        grid = os.path.join(strength_dir, name)
        per_seed, missed, c, dirs = read_grid(grid, g)
        diags += diagnostics(grid, *dirs[grid], g, "AdamW update per group")
        (arm,) = [r for r in next(iter(per_seed.values())) if r != "warm-up start"]
        if not set(per_seed) <= set(add_per_seed) or not set(missed) <= set(add_missed):
            refuse(f"{grid}: its valid and missed seeds are not the addition grid's: their warm-ups differ; run both "
                   "on one machine")
        seeds, L = sorted(per_seed, key=int), c["n_layer"]
        for s in seeds:  # paired only from one warm-up: a warm-up made on another machine rounds differently
            if measured(per_seed[s]["warm-up start"]) != measured(add_per_seed[s]["warm-up start"]):
                refuse(f"{grid}: seed {s}'s warm-up start differs from the addition grid's; run both on one machine")
        (l,) = layer_list(arm_config(ExpConfig(**c), arm))
        diff = {name: [100 * (per_seed[s][arm][key] - add_per_seed[s]["grpo"][key]) for s in seeds]
                for name, key in (("avgk", "avgk"), ("greedy", f"acc_L{L}"), ("exit", f"acc_L{l}"))}
        lam = f"logit {c['lambda_logit']}" if arm == "logit_only" else f"attn {c['lambda_attn']}"
        lines.append(f"| {os.path.basename(grid)} | {arm} ({c['exit_norm']}) | {lam} | {','.join(seeds)} | "
                     + " | ".join(", ".join(f"{d:+.1f}" for d in diff[n]) + f" ({np.mean(diff[n]):+.1f})"
                                  for n in ("avgk", "greedy", "exit")) + " |")
        out[os.path.basename(grid)] = diff
    return lines, out, diags


def finite_or_null(x):
    """x with every NaN or infinity (an undefined t, say) as None, so that the JSON is strict; numpy numbers as floats."""
    if isinstance(x, dict):
        return {k: finite_or_null(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite_or_null(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return finite_or_none(float(x))
    return int(x) if isinstance(x, np.integer) else x


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chain", required=True, help="the chain grid's out_dir (the primary test); dir1,dir2 for parts")
    p.add_argument("--addition", default="", help="the addition grid's out_dir; dir1,dir2 for parts (optional)")
    p.add_argument("--strength", default="", help="the folder holding the strength grids (optional)")
    p.add_argument("--out", required=True, help="the markdown report to write")
    p.add_argument("--plan", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "lens_plan.json"),
                   help="the seed scheduler's plan: each grid must hold exactly its seeds")
    a = p.parse_args(argv)
    if not os.path.isdir(os.path.dirname(os.path.abspath(a.out))):
        refuse(f"--out={a.out}: its folder does not exist")
    plan = read_plan(a.plan)
    report, data = ["# The lens test", ""], {}
    if a.strength and not a.addition:
        refuse("--strength needs --addition: its grids are paired with the addition grid's grpo")
    for name, path in (("chain", a.chain), ("addition", a.addition)) if a.addition else (("chain", a.chain),):
        per_seed, missed, c, dirs = read_grid(path, plan[name])
        arms = [r for r in next(iter(per_seed.values())) if r not in ("warm-up start", "grpo")]
        seeds = sorted(per_seed, key=int)
        report += [f"## {name} (`{path}`): {len(seeds)} valid seeds ({','.join(seeds)}); missed warm-ups (no RL): "
                   + (", ".join(f"{s} ({100 * v:.1f}%)" for s, v in missed.items()) or "none"), ""]
        data[name] = {"seeds": seeds, "missed": missed}
        if name == "chain":
            lines, data[name]["primary"] = primary(per_seed, c)
            report += lines + ["", "Secondary (exploratory, uncorrected):", ""]
        lines, data[name]["arms"] = arm_table(per_seed, c, arms)
        report += lines + [""]
        if name == "chain":
            lines, data[name]["step_acc"] = step_lines(per_seed, arms)
            report += ["Step accuracy (greedy):", ""] + lines + [""]
        elif "grpo_ce_exits" in arms:
            lines, data[name]["ce_vs_lens"] = arm_table(per_seed, c, ["grpo_ce_exits"], base=PRIMARY)
            report += [f"`grpo_ce_exits` against `{PRIMARY}`:", ""] + lines + [""]
        if name == "addition":
            add_per_seed, add_missed = per_seed, missed  # the strength grids' grpo: the same seeds and warm-ups
        for part, (valid, miss) in dirs.items():
            report += diagnostics(part, valid, miss, plan[name])
    if a.strength:
        lines, data["strength"], diags = strength_lines(a.strength, add_per_seed, add_missed, plan["strength"])
        report += ["## The strength of the terms (exploratory; against the addition grid's grpo on the same seeds)",
                   "", *lines, "", *diags]
    text = "\n".join(report)
    write_atomic(a.out, text + "\n")
    write_atomic(os.path.splitext(a.out)[0] + ".json", json.dumps(finite_or_null(data), indent=1, allow_nan=False))
    print(text)
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
