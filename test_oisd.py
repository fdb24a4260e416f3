"""
Fast CPU tests; each checks the code against an independent computation (numpy, autograd, a slow loop).

    python -m pytest -q
"""

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import experiments
import oisd
from model import GPT, GPTConfig, KVCache
from oisd import (Config, alignment_weights, attention_alignment_loss, group_advantages, grpo_loss,
                  js_divergence, logit_alignment_loss, masked_mean, response_mask, rl_loss, safe_log,
                  token_logprobs)
from tasks import EOS, get_tokenizer, heldout_split, make_task, sample_problems

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny_model(exit_norm="own", seed=0, n_layer=3):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=15, block_size=16, n_layer=n_layer, n_head=2, n_embd=16, exit_norm=exit_norm))
    with torch.no_grad():  # perturb the norms so exit heads and ln_f differ from the identity
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


# ---------------------------------------------------------------- js_divergence

def numpy_jsd(p, q):
    m = (p + q) / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        kl_pm = np.where(p > 0, p * np.log(p / m), 0.0).sum(-1)
        kl_qm = np.where(q > 0, q * np.log(q / m), 0.0).sum(-1)
    return 0.5 * kl_pm + 0.5 * kl_qm


def test_js_divergence_matches_numpy_with_zero_entries():
    rng = np.random.default_rng(0)
    p, q = rng.random((6, 5)), rng.random((6, 5))
    p[0, :2] = 0.0   # zero probability on one side only
    q[1, 3] = 0.0
    p[2, 4] = q[2, 4] = 0.0  # on both sides (a masked key)
    p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        logp, logq = torch.tensor(np.log(p)), torch.tensor(np.log(q))  # -inf where zero
    got = js_divergence(logp, logq)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), numpy_jsd(p, q), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(js_divergence(logq, logp).numpy(), got.numpy(), atol=1e-12)  # symmetric


def test_js_divergence_bounds_and_gradient():
    logp = F.log_softmax(torch.randn(4, 7), -1)
    assert js_divergence(logp, logp).abs().max() < 1e-6
    disjoint_p = torch.tensor([[0.0, float("-inf")]])
    disjoint_q = torch.tensor([[float("-inf"), 0.0]])
    assert math.isclose(js_divergence(disjoint_p, disjoint_q).item(), math.log(2), rel_tol=1e-6)
    assert (js_divergence(F.log_softmax(5 * torch.randn(100, 7), -1), logp.repeat(25, 1)) <= math.log(2) + 1e-6).all()
    x = torch.randn(3, 5, requires_grad=True)
    masked = x.masked_fill(torch.tensor([False, False, True, True, False]), float("-inf"))
    js_divergence(F.log_softmax(masked, -1), F.log_softmax(torch.randn(3, 5).masked_fill(
        torch.tensor([False, True, True, False, False]), float("-inf")), -1)).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_safe_log_gradient_is_finite_at_zero():
    p = torch.tensor([0.0, 0.25, 0.75], requires_grad=True)
    out = safe_log(p)
    assert out[0] == float("-inf")
    js_divergence(out, torch.tensor([0.5, 0.25, 0.25]).log()).backward()
    assert torch.isfinite(p.grad).all()


# ---------------------------------------------------------------- advantages and GRPO

def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(r, 4)
    assert torch.equal(adv[4:8], torch.zeros(4))  # all-equal group: exactly zero, no NaN
    assert torch.isfinite(adv).all()
    groups = r.numpy().reshape(-1, 4)
    expect = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    expect[1] = 0.0
    np.testing.assert_allclose(adv.numpy(), expect.reshape(-1), rtol=1e-6)
    assert adv.view(-1, 4).sum(1).abs().max() < 1e-5  # zero mean per group
    unscaled = group_advantages(r, 4, scale=False)
    np.testing.assert_allclose(unscaled.numpy(), (groups - groups.mean(1, keepdims=True)).reshape(-1), atol=1e-7)
    assert torch.equal(group_advantages(torch.full((8,), 0.3), 4, scale=True), torch.zeros(8))


def test_signed_weights_cancel_within_each_group():
    """Signed weights sum to zero in every group (a candidate reason why they train the exit so little)."""
    rewards = (torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    adv = group_advantages(rewards, 8)
    signed = alignment_weights(adv, "signed").view(8, 8).sum(1)
    positive = alignment_weights(adv, "positive").view(8, 8).sum(1)
    assert signed.abs().max() < 1e-5
    informative = rewards.view(8, 8).std(1) > 0
    assert (positive[informative] > 0.5).all() and (positive[~informative] == 0).all()


def test_alignment_weights():
    a = torch.tensor([-1.5, 0.0, 2.0])
    assert torch.equal(alignment_weights(a, "signed"), a)
    assert torch.equal(alignment_weights(a, "positive"), torch.tensor([0.0, 0.0, 2.0]))
    assert torch.equal(alignment_weights(a, "abs"), torch.tensor([1.5, 0.0, 2.0]))
    assert torch.equal(alignment_weights(a, "none"), torch.ones(3))


def test_response_mask_includes_first_eos_and_nothing_after():
    eos = 13
    completion = torch.tensor([[1, 2, eos, eos, eos], [3, eos, 4, eos, eos], [1, 2, 3, 4, 5], [eos, eos, eos, eos, eos]])
    expect = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    assert torch.equal(response_mask(completion, eos), expect)


def test_masked_mean_reductions():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert masked_mean(v, m, "token").item() == pytest.approx((1 + 2 + 4) / 3)
    assert masked_mean(v, m, "sequence").item() == pytest.approx((1.5 + 4) / 2)


def test_grpo_loss_clipping_and_kl():
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1)
    old = torch.zeros(2, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(0.5)]], requires_grad=True)  # ratios 1.5 and 0.5: both clipped
    loss = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.2 * 1.0 + 0.8 * -1.0) / 2)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros(2, 1))  # outside the trust region: no gradient
    logp = torch.tensor([[-0.3], [-0.7]])
    ref = torch.tensor([[-0.5], [-0.2]])
    with_kl = grpo_loss(logp, logp, adv, mask, ref_logp=ref, kl_beta=0.1)
    k3 = (torch.exp(ref - logp) - (ref - logp) - 1).mean()
    assert with_kl.item() == pytest.approx(grpo_loss(logp, logp, adv, mask).item() + 0.1 * k3.item(), rel=1e-5)


def test_rl_loss_matches_a_slow_per_prefix_loop():
    """The vectorised GRPO loss (one forward, masks by position) against a loop that runs the model on
    every prefix separately and counts only the response tokens up to and including the first EOS."""
    model, eos, P, temp = tiny_model(), 13, 4, 0.7
    seq = torch.tensor([[1, 2, 10, 3, 5, eos, eos, eos],   # two rollouts of prompt 1 2 10 3
                        [1, 2, 10, 3, 6, 7, 8, 9],         # truncated: no EOS
                        [0, 9, 10, 9, eos, eos, eos, eos],  # two rollouts of prompt 0 9 10 9
                        [0, 9, 10, 9, 4, 4, eos, eos]])
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0])
    cfg = Config(lambda_logit=0.0, lambda_attn=0.0, temperature=temp, n_layer=3, group_size=2)
    completion = seq[:, P:]
    mask = response_mask(completion, eos)
    with torch.no_grad():
        logits = model(seq[:, :-1])[0][:, P - 1:]
    old = token_logprobs(logits, completion, temp) - 0.05  # so the ratio is not exactly 1
    total, terms = rl_loss(cfg, model, seq, P, old, adv, mask)
    num, den = 0.0, 0
    for i in range(seq.size(0)):
        for j in range(completion.size(1)):
            with torch.no_grad():
                last = model(seq[i: i + 1, : P + j])[0][0, -1]
            logp = F.log_softmax(last / temp, -1)[completion[i, j]]
            ratio = torch.exp(logp - old[i, j])
            num += -min(ratio * adv[i], ratio.clamp(0.8, 1.2) * adv[i]).item()
            den += 1
            if completion[i, j] == eos:
                break
    assert total.item() == pytest.approx(num / den, rel=1e-5)
    assert set(terms) == {"grpo"}


# ---------------------------------------------------------------- the OISD terms

def oisd_batch():
    """Two prompts of 3 tokens, two rollouts each: (seq, prompt_len, advantages)."""
    seq = torch.tensor([[1, 2, 10, 3, 5, 13, 13], [1, 2, 10, 1, 6, 7, 13], [0, 9, 10, 9, 13, 13, 13],
                        [0, 9, 10, 2, 2, 13, 13]])
    return seq, 3, torch.tensor([1.0, -1.0, -0.5, 0.5])


def alignment_grads(model, weights, term):
    seq, P, _ = oisd_batch()
    mask = response_mask(seq[:, P:], 13)
    logits, exits, attns = model(seq[:, :-1], exit_layers=(1,), attn_layers=(1, 3))
    if term == "logit":
        loss = logit_alignment_loss(exits[1][:, P - 1:], logits[:, P - 1:], weights, mask)
    else:
        loss = attention_alignment_loss(attns[1][:, :, P - 1:], attns[3][:, :, P - 1:], weights, mask)
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}


@pytest.mark.parametrize("term", ["logit", "attn"])
def test_teacher_is_detached(term):
    """Aligning layer 1 to layer 3 trains blocks 1 (and the shared embeddings), never blocks 2, 3 or ln_f."""
    grads = alignment_grads(tiny_model(), torch.tensor([1.0, 0.5, 2.0, 0.3]), term)
    for name, g in grads.items():
        above = name.startswith(("transformer.h.1.", "transformer.h.2.", "transformer.ln_f"))
        if above:
            assert g is None or g.abs().max() == 0, name
    assert grads["transformer.h.0.attn.c_attn.weight"].abs().max() > 0
    if term == "logit":
        assert grads["exit_ln.0.weight"].abs().max() > 0


@pytest.mark.parametrize("term", ["logit", "attn"])
def test_flipping_advantage_sign_flips_alignment_gradient(term):
    weights = torch.tensor([1.0, -0.5, -0.5, 2.0])
    g_pos = alignment_grads(tiny_model(), weights, term)
    g_neg = alignment_grads(tiny_model(), -weights, term)
    checked = 0
    for name, g in g_pos.items():
        if g is not None:
            torch.testing.assert_close(g_neg[name], -g)
            checked += g.abs().max() > 0
    assert checked > 5


def test_zero_lambdas_give_plain_grpo():
    seq, P, adv = oisd_batch()
    mask = response_mask(seq[:, P:], 13)
    old = torch.full(mask.shape, -2.0)
    cfg = Config(n_layer=3, group_size=2, lambda_logit=0.0, lambda_attn=0.0)
    plain, terms = rl_loss(cfg, tiny_model(), seq, P, old, adv, mask)
    assert set(terms) == {"grpo"}
    model = tiny_model()
    logits = model(seq[:, :-1])[0][:, P - 1:]
    independent = grpo_loss(token_logprobs(logits, seq[:, P:]), old, adv, mask)
    assert plain.item() == pytest.approx(independent.item(), rel=1e-6)
    total, terms = rl_loss(Config(n_layer=3, group_size=2, align_layers="1"), tiny_model(), seq, P, old, adv, mask)
    assert set(terms) == {"grpo", "logit", "attn"}
    assert total.item() == pytest.approx(terms["grpo"].item() + terms["logit"].item() + 0.1 * terms["attn"].item())


# ---------------------------------------------------------------- the model

def test_attention_probabilities_match_manual_softmax_and_fused_output():
    model = tiny_model()
    idx = torch.randint(0, 13, (2, 6))
    logits_fused, _, _ = model(idx)
    logits, _, attns = model(idx, attn_layers=(1, 2, 3))
    torch.testing.assert_close(logits, logits_fused, atol=1e-5, rtol=1e-5)
    block = model.transformer.h[0]
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(6))
    q, k, _ = block.attn.c_attn(block.ln_1(x)).split(16, dim=2)
    q, k = (t.view(2, 6, 2, 8).transpose(1, 2) for t in (q, k))
    scores = q @ k.transpose(-2, -1) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(6, 6).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(attns[1], scores.softmax(-1))
    assert torch.all(attns[2].triu(1) == 0) and torch.allclose(attns[3].sum(-1), torch.ones(2, 2, 6))


def test_shared_prompt_forward_equals_full_forward():
    """Running the prompt once, sharing its keys and values with 3 continuations (the training forward of
    rl_loss), gives the full forward's logits, exits and attention rows, and the same gradients."""
    model = tiny_model()
    prompt, tails = torch.randint(0, 13, (1, 4)), torch.randint(0, 13, (3, 5))
    full_in = torch.cat([prompt.repeat(3, 1), tails], 1)
    logits, exits, attns = model(full_in, exit_layers=(1,), attn_layers=(1, 3))
    cache = KVCache(3)
    model(prompt, cache=cache)
    cache.repeat_interleave(3)
    s_logits, s_exits, s_attns = model(tails, cache=cache, exit_layers=(1,), attn_layers=(1, 3))
    torch.testing.assert_close(s_logits, logits[:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_exits[1], exits[1][:, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_attns[3], attns[3][:, :, 4:], atol=1e-6, rtol=1e-5)
    grad_full = torch.autograd.grad(logits[:, 4:].square().sum(), model.transformer.wpe.weight)[0]
    cache = KVCache(3)
    model(prompt, cache=cache)
    cache.repeat_interleave(3)
    grad_shared = torch.autograd.grad(model(tails, cache=cache)[0].square().sum(), model.transformer.wpe.weight)[0]
    torch.testing.assert_close(grad_shared, grad_full, atol=1e-5, rtol=1e-4)


def test_exit_heads():
    model = tiny_model()
    idx = torch.randint(0, 13, (2, 5))
    logits, exits, _ = model(idx, exit_layers=(1, 2, 3))
    torch.testing.assert_close(exits[3], logits)  # the last exit is the model's own head
    h = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(5))
    h, _ = model.transformer.h[0](h)
    torch.testing.assert_close(exits[1], model.lm_head(model.exit_ln[0](h)))
    assert "exit_ln" in str(model)
    assert not torch.allclose(exits[1], model.lm_head(model.transformer.ln_f(h)))  # own norm, not ln_f
    model.reset_exit_heads()
    torch.testing.assert_close(model(idx, exit_layers=(1,))[1][1], model.lm_head(model.transformer.ln_f(h)))
    lens = tiny_model(exit_norm="ln_f")
    assert not hasattr(lens, "exit_ln")
    h = lens.transformer.h[0](lens.transformer.wte(idx) + lens.transformer.wpe(torch.arange(5)))[0]
    torch.testing.assert_close(lens(idx, exit_layers=(1,))[1][1], lens.lm_head(lens.transformer.ln_f(h)))
    # early exit: stop_layer=1 runs block 1 only and reads its exit
    torch.testing.assert_close(lens(idx, stop_layer=1)[0], lens(idx, exit_layers=(1,))[1][1])


def naive_greedy(model, idx, steps, stop_layer=None):
    for _ in range(steps):
        logits = model(idx, stop_layer=stop_layer)[0][:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], 1)
    return idx


@pytest.mark.parametrize("exit_layer", [None, 2])
def test_kv_cache_generation_equals_naive_greedy(exit_layer):
    model = tiny_model(seed=3)
    idx = torch.randint(0, 13, (3, 4))
    out, logp = model.generate(idx, 8, temperature=0, num_samples=2, exit_layer=exit_layer)
    expect = naive_greedy(model, idx, 8, exit_layer).repeat_interleave(2, 0)
    assert torch.equal(out, expect)
    slow, slow_logp = model.generate(idx, 8, temperature=0, num_samples=2, exit_layer=exit_layer, use_cache=False)
    assert torch.equal(slow, out)
    torch.testing.assert_close(slow_logp, logp)


def test_sampling_is_seeded_and_logprobs_are_at_the_temperature():
    model = tiny_model(seed=4)
    idx = torch.randint(0, 13, (2, 4))
    a, logp = model.generate(idx, 6, temperature=0.8, num_samples=3, generator=torch.Generator().manual_seed(1))
    b, _ = model.generate(idx, 6, temperature=0.8, num_samples=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    with torch.no_grad():
        expect = token_logprobs(model(a[:, :-1])[0][:, 3:], a[:, 4:], 0.8)
    torch.testing.assert_close(logp, expect, atol=1e-5, rtol=1e-5)


def test_generation_stops_rows_at_eos():
    model = tiny_model(seed=5)
    with torch.no_grad():  # make token 13 the likeliest after token 7
        model.lm_head.weight[13] += 5 * model.lm_head.weight[7]
    idx = torch.tensor([[7, 7, 7, 7], [1, 2, 3, 4]])
    out, _ = model.generate(idx, 10, temperature=0, eos_id=13)
    for row in out[:, 4:].tolist():
        if 13 in row:
            assert all(t == 13 for t in row[row.index(13):])


# ---------------------------------------------------------------- tasks and tokenizer

def test_tokenizer_round_trip_and_unknown_character():
    tok = get_tokenizer()
    text = "0123456789+=,"
    ids = tok.encode(text)
    assert ids == list(range(13)) and tok.decode(ids) == text
    assert tok.decode(tok.encode("12" + EOS, allowed_special="all")) == "12" + EOS
    assert tok.eot_token == 13 and tok.n_vocab == 15
    with pytest.raises(ValueError, match="'x'"):
        tok.encode("12x")


def test_rewards_strict_parse():
    add = make_task("add", digits=3)
    assert add.reward("0306" + EOS, 306) == 1.0
    assert add.reward("306" + EOS, 306) == 1.0  # an integer match; padding is not required
    for bad in ["0306", "", EOS, "0307" + EOS, "03,06" + EOS, "0306+" + EOS, "=0306" + EOS, "0306" + EOS + "1"]:
        assert add.reward(bad, 306) == 0.0, bad
    chain = make_task("chain", terms=3, digits=2)
    prompt, answer = "12+34+56=", 102
    assert chain.solution(prompt) == "046,102"
    assert chain.reward("046,102" + EOS, answer) == 1.0
    assert chain.reward("999,102" + EOS, answer) == 1.0  # only the final answer is graded
    for bad in ["102" + EOS, "046,102,102" + EOS, "046,,102" + EOS, "046,102"]:
        assert chain.reward(bad, answer) == 0.0, bad


def test_tasks_and_heldout_split():
    rng = random.Random(0)
    for task in [make_task("add", digits=3), make_task("chain", terms=4, digits=2)]:
        prompts = [task.sample(rng) for _ in range(50)]
        assert len({len(p) for p, _ in prompts}) == 1  # equal-length prompts
        for p, a in prompts:
            assert task.reward(task.solution(p) + EOS, a) == 1.0
            assert sum(int(x) for x in p[:-1].split("+")) == a
    test, val = heldout_split(make_task("add", digits=2))
    assert len(test) == 500 and len({p for p, _ in test + val}) == 700
    exclude = {p for p, _ in test + val}
    assert not exclude & {p for p, _ in sample_problems(make_task("add", digits=2), rng, 2000, exclude)}
    with pytest.raises(ValueError, match="unknown task"):
        make_task("mul")
    with pytest.raises(ValueError):
        heldout_split(make_task("add", digits=1))


# ---------------------------------------------------------------- the command line and the loop

def test_arm_config():
    cfg = oisd.arm_config(Config(), "oisd_pos:1+3")
    assert cfg.align_layers == "1,3" and cfg.adv_weighting == "positive" and cfg.lambda_logit == 1.0
    grpo = oisd.arm_config(Config(), "grpo")
    assert grpo.lambda_logit == 0 and grpo.lambda_attn == 0
    assert oisd.arm_config(Config(), "oisd_lens").exit_norm == "ln_f"
    assert oisd.parse_args(["--arms=grpo,oisd_pos:1+2+3,sft_more"]).arms == "grpo,oisd_pos:1+2+3,sft_more"


def test_summarize_paired_difference_interval():
    final = {"grpo": [0.70, 0.75, 0.80, 0.72, 0.78], "oisd": [0.72, 0.74, 0.85, 0.75, 0.80]}
    per_seed = {s: {arm: {"acc_L4": final[arm][s], "len": 5.0} for arm in final} for s in range(5)}
    out = experiments.summarize(per_seed, 4)["oisd"]
    diff = np.array(final["oisd"]) - np.array(final["grpo"])
    half = 2.776 * diff.std(ddof=1) / math.sqrt(5)  # Student's t, 4 degrees of freedom, 97.5% quantile
    assert out["diff_mean"] == pytest.approx(diff.mean())
    assert (out["diff_lo"], out["diff_hi"]) == pytest.approx((diff.mean() - half, diff.mean() + half))
    assert out["final_std"] == pytest.approx(np.std(final["oisd"], ddof=1))


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "oisd.py"), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=120)


@pytest.mark.parametrize("arg", ["--n_embd=-8", "--align_layers=4", "--align_layers=0", "--task=mul",
                                 "--lambda_attn=-1", "--group_size=1", "--rl_steps=ten", "--colour=red",
                                 "--adv_weighting=sometimes", "--arms=sft_more,grpo", "--arms=oisd_pos:4",
                                 "--seeds=0,x", "--preset=tpu", "--block_size=8", "--digits=1"])
def test_cli_rejects_bad_values_with_status_2(arg):
    with pytest.raises(SystemExit) as e:
        oisd.main([arg])
    assert e.value.code == 2


def test_cli_bad_value_is_one_line_without_traceback():
    result = run_cli("--group_size=1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "group_size" in result.stderr


SMOKE = ["--sft_max_steps=4", "--sft_eval_every=2", "--eval_size=16", "--eval_every=2", "--log_every=1",
         "--ckpt_every=1", "--prompts_per_step=4", "--group_size=4", "--arms=oisd_pos", "--rl_lr=3e-3",
         "--n_layer=2", "--align_layers=1", "--digits=2"]


def test_smoke_run_trains_checkpoints_and_resumes_exactly(tmp_path, capsys):
    def run(out, steps, *extra):
        oisd.main(SMOKE + [f"--out_dir={out}", f"--rl_steps={steps}", *extra])
        return torch.load(os.path.join(out, "oisd_pos.pt"), weights_only=True)

    straight = run(tmp_path / "a", 4)
    warm = torch.load(next((tmp_path / "a").glob("warmup-*.pt")), weights_only=True)["model"]
    assert straight["step"] == 4
    assert not torch.equal(straight["model"]["transformer.h.0.mlp.c_fc.weight"], warm["transformer.h.0.mlp.c_fc.weight"])
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 4, "--resume")
    assert "resumed from" in capsys.readouterr().out
    for name, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], value, rtol=0, atol=0)
    assert (tmp_path / "a" / "metrics.jsonl").read_text().count('"arm": "oisd_pos"') >= 4


def test_kl_sequence_reduction_and_several_iterations_run(tmp_path):
    oisd.main(SMOKE + [f"--out_dir={tmp_path}", "--rl_steps=2", "--kl_beta=0.1", "--loss_reduction=sequence",
                       "--num_iterations=2", "--scale_advantages=false", "--arms=grpo,oisd_none"])
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"warm-up start", "grpo", "oisd_none"}


def test_corrupt_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "oisd_pos.pt").write_bytes(b"not a checkpoint")
    result = run_cli(*SMOKE, f"--out_dir={tmp_path}", "--rl_steps=1", "--resume")
    assert result.returncode != 0
    assert "corrupt" in result.stderr and "Traceback" not in result.stderr


def test_nan_loss_stops_with_step_and_term(tmp_path, monkeypatch):
    monkeypatch.setattr(oisd, "grpo_loss", lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as e:
        oisd.main(SMOKE + [f"--out_dir={tmp_path}", "--rl_steps=3"])
    assert "step 1" in str(e.value.code) and "loss_grpo" in str(e.value.code)


def test_checkpoint_without_the_expected_keys_is_one_clear_line(tmp_path):
    path = str(tmp_path / "grpo.pt")
    torch.save({"model": {}}, path)
    with pytest.raises(SystemExit, match="lacks optimizer, step"):
        oisd.load_checkpoint(path, "cpu", ("model", "optimizer", "step"))
