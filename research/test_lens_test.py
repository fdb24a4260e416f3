"""Tests of research/lens_test.py on hand-made grid summaries: the primary test's numbers against a direct
computation, the verdict rule fixed in advance, the strength grids' pairing, and the one-line refusals."""

import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import experiments  # noqa: E402
import gradients  # noqa: E402
import lens_test  # noqa: E402

L = 4


def measures(avgk, greedy=0.5, exit_acc=0.2, step=0.7):
    out = {"avgk": avgk, f"acc_L{L}": greedy, "step_acc": step}
    for layer in range(1, L):
        out.update({f"acc_L{layer}": exit_acc, f"lens_acc_L{layer}": exit_acc, f"probe_acc_L{layer}": exit_acc})
    return out


def write_grid(path, per_seed, missed=None, **config):
    """path/summary.json as research/experiments.py collects a grid; it ran as runs/<folder> unless out_dir is given."""
    config.setdefault("out_dir", f"runs/{os.path.basename(path)}")
    cfg = dict(dataclasses.asdict(experiments.ExpConfig(skip_missed=True)), **config)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump({"config": cfg, "per_seed": per_seed, "missed": missed or {}}, f)


CHAIN = dict(task="chain", digits=3, arms="grpo,oisd_lens,oisd_pos_lens")  # the settings each grid ran with
ADD = dict(arms="grpo,oisd_lens,grpo_ce_exits")
LOGIT10 = dict(arms="logit_only", exit_norm="ln_f", lambda_logit=10.0)
CHAIN_SEEDS = ["200", "201", "202", "204", "205", "206"]  # and 203, whose warm-up missed


def flags(settings):
    return [f"--{k}={v}" for k, v in settings.items()]


def grids(tmp_path, lens_minus_grpo):
    """A chain grid whose oisd_lens - grpo Avg@K per seed is lens_minus_grpo, an addition grid, one strength
    grid, and the plan they ran by."""
    grpo = [0.40, 0.45, 0.50, 0.42, 0.48, 0.44]
    chain = {s: {"warm-up start": measures(0.3), "grpo": measures(g), "oisd_lens": measures(g + d),
                 "oisd_pos_lens": measures(g, exit_acc=0.6)} for s, g, d in zip(CHAIN_SEEDS, grpo, lens_minus_grpo)}
    write_grid(tmp_path / "chain", chain, missed={"203": 0.31}, **CHAIN)
    add = {str(300 + i): {"warm-up start": measures(0.3), "grpo": measures(g), "oisd_lens": measures(g),
                          "grpo_ce_exits": measures(g - 0.01, exit_acc=0.5)} for i, g in enumerate(grpo[:4])}
    write_grid(tmp_path / "add", add, **ADD)
    strength = {str(300 + i): {"warm-up start": measures(0.3), "logit_only": measures(g + 0.02 * (i + 1))}
                for i, g in enumerate(grpo[:3])}
    write_grid(tmp_path / "strength" / "logit10", strength, **LOGIT10)
    plan = [dict(out_dir="runs/chain", args=flags(CHAIN), first_seed=200, valid=6),
            dict(out_dir="runs/add", args=flags(ADD), first_seed=300, valid=4),
            dict(out_dir="runs/logit10", args=flags(LOGIT10), first_seed=300, valid=3, share_warmup="runs/add")]
    (tmp_path / "plan.json").write_text(json.dumps({"grids": plan}))
    return grpo


def write_diagnostics(path, seeds, settings, **changed):
    """path/gradients.json as research/gradients.py --merge writes it: measured on seeds with the grid's settings
    (but `changed`), every measure absent (the report renders its tables from it)."""
    cfg = dataclasses.asdict(gradients.GradConfig(**dict(settings, skip_missed=True, out_dir=str(path), **changed)))
    measures = {s: {a: {"start": {}, "end": {}} for a in cfg["arms"].split(",")} for s in seeds}
    (path / "gradients.json").write_text(json.dumps({"config": cfg, "per_seed": measures, "missed": {}}))


def main(tmp_path, args):
    """lens_test.main with the plan that grids() wrote."""
    lens_test.main([*args, f"--plan={tmp_path / 'plan.json'}"])


def run(tmp_path, capsys):
    main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}",
                    f"--strength={tmp_path / 'strength'}", f"--out={tmp_path / 'lens_test.md'}"])
    capsys.readouterr()
    return json.load(open(tmp_path / "lens_test.json")), (tmp_path / "lens_test.md").read_text()


@pytest.mark.parametrize("diffs, verdict", [([0.03, 0.05, 0.04, 0.06, 0.02, 0.05], "helps"),
                                            ([-0.03, -0.05, -0.04, -0.06, -0.02, -0.05], "hurts"),
                                            ([0.03, -0.05, 0.04, -0.02, 0.01, -0.01], "no effect shown")])
def test_primary_test_and_its_verdict(tmp_path, capsys, diffs, verdict):
    grpo = grids(tmp_path, diffs)
    data, text = run(tmp_path, capsys)
    d, n = 100 * np.array(diffs), len(diffs)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    got = data["chain"]["primary"]
    assert got["verdict"] == verdict, (got["verdict"], verdict)
    assert got["mean"] == pytest.approx(d.mean()) and got["t"] == pytest.approx(t)
    assert got["hi"] - got["mean"] == pytest.approx(2.571 * d.std(ddof=1) / math.sqrt(n))  # t_0.975 with 5 df
    assert got["paper_effect"] == pytest.approx(100 * (64.75 / 55.08 - 1) * np.mean(grpo))
    # the p values and MDE of these differences, by experiments.py's functions (each tested on its own there)
    assert got["p"] == pytest.approx(experiments.t_pvalue(t, n - 1))
    assert got["p_wilcoxon"] == pytest.approx(experiments.wilcoxon_pvalue(d))
    assert got["mde"] == pytest.approx(experiments.min_detectable_effect(d.std(ddof=1), n))
    assert f"**{verdict}**" in text and "203 (31.0%)" in text
    assert data["chain"]["seeds"] == CHAIN_SEEDS


def test_secondaries_and_strength_are_paired_with_the_same_seeds(tmp_path, capsys):
    grids(tmp_path, [0.01] * 6)
    write_diagnostics(tmp_path / "chain", CHAIN_SEEDS, CHAIN)
    data, text = run(tmp_path, capsys)
    assert "# Where the gradient goes: 6 seed(s), 200, 201, 202, 204, 205, 206" in text
    assert data["chain"]["primary"]["p"] is None  # every difference equal: t undefined (null in the JSON), no verdict
    assert data["chain"]["primary"]["verdict"] == "no effect shown"
    assert data["addition"]["arms"]["grpo_ce_exits"]["avgk"]["mean"] == pytest.approx(-1.0)
    assert data["addition"]["ce_vs_lens"]["grpo_ce_exits"]["avgk"]["mean"] == pytest.approx(-1.0)
    assert data["chain"]["step_acc"]["oisd_pos_lens"]["mean"] == pytest.approx(0.0)
    # the strength grid's arm against the addition grid's grpo of the same seed: +2, +4, +6 points
    assert data["strength"]["logit10"]["avgk"] == pytest.approx([2.0, 4.0, 6.0])
    assert "| logit10 | logit_only (ln_f) | logit 10.0 | 300,301,302 | +2.0, +4.0, +6.0 (+4.0)" in text
    # the aligned exit of oisd_pos_lens (layer 2 by default), as trained, lens and probe, grpo's beside it
    assert "L2 60.0 (20.0), 60.0 (20.0), 60.0 (20.0)" in text


def test_refusals_are_one_line(tmp_path, capsys):
    grids(tmp_path, [0.01, 0.02, 0.0, 0.03, -0.01, 0.02])
    saved = json.load(open(tmp_path / "strength" / "logit10" / "summary.json"))["per_seed"]
    timed = json.loads(json.dumps(saved))
    for s in timed:  # the same warm-up, timed again: still paired
        timed[s]["warm-up start"].update(sec_L4=1.0 + int(s), lens_sec_L2=0.5)
    write_grid(tmp_path / "strength" / "logit10", timed, **LOGIT10)
    main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}",
                    f"--strength={tmp_path / 'strength'}", f"--out={tmp_path / 'timed.md'}"])
    assert "| logit10 |" in capsys.readouterr().out
    other = json.loads(json.dumps(saved))
    other["301"]["warm-up start"] = measures(0.32)  # another machine's warm-up of seed 301
    write_grid(tmp_path / "strength" / "logit10", other, **LOGIT10)
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}",
                        f"--strength={tmp_path / 'strength'}", f"--out={tmp_path / 'x.md'}"])
    assert e.value.code == 2 and "seed 301's warm-up start differs" in capsys.readouterr().err
    write_grid(tmp_path / "strength" / "logit10", saved, **LOGIT10)
    for args in ([f"--chain={tmp_path / 'none'}", f"--addition={tmp_path / 'add'}"],
                 [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}", f"--out={tmp_path / 'no' / 'x.md'}"]):
        with pytest.raises(SystemExit) as e:
            main(tmp_path, [f"--out={tmp_path / 'x.md'}", *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:  # the strength grids pair with the addition grid
        main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--strength={tmp_path / 'strength'}", f"--out={tmp_path / 'x.md'}"])
    assert e.value.code == 2 and "--strength needs --addition" in capsys.readouterr().err
    main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--out={tmp_path / 'chain_only.md'}"])  # the chain alone
    assert "addition" not in json.load(open(tmp_path / "chain_only.json")) and "Primary" in capsys.readouterr().out
    write_grid(tmp_path / "chain", json.load(open(tmp_path / "chain" / "summary.json"))["per_seed"], **CHAIN,
               missed={"203": 0.31}, skip_missed=False)
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}", f"--out={tmp_path / 'x.md'}"])
    assert e.value.code == 2 and "skip_missed=False" in capsys.readouterr().err


def test_a_grid_collected_in_two_parts_reads_as_one(tmp_path, capsys):
    grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
    whole, _ = run(tmp_path, capsys)
    saved = json.load(open(tmp_path / "chain" / "summary.json"))
    seeds = sorted(saved["per_seed"])
    for name, part, missed in (("p1", seeds[:2], saved["missed"]), ("p2", seeds[2:], {})):
        write_grid(tmp_path / name, {s: saved["per_seed"][s] for s in part}, missed=missed, **CHAIN,
                   seeds=",".join(part), out_dir="runs/chain")
    out = [f"--addition={tmp_path / 'add'}", f"--out={tmp_path / 'parts.md'}"]
    main(tmp_path, [f"--chain={tmp_path / 'p1'},{tmp_path / 'p2'}", *out])
    parts = json.load(open(tmp_path / "parts.json"))
    assert parts["chain"] == whole["chain"]  # the same seeds, misses, tests
    for name, part in (("p1", seeds[:2]), ("p2", seeds[2:])):  # each part with the diagnostics of its own seeds
        write_diagnostics(tmp_path / name, part, CHAIN)
    main(tmp_path, [f"--chain={tmp_path / 'p1'},{tmp_path / 'p2'}", *out])
    text = (tmp_path / "parts.md").read_text()
    assert "2 seed(s), 200, 201" in text and "4 seed(s), 202, 204, 205, 206" in text
    kept = kept_seeds(tmp_path)  # the second part kept seed by seed, the first collected
    for s in seeds[:2] + list(saved["missed"]):
        shutil.rmtree(kept / f"seed{s}")
        (kept / f"seed{s}.rc").unlink()
        (kept / f"seed{s}.log").unlink()
    main(tmp_path, [f"--chain={tmp_path / 'p1'},{kept}", *out])
    assert json.load(open(tmp_path / "parts.json"))["chain"] == whole["chain"]
    for bad in ("p1,p1", "p1,add"):  # a seed twice; another setting
        with pytest.raises(SystemExit) as e:
            main(tmp_path, [f"--chain={','.join(str(tmp_path / b) for b in bad.split(','))}", *out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err


def kept_seeds(tmp_path, kept=None):
    """The chain grid of grids() kept as research/assets/lens/ keeps a grid: seed<S>/summary.json (what each
    seed's process writes: that seed alone; a missed warm-up's holds only the miss), seed<S>.rc and
    seed<S>.log (a missed warm-up's log says so, as research/experiments.py --skip_missed prints it)."""
    saved = json.load(open(tmp_path / "chain" / "summary.json"))
    kept = kept or tmp_path / "kept"
    for s in [*saved["per_seed"], *saved["missed"]]:
        write_grid(kept / f"seed{s}", {s: saved["per_seed"][s]} if s in saved["per_seed"] else {},
                   missed={s: saved["missed"][s]} if s in saved["missed"] else {}, **CHAIN, seeds=s,
                   out_dir="runs/chain")
        (kept / f"seed{s}.rc").write_text("0\n")
        (kept / f"seed{s}.log").write_text(f"seed {s}: warm-up missed (31.0% < 50%); no RL (--skip_missed)\n"
                                           if s in saved["missed"] else f"seed {s}: done\n")
    return kept


def test_a_folder_of_each_seeds_own_summary_reads_as_the_grid(tmp_path, capsys):
    """A grid kept seed by seed reads as the grid collected in one piece, its diagnostics with it."""
    grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
    whole, _ = run(tmp_path, capsys)
    seeds = kept_seeds(tmp_path, tmp_path / "seeds")
    write_diagnostics(seeds, CHAIN_SEEDS, dict(CHAIN, arms="grpo,oisd_lens"))  # some of the grid's arms
    out = [f"--addition={tmp_path / 'add'}", f"--out={tmp_path / 'seeds.md'}"]
    main(tmp_path, [f"--chain={seeds}", *out])
    assert json.load(open(tmp_path / "seeds.json"))["chain"] == whole["chain"]
    assert "# Where the gradient goes: 6 seed(s), 200, 201, 202, 204, 205, 206" in (tmp_path / "seeds.md").read_text()
    for stale, message in ((dict(seeds=CHAIN_SEEDS[:-1]), "run research/gradients.py on them again"),  # a merge of 5
                           (dict(changed=dict(lambda_logit=10.0)), "other settings or arms"),
                           (dict(changed=dict(arms="grpo,oisd_pos")), "other settings or arms")):
        write_diagnostics(seeds, stale.get("seeds", CHAIN_SEEDS), CHAIN, **stale.get("changed", {}))
        with pytest.raises(SystemExit) as e:
            main(tmp_path, [f"--chain={seeds}", *out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, (message, err)
    (seeds / "gradients.json").unlink()
    (seeds / "gradients.md").write_text("tables without their numbers\n")
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [f"--chain={seeds}", *out])
    assert e.value.code == 2 and "gradients.md without its gradients.json" in capsys.readouterr().err
    (seeds / "gradients.md").unlink()
    only_missed = tmp_path / "missed_only" / "seed203"
    write_grid(only_missed, {}, missed={"203": 0.31}, **CHAIN, seeds="203", out_dir="runs/chain")
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [f"--chain={only_missed.parent}", *out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no seed of this grid reached RL" in err and err.count("\n") == 1, err


def refusal(tmp_path, capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [*args, f"--out={tmp_path / 'x.md'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


def test_nothing_is_reported_before_the_plans_seeds_are_complete(tmp_path, capsys):
    grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
    kept = kept_seeds(tmp_path)
    main(tmp_path, [f"--chain={kept}", f"--out={tmp_path / 'kept.md'}"])  # complete: reported
    assert "Primary" in capsys.readouterr().out
    saved = json.load(open(tmp_path / "chain" / "summary.json"))
    nan, null, text = (json.loads(json.dumps(saved["per_seed"])) for _ in range(3))
    nan["204"]["oisd_lens"]["avgk"], null["204"]["grpo"]["step_acc"], text["200"]["grpo"]["acc_L4"] = math.nan, None, "0.5"
    lacking = json.loads(json.dumps(saved["per_seed"]))
    del lacking["204"]["oisd_lens"]["avgk"]
    chain = tmp_path / "chain"
    cases = [  # (what is changed, the grid then read, what the refusal says)
        (lambda: write_grid(chain, {s: m for s, m in saved["per_seed"].items() if s != "205"},
                            missed={"203": 0.31}, **CHAIN), "chain", "5 valid of seeds 200,201,202,203,204,206"),
        (lambda: write_grid(chain, saved["per_seed"], missed={"207": 0.31}, **CHAIN),
         "chain", "run from 200 with none skipped"),
        (lambda: write_grid(chain, saved["per_seed"], missed={"203": 0.31, "207": 0.2}, **CHAIN),
         "chain", "the last one valid"),
        (lambda: write_grid(chain, saved["per_seed"], missed={"203": 0.31}, **CHAIN, out_dir="runs/chain_tuned"),
         "chain", "other settings than the plan's grid runs/chain (out_dir='runs/chain_tuned')"),
        (lambda: write_grid(chain, saved["per_seed"], missed={"203": 0.31}, **dict(CHAIN, digits=2)),
         "chain", "(digits=2)"),
        (lambda: write_grid(chain, nan, missed={"203": 0.31}, **CHAIN), "chain", "not a finite number"),
        (lambda: write_grid(chain, null, missed={"203": 0.31}, **CHAIN), "chain", "not a finite number"),
        (lambda: write_grid(chain, text, missed={"203": 0.31}, **CHAIN), "chain", "not a finite number"),
        (lambda: write_grid(chain, saved["per_seed"], missed={"203": "31%"}, **CHAIN), "chain", "not a finite number"),
        (lambda: write_grid(chain, lacking, missed={"203": 0.31}, **CHAIN), "chain", "a measure is missing"),
        (lambda: write_grid(chain, {"2o4" if s == "204" else s: m for s, m in saved["per_seed"].items()},
                            missed={"203": 0.31}, **CHAIN), "chain", "is not a grid summary (ValueError)"),
        (lambda: (chain / "summary.json").write_text(json.dumps(dict(saved, config=5))), "chain",
         "is not a grid summary (TypeError)"),
        (lambda: (kept / "seed203.rc").write_text("137\n"), "kept", "seed 203 ended with status '137'"),
        (lambda: (kept / "seed206.log").unlink(), "kept", "seed 206 has no kept log"),
        (lambda: [p.unlink() for p in kept.glob("seed*.*")], "kept", "seed 200 has no kept log"),
        (lambda: (kept / "seed205.rc").unlink() or (kept / "seed205.rc").mkdir(), "kept",
         "seed 205's kept log or exit status cannot be read"),
        (lambda: (kept / "seed201.log").write_text("seed 201: warm-up missed (8.5% < 50%)\n"), "kept",
         "the log reports a missed warm-up and the summary does not"),
        (lambda: (kept / "seed203.log").write_text("seed 203: done\n"), "kept",
         "the log does not report a missed warm-up and the summary does"),
        (lambda: [(kept / "seed207.rc").write_text("0\n"), (kept / "seed207.log").write_text("")], "kept",
         "seed 207 ran but has no summary"),
        (lambda: (kept / "seed204" / "summary.json").write_bytes((kept / "seed205" / "summary.json").read_bytes()),
         "kept", "the folder of seed 204 holds the summary of seeds ['205']"),
        (lambda: (kept / "seed2x").mkdir() or (kept / "seed2x" / "summary.json").write_text("{}"), "kept",
         "named seed<integer>, not 'seed2x'"),
        (lambda: write_grid(kept / "seed202", {"202": saved["per_seed"]["202"]}, missed={"202": 0.2}, **CHAIN,
                            seeds="202", out_dir="runs/chain"), "kept", "both valid and missed"),
    ]
    for change, grid, message in cases:
        grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
        if (tmp_path / "kept").exists():
            shutil.rmtree(tmp_path / "kept")
        kept = kept_seeds(tmp_path)
        change()
        assert message in refusal(tmp_path, capsys, f"--chain={tmp_path / grid}"), message


def test_each_grid_is_read_as_the_plans_grid_of_its_role(tmp_path, capsys):
    """The chain grid is the plan's --task=chain grid, the addition grid the one the strength grids share
    warm-ups with, and the strength folder holds exactly the plan's strength grids."""
    grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
    chain, add, strength = (f"--{role}={tmp_path / name}" for role, name in
                            (("chain", "chain"), ("addition", "add"), ("strength", "strength")))
    assert "plan's grid runs/chain" in refusal(tmp_path, capsys, f"--chain={tmp_path / 'add'}")
    assert "plan's grid runs/add" in refusal(tmp_path, capsys, chain, f"--addition={tmp_path / 'chain'}")
    write_grid(tmp_path / "strength" / "logit1", {}, missed={"300": 0.2}, **LOGIT10)  # a grid the plan lacks
    assert "nothing else" in refusal(tmp_path, capsys, chain, add, strength)
    shutil.rmtree(tmp_path / "strength" / "logit1")
    shutil.move(tmp_path / "strength" / "logit10", tmp_path / "logit10")  # a planned grid missing
    assert "the plan's strength grids are logit10" in refusal(tmp_path, capsys, chain, add, strength)
    shutil.move(tmp_path / "logit10", tmp_path / "strength" / "logit10")
    main(tmp_path, [chain, add, strength, f"--out={tmp_path / 'x.md'}"])  # the plan's grids, each in its role
    saved = json.load(open(tmp_path / "strength" / "logit10" / "summary.json"))["per_seed"]
    moved = {"300": saved["300"], "302": saved["301"], "303": saved["302"]}  # 301 missed where the addition's did not
    write_grid(tmp_path / "strength" / "logit10", moved, missed={"301": 0.2}, **LOGIT10)
    assert "not the addition grid's: their warm-ups differ" in refusal(tmp_path, capsys, chain, add, strength)
    plan = json.loads((tmp_path / "plan.json").read_text())
    for broken in (dict(plan["grids"][0], valid="6"), dict(plan["grids"][0], args=["--no_such_flag=1"]),
                   dict(plan["grids"][0], args=[])):  # a count that is no int, a flag that is none, no chain grid
        (tmp_path / "plan.json").write_text(json.dumps({"grids": [broken, *plan["grids"][1:]]}))
        assert "is not the lens test's plan" in refusal(tmp_path, capsys, chain)
