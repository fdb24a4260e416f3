"""
Tests of the research tools (grids, intervals, the probe, Avg@K, the drafter), each against an independent
computation. They import the core one folder up; the core's own tests (../test_oisd.py) import nothing here.

    python -m pytest -q research
"""

import ast
import dataclasses
import json
import math
import os
import itertools
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the core: oisd, model, tasks, harness
import experiments  # noqa: E402
import harness  # noqa: E402
import oisd  # noqa: E402
import speculative  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from oisd import masked_mean, response_mask  # noqa: E402
from speculative import speculative_accept, speculative_generate  # noqa: E402
from test_oisd import assert_close, tiny_env  # noqa: E402  (the core tests' checks and small run environment)



def test_summarize_paired_difference_interval():
    final = {"grpo": [0.70, 0.75, 0.80, 0.72, 0.78], "oisd": [0.72, 0.74, 0.85, 0.75, 0.80]}
    per_seed = {s: {arm: {"acc_L4": final[arm][s], "avgk": final[arm][s] / 2, "len": 5.0} for arm in final}
                for s in range(5)}
    out = experiments.summarize(per_seed, 4)["oisd"]
    diff = np.array(final["oisd"]) - np.array(final["grpo"])
    half = 2.776 * diff.std(ddof=1) / math.sqrt(5)  # Student's t, 4 degrees of freedom, 97.5% quantile
    assert out["final_diff"] == pytest.approx(diff.mean())
    assert (out["final_lo"], out["final_hi"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert out["final_std"] == pytest.approx(np.std(final["oisd"], ddof=1))
    assert out["avgk_diff"] == pytest.approx(diff.mean() / 2)
    assert out["final_mde"] == pytest.approx((2.776 + 0.941) * diff.std(ddof=1) / math.sqrt(5))



def test_probe_fits_only_the_exit_norms_and_closes_the_gap_to_the_final_layer(tmp_path):
    env = tiny_env(tmp_path)
    torch.manual_seed(0)
    model = GPT(env.model_config(env.cfg))
    probe = experiments.probe_exits(env, model, steps=60, lr=0.05, batches=2)
    for name, p in model.state_dict().items():
        if not name.startswith("exit_ln"):
            assert torch.equal(probe.state_dict()[name], p), name
    assert not torch.equal(probe.exit_ln[0].weight, model.transformer.ln_f.weight)
    # independent check of what it optimised: KL(final || exit) on fresh samples, lens start vs probe
    seq, _ = model.generate(env.prompts(env.val[:8]), env.max_new, 1.0, 4, env.eos_id, torch.Generator().manual_seed(5))
    P = env.prompt_len
    mask = response_mask(seq[:, P:], env.eos_id)

    def kl(m, layer):
        with torch.no_grad():
            logits, exits, _ = m(seq[:, :-1], exit_layers=(layer,))
        t, s = F.log_softmax(logits[:, P - 1:], -1), F.log_softmax(exits[layer][:, P - 1:], -1)
        return masked_mean((t.exp() * (t - s)).sum(-1), mask).item()

    start = oisd.logit_lens(model)
    assert kl(probe, 1) < 0.9 * kl(start, 1) and kl(probe, 2) < 0.9 * kl(start, 2)


# ---------------------------------------------------------------- experiments: Avg@K, power

def test_avg_k_pass_k_and_step_metrics_against_hand_counts(tmp_path):
    env = oisd.Env(experiments.ExpConfig(out_dir=str(tmp_path), task="chain", terms=3, digits=2, eval_size=2, avg_k=3,
                                         n_layer=2, n_head=2, n_embd=16))
    (p1, a1), (p2, a2) = env.test
    right1, right2 = env.task.solution(p1), env.task.solution(p2)
    wrong_step1 = "999," + right1.split(",")[1]  # right answer, wrong running sum
    greedy = [right1, "5"]
    sampled = [right1, wrong_step1, "0,0", right2, right2, "1"]  # problem 1: 2 of 3 right, problem 2: 2 of 3

    class Fake:
        def generate(self, prompts, max_new, temperature=1.0, num_samples=1, eos_id=None, generator=None):
            texts = greedy if temperature == 0 else sampled
            problems = [p1, p2] if temperature == 0 else [p1, p1, p1, p2, p2, p2]
            rows = [env.tok.encode(p + t) + [env.eos_id] for p, t in zip(problems, texts)]
            width = max(map(len, rows))
            return torch.tensor([r + [env.eos_id] * (width - len(r)) for r in rows]), None

    out = experiments.sampled_and_step_metrics(env, Fake())
    assert out["avgk"] == pytest.approx(4 / 6) and out["passk"] == 1.0
    assert out["all_steps"] == 0.5 and out["step_acc"] == 0.5  # greedy: one fully right, one malformed
    assert out["sampled_all_steps"] == pytest.approx(3 / 6) and out["sampled_step_acc"] == pytest.approx(3 / 6)



def student_t_cdf(x, df):
    """CDF of Student's t by numerical integration of its density (independent of the tables)."""
    grid = np.linspace(0, x, 200001)  # the density is symmetric: CDF(x) = 1/2 + integral from 0 to x
    density = np.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) * (1 + grid**2 / df) ** (-(df + 1) / 2)
    return 0.5 + float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(grid)))



def test_t_quantile_tables():
    for df in (1, 2, 4, 9, 30):
        assert student_t_cdf(experiments.T975[df - 1], df) == pytest.approx(0.975, abs=2e-3)
        assert student_t_cdf(experiments.T80[df - 1], df) == pytest.approx(0.80, abs=2e-3)



def test_minimum_detectable_effect_has_80_percent_power():
    """Simulate paired t-tests on 5 and 10 seeds with a true effect equal to the MDE: about 80% reject."""
    rng = np.random.default_rng(0)
    for n in (5, 10):
        mde = experiments.min_detectable_effect(1.0, n)
        d = rng.normal(mde, 1.0, size=(40000, n))
        t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
        power = np.mean(np.abs(t) > experiments.T975[n - 2])
        assert 0.75 < power < 0.85, (n, power)
    assert experiments.seeds_needed(1.0, experiments.min_detectable_effect(1.0, 7)) == 7



@pytest.mark.parametrize("arg", ["--seeds=0,x", "--seeds=1,1", "--seeds=-1", "--avg_k=0", "--probe_lr=nan",
                                 "--spec_layers=4", "--spec_layers=a", "--report=/nonexistent", "--spec_problems=1",
                                 "--speculative --eval_size=50 --spec_problems=60"])
def test_experiment_flags_are_checked(arg):
    with pytest.raises(SystemExit) as e:
        experiments.main(arg.split(" "))
    assert e.value.code == 2



def test_report_on_a_corrupt_summary_is_one_line(tmp_path, capsys):
    """--report over a grid whose summary.json is corrupt (or not a summary) exits 2 with one line, no traceback."""
    for text in ("{not json", "[1, 2]", '{"config": {}}', '{"config": {}, "summary": {"grpo": {}}}',
                 '{"config": {"task": "add"}, "summary": [1]}'):
        (tmp_path / "summary.json").write_text(text)
        with pytest.raises(SystemExit) as e:
            experiments.main([f"--report={tmp_path}", f"--out_dir={tmp_path}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "summary.json" in err, err


# ---------------------------------------------------------------- self-speculative decoding

def disagreeing_model(seed, n_layer=4, vocab=15, sharpness=10.0, exit_noise=1.0):
    """A random model with varied, fairly sharp next-token distributions whose exits, their norms
    perturbed, often disagree with its final layer."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=32, n_layer=n_layer, n_head=2, n_embd=16))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.5 * torch.randn_like(p))
            if name.startswith("exit_ln"):
                p.add_(exit_noise * torch.randn_like(p))
            if name.endswith("wte.weight"):
                p.mul_(sharpness)
    return model



def test_speculative_greedy_equals_plain_greedy():
    disagreements, cases = [], 0
    for seed in range(3):
        model = disagreeing_model(seed)
        for prompt_seed in range(2):
            idx = torch.randint(0, 13, (1, 5), generator=torch.Generator().manual_seed(prompt_seed))
            for eos in (None, 13, int(idx[0, 0])):
                plain, _ = model.generate(idx, 14, temperature=0, eos_id=eos)
                for layer in (1, 2, 3):
                    for k in (1, 3, 6):
                        out, stats = speculative_generate(model, idx, 14, layer, k, eos_id=eos)
                        what = (f"speculative greedy decoding (model seed {seed}, prompt seed {prompt_seed}, "
                                f"eos_id={eos}, draft layer {layer}, {k} drafts)")
                        assert_close(out, plain, f"tokens of {what}, against plain greedy decoding", rtol=0, atol=0)
                        assert stats["tokens"] == plain.size(1) - 5, (f"stats['tokens'] of {what}: expected "
                                                                      f"{plain.size(1) - 5}, got {stats['tokens']}")
                        assert stats["accepted"] <= stats["drafted"], f"stats of {what}: more accepted than drafted"
                        disagreements.append(1 - stats["accepted"] / max(stats["drafted"], 1))
                        cases += 1
    assert cases == 162, f"cases checked: expected 162, got {cases}"
    assert np.mean(disagreements) > 0.25, (f"share of rejected drafts: expected > 0.25 (the drafts often wrong), "
                                           f"got {np.mean(disagreements):.3f}")



def test_speculative_eos_inside_the_accepted_prefix_and_max_new_tokens_mid_draft():
    model = disagreeing_model(1)
    idx = torch.randint(0, 13, (1, 5), generator=torch.Generator().manual_seed(0))
    plain, _ = model.generate(idx, 12, temperature=0)
    tokens = plain[0, 5:].tolist()
    eos = tokens[3]  # declare the 4th generated token to be EOS: the output must stop right after it
    out, _ = speculative_generate(model, idx, 12, 3, 6, eos_id=eos)
    expect, _ = model.generate(idx, 12, temperature=0, eos_id=eos)
    assert torch.equal(out, expect) and out[0, -1] == eos and out.size(1) <= 5 + 4
    for max_new in (1, 2, 3, 7):  # the budget runs out inside a draft
        out, stats = speculative_generate(model, idx, max_new, 3, 6)
        assert torch.equal(out, plain[:, : 5 + max_new]) and stats["tokens"] == max_new
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(model, idx.repeat(2, 1), 4, 2, 2)
    with pytest.raises(ValueError):
        speculative_generate(model, idx, 4, 4, 2)



def exact_three_token_distribution(model, idx, temperature):
    """P(t1, t2, t3) of the full model, by enumeration."""
    V = model.config.vocab_size
    probs = np.zeros((V, V, V))
    with torch.no_grad():
        p1 = F.softmax(model(idx)[0][0, -1] / temperature, -1)
        for a in range(V):
            p2 = F.softmax(model(torch.cat([idx, torch.tensor([[a]])], 1))[0][0, -1] / temperature, -1)
            for b in range(V):
                p3 = F.softmax(model(torch.cat([idx, torch.tensor([[a, b]])], 1))[0][0, -1] / temperature, -1)
                probs[a, b] = (p1[a] * p2[b] * p3).numpy()
    return probs.reshape(-1)



def chi_square(counts, probs, z=3.09):
    """Pearson's chi-square against probs (cells with expected count < 5 pooled): (the statistic, its
    critical value at about the 0.1% level by the Wilson-Hilferty approximation, degrees of freedom)."""
    n = counts.sum()
    expected = n * probs
    small = expected < 5
    obs = np.append(counts[~small], counts[small].sum())
    exp = np.append(expected[~small], expected[small].sum())
    stat = ((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum()
    df = len(obs) - 1
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3, df


def chi_square_rejects(counts, probs, z=3.09):
    """True if the chi-square test against probs rejects at about the 0.1% level."""
    stat, critical, _ = chi_square(counts, probs, z)
    return stat > critical


def chi_square_says(counts, probs, what):
    """A sentence for a failed check: the chi-square statistic of `what` against its critical value."""
    stat, critical, df = chi_square(counts, probs)
    verdict = "rejected" if stat > critical else "not rejected"
    return (f"chi-square of {what}: statistic {stat:.1f}, 0.1% critical value {critical:.1f} ({df} degrees of "
            f"freedom): {verdict}")



def wrong_always_accept(target, draft, tokens, generator=None):
    if target.size(0) > len(tokens):
        return len(tokens), int(torch.multinomial(target[len(tokens)], 1, generator=generator))
    return len(tokens), None



def wrong_resample_from_target(target, draft, tokens, generator=None):
    for i, x in enumerate(tokens):
        if torch.rand((), generator=generator) >= min(1.0, (target[i, x] / draft[i, x]).item()):
            return i, int(torch.multinomial(target[i], 1, generator=generator))
    if target.size(0) > len(tokens):
        return len(tokens), int(torch.multinomial(target[len(tokens)], 1, generator=generator))
    return len(tokens), None



@pytest.mark.parametrize("rule", ["exact", "always_accept", "resample_from_target"])
def test_speculative_sampling_matches_the_model_distribution(rule, monkeypatch):
    """Tokens 2-3 come from the first draft-and-verify cycle (two drafts, both checked by the rule when the
    first is accepted). Their joint law with token 1 over 1500
    seeded samples must pass a chi-square test against the model's exact law; the same test must catch
    the two wrong rules."""
    if rule != "exact":
        monkeypatch.setattr(speculative, "speculative_accept", globals()[f"wrong_{rule}"])
    model = disagreeing_model(2, n_layer=3, vocab=4, sharpness=3.0, exit_noise=3.0)
    idx = torch.tensor([[1, 2, 0]])
    probs = exact_three_token_distribution(model, idx, temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(64)
    for _ in range(1500):
        out, _ = speculative_generate(model, idx, 4, 1, 2, temperature=1.0, generator=gen)
        a, b, c = out[0, 3:6].tolist()
        counts[16 * a + 4 * b + c] += 1
    expect = "a rejection (a wrong rule)" if rule != "exact" else "no rejection (the law of plain sampling)"
    assert chi_square_rejects(counts, probs) == (rule != "exact"), (
        chi_square_says(counts, probs, f"the first 3 tokens of 1500 speculative samples, rule {rule}, against the "
                        "model's exact law") + f"; expected {expect}")



def test_speculative_accept_rule_reproduces_the_target_distribution():
    """The acceptance rule alone, with one draft drawn from the draft distribution: the token it keeps
    follows the target distribution exactly."""
    target = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])  # p_L, one row per checked position
    draft = torch.tensor([[0.1, 0.2, 0.3, 0.4]])  # p_l
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(4)
    for _ in range(20000):
        x = int(torch.multinomial(draft[0], 1, generator=gen))
        n_ok, last = speculative_accept(target[:1], draft, [x], gen)
        counts[x if n_ok == 1 else last] += 1
    assert not chi_square_rejects(counts, target[0].numpy()), (chi_square_says(
        counts, target[0].numpy(), "the token kept after one draft from p_l (20000 trials), against p_L") +
        "; expected no rejection")
    bonus = np.zeros(4)
    for _ in range(4000):  # p_L/p_l = 5 >= 1: always accepted, then a bonus token from p_L at the next position
        n_ok, last = speculative_accept(target, draft, [0], gen)
        assert n_ok == 1 and last is not None, (f"speculative_accept of draft token 0 (p_L/p_l = 5) with a position "
                                                f"after it: expected (1, a bonus token), got ({n_ok}, {last})")
        bonus[last] += 1
    assert not chi_square_rejects(bonus, target[1].numpy()), (chi_square_says(
        bonus, target[1].numpy(), "the bonus token (4000 trials), against p_L at its position")
        + "; expected no rejection")



def test_speculative_counts_checked_drafts_and_the_prediction_matches_a_simulation():
    model = disagreeing_model(1)
    idx = torch.randint(0, 13, (1, 5), generator=torch.Generator().manual_seed(3))
    _, stats = speculative_generate(model, idx, 14, 2, 6)
    assert stats["accepted"] <= stats["checked"] <= stats["drafted"] and stats["passes"] >= 2
    # the prediction's bookkeeping against a plain Monte-Carlo simulation of the same process
    costs = {"prefill": 5.0, "full": 2.0, "draft": 0.5, "verify": [1.5 + 0.1 * m for m in range(1, 6)]}
    rng = np.random.default_rng(0)
    for a, k, n in [(0.9, 4, 10), (0.5, 2, 5), (1.0, 3, 7)]:
        total = 0.0
        for _ in range(20000):
            left, seconds = n - 1, costs["prefill"]
            while left > 0:
                drafts = min(k, left - 1)
                accepted = 0
                while accepted < drafts and rng.random() < a:
                    accepted += 1
                seconds += (drafts + 1) * costs["draft"] + (1.5 + 0.1 * (drafts + 1))
                left -= accepted + 1
            total += seconds
        simulated = (costs["prefill"] + (n - 1) * costs["full"]) / (total / 20000)
        assert experiments.predicted_speedup(a, k, n, costs) == pytest.approx(simulated, rel=0.01), (a, k, n)



def test_speculative_table_pairs_each_arm_with_grpo_on_the_same_seeds():
    def row(seed, arm, speedup, acceptance):
        return dict(seed=seed, arm=arm, drafter="as trained", layer=2, k=3, acceptance=0.0, acceptance_all_k=acceptance,
                    tokens_per_pass=2.0, passes_per_token=0.5, ms_per_problem=10.0, plain_ms_per_problem=12.0,
                    speedup=speedup, predicted=1.2, mismatches=0)
    grpo = [1.0, 1.2, 0.9]
    oisd = [1.4, 1.5, 1.6]  # seed 3 of oisd has no grpo partner: left out of the pairing
    # rows in an order a positional pairing would get wrong: the unpaired seed first, grpo's seeds reversed
    results = ([row(3, "oisd", 9.0, 0.9)] + [row(s, "grpo", x, 0.5) for s, x in reversed(list(enumerate(grpo)))]
               + [row(s, "oisd", x, 0.8 + 0.01 * s) for s, x in enumerate(oisd)])
    lines = experiments.speculative_table(results).splitlines()
    grpo_cells, cells = lines[3].split(" | "), lines[2].split(" | ")
    assert cells[0] == "| oisd" and grpo_cells[0] == "| grpo"
    diff = np.array(oisd) - np.array(grpo)  # 0.4, 0.3, 0.7
    half = 4.303 * diff.std(ddof=1) / np.sqrt(3)  # t_0.975 with 2 degrees of freedom
    assert cells[12] == f"{diff.mean():+.2f} [{diff.mean() - half:+.2f}, {diff.mean() + half:+.2f}] (3)"
    assert cells[13].startswith("+31.0 [")  # acceptance over all k: 30, 31, 32 points
    assert cells[3] == "4" and cells[10] == f"{np.mean(oisd + [9.0]):.2f}x ± {np.std(oisd + [9.0], ddof=1):.2f}"
    assert grpo_cells[12] == "" and grpo_cells[10] == f"{np.mean(grpo):.2f}x ± {np.std(grpo, ddof=1):.2f}"
    one = experiments.speculative_table([row(0, "grpo", 1.1, 0.5)]).splitlines()[2].split(" | ")
    assert one[10] == "1.10x"  # one seed: no spread to show, and no "nan"



def test_pass_costs_prices_every_piece_and_survives_json():
    model = disagreeing_model(1)
    idx = torch.randint(0, 13, (1, 5), generator=torch.Generator().manual_seed(0))
    costs = experiments.pass_costs(types.SimpleNamespace(device="cpu"), model, idx, 2, 3, repeats=3)
    assert sorted(costs) == ["draft", "full", "prefill", "verify"] and len(costs["verify"]) == 3 + 1
    assert all(t > 0 for t in [costs["prefill"], costs["full"], costs["draft"], *costs["verify"]])
    assert json.loads(json.dumps(costs)) == costs



def test_greedy_decode_matches_the_sampler_at_temperature_0():
    model = disagreeing_model(1)
    for seed in range(4):
        idx = torch.randint(0, 13, (1, 5), generator=torch.Generator().manual_seed(seed))
        full, _ = model.generate(idx, 9, temperature=0)
        eos = int(full[0, 5 + 3])  # the 4th new token: an EOS the model does emit
        for max_new, eos in [(9, None), (9, eos), (1, eos)]:
            plain, _ = model.generate(idx, max_new, temperature=0, eos_id=eos)
            assert torch.equal(experiments.greedy_decode(model, idx, max_new, eos), plain)
        assert experiments.greedy_decode(model, idx, 9, eos).size(1) <= 5 + 4  # stopped at that EOS



def test_measure_cache_is_tied_to_the_model_it_measured(tmp_path, capsys):
    grid = [f"--out_dir={tmp_path}", "--arms=grpo", "--digits=2", "--sft_max_steps=4", "--sft_eval_every=2",
            "--eval_size=8", "--eval_every=2", "--prompts_per_step=4", "--group_size=4", "--n_layer=2",
            "--align_layers=1", "--probe_steps=2", "--avg_k=2", "--probe_batches=1"]
    experiments.main(grid + ["--rl_steps=2"])
    assert "measured grpo" in capsys.readouterr().out
    experiments.main(grid + ["--rl_steps=2", "--resume"])
    assert "measured grpo" not in capsys.readouterr().out  # the same model: the cache is reused
    experiments.main(grid + ["--rl_steps=4", "--resume"])
    assert "measured grpo" in capsys.readouterr().out  # the model changed: measured again



def test_speculative_measurements_are_cached_per_seed_and_collected(tmp_path, capsys, monkeypatch):
    grid = [f"--out_dir={tmp_path}", "--arms=grpo", "--digits=2", "--sft_max_steps=4", "--sft_eval_every=2",
            "--eval_size=8", "--eval_every=2", "--prompts_per_step=4", "--group_size=4", "--n_layer=2",
            "--align_layers=1", "--probe_steps=2", "--avg_k=2", "--probe_batches=1", "--rl_steps=2"]
    spec = ["--speculative", "--spec_problems=2", "--spec_max_draft=1", "--spec_layers=1"]
    experiments.main(grid + ["--seeds=0,1"])
    experiments.main(grid + spec + ["--seeds=0"])
    measure, measured = experiments.measure_drafter, []  # seed 1's measurements, in memory
    monkeypatch.setattr(experiments, "measure_drafter", lambda *a: measured.append(measure(*a)) or measured[-1])
    experiments.main(grid + spec + ["--seeds=1"])
    monkeypatch.undo()
    measured = [dict(arm="grpo", drafter=d, **m) for d, m in zip(("as trained", "probe"), measured)]
    assert isinstance(measured[0]["costs"]["verify"], list) and isinstance(measured[0]["by_k"], list)
    capsys.readouterr()
    real, timed = speculative_generate, set()
    monkeypatch.setattr(experiments, "speculative_generate", lambda *a, **k: pytest.fail("re-timed"))
    experiments.main(grid + spec + ["--seeds=0,1"])  # both seeds from their caches, one table
    out = capsys.readouterr().out
    assert "| grpo | as trained | L1 | 2 |" in out and "| grpo | probe | L1 | 2 |" in out
    saved = json.load(open(tmp_path / "speculative.json"))
    assert sorted((r["seed"], r["drafter"]) for r in saved) == [(0, "as trained"), (0, "probe"), (1, "as trained"), (1, "probe")]
    assert [(r["seed"], r["drafter"]) for r in saved[-2:]] == [(1, "as trained"), (1, "probe")]
    assert [{k: v for k, v in r.items() if k != "seed"} for r in saved[-2:]] == measured  # as measured, after JSON
    # any setting the measurement depends on re-times it
    def recording(model, idx, max_new, layer, k, **kw):
        timed.add((max_new, layer, k))
        return real(model, idx, max_new, layer, k, **kw)
    monkeypatch.setattr(experiments, "speculative_generate", recording)
    experiments.main(grid + spec + ["--seeds=0", "--max_new_tokens=5"])
    assert timed == {(5, 1, 1)}, timed  # (max_new, exit, k): the new max_new re-timed
    experiments.main(grid + spec[:2] + ["--spec_max_draft=2", "--spec_layers=1", "--seeds=0", "--max_new_tokens=5"])
    assert timed == {(5, 1, 1), (5, 1, 2)}, timed  # only spec_max_draft changed: re-timed too
    for corrupt in ("{not json", "[1, 2]"):
        (tmp_path / "seed0" / "spec-grpo.json").write_text(corrupt)
        with pytest.raises(SystemExit) as e:
            experiments.main(grid + spec + ["--seeds=0"])
        assert e.value.code == 2 and "delete it" in capsys.readouterr().err



def test_speculative_refuses_an_unfinished_arm(tmp_path):
    """--speculative measures trained arms only: a checkpoint that stopped before rl_steps exits 2, one line."""
    grid = [f"--out_dir={tmp_path}", "--arms=grpo", "--digits=2", "--sft_max_steps=4", "--sft_eval_every=2",
            "--eval_size=8", "--eval_every=2", "--prompts_per_step=4", "--group_size=4", "--n_layer=2",
            "--align_layers=1", "--probe_steps=2", "--avg_k=2", "--probe_batches=1", "--seeds=0"]
    experiments.main(grid + ["--rl_steps=2"])
    with pytest.raises(SystemExit) as e:
        experiments.main(grid + ["--rl_steps=4", "--speculative", "--spec_problems=2", "--spec_max_draft=1"])
    assert e.value.code == 2



def test_skip_missed_gives_a_missed_warmup_no_rl_and_reports_it(tmp_path, capsys, monkeypatch):
    """--skip_missed: a seed whose warm-up misses sft_target_acc spends no RL step, is listed in summary.md
    and summary.json, and is left out of every table; the other seeds are summarised as usual."""
    grid = [f"--out_dir={tmp_path}", "--arms=grpo", "--digits=2", "--sft_max_steps=4", "--sft_eval_every=2",
            "--eval_size=8", "--eval_every=2", "--prompts_per_step=4", "--group_size=4", "--n_layer=2",
            "--align_layers=1", "--probe_steps=2", "--avg_k=2", "--probe_batches=1", "--rl_steps=2", "--skip_missed"]
    experiments.main(grid + ["--seeds=0,1", "--sft_target_acc=1.0"])  # 4 warm-up steps cannot reach 100%
    out = capsys.readouterr().out
    assert "seed 0: warm-up missed" in out and "nothing to summarise" in out
    assert not list(tmp_path.glob("seed*/grpo.pt"))  # no RL step was taken
    monkeypatch.setattr(experiments, "warmup_val_acc", lambda env: 0.25 if env.cfg.seed == 1 else 0.75)
    experiments.main(grid + ["--seeds=0,1"])  # seed 1 missed, seed 0 reached the target
    saved = json.load(open(tmp_path / "summary.json"))
    assert saved["missed"] == {"1": 0.25} and list(saved["per_seed"]) == ["0"]
    assert (tmp_path / "seed0" / "grpo.pt").exists() and not (tmp_path / "seed1" / "grpo.pt").exists()
    assert saved["per_seed"]["0"]["warm-up start"]["warmup_val_acc"] == 0.75
    assert "Seeds whose warm-up missed, with no RL: 1 (25.0%)" in (tmp_path / "summary.md").read_text()
    monkeypatch.undo()
    with pytest.raises(SystemExit) as e:  # seed 0's warm-up exists for other settings: never made a second time
        experiments.main(grid + ["--seeds=0", "--sft_lr=0.002"])
    assert e.value.code == 2 and "never makes a seed's warm-up twice" in capsys.readouterr().err



def test_t_pvalue_matches_the_integrated_density():
    """Two-sided Student-t p-values against a numerical integral of the t density, and the 95% quantiles."""
    for df in (1, 2, 4, 9, 30):
        for t in (0.3, 1.0, 2.5, 6.0):
            x = np.linspace(abs(t), abs(t) + 4000, 4_000_001)
            log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
            density = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
            tail = np.trapezoid(density, x) + density[-1] * x[-1] / df  # the power-law tail beyond the grid, roughly
            assert experiments.t_pvalue(t, df) == pytest.approx(2 * tail, rel=2e-3, abs=1e-6), (t, df)
    for df, q in ((4, 2.776445), (9, 2.262157), (29, 2.045230)):
        assert experiments.t_pvalue(q, df) == pytest.approx(0.05, abs=1e-6)
    assert experiments.t_pvalue(0.0, 5) == 1.0



def test_wilcoxon_pvalue_against_a_slow_enumeration_and_known_values():
    def slow(diff):  # every sign pattern, ranks by counting, ties averaged
        d = [x for x in diff if x != 0]
        rank = [sum(abs(y) < abs(x) for y in d) + (sum(abs(y) == abs(x) for y in d) + 1) / 2 for x in d]
        observed = abs(sum(r for r, x in zip(rank, d) if x > 0) - len(d) * (len(d) + 1) / 4)
        hits = sum(abs(sum(r for r, s in zip(rank, signs) if s) - len(d) * (len(d) + 1) / 4) >= observed - 1e-9
                   for signs in itertools.product((0, 1), repeat=len(d)))
        return hits / 2 ** len(d)
    rng = np.random.default_rng(0)
    for n in (1, 3, 6, 9):
        diff = np.round(rng.normal(size=n), 1)  # rounding makes ties
        assert experiments.wilcoxon_pvalue(diff) == pytest.approx(slow(diff))
    assert experiments.wilcoxon_pvalue([13.6, 13.6, 24.0, -0.8, 23.4]) == pytest.approx(0.125)  # 4 of 32 patterns
    assert experiments.wilcoxon_pvalue(np.ones(5)) == pytest.approx(2 / 32)
    assert experiments.wilcoxon_pvalue([0.0, 0.0, 2.0, -2.0]) == pytest.approx(1.0)  # zeros dropped, tie averaged
    # differences of accuracies k/500 in points: equal counts must tie although their floats differ
    a, b = np.array([0.864, 0.81, 0.5, 0.7]), np.array([0.728, 0.674, 0.52, 0.66])
    diff = 100 * a - 100 * b
    assert diff[0] != diff[1] and experiments.wilcoxon_pvalue(diff) == pytest.approx(slow([13.6, 13.6, -2.0, 4.0]))



def test_step_test_reads_a_grid_and_tests_each_arm_against_grpo(tmp_path, capsys, monkeypatch):
    """--step_test on a hand-made chain summary: per-seed changes, the paired test, the collapse counts."""
    monkeypatch.setattr(experiments, "unfaithful_example", lambda cfg, c, path, seed, rows: [f"seed {seed}"])
    start, grpo, oisd = [90, 88, 92, 85], [60, 86, 70, 84], [85, 80, 91, 83]
    per_seed = {str(s): {row: {"step_acc": v[i] / 100, "acc_L4": 0.5 + 0.01 * i, "avgk": 0.4}
                         for row, v in (("warm-up start", start), ("grpo", grpo), ("oisd", oisd))} for i, s in enumerate(range(4))}
    for rows in per_seed.values():
        rows["warm-up start"]["warmup_val_acc"] = 0.5
    cfg = dataclasses.asdict(experiments.ExpConfig(task="chain", digits=3, skip_missed=True))
    (tmp_path / "g").mkdir()

    def write(per_seed, **changes):
        (tmp_path / "g" / "summary.json").write_text(
            json.dumps({"config": dict(cfg, **changes), "per_seed": per_seed, "missed": {"7": 0.1}}))

    def refused(per_seed, **changes):
        write(per_seed, **changes)
        with pytest.raises(SystemExit) as e:
            experiments.main([f"--step_test={tmp_path / 'g'}", f"--out_dir={tmp_path}"])
        err = capsys.readouterr().err
        return e.value.code == 2 and err.count("\n") == 1

    assert refused({"0": per_seed["0"]})  # one seed: no test
    assert refused(per_seed, skip_missed=False)  # collected without the miss rule
    assert refused(dict(per_seed, **{"1": {"warm-up start": dict(per_seed["1"]["warm-up start"], warmup_val_acc=0.4),
                                           "grpo": per_seed["1"]["grpo"], "oisd": per_seed["1"]["oisd"]}}))
    assert refused(dict(per_seed, **{"1": {"warm-up start": per_seed["1"]["warm-up start"], "oisd": per_seed["1"]["oisd"]}}))
    write(per_seed)
    experiments.main([f"--step_test={tmp_path / 'g'}", f"--out_dir={tmp_path}"])
    r = json.load(open(tmp_path / "step_test.json"))[str(tmp_path / "g")]
    diff = np.array(oisd, float) - np.array(grpo, float)
    assert r["arms"]["oisd"]["step"]["mean"] == pytest.approx(diff.mean())
    sd = diff.std(ddof=1)
    assert r["arms"]["oisd"]["step"]["t"] == pytest.approx(diff.mean() / (sd / 2))
    assert r["arms"]["oisd"]["collapse"] == {"only_grpo": 2, "only_arm": 0, "sign_p": 0.5}  # seeds 0 and 2 lose > 10 under grpo
    assert r["missed"] == {"7": 0.1} and r["arms"]["oisd"]["greedy"]["mean"] == pytest.approx(0.0)
    text = (tmp_path / "step_test.md").read_text()
    assert "Missed warm-ups (no RL): 7 (10.0%)" in text and "seed 0 (grpo's largest loss" in text
    assert f"arms {cfg['arms']}, {cfg['rl_steps']} RL steps" in text and f"seeds run: {cfg['seeds']}." in text  # for audit
    for rows in per_seed.values():  # both arms collapse on the same seeds: no discordant seed, no sign test
        rows["oisd"] = dict(rows["grpo"])
    write(per_seed)
    experiments.main([f"--step_test={tmp_path / 'g'}", f"--out_dir={tmp_path}"])
    r = json.load(open(tmp_path / "step_test.json"))[str(tmp_path / "g")]
    assert r["arms"]["oisd"]["collapse"] == {"only_grpo": 0, "only_arm": 0, "sign_p": None}
    assert "the sign test has nothing to test" in (tmp_path / "step_test.md").read_text()



def test_step_test_runs_on_a_real_chain_grid(tmp_path, capsys, monkeypatch):
    """A tiny chain grid, then --step_test on it: the example is read from the grid's own checkpoints; with
    a thread count that has no warm-up cache the test is still written, with a note instead of the example."""
    real = experiments.warmup_val_acc
    monkeypatch.setattr(experiments, "warmup_val_acc", lambda env: max(real(env), 0.5))  # 6 steps reach nothing
    grid = [f"--out_dir={tmp_path}", "--arms=grpo,oisd:1", "--task=chain", "--digits=2", "--terms=3", "--sft_max_steps=6",
            "--sft_eval_every=3", "--eval_size=8", "--eval_every=2", "--prompts_per_step=4", "--group_size=4",
            "--n_layer=2", "--align_layers=1", "--probe_steps=2", "--avg_k=2", "--probe_batches=1", "--rl_steps=2",
            "--seeds=0,1", "--skip_missed"]
    experiments.main(grid)
    capsys.readouterr()
    experiments.main([f"--step_test={tmp_path}", f"--out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert "oisd:1 - grpo, step accuracy** (n = 2)" in out and "right answers carry a wrong running sum" in out
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        experiments.main([f"--step_test={tmp_path}", f"--out_dir={tmp_path}"])
        out = capsys.readouterr().out
        assert "(no example: no warm-up of seed" in out and "p = " in out
        experiments.main([f"--report={tmp_path}", f"--out_dir={tmp_path}"])  # RESULTS.md carries the test
        report = (tmp_path / "RESULTS.md").read_text()
        assert "The step-accuracy test (--step_test):" in report and "| 2 (0,1) | oisd:1 |" in report
    finally:
        torch.set_num_threads(threads)



def test_research_imports_the_core_one_way_and_help_lists_its_flags(capsys):
    """research -> oisd -> harness, model, tasks: speculative needs only the model, nothing imports research."""
    tree = ast.parse(open(os.path.join(ROOT, "research", "speculative.py")).read())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "model" in modules and not {"oisd", "harness", "experiments"} & modules
    groups = [title for title, _ in harness.field_groups(experiments.ExpConfig)]
    with pytest.raises(SystemExit) as e:
        experiments.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(experiments.ExpConfig):
        assert any(line.strip().startswith(f"--{f.name} ") for line in out.splitlines()), f.name
    assert groups[0] == "run" and groups[-1] == "experiments"


def test_report_headline_gives_the_wilcoxon_p_of_the_paired_differences(tmp_path, capsys):
    """--report's headline: beside each paired interval, the exact Wilcoxon p of the same per-seed
    differences (here 4 seeds all above grpo: p = 2/16 two-sided, the smallest 4 pairs allow)."""
    cfg = dataclasses.asdict(experiments.ExpConfig())
    per_seed = {str(s): {"grpo": {"acc_L4": 0.5, "avgk": 0.4}, "oisd": {"acc_L4": 0.5 + 0.01 * (s + 1), "avgk": 0.4}}
                for s in range(4)}
    summary = experiments.summarize(per_seed, 4)
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "summary.json").write_text(json.dumps({"config": cfg, "per_seed": per_seed, "summary": summary}))
    (tmp_path / "g" / "summary.md").write_text("tables\n")
    experiments.main([f"--report={tmp_path / 'g'}", f"--out_dir={tmp_path}"])
    capsys.readouterr()
    (row,) = [line for line in (tmp_path / "RESULTS.md").read_text().splitlines() if "| oisd |" in line]
    cells = [c.strip() for c in row.split("|")]
    assert cells[6] == "0.125" and cells[9] == "1.000", row  # greedy: 4 of 4 above; Avg@K: no difference
