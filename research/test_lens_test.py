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


def grids(tmp_path, lens_minus_grpo):
    """A chain grid whose oisd_lens - grpo Avg@K per seed is lens_minus_grpo, an addition grid, one strength grid."""
    grpo = [0.40, 0.45, 0.50, 0.42, 0.48, 0.44]
    chain = {str(200 + i): {"warm-up start": measures(0.3), "grpo": measures(g), "oisd_lens": measures(g + d),
                            "oisd_pos_lens": measures(g, exit_acc=0.6)}
             for i, (g, d) in enumerate(zip(grpo, lens_minus_grpo))}
    write_grid(tmp_path / "chain", chain, missed={"206": 0.31}, task="chain", digits=3)
    add = {str(300 + i): {"warm-up start": measures(0.3), "grpo": measures(g), "oisd_lens": measures(g),
                          "grpo_ce_exits": measures(g - 0.01, exit_acc=0.5)} for i, g in enumerate(grpo[:4])}
    write_grid(tmp_path / "add", add)
    strength = {str(300 + i): {"warm-up start": measures(0.3), "logit_only": measures(g + 0.02 * (i + 1))}
                for i, g in enumerate(grpo[:3])}
    write_grid(tmp_path / "strength" / "logit10", strength, arms="logit_only", exit_norm="ln_f", lambda_logit=10.0)
    plan = [("runs/chain", 200, 6), ("runs/add", 300, 4), ("runs/logit10", 300, 3)]
    (tmp_path / "plan.json").write_text(json.dumps({"grids": [dict(out_dir=o, first_seed=f, valid=v) for o, f, v in plan]}))
    return grpo


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
    assert f"**{verdict}**" in text and "206 (31.0%)" in text
    assert data["chain"]["seeds"] == [str(s) for s in range(200, 206)]


def test_secondaries_and_strength_are_paired_with_the_same_seeds(tmp_path, capsys):
    grids(tmp_path, [0.01] * 6)
    (tmp_path / "chain" / "gradients.md").write_text("| the chain's diagnostics |\n")
    data, text = run(tmp_path, capsys)
    assert "| the chain's diagnostics |" in text
    assert math.isnan(data["chain"]["primary"]["p"])  # every difference equal: t undefined, no verdict of an effect
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
    other = json.load(open(tmp_path / "strength" / "logit10" / "summary.json"))["per_seed"]
    timed = json.load(open(tmp_path / "strength" / "logit10" / "summary.json"))
    for s in timed["per_seed"]:  # the same warm-up, timed again: still paired
        timed["per_seed"][s]["warm-up start"].update(sec_L4=1.0 + int(s), lens_sec_L2=0.5)
    write_grid(tmp_path / "strength" / "logit10", timed["per_seed"], arms="logit_only", exit_norm="ln_f", lambda_logit=10.0)
    main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}",
                    f"--strength={tmp_path / 'strength'}", f"--out={tmp_path / 'timed.md'}"])
    assert "| logit10 |" in capsys.readouterr().out
    other["301"]["warm-up start"] = measures(0.32)  # another machine's warm-up of seed 301
    write_grid(tmp_path / "strength" / "other", other, arms="logit_only", exit_norm="ln_f", out_dir="runs/logit10")
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}",
                        f"--strength={tmp_path / 'strength'}", f"--out={tmp_path / 'x.md'}"])
    assert e.value.code == 2 and "seed 301's warm-up start differs" in capsys.readouterr().err
    (tmp_path / "strength" / "other" / "summary.json").unlink()
    write_grid(tmp_path / "strength" / "bad", {"399": {"warm-up start": measures(0.3), "attn_only": measures(0.4)}},
               arms="attn_only")
    for args in ([f"--chain={tmp_path / 'none'}", f"--addition={tmp_path / 'add'}"],
                 [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}", f"--strength={tmp_path / 'strength'}"]):
        with pytest.raises(SystemExit) as e:
            main(tmp_path, args + [f"--out={tmp_path / 'x.md'}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:  # the strength grids pair with the addition grid
        main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--strength={tmp_path / 'strength'}", f"--out={tmp_path / 'x.md'}"])
    assert e.value.code == 2 and "--strength needs --addition" in capsys.readouterr().err
    main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--out={tmp_path / 'chain_only.md'}"])  # the chain alone
    assert "addition" not in json.load(open(tmp_path / "chain_only.json")) and "Primary" in capsys.readouterr().out
    write_grid(tmp_path / "chain", json.load(open(tmp_path / "chain" / "summary.json"))["per_seed"], skip_missed=False)
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [f"--chain={tmp_path / 'chain'}", f"--addition={tmp_path / 'add'}", f"--out={tmp_path / 'x.md'}"])
    assert e.value.code == 2 and "--skip_missed" in capsys.readouterr().err


def test_a_grid_collected_in_two_parts_reads_as_one(tmp_path, capsys):
    grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
    whole, _ = run(tmp_path, capsys)
    saved = json.load(open(tmp_path / "chain" / "summary.json"))
    seeds = sorted(saved["per_seed"])
    for name, part, missed in (("p1", seeds[:2], saved["missed"]), ("p2", seeds[2:], {})):
        write_grid(tmp_path / name, {s: saved["per_seed"][s] for s in part}, missed=missed, task="chain", digits=3,
                   seeds=",".join(part), out_dir="runs/chain")
    out = [f"--addition={tmp_path / 'add'}", f"--out={tmp_path / 'parts.md'}"]
    main(tmp_path, [f"--chain={tmp_path / 'p1'},{tmp_path / 'p2'}", *out])
    parts = json.load(open(tmp_path / "parts.json"))
    assert parts["chain"] == whole["chain"]  # the same seeds, misses, tests
    for bad in ("p1,p1", "p1,add"):  # a seed twice; another setting
        with pytest.raises(SystemExit) as e:
            main(tmp_path, [f"--chain={','.join(str(tmp_path / b) for b in bad.split(','))}", *out])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1, err


def test_a_folder_of_each_seeds_own_summary_reads_as_the_grid(tmp_path, capsys):
    """What each seed's process writes (a summary of that seed alone; a missed warm-up's holds only the miss)
    and research/assets/lens/ keeps as seed<S>/summary.json reads as the grid collected in one piece."""
    grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
    whole, _ = run(tmp_path, capsys)
    saved = json.load(open(tmp_path / "chain" / "summary.json"))
    for s in [*saved["per_seed"], *saved["missed"]]:
        write_grid(tmp_path / "seeds" / f"seed{s}", {s: saved["per_seed"][s]} if s in saved["per_seed"] else {},
                   missed={s: saved["missed"][s]} if s in saved["missed"] else {}, task="chain", digits=3, seeds=s,
                   out_dir="runs/chain")
    (tmp_path / "seeds" / "gradients.md").write_text("| the diagnostics of every seed |\n")
    out = [f"--addition={tmp_path / 'add'}", f"--out={tmp_path / 'seeds.md'}"]
    main(tmp_path, [f"--chain={tmp_path / 'seeds'}", *out])
    assert json.load(open(tmp_path / "seeds.json"))["chain"] == whole["chain"]
    assert "| the diagnostics of every seed |" in (tmp_path / "seeds.md").read_text()
    only_missed = tmp_path / "missed_only" / "seed206"
    write_grid(only_missed, {}, missed={"206": 0.31}, task="chain", digits=3, seeds="206", out_dir="runs/chain")
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [f"--chain={only_missed.parent}", *out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no seed of this grid reached RL" in err and err.count("\n") == 1, err


def kept_seeds(tmp_path):
    """The chain grid of grids() kept as research/assets/lens/ keeps a grid: seed<S>/summary.json, seed<S>.rc
    and seed<S>.log (a missed warm-up's log says so, as research/experiments.py --skip_missed prints it)."""
    saved = json.load(open(tmp_path / "chain" / "summary.json"))
    kept = tmp_path / "kept"
    for s in [*saved["per_seed"], *saved["missed"]]:
        write_grid(kept / f"seed{s}", {s: saved["per_seed"][s]} if s in saved["per_seed"] else {},
                   missed={s: saved["missed"][s]} if s in saved["missed"] else {}, task="chain", digits=3, seeds=s,
                   out_dir="runs/chain")
        (kept / f"seed{s}.rc").write_text("0\n")
        (kept / f"seed{s}.log").write_text(f"seed {s}: warm-up missed (31.0% < 50%); no RL (--skip_missed)\n"
                                           if s in saved["missed"] else f"seed {s}: done\n")
    return kept


def refusal(tmp_path, capsys, chain):
    with pytest.raises(SystemExit) as e:
        main(tmp_path, [f"--chain={chain}", f"--out={tmp_path / 'x.md'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


def test_nothing_is_reported_before_the_plans_seeds_are_complete(tmp_path, capsys):
    grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
    kept = kept_seeds(tmp_path)
    main(tmp_path, [f"--chain={kept}", f"--out={tmp_path / 'kept.md'}"])  # complete: reported
    assert "Primary" in capsys.readouterr().out
    saved = json.load(open(tmp_path / "chain" / "summary.json"))
    cases = [  # (what is changed, how the grid is then not the plan's, complete)
        (lambda: write_grid(tmp_path / "chain", {s: m for s, m in saved["per_seed"].items() if s != "205"},
                            missed={"206": 0.31}, task="chain", digits=3), "chain", "5 valid of seeds 200,201,202,203,204,206"),
        (lambda: write_grid(tmp_path / "chain", saved["per_seed"], missed={"207": 0.31}, task="chain", digits=3),
         "chain", "run from 200 with none skipped"),
        (lambda: write_grid(tmp_path / "chain", saved["per_seed"], missed={"206": 0.31}, task="chain", digits=3,
                            out_dir="runs/chain_tuned"), "chain", "which the plan does not name"),
        (lambda: (kept / "seed203.rc").write_text("137\n"), "kept", "seed 203 ended with status '137'"),
        (lambda: (kept / "seed206.log").unlink(), "kept", "seed 206 has no kept log"),
        (lambda: (kept / "seed201.log").write_text("seed 201: warm-up missed (8.5% < 50%)\n"), "kept",
         "the log reports a missed warm-up and the summary does not"),
        (lambda: (kept / "seed206.log").write_text("seed 206: done\n"), "kept",
         "the log does not report a missed warm-up and the summary does"),
        (lambda: [(kept / "seed207.rc").write_text("0\n"), (kept / "seed207.log").write_text("")], "kept",
         "seed 207 ran but has no summary"),
        (lambda: (kept / "seed204" / "summary.json").write_bytes((kept / "seed205" / "summary.json").read_bytes()),
         "kept", "the folder of seed 204 holds the summary of seeds ['205']"),
        (lambda: (kept / "seed2x").mkdir() or (kept / "seed2x" / "summary.json").write_text("{}"), "kept",
         "named seed<integer>, not 'seed2x'"),
        (lambda: write_grid(kept / "seed202", {"202": saved["per_seed"]["202"]}, missed={"202": 0.2}, task="chain",
                            digits=3, seeds="202", out_dir="runs/chain"), "kept", "both valid and missed"),
    ]
    for change, grid, message in cases:
        grids(tmp_path, [0.03, -0.05, 0.04, -0.02, 0.01, -0.01])
        if (tmp_path / "kept").exists():
            shutil.rmtree(tmp_path / "kept")
        kept = kept_seeds(tmp_path)
        change()
        assert message in refusal(tmp_path, capsys, tmp_path / grid), message
