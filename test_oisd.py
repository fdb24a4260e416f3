"""
Fast CPU tests; each checks the code against an independent computation (numpy, autograd, a slow loop).

    python -m pytest -q
"""

import ast
import dataclasses
import json
import math
import os
import random
import itertools
import subprocess
import time
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import harness
import oisd
import tasks
from model import GPT, GPTConfig, KVCache
from oisd import (Config, alignment_weights, attention_alignment_loss, group_advantages, grpo_loss,
                  js_divergence, logit_alignment_loss, masked_mean, response_mask, rl_loss, safe_log,
                  token_logprobs)
from tasks import EOS, get_tokenizer, heldout_keys, heldout_split, make_task, sample_problems

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCES = {torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5), torch.float32: (1.3e-6, 1e-5),
              torch.float64: (1e-7, 1e-7)}  # torch.testing.assert_close's defaults (rtol, atol); exact otherwise


def assert_close(actual, expected, what, rtol=None, atol=None):
    """Assert |actual - expected| <= atol + rtol * |expected| everywhere (rtol = atol = 0: exactly equal;
    by default torch.testing's tolerances of the dtype), and equal dtypes when both are tensors. On failure
    the message names the quantity, the shapes, how many entries differ, the first differing index and
    both values there. NaN equals nothing, and an infinite expected value is matched only exactly (no
    tolerance reaches it); numbers and arrays are compared in float64."""
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor) and actual.dtype != expected.dtype:
        raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {actual.dtype}")
    a, e = (x.detach().cpu() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))
            for x in (actual, expected))
    if a.shape != e.shape:
        raise AssertionError(f"{what}: expected shape {tuple(e.shape)}, got shape {tuple(a.shape)}")
    defaults = [max(pair) for pair in zip(TOLERANCES.get(a.dtype, (0.0, 0.0)), TOLERANCES.get(e.dtype, (0.0, 0.0)))]
    rtol, atol = defaults[0] if rtol is None else rtol, defaults[1] if atol is None else atol
    a, e = a.double(), e.double()
    bad = ~((a == e) | (torch.isfinite(e) & ((a - e).abs() <= atol + rtol * e.abs())))
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        where = f"{int(bad.sum())} of {bad.numel()} entries differ (shape {tuple(a.shape)}); first at index {i}: "
        where = where if i else ""  # a scalar
        tolerance = "exactly" if rtol == atol == 0 else f"tolerance {atol:g} + {rtol:g} * |expected|"
        raise AssertionError(f"{what}: {where}expected {e[i].item():.6g}, got {a[i].item():.6g} ({tolerance})")


def assert_finite(actual, what):
    """Assert every entry is finite; the message names the quantity, the first bad index and its value."""
    bad = ~torch.isfinite(actual.detach())
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} entries are not finite (shape "
                             f"{tuple(actual.shape)}); first at index {i}: {actual[i].item()}")


def largest(grad):
    """The largest |entry| of a gradient, 0.0 for a parameter that got none (None)."""
    return 0.0 if grad is None else grad.abs().max().item()


def parse_args(argv):
    """oisd.py's config from its flags, checked, as oisd.setup parses it (without printing or exiting)."""
    return harness.parse_args(argv, Config, "oisd.py", **oisd.METHOD)


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
    what = "JSD of 6 pairs of rows over 5 entries, some of probability 0 (log = -inf)"
    assert_finite(got, what)
    assert_close(got, numpy_jsd(p, q), f"{what}, against numpy", rtol=1e-9, atol=1e-12)
    assert_close(js_divergence(logq, logp), got, f"{what}, arguments swapped (JSD is symmetric)", rtol=1e-7, atol=1e-12)


def test_js_divergence_bounds_and_gradient():
    logp = F.log_softmax(torch.randn(4, 7), -1)
    assert_close(js_divergence(logp, logp), torch.zeros(4), "JSD of 4 distributions with themselves", rtol=0, atol=1e-6)
    disjoint_p = torch.tensor([[0.0, float("-inf")]])
    disjoint_q = torch.tensor([[float("-inf"), 0.0]])
    assert_close(js_divergence(disjoint_p, disjoint_q), [math.log(2)],
                 "JSD of [1, 0] and [0, 1] (disjoint supports: ln 2)", rtol=1e-6, atol=0)
    far = js_divergence(F.log_softmax(5 * torch.randn(100, 7), -1), logp.repeat(25, 1))
    assert (far <= math.log(2) + 1e-6).all(), (f"JSD of 100 pairs of distributions: expected at most ln 2 = 0.693147 "
                                               f"each, got {far.max().item():.6g} at index {far.argmax().item()}")
    x = torch.randn(3, 5, requires_grad=True)
    masked = x.masked_fill(torch.tensor([False, False, True, True, False]), float("-inf"))
    js_divergence(F.log_softmax(masked, -1), F.log_softmax(torch.randn(3, 5).masked_fill(
        torch.tensor([False, True, True, False, False]), float("-inf")), -1)).sum().backward()
    assert_finite(x.grad, "gradient of the JSD of distributions with masked (-inf) entries, w.r.t. the logits")


def test_safe_log_gradient_is_finite_at_zero():
    p = torch.tensor([0.0, 0.25, 0.75], requires_grad=True)
    out = safe_log(p)
    assert_close(out, [float("-inf"), math.log(0.25), math.log(0.75)], "safe_log([0, 0.25, 0.75])")
    js_divergence(out, torch.tensor([0.5, 0.25, 0.25]).log()).backward()
    assert_finite(p.grad, "gradient of JSD(safe_log([0, 0.25, 0.75]), log [0.5, 0.25, 0.25]) w.r.t. the probabilities")
    assert_close(p.grad[0], 0.0, "that gradient at the probability 0 (safe_log's is zero there)", rtol=0, atol=0)


# ---------------------------------------------------------------- advantages and GRPO

def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv = group_advantages(r, 4)
    what = "advantages of rewards [1, 0, 0, 1 | 1, 1, 1, 1 | 1, 0, 0, 0], groups of 4"
    assert_close(adv[4:8], torch.zeros(4), f"{what}: the all-equal group 2 (exactly zero, no NaN)", rtol=0, atol=0)
    assert_finite(adv, what)
    groups = r.numpy().reshape(-1, 4)
    expect = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    expect[1] = 0.0
    assert_close(adv, expect.reshape(-1), f"{what} (sample std, ddof=1, eps 1e-4), against numpy", rtol=1e-6, atol=0)
    assert_close(adv.view(-1, 4).sum(1), torch.zeros(3), f"{what}: their sum in each group", rtol=0, atol=1e-5)
    unscaled = group_advantages(r, 4, scale=False)
    assert_close(unscaled, (groups - groups.mean(1, keepdims=True)).reshape(-1), f"{what}, scale=False (centred only)",
                 rtol=1e-7, atol=1e-7)
    for n, size in [(8, 4), (16, 8)]:  # 0.3 - mean(0.3, ...) is not exactly 0 in float32 for every group size
        assert_close(group_advantages(torch.full((n,), 0.3), size, scale=True), torch.zeros(n),
                     f"advantages of {n // size} all-equal groups of {size} rewards 0.3 (exactly zero)", rtol=0, atol=0)


def test_signed_weights_cancel_within_each_group():
    """Signed weights sum to zero in every group (a candidate reason why they train the exit so little)."""
    rewards = (torch.rand(64, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    adv = group_advantages(rewards, 8)
    signed = alignment_weights(adv, "signed").view(8, 8).sum(1)
    positive = alignment_weights(adv, "positive").view(8, 8).sum(1)
    assert_close(signed, torch.zeros(8), "sum of the signed weights in each of 8 groups of 8", rtol=0, atol=1e-5)
    informative = rewards.view(8, 8).std(1) > 0
    assert (positive[informative] > 0.5).all(), ("sum of the positive weights in each group with mixed rewards: "
                                                 f"expected > 0.5, got {positive[informative].tolist()}")
    assert (positive[~informative] == 0).all(), ("sum of the positive weights in each all-equal group: expected 0, "
                                                 f"got {positive[~informative].tolist()}")


def test_alignment_weights():
    a = torch.tensor([-1.5, 0.0, 2.0])
    assert torch.equal(alignment_weights(a, "signed"), a)
    assert torch.equal(alignment_weights(a, "positive"), torch.tensor([0.0, 0.0, 2.0]))
    assert torch.equal(alignment_weights(a, "none"), torch.ones(3))
    with pytest.raises(ValueError, match="unknown weighting 'abs'"):  # a mode it does not know is no silent 1
        alignment_weights(a, "abs")


def test_response_mask_includes_first_eos_and_nothing_after():
    eos = 13
    completion = torch.tensor([[1, 2, eos, eos, eos], [3, eos, 4, eos, eos], [1, 2, 3, 4, 5], [eos, eos, eos, eos, eos]])
    expect = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)
    assert_close(response_mask(completion, eos), expect, f"response mask of completions {completion.tolist()} with "
                 f"EOS {eos} (1 up to and including the first EOS)", rtol=0, atol=0)


def test_masked_mean_reductions():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    what = "masked_mean of [[1, 2, 3], [4, 5, 6]] under the mask [[1, 1, 0], [1, 0, 0]]"
    assert_close(masked_mean(v, m, "token"), (1 + 2 + 4) / 3, f"{what}, 'token'", rtol=1e-6, atol=0)
    assert_close(masked_mean(v, m, "sequence"), (1.5 + 4) / 2, f"{what}, 'sequence'", rtol=1e-6, atol=0)
    # an inf and a NaN at masked positions are selected out: they change neither the value nor the gradient
    bad = v.clone().index_put_((torch.tensor([0, 1]), torch.tensor([2, 1])), torch.tensor([float("inf"), float("nan")]))
    for reduction, value, grad in [("token", (1 + 2 + 4) / 3, m / 3),
                                   ("sequence", (1.5 + 4) / 2, torch.tensor([[0.25, 0.25, 0.0], [0.5, 0.0, 0.0]]))]:
        bad.requires_grad_(True).grad = None
        out = masked_mean(bad, m, reduction)
        out.backward()
        assert_close(out, value, f"{what}, '{reduction}', with inf and NaN at masked positions",
                     rtol=1e-6, atol=0)
        assert_close(bad.grad, grad, f"gradient of that masked_mean, '{reduction}'")


def test_grpo_loss_clipping_and_kl():
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 1)
    old = torch.zeros(2, 1)
    logp = torch.tensor([[math.log(1.5)], [math.log(0.5)]], requires_grad=True)  # ratios 1.5 and 0.5: both clipped
    loss = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    what = "GRPO loss, advantages [1, -1], ratios [1.5, 0.5] (min picks the clipped side)"
    assert_close(loss, -(1.2 * 1.0 + 0.8 * -1.0) / 2, what, rtol=1e-6, atol=0)
    loss.backward()
    assert_close(logp.grad, torch.zeros(2, 1), f"gradient of the {what}: none outside the trust region", rtol=0, atol=0)
    # the other side of the min: ratios [0.5, 1.5], unclipped, with their full gradient -ratio * A / 2
    logp = torch.tensor([[math.log(0.5)], [math.log(1.5)]], requires_grad=True)
    loss = grpo_loss(logp, old, adv, mask, clip_eps=0.2)
    what = "GRPO loss, advantages [1, -1], ratios [0.5, 1.5] (min picks the unclipped side)"
    assert_close(loss, -(0.5 * 1.0 + 1.5 * -1.0) / 2, what, rtol=1e-6, atol=0)
    loss.backward()
    assert_close(logp.grad, torch.tensor([[-0.25], [0.75]]), f"gradient of the {what}")
    logp = torch.tensor([[-0.3], [-0.7]])
    ref = torch.tensor([[-0.5], [-0.2]])
    with_kl = grpo_loss(logp, logp, adv, mask, ref_logp=ref, kl_beta=0.1)
    k3 = (torch.exp(ref - logp) - (ref - logp) - 1).mean()
    assert_close(with_kl, grpo_loss(logp, logp, adv, mask) + 0.1 * k3,
                 "GRPO loss with kl_beta=0.1 (plain loss + 0.1 * mean k3)", rtol=1e-5, atol=0)


def per_prefix_batch():
    """A tiny model and 4 rollouts (one truncated, EOS at varied places) with rollout log-probs 0.05 below the
    model's, so the ratio is not exactly 1: (model, seq, prompt_len, temperature, advantages, old_logp)."""
    model, eos, P, temp = tiny_model(), 13, 4, 0.7
    seq = torch.tensor([[1, 2, 10, 3, 5, eos, eos, eos],   # two rollouts of prompt 1 2 10 3
                        [1, 2, 10, 3, 6, 7, 8, 9],         # truncated: no EOS
                        [0, 9, 10, 9, eos, eos, eos, eos],  # two rollouts of prompt 0 9 10 9
                        [0, 9, 10, 9, 4, 4, eos, eos]])
    with torch.no_grad():
        logits = model(seq[:, :-1])[0][:, P - 1:]
    old = token_logprobs(logits, seq[:, P:], temp) - 0.05
    return model, seq, P, temp, torch.tensor([0.5, -0.5, 1.0, -1.0]), old


def slow_per_prefix_loss(model, seq, P, temp, adv, old, eos=13):
    """The clipped GRPO loss by a loop that runs the model on every prefix separately and counts only the
    response tokens up to and including the first EOS."""
    num, den = 0.0, 0
    completion = seq[:, P:]
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
    return num / den


def test_grpo_loss_matches_a_slow_per_prefix_loop():
    """response_mask, grpo_loss and masked_mean on one forward of the whole rollouts, against the loop."""
    model, seq, P, temp, adv, old = per_prefix_batch()
    logp = token_logprobs(model(seq[:, :-1])[0][:, P - 1:], seq[:, P:], temp)
    loss = grpo_loss(logp, old, adv, response_mask(seq[:, P:], 13))
    assert_close(loss, slow_per_prefix_loss(model, seq, P, temp, adv, old),
                 "GRPO loss of 4 rollouts (EOS at 2, never, 1, 3) against a loop over prefixes", rtol=1e-5, atol=0)


def test_rl_loss_matches_a_slow_per_prefix_loop():
    """The vectorised GRPO loss of rl_loss (the prompt run once per group, masks by position) against the loop."""
    model, seq, P, temp, adv, old = per_prefix_batch()
    cfg = Config(lambda_logit=0.0, lambda_attn=0.0, temperature=temp, n_layer=3, group_size=2)
    total, terms = rl_loss(cfg, model, seq, P, old, adv, response_mask(seq[:, P:], 13))
    assert total.item() == pytest.approx(slow_per_prefix_loss(model, seq, P, temp, adv, old), rel=1e-5)
    assert set(terms) == {"grpo"}


# ---------------------------------------------------------------- the OISD terms

def oisd_batch():
    """Two prompts of 3 tokens, two rollouts each: (seq, prompt_len, advantages)."""
    seq = torch.tensor([[1, 2, 10, 3, 5, 13, 13], [1, 2, 10, 1, 6, 7, 13], [0, 9, 10, 9, 13, 13, 13],
                        [0, 9, 10, 2, 2, 13, 13]])
    return seq, 3, torch.tensor([1.0, -1.0, -0.5, 0.5])


OISD_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.float)  # oisd_batch's
# response mask, written out: up to and including the first EOS (13)


def alignment_grads(model, weights, term):
    """The gradient of one OISD term, layer 1 the student and layer 3 the teacher (its output not detached
    here: the term must detach it), on oisd_batch: {parameter name: gradient or None}."""
    seq, P, _ = oisd_batch()
    mask = OISD_MASK
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
        if g is not None:
            assert_finite(g, f"gradient of the {term} term w.r.t. {name}")
        above = name.startswith(("transformer.h.1.", "transformer.h.2.", "transformer.ln_f"))
        if above:
            assert largest(g) == 0, (f"gradient of the {term} term w.r.t. {name}, above the student (layer 1): "
                                     f"expected exactly 0 (the teacher detached), got largest |entry| {largest(g):.3g}")
    name = "transformer.h.0.attn.c_attn.weight"
    assert largest(grads[name]) > 0, f"gradient of the {term} term w.r.t. {name} (the student): expected nonzero, got 0"
    if term == "logit":
        assert largest(grads["exit_ln.0.weight"]) > 0, ("gradient of the logit term w.r.t. exit_ln.0.weight, the "
                                                        "student's exit norm: expected nonzero, got 0")


def test_where_the_logit_terms_gradient_lands_under_each_exit_norm():
    """own: on the aligned exit's own norm, never ln_f or another exit's norm. ln_f (the logit lens): on the
    policy's own ln_f. In every mode blocks above the aligned layer get exactly nothing."""
    weights = torch.tensor([1.0, 0.5, 2.0, 0.3])
    own = alignment_grads(tiny_model("own"), weights, "logit")
    assert own["exit_ln.0.weight"].abs().max() > 0
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias", "exit_ln.1.weight", "exit_ln.1.bias"):
        assert own[name] is None or own[name].abs().max() == 0, name
    lens = alignment_grads(tiny_model("ln_f"), weights, "logit")
    assert lens["transformer.ln_f.weight"].abs().max() > 0 and lens["transformer.ln_f.bias"].abs().max() > 0
    for grads in (own, lens, alignment_grads(tiny_model("ln_f_frozen"), weights, "logit")):
        for name, g in grads.items():
            if name.startswith(("transformer.h.1.", "transformer.h.2.")):
                assert g is None or g.abs().max() == 0, name


def test_frozen_lens_trains_only_the_trunk_below_and_the_input_embedding():
    """exit_norm='ln_f_frozen' gives the lens's numbers, but its gradient skips ln_f and the unembedding:
    wte's gradient is the one an untied copy of the model gives its input embedding alone, so the rows of
    tokens absent from the input get exactly zero (through the unembedding every row would move). The final
    layer is not an exit: a loss on it trains ln_f and the unembedding exactly as under the lens."""
    weights = torch.tensor([1.0, 0.5, 2.0, 0.3])
    frozen, lens = tiny_model("ln_f_frozen"), tiny_model("ln_f")
    seq, P, _ = oisd_batch()
    torch.testing.assert_close(frozen(seq, exit_layers=(1,))[1][1], lens(seq, exit_layers=(1,))[1][1], rtol=0, atol=0)
    g = alignment_grads(frozen, weights, "logit")
    assert g["transformer.ln_f.weight"] is None and g["transformer.ln_f.bias"] is None
    untied = tiny_model("ln_f")
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    g_untied = alignment_grads(untied, weights, "logit")
    torch.testing.assert_close(g["transformer.wte.weight"], g_untied["transformer.wte.weight"])
    absent = sorted(set(range(15)) - set(seq[:, :-1].flatten().tolist()))
    assert absent and g["transformer.wte.weight"][absent].abs().max() == 0
    assert alignment_grads(lens, weights, "logit")["transformer.wte.weight"][absent].abs().max() > 0
    assert g["transformer.h.0.attn.c_attn.weight"].abs().max() > 0
    torch.testing.assert_close(g["transformer.h.0.attn.c_attn.weight"], g_untied["transformer.h.0.attn.c_attn.weight"])
    for model in (frozen, lens):  # the final layer still reads through ln_f and the unembedding, with their gradient,
        model.zero_grad()        # also in a forward that computes the detached exit beside it
        model(seq, exit_layers=(1,))[0].square().mean().backward()
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight"):
        final = frozen.get_parameter(name).grad
        assert final is not None and final.abs().max() > 0, name
        torch.testing.assert_close(final, lens.get_parameter(name).grad, rtol=0, atol=0)


def test_lens_arms_change_only_the_exit_norm():
    """oisd_pos_lens is oisd_pos read through the lens; oisd_lens_frozen is oisd_lens with the head detached."""
    cfg = Config()
    assert oisd.arm_config(cfg, "oisd_pos_lens") == dataclasses.replace(oisd.arm_config(cfg, "oisd_pos"), exit_norm="ln_f")
    assert oisd.arm_config(cfg, "oisd_lens") == dataclasses.replace(oisd.arm_config(cfg, "oisd"), exit_norm="ln_f")
    assert (oisd.arm_config(cfg, "oisd_lens_frozen")
            == dataclasses.replace(oisd.arm_config(cfg, "oisd_lens"), exit_norm="ln_f_frozen"))


@pytest.mark.parametrize("term", ["logit", "attn"])
def test_flipping_advantage_sign_flips_alignment_gradient(term):
    weights = torch.tensor([1.0, -0.5, -0.5, 2.0])
    g_pos = alignment_grads(tiny_model(), weights, term)
    g_neg = alignment_grads(tiny_model(), -weights, term)
    checked = 0
    for name, g in g_pos.items():
        if g is not None:
            what = f"gradient of the {term} term w.r.t. {name} with the weights negated (expected: minus the gradient)"
            assert g_neg[name] is not None, f"{what}: got none"
            assert_close(g_neg[name], -g, what)
            checked += largest(g) > 0
    assert checked > 5, f"parameters with a nonzero gradient from the {term} term: expected more than 5, got {checked}"


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


def assert_rows_of_the_full_forward(got, full, start, what):
    """got, full: (logits, {layer: exit logits}, {layer: attention}) of a forward; got's rows must be full's from
    position `start` on, for the final logits and every exit and attention layer got has."""
    (logits, exits, attns), (f_logits, f_exits, f_attns) = got, full
    assert_close(logits, f_logits[:, start:], f"final logits of {what}, against the full forward", atol=1e-5, rtol=1e-5)
    for layer in exits:
        assert_close(exits[layer], f_exits[layer][:, start:], f"layer-{layer} exit logits of {what}, against the full "
                     "forward", atol=1e-5, rtol=1e-5)
    for layer in attns:
        assert_close(attns[layer], f_attns[layer][:, :, start:], f"layer-{layer} attention rows of {what}, against the "
                     "full forward", atol=1e-6, rtol=1e-5)


def test_shared_prompt_forward_equals_full_forward():
    """Running the prompt once, sharing its keys and values with 3 continuations (the training forward of
    rl_loss), gives the full forward's logits, exits and attention rows, and the same gradients."""
    model = tiny_model()
    prompt, tails = torch.randint(0, 13, (1, 4)), torch.randint(0, 13, (3, 5))
    full_in = torch.cat([prompt.repeat(3, 1), tails], 1)
    logits, exits, attns = model(full_in, exit_layers=(1,), attn_layers=(1, 3))
    cache = KVCache()
    model(prompt, cache=cache)
    cache.repeat_interleave(3)
    what = "a prompt of 4 run once into the KV cache, then 3 continuations of 5"
    assert_rows_of_the_full_forward(model(tails, cache=cache, exit_layers=(1,), attn_layers=(1, 3)),
                                    (logits, exits, attns), 4, what)
    grad_full = torch.autograd.grad(logits[:, 4:].square().sum(), model.transformer.wpe.weight)[0]
    cache = KVCache()
    model(prompt, cache=cache)
    cache.repeat_interleave(3)
    grad_shared = torch.autograd.grad(model(tails, cache=cache)[0].square().sum(), model.transformer.wpe.weight)[0]
    assert_close(grad_shared, grad_full, f"gradient w.r.t. wpe of {what}, against the full forward",
                 atol=1e-5, rtol=1e-4)
    # rl_loss runs the rollouts through forward_responses, which is this trick: the full forward's rows at the
    # positions that predict response tokens (the prompt's last position on), for 3 rollouts of one prompt
    cfg = Config(n_layer=3, align_layers="1", group_size=3)
    full = model(full_in[:, :-1], exit_layers=(1,), attn_layers=(1, 3))
    what = "forward_responses on 3 rollouts of one prompt (it runs the prompt once, through the KV cache)"
    got = oisd.forward_responses(cfg, model, full_in, 4)
    assert set(got[1]) == {1} and set(got[2]) == {1, 3}, f"{what}: exits of layers {set(got[1])}, attention of {set(got[2])}"
    assert_rows_of_the_full_forward(got, full, 3, what)


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
    """The loop without a cache: the whole prefix again for every token. Returns tokens and their log-probs."""
    logps = []
    for _ in range(steps):
        logits = model(idx, stop_layer=stop_layer)[0][:, -1]
        idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], 1)
        logps.append(F.log_softmax(logits, -1).gather(1, idx[:, -1:]).squeeze(1))
    return idx, torch.stack(logps, 1)


@pytest.mark.parametrize("exit_layer", [None, 2])
def test_kv_cache_generation_equals_naive_greedy(exit_layer):
    model = tiny_model(seed=3)
    idx = torch.randint(0, 13, (3, 4))
    out, logp = model.generate(idx, 8, temperature=0, num_samples=2, exit_layer=exit_layer)
    expect, expect_logp = naive_greedy(model, idx, 8, exit_layer)
    what = f"generate(3 prompts of 4, 8 new tokens, greedy, 2 samples each, exit_layer={exit_layer})"
    assert_close(out, expect.repeat_interleave(2, 0), f"tokens of {what}, against a loop without the cache",
                 rtol=0, atol=0)
    assert_close(logp, expect_logp.repeat_interleave(2, 0),
                 f"log-probabilities of {what}, against a loop without the cache")


def test_sampling_is_seeded_and_logprobs_are_at_the_temperature():
    model = tiny_model(seed=4)
    idx = torch.randint(0, 13, (2, 4))
    a, logp = model.generate(idx, 6, temperature=0.8, num_samples=3, generator=torch.Generator().manual_seed(1))
    b, _ = model.generate(idx, 6, temperature=0.8, num_samples=3, generator=torch.Generator().manual_seed(1))
    what = "generate(2 prompts of 4, 6 new tokens, temperature 0.8, 3 samples each)"
    assert_close(b, a, f"tokens of {what}, run twice with the same seed", rtol=0, atol=0)
    with torch.no_grad():
        expect = token_logprobs(model(a[:, :-1])[0][:, 3:], a[:, 4:], 0.8)
    assert_close(logp, expect, f"log-probabilities of the tokens of {what}, against the model's own at temperature 0.8",
                 atol=1e-5, rtol=1e-5)


def test_generation_stops_rows_at_eos():
    """A row that has emitted EOS keeps emitting it, and generation stops once every row has, against the
    naive greedy loop with each row cut after its first EOS and padded with EOS. Each token the naive loop
    emits is tried as the EOS id; among them must be one that stops both rows early and one after which a
    finished row is padded while the other goes on."""
    model, new = tiny_model(seed=5), 10
    idx = torch.tensor([[12, 2, 4, 3], [12, 11, 7, 4]])
    free = naive_greedy(model, idx, new)[0][:, 4:].tolist()  # (2, new): the rows without any EOS
    stopped_early = padded = False
    for eos in sorted({t for row in free for t in row}):
        firsts = [row.index(eos) if eos in row else None for row in free]  # each row's first EOS, if any
        length = new if None in firsts else max(firsts) + 1  # generation stops once every row has emitted EOS
        rows = [row if f is None else row[: f + 1] + [eos] * (new - f - 1) for row, f in zip(free, firsts)]
        stopped_early |= length < new
        padded |= any(f is not None and f + 1 < length for f in firsts)
        out, logp = model.generate(idx, new, temperature=0, eos_id=eos)
        what = f"generate(2 prompts, {new} new tokens, greedy, eos_id={eos})"
        assert_close(out, torch.cat([idx, torch.tensor(rows)[:, :length]], 1), f"tokens of {what}, against the "
                     f"naive loop cut after each row's first EOS (length {length})", rtol=0, atol=0)
        assert logp.shape == (2, length), (f"log-probabilities of {what}: expected shape (2, {length}), "
                                           f"got {tuple(logp.shape)}")
        with torch.no_grad():  # EOS after a row is done included: the model's own log-probability of it
            expect = token_logprobs(model(out[:, :-1])[0][:, 3:], out[:, 4:], 1.0)
        assert_close(logp, expect, f"log-probabilities of {what}, against the model's own at temperature 1",
                     atol=1e-5, rtol=1e-5)
    assert stopped_early and padded, (f"the naive loop's rows {free} give no EOS id that stops both rows early "
                                      f"({stopped_early}) or pads a finished row ({padded}): pick another seed")


def test_sampled_rows_are_padded_after_their_eos():
    """The GRPO path: sampled rollouts (temperature 0.8, 3 per prompt) keep emitting EOS once a row has
    emitted it, stop once every row has, and report the model's own log-probability at the temperature for
    every token, the padding included. Each token the sampler emits is tried as the EOS id; among them must
    be one after which a finished row is padded while another goes on."""
    model, new, T = tiny_model(seed=5), 10, 0.8
    idx = torch.tensor([[12, 2, 4, 3], [12, 11, 7, 4]])
    free, _ = model.generate(idx, new, T, 3, generator=torch.Generator().manual_seed(0))
    padded = False
    for eos in sorted(set(free[:, 4:].flatten().tolist())):
        out, logp = model.generate(idx, new, T, 3, eos, torch.Generator().manual_seed(0))
        what = f"generate(2 prompts x 3 samples, {new} new tokens, temperature {T}, eos_id={eos})"
        rows = out[:, 4:].tolist()
        firsts = [row.index(eos) if eos in row else None for row in rows]  # each row's first EOS, if any
        length = new if None in firsts else max(firsts) + 1
        assert len(rows[0]) == length, f"{what}: {len(rows[0])} tokens, expected {length} (first EOS per row: {firsts})"
        for r, (row, f) in enumerate(zip(rows, firsts)):
            assert f is None or row[f:] == [eos] * (length - f), f"{what}: row {r} goes on after its EOS: {row}"
        padded |= any(f is not None and f + 1 < length for f in firsts)
        with torch.no_grad():
            expect = token_logprobs(model(out[:, :-1])[0][:, 3:], out[:, 4:], T)
        assert_close(logp, expect, f"log-probabilities of {what}, against the model's own at temperature {T}",
                     atol=1e-5, rtol=1e-5)
    assert padded, f"no EOS id among the samples {free[:, 4:].tolist()} pads a finished row: pick another seed"


def test_sampling_draws_from_the_softmax_at_the_temperature():
    """20,000 one-token samples of one prompt at temperature 0.3: their frequencies lie within total
    variation 0.03 of softmax(logits / 0.3), which is more than 0.06 from softmax(logits) (the test can tell
    the two apart; sampling noise here is about 0.012)."""
    model, temp, n = tiny_model(seed=4), 0.3, 20000
    idx = torch.randint(0, 13, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(idx)[0][0, -1]
    at_temp, at_one = F.softmax(logits / temp, -1), F.softmax(logits, -1)
    assert 0.5 * (at_temp - at_one).abs().sum() > 0.06
    out, _ = model.generate(idx, 1, temperature=temp, num_samples=n, generator=torch.Generator().manual_seed(2))
    freq = torch.bincount(out[:, -1], minlength=logits.numel()).float() / n
    tv = 0.5 * (freq - at_temp).abs().sum().item()
    assert tv < 0.03, (f"frequencies of {n} one-token samples at temperature {temp}: expected within total variation "
                       f"0.03 of softmax(logits / {temp}), got {tv:.3f} (from softmax(logits): "
                       f"{0.5 * (freq - at_one).abs().sum().item():.3f}); is the temperature applied to the draw?")


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
    with pytest.raises(ValueError, match="unknown task"):
        make_task("mul")
    with pytest.raises(ValueError):
        heldout_split(make_task("add", digits=1))


@pytest.mark.parametrize("name, options", [("add", dict(digits=2)), ("add", dict(digits=3)),
                                           ("chain", dict(terms=3, digits=2))])
def test_no_reordering_of_a_heldout_problem_is_ever_trained(name, options):
    """'b+a=' has the answer of a held-out 'a+b=': training must never see it, for any reordering."""
    task = make_task(name, **options)
    test, val = heldout_split(task)
    assert len(test) == 500 and len(val) == 200
    as_multisets = [tuple(sorted(int(x) for x in p[:-1].split("+"))) for p, _ in test + val]
    assert len(set(as_multisets)) == 700  # no two held-out problems are reorderings of each other
    exclude = heldout_keys(task, test + val)
    drawn = sample_problems(task, random.Random(1), 20000, exclude)
    assert not set(as_multisets) & {tuple(sorted(int(x) for x in p[:-1].split("+"))) for p, _ in drawn}
    # and every reordering of a held-out prompt is refused, written out by hand
    for p, _ in test[:50]:
        xs = p[:-1].split("+")
        for perm in itertools.permutations(xs):
            assert tasks.problem_key(task, "+".join(perm) + "=") in exclude


def test_trainable_size_matches_enumeration():
    task = make_task("add", digits=2)
    test, val = heldout_split(task)
    exclude = heldout_keys(task, test + val)
    trainable = sum(1 for a in range(100) for b in range(100) if tuple(sorted((a, b))) not in exclude)
    assert tasks.trainable_size(task, exclude) == trainable
    assert trainable < 10000 - 700  # most held-out pairs have a second ordering that is excluded too


def test_chain_step_accuracy():
    chain = make_task("chain", terms=4, digits=2)
    prompt = "12+34+56+07="  # running sums 46, 102, 109
    assert chain.steps("0046,0102,0109" + EOS, prompt) == [True, True, True]
    assert chain.steps("046,103,109" + EOS, prompt) == [True, False, True]  # right answer, wrong step
    assert chain.steps("046,102" + EOS, prompt) == [False, False, False]  # malformed: nothing counts
    assert make_task("add", digits=2).steps("046" + EOS, "12+34=") == [True]


# ---------------------------------------------------------------- the command line and the loop

def test_arm_config():
    cfg = oisd.arm_config(Config(), "oisd_pos:1+3")
    assert cfg.align_layers == "1,3" and cfg.adv_weighting == "positive" and cfg.lambda_logit == 1.0
    grpo = oisd.arm_config(Config(), "grpo")
    assert grpo.lambda_logit == 0 and grpo.lambda_attn == 0
    assert oisd.arm_config(Config(), "oisd_lens").exit_norm == "ln_f"
    assert parse_args(["--arms=grpo,oisd_pos:1+2+3,sft_more"]).arms == "grpo,oisd_pos:1+2+3,sft_more"


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "oisd.py"), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=120)


@pytest.mark.parametrize("arg", ["--n_embd=-8", "--align_layers=4", "--align_layers=0", "--task=mul",
                                 "--lambda_attn=-1", "--group_size=1", "--rl_steps=ten", "--colour=red",
                                 "--adv_weighting=sometimes", "--arms=sft_more,grpo", "--arms=oisd_pos:4",
                                 "--preset=tpu", "--block_size=8", "--digits=1",
                                 # nothing non-finite, out of range or absurd gets through
                                 "--rl_lr=nan", "--temperature=nan", "--lambda_logit=nan", "--kl_beta=nan",
                                 "--rl_lr=inf", "--lambda_attn=-inf", "--sft_target_acc=nan", "--grad_clip=0",
                                 "--seed=-1", "--seed=99999999999", "--n_embd=100000", "--n_layer=1000",
                                 "--prompts_per_step=100000", "--group_size=100000", "--clip_eps=1.5",
                                 "--temperature=0", "--max_new_tokens=3", "--eval_size=501", "--rl_steps=-1",
                                 "--precision=fp8", "--device=tpu", "--compile=maybe", "--rl_lr", "extra",
                                 # an arm suffix must mean something
                                 "--arms=grpo,sft_more:2", "--arms=grpo:2", "--arms=grpo,grpo", "--arms=oisd:",
                                 "--arms=oisd:x", "--arms=oisd:1+1", "--align_layers=1,1", "--align_layers=a",
                                 "--preset gpu"])  # the preset picks the defaults, so it must be written --preset=gpu
def test_cli_rejects_bad_values_with_status_2(arg):
    with pytest.raises(SystemExit) as e:
        oisd.main(arg.split(" "))
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
    with pytest.raises(SystemExit) as e:
        oisd.main(SMOKE + [f"--out_dir={tmp_path}", "--rl_steps=1", "--resume"])
    assert "corrupt" in str(e.value.code) and "\n" not in str(e.value.code)


def test_nan_loss_stops_with_step_and_term(tmp_path, monkeypatch):
    monkeypatch.setattr(oisd, "grpo_loss", lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(SystemExit) as e:
        oisd.main(SMOKE + [f"--out_dir={tmp_path}", "--rl_steps=3"])
    assert "step 1" in str(e.value.code) and "loss_grpo" in str(e.value.code)


def test_checkpoint_without_the_expected_keys_is_one_clear_line(tmp_path):
    path = str(tmp_path / "grpo.pt")
    torch.save({"model": {}}, path)
    with pytest.raises(SystemExit, match="lacks optimizer, step"):
        harness.load_checkpoint(path, "cpu", ("model", "optimizer", "step"))


# ---------------------------------------------------------------- validity: numerics, streams, paths never run

def tiny_env(tmp_path=None, **overrides):
    cfg = Config(**dict(dict(out_dir=str(tmp_path or "unused"), digits=2, n_layer=3, n_head=2, n_embd=16,
                             prompts_per_step=4, group_size=4, align_layers="1", eval_size=16), **overrides))
    return oisd.Env(cfg)


def bf16_training_logprobs(arm, monkeypatch):
    """One batch of bf16 rollouts (autocast, emulated on the CPU; temperature 0.7) of a fresh tiny model, and
    the log-probabilities that arm's rl_loss hands grpo_loss for them: (training, sampler's, response mask)."""
    env = tiny_env(precision="bf16", temperature=0.7)
    cfg = env.cfg = oisd.arm_config(env.cfg, arm)
    torch.manual_seed(0)
    model = GPT(env.model_config(cfg))
    problems = sample_problems(env.task, random.Random(0), 4, env.exclude)
    seq, old_logp, _ = oisd.rollout(env, cfg, model, problems, torch.Generator().manual_seed(0))
    seen, real = {}, oisd.grpo_loss
    monkeypatch.setattr(oisd, "grpo_loss", lambda logp, old, *a, **k: seen.setdefault("logp", logp.detach()) is None or real(logp, old, *a, **k))
    mask = response_mask(seq[:, env.prompt_len:], env.eos_id)
    with oisd.autocast(env):
        oisd.rl_loss(cfg, model, seq, env.prompt_len, old_logp, torch.randn(16), mask)
    monkeypatch.undo()
    return seen["logp"], old_logp, mask.bool()


@pytest.mark.parametrize("arm", ["oisd", "oisd_pos", "logit_only", "attn_only", "oisd_lens", "oisd_lens_frozen", "grpo_ce_exits"])
def test_bf16_rollout_and_training_logprobs_agree_for_every_arm(arm, monkeypatch):
    """Under bf16 autocast every arm's training forward gives bit for bit the log-probabilities grpo's does (arms
    differ in method, not in numerics), and each agrees with the sampler's to rounding: the first ratio is
    within 1e-3 of 1 (the clip acts at 0.2). The sampler runs one position at a time and the training forward
    all at once, so products of other shapes may round otherwise: exact on an AVX-512 CPU, up to 1.7e-4 apart
    over 30 seeds on an AVX2 one. Log-probabilities at temperature 1 instead of 0.7 are 0.15 apart here, and
    positions shifted by one 0.7."""
    logp, old_logp, valid = bf16_training_logprobs(arm, monkeypatch)
    grpo_logp, grpo_old, _ = bf16_training_logprobs("grpo", monkeypatch)
    assert torch.equal(old_logp, grpo_old), "the sampler's log-probabilities differ between arms"
    assert torch.equal(logp, grpo_logp), f"{arm}'s training log-probabilities differ from grpo's"
    assert (logp - old_logp)[valid].abs().max() < 1e-3, (logp - old_logp)[valid].abs().max()


def compiled_steps_match_eager(env, arm, steps=2):
    """compile_forward on a fresh model of arm, then `steps` RL steps of it and of an eager twin: the losses and
    rewards agree, compile_forward compiled something and leaves no gradient, and the steps compile nothing."""
    import torch._dynamo
    counters = torch._dynamo.utils.counters
    cfg = oisd.arm_config(env.cfg, arm)
    models = {}
    for name in ("eager", "compiled"):
        torch.manual_seed(0)
        models[name] = GPT(env.model_config(cfg))
    before = counters["stats"]["unique_graphs"]
    forward, seconds = harness.compile_forward(env, cfg, models["compiled"], oisd.rl_loss)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before, arm  # compiled, not fallen back to eager
    assert seconds > 0 and all(p.grad is None for p in models["compiled"].parameters())
    opts = {name: oisd.make_optimizer(m, 1e-3, "cpu") for name, m in models.items()}
    gens = {name: torch.Generator().manual_seed(0) for name in models}
    rng = random.Random(0)
    for step in range(steps):
        problems = sample_problems(env.task, rng, 4, env.exclude)
        eager = oisd.rl_step(env, cfg, models["eager"], opts["eager"], problems, gens["eager"])
        compiled = oisd.rl_step(env, cfg, models["compiled"], opts["compiled"], problems, gens["compiled"], forward)
        for key in eager:
            if key.startswith("loss_") or key == "reward":
                assert compiled[key] == pytest.approx(eager[key], rel=1e-3, abs=1e-5), (arm, step, key)
    assert counters["stats"]["unique_graphs"] == graphs, arm  # nothing compiled after compile_forward


def test_compiled_rl_steps_match_eager_and_do_not_recompile(tmp_path):
    """--compile (inductor): the compiled forward of an OISD arm (exits and attention rows) pads rollouts to
    fixed shapes and compiles before the timed steps; then it gives the eager loss step after step without
    compiling again."""
    import torch._dynamo
    compiled_steps_match_eager(tiny_env(tmp_path, n_layer=2, compile=True), "oisd_pos")
    torch._dynamo.reset()


def test_each_arm_compiles_afresh(tmp_path, monkeypatch):
    """A grid compiles every arm, one after another: each compiles afresh, so a stale cache never pushes a later
    arm into eager fallback. Graph capture alone decides this, so torch.compile runs here without code
    generation (backend 'eager'), which costs seconds, not a minute, cold."""
    import torch._dynamo
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: real(model, backend="eager", **kw))
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 2)  # one arm's two graphs: a second arm needs a fresh cache
    env = tiny_env(tmp_path, n_layer=2, compile=True)
    for arm in ("grpo", "oisd_pos", "oisd_lens"):
        compiled_steps_match_eager(env, arm, steps=1)
    torch._dynamo.reset()


def test_rl_step_accepts_a_compiled_module_as_forward():
    """The old `forward or model` called bool() on the compiled module and crashed."""
    env = tiny_env(n_layer=2)
    cfg = oisd.arm_config(env.cfg, "grpo")
    model = GPT(env.model_config(cfg))

    class NoBool(torch.nn.Module):  # stands in for an OptimizedModule, which has no __len__ and no __bool__
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __len__(self):
            raise TypeError("no len()")

        def forward(self, *a, **k):
            return self.inner(*a, **k)

        @property
        def config(self):
            return self.inner.config

    stats = oisd.rl_step(env, cfg, model, oisd.make_optimizer(model, 1e-3, "cpu"),
                         sample_problems(env.task, random.Random(0), 4, env.exclude), None, NoBool(model))
    assert math.isfinite(stats["loss_grpo"])


def test_k3_kl_and_ratio_are_finite_when_masked_positions_overflow():
    """Tokens after EOS can be very improbable: exp of their log-ratio overflows. They are masked, so
    neither the loss nor its gradient may become NaN."""
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    logp = torch.tensor([[-0.5, -1.0, -200.0, -300.0]], requires_grad=True)
    old = torch.tensor([[-0.6, -1.1, 0.0, 0.0]])
    ref = torch.tensor([[-0.4, -0.9, 0.0, 0.0]])
    loss = grpo_loss(logp, old, torch.tensor([1.0]), mask, ref_logp=ref, kl_beta=0.1)
    loss.backward()
    what = "GRPO loss with kl_beta=0.1 and log-probs -200, -300 at the 2 masked positions"
    assert_finite(loss, what)
    assert_finite(logp.grad, f"gradient of the {what}")
    assert_close(logp.grad[0, 2:], torch.zeros(2), f"gradient of the {what}, at the masked positions", rtol=0, atol=0)
    unmasked = grpo_loss(logp[:, :2].detach(), old[:, :2], torch.tensor([1.0]), mask[:, :2], ref_logp=ref[:, :2], kl_beta=0.1)
    assert_close(loss, unmasked, f"{what} against the same loss without them", rtol=1e-6, atol=0)


def test_every_random_stream_is_its_own(monkeypatch, tmp_path):
    """No two streams of a run, nor of two seeds, share data: record every batch of problems drawn by two
    seeds' runs and check that no batch appears twice (seed s+1's warm-up used to be seed s's RL prompts)."""
    purposes = ["init", "warmup", "rl_prompts", "rl_sampling", "sft_more", "probe", "avg_k", "bench"]
    purposes += [f"diagnose/{step}" for step in range(1, 50)]
    seeds = [oisd.stream_seed(s, p) for s in range(50) for p in purposes]
    assert len(set(seeds)) == len(seeds) and len({s % 2**32 for s in seeds}) == len(seeds)
    drawn = []
    real = oisd.sample_problems

    def record(task, rng, n, exclude):
        problems = real(task, rng, n, exclude)
        drawn.append(tuple(problems))
        return problems

    monkeypatch.setattr(oisd, "sample_problems", record)
    for seed in (0, 1):
        oisd.main(SMOKE + [f"--out_dir={tmp_path / str(seed)}", f"--seed={seed}", "--rl_steps=4", "--arms=grpo,oisd_pos"])
    batches = [b for b in drawn]
    # the arms of one seed share their prompts on purpose (a paired design); apart from that, nothing repeats
    unique_per_purpose = set(batches)
    counts = {b: batches.count(b) for b in unique_per_purpose}
    assert max(counts.values()) <= 2 and sum(c == 2 for c in counts.values()) == 2 * 4  # 4 RL steps, 2 seeds


def test_nonfinite_weights_stop_the_run_with_step_and_term(tmp_path, monkeypatch):
    real = oisd.make_optimizer

    def poisoned(model, lr, device):
        opt = real(model, lr, device)
        step = opt.step

        def bad_step(*a, **k):
            out = step(*a, **k)
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
            return out

        opt.step = bad_step
        return opt

    env = oisd.Env(parse_args(SMOKE + [f"--out_dir={tmp_path}", "--rl_steps=3"]))
    oisd.warmup(env)  # cached, unpoisoned
    monkeypatch.setattr(oisd, "make_optimizer", poisoned)
    with pytest.raises(SystemExit) as e:
        oisd.run_seed(env)
    assert "oisd_pos step 1: the weights" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        oisd.run_seed(oisd.Env(parse_args(SMOKE + [f"--out_dir={tmp_path / 'new'}"])))
    assert "warm-up step 1: the weights" in str(e.value.code)


def test_cli_refuses_unusable_out_dir(tmp_path, capsys):
    afile = tmp_path / "a_file"
    afile.write_text("x")
    for path in (afile, afile / "below"):
        with pytest.raises(SystemExit) as e:
            oisd.main([f"--out_dir={path}"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "out_dir" in err


def test_help_lists_every_flag_with_type_default_and_meaning(capsys):
    for flag in ("--help", "-h"):
        with pytest.raises(SystemExit) as e:
            oisd.main([flag])
        assert e.value.code == 0
        out = capsys.readouterr().out
        for f in dataclasses.fields(Config):
            line = next(l for l in out.splitlines() if l.strip().startswith(f"--{f.name} "))
            assert type(f.default).__name__ in line, line
        assert "(default: 0.0001)" in out and "stage 2: GRPO:" in out


def test_resume_refuses_another_device_precision_warmup_or_step_before_any_work(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    oisd.main(SMOKE + [f"--out_dir={out}", "--rl_steps=2"])
    monkeypatch.setattr(oisd, "warmup", lambda env: pytest.fail("work started before the checks"))
    ck = torch.load(out / "oisd_pos.pt", weights_only=True)
    for field, value, expect in [("device", "cuda", "device"), ("precision", "bf16", "precision"),
                                 ("warmup_key", dict(ck["warmup_key"], threads=64), "thread count")]:
        torch.save(dict(ck, **{field: value}), out / "oisd_pos.pt")
        with pytest.raises(SystemExit) as e:
            oisd.main(SMOKE + [f"--out_dir={out}", "--rl_steps=3", "--resume"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expect in err and err.count("\n") == 1, err
    torch.save(ck, out / "oisd_pos.pt")
    # another precision; a checkpoint already past --rl_steps; another setting
    for extra in (["--rl_steps=3", "--precision=bf16"], ["--rl_steps=1"], ["--rl_steps=3", "--rl_lr=0.5"]):
        with pytest.raises(SystemExit) as e:
            oisd.main(SMOKE + [f"--out_dir={out}", "--resume"] + extra)
        assert e.value.code == 2, extra
    capsys.readouterr()


def test_sft_more_retrains_when_the_grpo_budget_changes(tmp_path, capsys):
    args = SMOKE + [f"--out_dir={tmp_path}", "--arms=grpo,sft_more"]
    oisd.main(args + ["--rl_steps=2"])
    first = torch.load(tmp_path / "sft_more.pt", weights_only=True)["budget"]
    oisd.main(args + ["--rl_steps=2", "--resume"])
    assert "sft_more: reusing" in capsys.readouterr().out
    oisd.main(args + ["--rl_steps=4", "--resume"])
    assert "training again" in capsys.readouterr().out
    assert torch.load(tmp_path / "sft_more.pt", weights_only=True)["budget"] > first


def test_warmup_cache_is_keyed_on_what_changes_the_weights(tmp_path):
    env = oisd.Env(parse_args(SMOKE + [f"--out_dir={tmp_path}"]))
    key = harness.warmup_key(env)
    assert {"device", "precision", "threads", "torch", "seed", "sft_lr"} <= set(key)
    bf16 = oisd.Env(parse_args(SMOKE + [f"--out_dir={tmp_path}", "--precision=bf16"]))
    assert harness.warmup_key(bf16) != key
    oisd.warmup(env)
    path = next(tmp_path.glob("warmup-*.pt"))
    ck = torch.load(path, weights_only=True)
    ck["key"]["sft_lr"] = 0.5  # a file whose stored key does not match its name
    torch.save(ck, path)
    with pytest.raises(SystemExit, match="other settings"):
        oisd.warmup(env)


def test_sigkill_mid_arm_then_resume_gives_the_uninterrupted_table(tmp_path):
    args = SMOKE + ["--rl_steps=12", "--arms=grpo,oisd_pos", "--eval_every=6"]
    oisd.main(args + [f"--out_dir={tmp_path / 'a'}"])
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "oisd.py"), *args, f"--out_dir={out}"],
                            cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 100
    while not (out / "oisd_pos.pt").exists() and time.time() < deadline:  # killed inside the second arm
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    assert not (out / "results.json").exists()
    resumed = run_cli(*args, f"--out_dir={out}", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = (json.loads((d / "results.json").read_text()) for d in (tmp_path / "a", out))
    for arm in a:
        for key in a[arm]:
            if "sec" not in key:
                assert a[arm][key] == b[arm][key], (arm, key)


def test_dependencies_run_one_way_and_layers_are_one_based():
    """oisd -> harness, model, tasks: harness never imports oisd, model and tasks import neither, and no
    core module imports anything from research/, trl_bridge/ or classroom/."""
    imports = {}
    for name in ("oisd", "harness", "model", "tasks", "test_oisd"):
        tree = ast.parse(open(os.path.join(HERE, f"{name}.py")).read())
        imports[name] = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imports[name] |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    extras = {"experiments", "speculative", "oisd_trl", "research", "trl_bridge", "classroom", "handout", "grade"}
    assert {"harness", "model", "tasks"} <= imports["oisd"] and not extras & set().union(*imports.values())
    assert "oisd" not in imports["harness"]
    assert not {"oisd", "harness"} & (imports["model"] | imports["tasks"])
    model = tiny_model()
    cache = KVCache()
    model(torch.randint(0, 13, (1, 4)), cache=cache)
    assert sorted(cache.k) == [1, 2, 3] and [model.block(l).attn.layer for l in (1, 2, 3)] == [1, 2, 3]


def test_logit_lens_reads_exits_through_the_trained_ln_f():
    model = tiny_model()
    lens = oisd.logit_lens(model)
    idx = torch.randint(0, 13, (2, 5))
    h = model.block(1)(model.embed(idx))[0]
    torch.testing.assert_close(lens(idx, exit_layers=(1,))[1][1], model.lm_head(model.transformer.ln_f(h)))
    assert model.config.exit_norm == "own"  # the original is untouched


def test_alignment_terms_match_a_numpy_loop():
    """Both OISD terms against a plain loop in numpy: weight * JSD per position (over the vocabulary, or
    over keys averaged over heads), masked, reduced per token or per sequence."""
    gen = torch.Generator().manual_seed(0)
    N, R, V, H, K = 3, 5, 7, 2, 6
    student, teacher = torch.randn(N, R, V, generator=gen), torch.randn(N, R, V, generator=gen)
    s_attn = torch.softmax(torch.randn(N, H, R, K, generator=gen), -1)
    t_attn = torch.softmax(torch.randn(N, H, R, K, generator=gen), -1)
    s_attn[..., -1] = 0.0  # an exactly-zero probability, as a causal mask gives
    weights = torch.tensor([0.7, -1.2, 0.0])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float)

    def jsd(p, q):
        m = (p + q) / 2
        kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)

    def reduce(per_pos, reduction):
        rows = [[per_pos[i][t] for t in range(R) if mask[i, t]] for i in range(N)]
        if reduction == "token":
            return sum(map(sum, rows)) / sum(map(len, rows))
        return float(np.mean([sum(r) / len(r) for r in rows]))

    sp, tp = torch.softmax(student, -1).double().numpy(), torch.softmax(teacher, -1).double().numpy()
    sa, ta = s_attn.double().numpy(), t_attn.double().numpy()
    logit = [[weights[i].item() * jsd(sp[i, t], tp[i, t]) for t in range(R)] for i in range(N)]
    attn = [[weights[i].item() * np.mean([jsd(sa[i, h, t], ta[i, h, t]) for h in range(H)]) for t in range(R)]
            for i in range(N)]
    for reduction in ("token", "sequence"):
        assert_close(logit_alignment_loss(student, teacher, weights, mask, reduction), reduce(logit, reduction),
                     f"logit_alignment_loss (N, R, V = {N}, {R}, {V}), '{reduction}', against a numpy loop",
                     rtol=0, atol=1e-6)
        assert_close(attention_alignment_loss(s_attn, t_attn, weights, mask, reduction), reduce(attn, reduction),
                     f"attention_alignment_loss (N, heads, R, keys = {N}, {H}, {R}, {K}), '{reduction}', "
                     "against a numpy loop", rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the lens picture (out_dir/lens.png)

@pytest.mark.parametrize("seed, length", [(1, 6), (19, 3)])  # no EOS within max_new / EOS as the 3rd token
def test_lens_grid_is_each_exits_top1_along_the_greedy_completion(seed, length):
    """lens_grid against a direct computation: the greedy completion by the naive loop, cut after its first
    EOS, and each layer's exit (its own norm, ln_f for the last) applied by hand to the residual stream."""
    env = tiny_env()
    model = tiny_model(seed=seed)
    with torch.no_grad():
        model.transformer.wte.weight[env.eos_id] *= 2.0  # makes EOS likely enough for one seed to stop early
    problem, P, L = env.test[0], env.prompt_len, model.config.n_layer
    tokens, probs, completion = harness.lens_grid(env, model, problem)
    response = naive_greedy(model, env.prompts([problem]), env.max_new)[0][0, P:].tolist()
    R = response.index(env.eos_id) + 1 if env.eos_id in response else len(response)
    assert R == length and probs.shape == (L, R) and completion == env.tok.decode(response[:R])
    x = model.embed(torch.cat([env.prompts([problem]), torch.tensor([response[: R - 1]])], 1))
    for layer in range(1, L + 1):
        x = model.block(layer)(x)[0]
        norm = model.transformer.ln_f if layer == L else model.exit_ln[layer - 1]
        p = torch.softmax(model.lm_head(norm(x))[0, P - 1:], -1)  # (R, V)
        assert tokens[layer - 1] == ["EOS" if t == env.eos_id else tasks.CHARS[t] for t in p.argmax(-1).tolist()]
        torch.testing.assert_close(probs[layer - 1], p.max(-1).values)
    assert tokens[-1] == ["EOS" if t == env.eos_id else tasks.CHARS[t] for t in response[:R]]  # the final layer's


def test_lens_png_is_drawn_for_every_row_of_the_table(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # optional: the core installs without it (the next test covers that)
    oisd.main(SMOKE + [f"--out_dir={tmp_path}", "--rl_steps=2", "--arms=grpo,oisd_pos"])
    assert (tmp_path / "lens.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    last = capsys.readouterr().out.splitlines()[-1]  # every row's checkpoint was read back, none stale
    assert last.startswith(f"saved {tmp_path / 'lens.png'}: ") and last.endswith(" warm-up start, grpo, oisd_pos")


def test_lens_png_without_matplotlib_is_one_line_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    oisd.main(SMOKE + [f"--out_dir={tmp_path}", "--rl_steps=2", "--arms=grpo,oisd_pos"])
    lines = [line for line in capsys.readouterr().out.splitlines() if "lens.png" in line]
    assert lines == ["lens.png skipped: pip install matplotlib to draw it"]
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"warm-up start", "grpo", "oisd_pos"}
    assert not (tmp_path / "lens.png").exists()


def test_padded_forward_gives_the_unpadded_forward_responses():
    """harness.PaddedForward (the compiled path, emulated eagerly here) pads only the response pass, after the
    prompt fills the cache: logits, exits and attention rows equal the plain forward's at every asked position."""
    env = tiny_env(n_layer=3)
    cfg = oisd.arm_config(env.cfg, "oisd")
    model = GPT(env.model_config(cfg)).eval()
    padded = harness.PaddedForward(model, env.max_new + 3, env.eos_id)
    padded.compiled = model  # the eager model behind the same padding, so no compile is needed here
    seq, _, _ = oisd.rollout(env, cfg, model, sample_problems(env.task, random.Random(0), 4, env.exclude),
                             torch.Generator().manual_seed(0))
    want, got = oisd.forward_responses(cfg, model, seq, env.prompt_len), oisd.forward_responses(cfg, padded, seq, env.prompt_len)
    torch.testing.assert_close(got[0], want[0], msg="final logits through PaddedForward")
    for layer in want[1]:
        torch.testing.assert_close(got[1][layer], want[1][layer], msg=f"exit logits of layer {layer}")
    for layer in want[2]:
        assert got[2][layer].shape == want[2][layer].shape, f"attention rows of layer {layer}: shape"
        torch.testing.assert_close(got[2][layer], want[2][layer], msg=f"attention rows of layer {layer}")
