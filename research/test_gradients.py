"""
Tests of research/gradients.py (where OISD's gradient goes), each against an independent computation, on a
tiny model on the CPU.

    python -m pytest -q research/test_gradients.py
"""

import json
import math
import os
import random
import shutil
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the core: oisd, model, tasks, harness
import experiments  # noqa: E402
import gradients  # noqa: E402
import oisd  # noqa: E402
from model import GPT  # noqa: E402
from tasks import sample_problems  # noqa: E402
from test_oisd import tiny_env  # noqa: E402  (the core tests' small run environment)


def tiny_batch(arm, **overrides):
    """A tiny model with the arm's config (3 layers, layer 1 aligned) and one batch of its rollouts with
    random advantages (a fresh model earns no reward, so group advantages would all be 0)."""
    env = tiny_env(**overrides)
    cfg = oisd.arm_config(env.cfg, arm)
    torch.manual_seed(0)
    model = GPT(env.model_config(cfg))
    problems = sample_problems(env.task, random.Random(0), cfg.prompts_per_step, env.exclude)
    seq, old_logp, rewards = oisd.rollout(env, cfg, model, problems, torch.Generator().manual_seed(0))
    advantages = torch.randn(seq.size(0), generator=torch.Generator().manual_seed(1))
    batch = dict(seq=seq, old_logp=old_logp, rewards=rewards, advantages=advantages, P=env.prompt_len,
                 mask=oisd.response_mask(seq[:, env.prompt_len:], env.eos_id))
    return cfg, model, batch


@pytest.mark.parametrize("arm,reduction", [("oisd", "token"), ("oisd_lens", "sequence"), ("oisd_none", "token")])
def test_rollout_contributions_sum_to_the_batch_gradient(arm, reduction):
    """sum_i c_i over every rollout equals the gradient of the batch's own term (one batched rl_loss and a
    plain backward), for the alignment term and for GRPO's, under both reductions and weightings."""
    cfg, model, batch = tiny_batch(arm, loss_reduction=reduction)
    N = batch["seq"].size(0)
    params = [p for p in model.parameters() if p.requires_grad]
    _, terms = oisd.rl_loss(cfg, model, batch["seq"], batch["P"], batch["old_logp"], batch["advantages"], batch["mask"])
    align = cfg.lambda_logit * terms["logit"] + cfg.lambda_attn * terms["attn"]
    c = gradients.rollout_gradients(cfg, model, batch, range(N))
    for name, loss in (("align", align), ("grpo", terms["grpo"])):
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)  # the batch's own gradient, by plain backward
        whole = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params])
        assert c[name].shape == (N, whole.numel())
        assert whole.norm() > 0
        # to float rounding (the JSD of nearly equal distributions loses digits); a token miscounted would be ~1e-2
        assert (c[name].sum(0) - whole).norm() < 1e-4 * whole.norm(), name


def test_cancellation_ratio_is_one_for_equal_vectors_and_zero_for_opposite_ones():
    v = torch.randn(7)
    assert gradients.cancellation_ratio(v.repeat(5, 1)) == pytest.approx(1.0)
    assert gradients.cancellation_ratio(torch.stack([v, -v])) == pytest.approx(0.0, abs=1e-12)
    assert gradients.cancellation_ratio(torch.stack([v, 3 * v, -v])) == pytest.approx(3 / 5)  # ||3v|| / (5 ||v||)
    assert math.isnan(gradients.cancellation_ratio(torch.zeros(3, 7)))
    groups, whole = gradients.cancellations(torch.stack([v, v, v, -v, 0 * v, 0 * v]), 2)
    assert groups == pytest.approx([1.0, 0.0]) and whole == pytest.approx(2 / 4)  # the all-zero group is left out


@pytest.mark.parametrize("exit_norm", ["own", "ln_f", "ln_f_frozen"])
def test_alignment_gradient_shares(exit_norm):
    """Shares sum to 1; the term never reaches the blocks above the aligned layer; it reaches ln_f only
    through the lens, and neither ln_f nor an exit norm when the lens is detached."""
    cfg, model, batch = tiny_batch("oisd", exit_norm=exit_norm)
    named = gradients.trainable(model)
    assert {gradients.param_group(n, 1) for n, _ in named} >= {"ln_f", "blocks_1..l", "blocks_above", "wte", "wpe"}
    share = gradients.shares(gradients.group_sqnorms(named, gradients.term_gradients(cfg, model, batch)["align"], 1))
    assert sum(share.values()) == pytest.approx(1.0)
    assert share["blocks_above"] == 0.0 and share["blocks_1..l"] > 0 and share["wte"] > 0 and share["wpe"] > 0
    if exit_norm == "own":
        assert share["ln_f"] == 0.0 and share["exit_norms"] > 0
    elif exit_norm == "ln_f":
        assert share["ln_f"] > 0 and share["exit_norms"] == 0.0
    else:
        assert share["ln_f"] == 0.0 and share["exit_norms"] == 0.0


def test_adam_update_matches_a_real_adamw_step_with_its_first_moment_zeroed():
    """After a few real steps, one more with beta1 = 0 (the first moment is that step's gradient alone) and no
    weight decay moves the parameter by exactly adam_update computed from the state after it; and that is
    lr * g / (sqrt(v_hat) + eps) computed by hand from the state before it."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6))
    opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(3):
        p.grad = torch.randn(6)
        opt.step()
    g = torch.randn(6)
    v, t = opt.state[p]["exp_avg_sq"].clone(), float(opt.state[p]["step"]) + 1
    hand = 1e-2 * g / (((0.99 * v + 0.01 * g**2) / (1 - 0.99**t)).sqrt() + 1e-6)
    opt.param_groups[0].update(betas=(0.0, 0.99), weight_decay=0.0)
    before, p.grad = p.detach().clone(), g.clone()
    opt.step()
    ours = gradients.adam_update(opt, p, g)
    assert torch.allclose(ours, before - p.detach(), rtol=1e-4, atol=1e-6)  # a float32 difference of O(1) weights
    assert torch.allclose(ours, hand, rtol=1e-5)


def test_jsd_adv_correlations_demean_within_groups_and_skip_uniform_groups():
    """Two informative groups whose JSD differs by a large offset: demeaned, the JSD follows the advantage
    exactly; pooled, the offset hides it. The uniform group is left out."""
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.0])
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])
    jsd = torch.tensor([0.2, 0.1, 10.2, 10.1, 99.0, -99.0])
    out = gradients.jsd_adv_correlations(jsd, adv, rewards, 2)
    assert out["corr_within"] == pytest.approx(1.0) and out["corr_n"] == 4
    assert abs(out["corr_pooled"]) < 0.1


GRID = ["--seeds=0", "--digits=2", "--n_layer=2", "--align_layers=1", "--sft_max_steps=4", "--sft_eval_every=2",
        "--rl_steps=2", "--eval_size=16", "--eval_every=2", "--prompts_per_step=4", "--group_size=4", "--n_embd=16",
        "--n_head=2", "--probe_steps=2", "--avg_k=2", "--probe_batches=1"]


def test_end_to_end_on_a_tiny_grid_and_refusals(tmp_path, capsys, monkeypatch):
    grid = [f"--out_dir={tmp_path}", *GRID]
    experiments.main(grid + ["--arms=grpo,oisd_lens"])
    # a tiny warm-up earns no reward, so every advantage would be 0: give each group one right rollout in four
    real = gradients.rollout
    monkeypatch.setattr(gradients, "rollout", lambda *a: (*(out := real(*a))[:2], (torch.arange(out[0].size(0)) % 4 == 0).float()))
    capsys.readouterr()
    gradients.main(grid + ["--arms=grpo,oisd_lens", "--diag_batches=1", "--diag_groups=2"])
    out = capsys.readouterr().out
    assert "seed 0 grpo: start and end measured in" in out and "## 5. AdamW update" in out
    saved = json.load(open(tmp_path / "gradients.json"))
    assert set(saved["per_seed"]) == {"0"} and set(saved["per_seed"]["0"]) == {"grpo", "oisd_lens"}
    for arm, points in saved["per_seed"]["0"].items():
        assert set(points) == {"start", "end"}
        for point, m in points.items():
            assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in m.values()), (arm, point, m)
            assert m["cancel_rollouts"] == 8 and "corr_within" in m and "cancel_grpo_group" in m
            assert ("update_grpo_wte" in m and "drift_ln_f_bias" in m) == (point == "end")
    lens = saved["per_seed"]["0"]["oisd_lens"]
    assert sum(lens["start"][f"share_{g}"] for g in gradients.GROUPS) == pytest.approx(1.0)
    assert lens["end"]["share_blocks_above"] == 0.0 and "share_ln_f" not in saved["per_seed"]["0"]["grpo"]["end"]
    assert lens["end"]["ratio_logit_ln_f"] > 0 and lens["end"]["ratio_attn_blocks_above"] == 0.0
    assert (tmp_path / "gradients.md").read_text().startswith("# Where the gradient goes")
    for bad in (["--arms=grpo,oisd"], ["--arms=grpo", "--rl_steps=4"]):  # no oisd.pt; grpo.pt is at step 2, not 4
        with pytest.raises(SystemExit) as e:
            gradients.main(grid + bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err


def test_merge_of_per_seed_runs_reads_as_one_run_over_every_seed(tmp_path, capsys):
    """Two one-seed runs kept as seed<S>/gradients.json merge into the tables of both seeds: each cell the
    mean of the two; other settings, one seed twice, a seed both measured and missed, a setting the script
    lacks, or a file that is not its gradients.json are refused with one line."""
    grid = [f"--out_dir={tmp_path}", *GRID, "--rl_steps=1", "--eval_every=1", "--probe_steps=1"]
    experiments.main(grid + ["--arms=grpo,oisd_lens"])
    gradients.main(grid + ["--arms=grpo,oisd_lens", "--diag_batches=1", "--diag_groups=2"])
    one = json.load(open(tmp_path / "gradients.json"))
    two = json.loads(json.dumps(one).replace('"0": {"grpo"', '"1": {"grpo"'))  # the same numbers as seed 1 ...
    two["per_seed"]["1"]["oisd_lens"]["end"]["drift_ln_f_bias"] += 0.5  # ... but one
    two["config"]["seeds"] = "1"
    for seed, saved in (("0", one), ("1", two)):
        (tmp_path / "kept" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "kept" / f"seed{seed}" / "gradients.json").write_text(json.dumps(saved))
    capsys.readouterr()
    gradients.main([f"--merge={tmp_path / 'kept'}"])
    merged = json.load(open(tmp_path / "kept" / "gradients.json"))
    assert list(merged["per_seed"]) == ["0", "1"] and merged["config"]["seeds"] == "0,1"
    drift = one["per_seed"]["0"]["oisd_lens"]["end"]["drift_ln_f_bias"]
    row = [line for line in (tmp_path / "kept" / "gradients.md").read_text().splitlines() if line.startswith("| oisd_lens | 2 |")]
    assert row and row[0].endswith(f"| {drift + 0.25:.4g} |"), row
    two["config"]["diag_batches"] = 2
    (tmp_path / "kept" / "seed2").mkdir()
    (tmp_path / "kept" / "seed2" / "gradients.json").write_text(json.dumps(dict(two, per_seed={"2": two["per_seed"]["1"]})))
    with pytest.raises(SystemExit) as e:
        gradients.main([f"--merge={tmp_path / 'kept'}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "other settings" in err and err.count("\n") == 1, err
    shutil.rmtree(tmp_path / "kept" / "seed2")
    two = json.loads((tmp_path / "kept" / "seed1" / "gradients.json").read_text())  # as kept, with seed 0's settings
    both = json.loads(json.dumps(two))
    both["missed"] = {"1": 0.2}  # seed 1 measured and missed at once
    unknown = dict(two, config=dict(two["config"], no_such_setting=1))
    for folder, saved, message in (("seed3", two, "measured seeds ['1'] (valid and missed), not its folder's 3"),
                                   ("seedx", one, "named seed<integer>, not 'seedx'"),
                                   ("seed01", two, "seed 1 is in two folders"),  # seed01 and seed1: one seed twice
                                   ("seed1", both, "not its folder's 1 alone"),
                                   ("seed1", unknown, "settings this script lacks (no_such_setting)"),
                                   ("seed1", "{not json", "is not this script's gradients.json (JSONDecodeError)"),
                                   ("seed1", dict(two, missed=None), "(TypeError)")):
        if folder == "seed1":
            shutil.rmtree(tmp_path / "kept" / "seed1")
        (tmp_path / "kept" / folder).mkdir()
        (tmp_path / "kept" / folder / "gradients.json").write_text(saved if isinstance(saved, str) else json.dumps(saved))
        with pytest.raises(SystemExit) as e:
            gradients.main([f"--merge={tmp_path / 'kept'}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, (message, err)
        shutil.rmtree(tmp_path / "kept" / folder)
        if folder == "seed1":
            (tmp_path / "kept" / "seed1").mkdir()
            (tmp_path / "kept" / "seed1" / "gradients.json").write_text(json.dumps(two))
