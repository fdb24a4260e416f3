"""
Tests of the TRL bridge (oisd_trl.py): CPU, offline, tiny models. In the core's venv (no TRL) the module is
skipped; CI runs it in its own venv with OISD_TRL_REQUIRED=1, where a missing package is an error, not a skip.

    pip install -r trl_bridge/requirements.txt && OISD_TRL_REQUIRED=1 python -m pytest -q -rs trl_bridge/test_oisd_trl.py

The heart of it: the terms the trainer logs equal oisd.rl_loss's on our GPT and its to_hf copy.
"""

import copy
import os
import subprocess
import sys
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
if os.environ.get("OISD_TRL_REQUIRED") == "1":
    import trl  # noqa: F401  (a missing package fails the run here)
else:
    pytest.importorskip("trl")

# pytest puts this folder on sys.path (oisd_trl); importing oisd_trl puts the repository root there (the core)
import oisd_trl as ot  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from oisd import Config, Env, load_policy, response_mask, rl_loss, warmup  # noqa: E402

EOS_ID, PAD_ID = 13, 14
HERE = os.path.dirname(os.path.abspath(__file__))


def sharp_gpt(exit_norm="own", seed=0, n_layer=4):
    """A random GPT whose distributions are far from uniform (larger weights) and whose exit norms differ
    from ln_f, so that the terms are large enough for a 1e-5 comparison to mean something."""
    torch.manual_seed(seed)
    g = GPT(GPTConfig(vocab_size=15, block_size=32, n_layer=n_layer, n_head=4, n_embd=32, exit_norm=exit_norm))
    with torch.no_grad():
        for name, p in g.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(8.0)
            elif "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return g


@pytest.fixture(scope="module")
def warm_gpt(tmp_path_factory):
    """Our GPT from a short warm-up (oisd.warmup) of 2-digit addition, exit norms perturbed as after training."""
    env = Env(Config(out_dir=str(tmp_path_factory.mktemp("warm")), digits=2, n_embd=32, sft_max_steps=400,
                     sft_eval_every=50))
    g = load_policy(env, env.cfg, warmup(env))
    with torch.no_grad():
        for ln in g.exit_ln:
            for p in ln.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return g


def batch(groups=2, G=4, P=6, R=5, seed=1):
    """Rollouts as oisd.rl_loss takes them: G consecutive rows per prompt; EOS at varied places; advantages
    with both signs and one all-zero group."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, 13, (groups, P), generator=gen).repeat_interleave(G, 0)
    comp = torch.randint(0, 13, (groups * G, R), generator=gen)
    comp[0, 1] = comp[2, 3] = comp[5, 0] = EOS_ID
    adv = torch.randn(groups * G, generator=gen)
    adv[G:2 * G] = 0.0  # a group whose rewards were all equal
    return torch.cat([prompts, comp], 1), comp, response_mask(comp, EOS_ID), adv


def trainer_for(model, tmp_path, cls=None, **overrides):
    """An OISDTrainer (or `cls`) around `model`, fp32, no dropout, for calling _compute_loss directly."""
    from datasets import Dataset
    kw = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=8, num_generations=4,
              max_completion_length=5, bf16=False, use_cpu=True, activation_checkpointing=False, disable_dropout=True,
              report_to="none", loss_type="bnpo", logging_steps=1, align_layers="2")
    kw.update(overrides)
    cls = cls or ot.OISDTrainer
    args = ot.OISDConfig(**kw) if cls is ot.OISDTrainer else ot.GRPOConfig(
        **{k: v for k, v in kw.items() if k not in ("align_layers", "lambda_logit", "lambda_attn", "adv_weighting",
                                                    "exit_norm", "align_reduction", "exit_chunk", "attn_chunk")})
    tr = cls(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args,
             processing_class=ot.arithmetic_tokenizer(), train_dataset=Dataset.from_dict({"prompt": ["12+34="] * 8}))
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    return tr


def inputs_of(prompt_ids, comp, mask, adv, prompt_mask=None):
    prompt_mask = torch.ones_like(prompt_ids) if prompt_mask is None else prompt_mask
    return dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=comp, completion_mask=mask.long(),
                advantages=adv, num_items_in_batch=mask.sum())


def logged(tr, name):
    return tr._metrics["train"][f"oisd/{name}"][-1]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# -----------------------------------------------------------------------------
# Conversion

@pytest.mark.parametrize("exit_norm", ["own", "ln_f"])
def test_to_hf_and_back_give_the_same_logits(exit_norm):
    g = sharp_gpt(exit_norm)
    hf = ot.to_hf(g)
    ids = torch.randint(0, 15, (3, 11))
    out = hf(ids, output_hidden_states=True)
    logits, exits, _ = g(ids, exit_layers=(1, 2, 3))
    torch.testing.assert_close(out.logits, logits, rtol=0, atol=1e-5)
    for layer in (1, 2, 3):
        mine = ot.exit_logits(ot.exit_norm_module(hf, layer), hf.lm_head, out.hidden_states[layer])
        torch.testing.assert_close(mine, exits[layer], rtol=0, atol=1e-5)
    back = ot.from_hf(hf)
    assert back.config == g.config
    for (name, p), (_, q) in zip(g.state_dict().items(), back.state_dict().items()):
        assert torch.equal(p, q), name


def test_tokenizer_matches_tiktoken():
    from tasks import get_tokenizer
    tok, ref = ot.arithmetic_tokenizer(), get_tokenizer()
    text = "041+265=0306" + ot.EOS
    assert tok(text).input_ids == ref.encode(text, allowed_special="all")
    assert tok.eos_token_id == EOS_ID and tok.pad_token_id == PAD_ID and tok.padding_side == "left"


# -----------------------------------------------------------------------------
# Equivalence with oisd.rl_loss

def core_terms(g, seq, P, mask, adv, **cfg):
    cfg = Config(n_layer=g.config.n_layer, group_size=4, **cfg)
    total, terms = rl_loss(cfg, g, seq, P, torch.zeros_like(mask), adv, mask)
    return terms


@pytest.mark.parametrize("weighting", ["signed", "positive"])
@pytest.mark.parametrize("exit_norm", ["own", "ln_f"])
@pytest.mark.parametrize("layers", ["2", "1,3"])
def test_logged_terms_equal_rl_loss(tmp_path, weighting, exit_norm, layers):
    g = sharp_gpt(exit_norm)
    seq, comp, mask, adv = batch()
    knobs = dict(align_layers=layers, adv_weighting=weighting, exit_norm=exit_norm, lambda_logit=1.0, lambda_attn=0.1)
    want = core_terms(g, seq, 6, mask, adv, **knobs)
    tr = trainer_for(ot.to_hf(g), tmp_path, **knobs)
    tr._compute_loss(tr.model, inputs_of(seq[:, :6], comp, mask, adv))
    assert abs(want["logit"].item()) > 1e-3 and abs(want["attn"].item()) > 1e-4  # large enough to tell apart
    assert logged(tr, "logit") == pytest.approx(want["logit"].item(), abs=1e-5)
    assert logged(tr, "attn") == pytest.approx(want["attn"].item(), abs=1e-5)


def test_terms_and_their_gradients_equal_rl_loss_from_the_warmup(tmp_path, warm_gpt):
    """From a warm-up checkpoint: the values, and the gradients of lambda-weighted terms on every parameter
    (the OISD part of the trainer's loss is its loss minus the same trainer's loss with both lambdas at 0)."""
    g = copy.deepcopy(warm_gpt)
    seq, comp, mask, adv = batch(seed=3)
    knobs = dict(align_layers="1,2", adv_weighting="signed", lambda_logit=1.0, lambda_attn=0.1)
    terms = core_terms(g, seq, 6, mask, adv, **knobs)
    (terms["logit"] + 0.1 * terms["attn"]).backward()
    want = as_hf_grads(g)

    def trainer_grads(**kw):
        tr = trainer_for(ot.to_hf(warm_gpt), tmp_path, **{**knobs, **kw})
        tr._compute_loss(tr.model, inputs_of(seq[:, :6], comp, mask, adv)).backward()
        return tr, grads(tr.model)
    tr, with_terms = trainer_grads()
    _, without = trainer_grads(lambda_logit=0.0, lambda_attn=0.0)
    assert logged(tr, "logit") == pytest.approx(terms["logit"].item(), abs=1e-5)
    assert logged(tr, "attn") == pytest.approx(terms["attn"].item(), abs=1e-5)
    for name, grad in with_terms.items():
        oisd_part = grad - without.get(name, torch.zeros_like(grad))
        torch.testing.assert_close(oisd_part, want[name], rtol=1e-4, atol=1e-6, msg=name)
    assert with_terms["oisd_exit_ln.1.weight"].abs().sum() > 0 and "oisd_exit_ln.2.weight" not in with_terms


def as_hf_grads(g):
    """g's gradients under to_hf's parameter names: a copy of g holding its gradients as weights, converted."""
    c = copy.deepcopy(g)
    with torch.no_grad():
        for p, q in zip(g.parameters(), c.parameters()):
            q.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return {n: p.detach() for n, p in ot.to_hf(c).named_parameters()}


def left_padded(pad_id):
    """Two groups whose prompts differ in length (4 and 6 tokens), left-padded to 6 as TRL pads them."""
    seq, comp, mask, adv = batch()
    prompts = seq[:, :6].clone()
    prompt_mask = torch.ones_like(prompts)
    prompts[:4, :2], prompt_mask[:4, :2] = pad_id, 0
    return prompts, prompt_mask, comp, mask, adv


def test_left_padded_prompts_pad_tokens_contribute_nothing(tmp_path):
    g = sharp_gpt()
    values = []
    for pad_id in (PAD_ID, 3, 9):
        prompts, prompt_mask, comp, mask, adv = left_padded(pad_id)
        tr = trainer_for(ot.to_hf(g), tmp_path, align_layers="1,2", lambda_attn=0.1)
        tr._compute_loss(tr.model, inputs_of(prompts, comp, mask, adv, prompt_mask))
        values.append((logged(tr, "logit"), logged(tr, "attn")))
    assert abs(values[0][0]) > 1e-3 and abs(values[0][1]) > 1e-4
    for other in values[1:]:
        assert other == pytest.approx(values[0], abs=1e-6)
    # no attention mass on pad keys, in the aligned layers and the last one, at every real query position
    hf = tr.model
    ids = torch.cat([prompts, comp], 1)
    with ot.recording(hf, (1, 2), (1, 2, 4)) as rec:
        hf(ids, attention_mask=torch.cat([prompt_mask, mask.long()], 1))
    for layer, probs in rec["attn"].items():
        assert probs[:4, :, 2:, :2].abs().max() == 0, layer  # rows 0-3 have pads at keys 0-1
        torch.testing.assert_close(probs[:4, :, 2:].sum(-1), torch.ones(4, 4, 9))


def test_left_padded_prompts_give_oisd_terms_of_each_unpadded_group(tmp_path):
    """Prompts of 4 and 6 tokens, left-padded by TRL: the logged terms equal oisd.rl_loss's on each group
    without its pads, combined by token counts (token reduction). GPT-2's positions must then come from the
    mask, as at sampling; without positions_from_mask they would be shifted by the pads."""
    g = sharp_gpt()
    prompts, prompt_mask, comp, mask, adv = left_padded(PAD_ID)
    knobs = dict(align_layers="1,2", lambda_attn=0.1)
    tr = trainer_for(ot.to_hf(g), tmp_path, **knobs)
    tr._compute_loss(tr.model, inputs_of(prompts, comp, mask, adv, prompt_mask))
    want = {"logit": 0.0, "attn": 0.0}
    for rows, pads in ((slice(0, 4), 2), (slice(4, 8), 0)):
        seq = torch.cat([prompts[rows, pads:], comp[rows]], 1)
        terms = core_terms(g, seq, 6 - pads, mask[rows], adv[rows], **knobs)
        for name in want:
            want[name] += terms[name].item() * mask[rows].sum().item() / mask.sum().item()
    assert (logged(tr, "logit"), logged(tr, "attn")) == pytest.approx((want["logit"], want["attn"]), abs=1e-5)


def test_trl_logprobs_of_a_padded_prompt_equal_those_of_the_unpadded_one(tmp_path):
    """The old-policy and reference log-probs TRL takes outside _compute_loss see the same positions as
    sampling: a left-padded row's completion log-probs equal the unpadded row's, for the policy and for the
    reference model that TRL loads from the policy's path when beta > 0."""
    prompts, prompt_mask, comp, mask, adv = left_padded(PAD_ID)
    ot.to_hf(sharp_gpt()).save_pretrained(str(tmp_path / "policy"))
    tr = trainer_for(str(tmp_path / "policy"), tmp_path, beta=0.04, model_init_kwargs={"dtype": torch.float64})
    assert tr.ref_model is not None and tr.ref_model is not tr.model
    assert tr.model.dtype == tr.ref_model.dtype == torch.float64  # a path is loaded with model_init_kwargs
    torch.testing.assert_close(tr.model.oisd_exit_ln[1].weight, sharp_gpt().exit_ln[1].weight.double())  # its own norms
    C = comp.size(1)
    for model in (tr.model, tr.ref_model):
        padded = tr._get_per_token_logps_and_entropies(model, torch.cat([prompts, comp], 1)[:4],
                                                       torch.cat([prompt_mask, mask.long()], 1)[:4], C)[0]
        plain = tr._get_per_token_logps_and_entropies(model, torch.cat([prompts[:4, 2:], comp[:4]], 1),
                                                      torch.cat([prompt_mask[:4, 2:], mask[:4].long()], 1), C)[0]
        torch.testing.assert_close(padded, plain, rtol=0, atol=1e-5)


def test_a_path_loads_in_fp32_as_grpo_trainer_loads_it(tmp_path):
    """A checkpoint saved in bf16, given as a path with no model_init_kwargs, trains fp32 weights (TRL's default for
    a path; from_pretrained's own default would keep bf16, where a 1e-6 update rounds away), exit norms restored."""
    hf = ot.to_hf(sharp_gpt()).to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "bf16"))
    tr = trainer_for(str(tmp_path / "bf16"), tmp_path)
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())
    torch.testing.assert_close(tr.model.oisd_exit_ln[1].weight, hf.oisd_exit_ln[1].weight.float(), rtol=0, atol=0)
    back = ot.load_oisd_model(str(tmp_path / "bf16"))  # for use after training: from_pretrained's defaults
    assert back.dtype == torch.bfloat16 and torch.equal(back.oisd_exit_ln[1].weight, hf.oisd_exit_ln[1].weight)
    with pytest.raises(ot.OISDError, match="quantization_config"):  # 4/8-bit weights train only through PEFT
        trainer_for(str(tmp_path / "bf16"), tmp_path, model_init_kwargs={"quantization_config": {"load_in_4bit": True}})


def test_global_token_loss_types_are_refused(tmp_path):
    """dapo (TRL's own default), cispo and vespo normalise by the global token count; the OISD terms do not."""
    for loss_type in ("dapo", "cispo", "vespo"):
        with pytest.raises(ot.OISDError, match="loss_type"):
            trainer_for(ot.to_hf(sharp_gpt()), tmp_path, loss_type=loss_type)
    assert ot.OISDConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False).loss_type == "bnpo"
    with pytest.raises(ot.OISDError, match="OISDConfig"):  # a plain GRPOConfig (or none) has no OISD fields
        ot.OISDTrainer(model=ot.to_hf(sharp_gpt()), args=ot.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False))


def test_eager_attention_only_where_needed(tmp_path):
    off = trainer_for(ot.to_hf(sharp_gpt()), tmp_path, lambda_attn=0.0)
    assert off.model.config._attn_implementation == "sdpa"
    on = trainer_for(ot.to_hf(sharp_gpt()), tmp_path, align_layers="2", lambda_attn=0.1)
    assert on.model.config._attn_implementation == ot.ATTN_IMPL
    assert [getattr(b.attn, "oisd_layer", None) for b in ot.blocks(on.model)] == [None, 2, None, 4]


# -----------------------------------------------------------------------------
# The loss as a whole

def test_lambda_zero_equals_plain_grpo_trainer(tmp_path):
    g = sharp_gpt()
    seq, comp, mask, adv = batch()
    inputs = inputs_of(seq[:, :6], comp, mask, adv)
    plain = trainer_for(ot.to_hf(g), tmp_path, cls=ot.GRPOTrainer)
    ours = trainer_for(ot.to_hf(g), tmp_path, lambda_logit=0.0, lambda_attn=0.0)
    loss_plain, loss_ours = plain._compute_loss(plain.model, inputs), ours._compute_loss(ours.model, inputs)
    loss_plain.backward()
    loss_ours.backward()
    assert torch.equal(loss_plain, loss_ours)
    gp, go = grads(plain.model), grads(ours.model)
    assert gp.keys() == go.keys() and all(torch.equal(gp[k], go[k]) for k in gp)
    with_terms = trainer_for(ot.to_hf(g), tmp_path)  # and the terms do change it
    assert not torch.equal(with_terms._compute_loss(with_terms.model, inputs), loss_plain)


@pytest.mark.parametrize("loss_type", ot.PER_MICRO_BATCH_LOSS_TYPES)
def test_each_allowed_loss_type_is_trls_loss_plus_the_terms(tmp_path, loss_type):
    g = sharp_gpt()
    seq, comp, mask, adv = batch()
    inputs = inputs_of(seq[:, :6], comp, mask, adv)
    kw = dict(loss_type=loss_type, importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    plain = trainer_for(ot.to_hf(g), tmp_path, cls=ot.GRPOTrainer, **kw)
    ours = trainer_for(ot.to_hf(g), tmp_path, lambda_logit=1.0, lambda_attn=0.1, **kw)
    for accumulation in (1, 2):  # TRL divides its loss by the accumulation steps, and the terms with it
        plain.current_gradient_accumulation_steps = ours.current_gradient_accumulation_steps = accumulation
        extra = ours._compute_loss(ours.model, inputs) - plain._compute_loss(plain.model, inputs)
        assert logged(ours, "logit") > 1e-3 and logged(ours, "attn") > 1e-3
        terms = logged(ours, "logit") + 0.1 * logged(ours, "attn")
        assert extra.item() == pytest.approx(terms / accumulation, rel=1e-5)


def loss_and_grads(tr, inputs):
    loss = tr._compute_loss(tr.model, inputs)
    loss.backward()
    return loss.detach(), grads(tr.model)


def assert_same(a, b, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    assert a[1].keys() == b[1].keys()
    for k in a[1]:
        torch.testing.assert_close(a[1][k], b[1][k], rtol=1e-5, atol=atol, msg=k)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_chunked_equals_unchunked(tmp_path, reduction):
    g = sharp_gpt()
    seq, comp, mask, adv = batch()
    inputs = inputs_of(seq[:, :6], comp, mask, adv)
    runs = [loss_and_grads(trainer_for(ot.to_hf(g), tmp_path, exit_chunk=chunk, attn_chunk=attn, align_reduction=reduction,
                                       align_layers="1,2"), inputs) for chunk, attn in ((0, 0), (3, 2))]
    assert_same(*runs)


def test_chunked_logit_term_equals_core_function_in_both_reductions():
    torch.manual_seed(0)
    head, norm = torch.nn.Linear(8, 50, bias=False), torch.nn.LayerNorm(8)
    s, t = torch.randn(3, 7, 8) * 3, torch.randn(3, 7, 8) * 3
    mask = (torch.rand(3, 7) > 0.3).float()
    w = torch.tensor([1.0, -0.5, 2.0])
    for reduction in ("token", "sequence"):
        want = ot.logit_alignment_loss(head(norm(s)), head(t), w, mask, reduction)
        got = ot.logit_term(s, t, norm, head, w, mask, reduction, chunk=4)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_chunked_attention_term_equals_core_function_in_both_reductions():
    """The response rows 2..8 of a (3, 2, 10, 9) attention, in chunks, against attention_alignment_loss on those
    rows: the same value, the same gradient there and zero on every other row, none for the teacher; with
    masked keys (exact zeros) in both, and a rollout with nothing to align."""
    torch.manual_seed(0)
    scores_s, scores_t = torch.randn(3, 2, 10, 9) * 3, torch.randn(3, 2, 10, 9) * 3
    scores_s[..., 0] = scores_t[..., :2] = float("-inf")  # exact zeros, as masked keys give
    s, t = scores_s.softmax(-1).requires_grad_(), scores_t.softmax(-1).requires_grad_()
    mask = (torch.rand(3, 7) > 0.3).float()
    mask[1] = 0  # a row with nothing to align
    w = torch.tensor([1.0, -0.5, 2.0])
    for reduction in ("token", "sequence"):
        want = ot.attention_alignment_loss(s[:, :, 2:9], t[:, :, 2:9], w, mask, reduction)
        want_grad, = torch.autograd.grad(want, s)
        assert want_grad[:, :, 2:9].abs().sum() > 0 and not want_grad[:, :, [0, 1, 9]].any()
        for chunk in (0, 1, 3, 7, 50):
            got = ot.attention_term(s, t, w, mask, reduction, chunk, first=2)
            got_grad, got_t = torch.autograd.grad(got, (s, t), allow_unused=True)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-8)
            assert torch.isfinite(got_grad).all() and (got_t is None or not got_t.any())


@pytest.mark.parametrize("reentrant,knobs", [(False, dict(lambda_attn=0.1)), (True, dict(lambda_attn=0.0))])
def test_checkpointing_on_equals_off(tmp_path, reentrant, knobs):
    """Non-reentrant with both terms; reentrant with the logit term only (the attention term refuses it)."""
    g = sharp_gpt()
    seq, comp, mask, adv = batch()
    inputs = inputs_of(seq[:, :6], comp, mask, adv)
    off = loss_and_grads(trainer_for(ot.to_hf(g), tmp_path, align_layers="1,2", **knobs), inputs)
    tr = trainer_for(ot.to_hf(g), tmp_path, align_layers="1,2", activation_checkpointing=True,
                     activation_checkpointing_kwargs={"use_reentrant": reentrant}, **knobs)
    tr.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    tr.model.train()
    assert all(b.gradient_checkpointing for b in ot.blocks(tr.model))
    assert_same(off, loss_and_grads(tr, inputs))


def test_several_chunks_under_checkpointing_equal_one_without(tmp_path):
    """Both terms in several chunks (exit_chunk 3, attn_chunk 2) inside non-reentrant activation checkpointing
    against no chunks and no checkpointing; then a micro-batch with no response token at all: finite, zero terms."""
    g = sharp_gpt()
    seq, comp, mask, adv = batch()
    inputs = inputs_of(seq[:, :6], comp, mask, adv)
    off = loss_and_grads(trainer_for(ot.to_hf(g), tmp_path, align_layers="1,2", exit_chunk=0, attn_chunk=0), inputs)
    tr = trainer_for(ot.to_hf(g), tmp_path, align_layers="1,2", exit_chunk=3, attn_chunk=2, activation_checkpointing=True,
                     activation_checkpointing_kwargs={"use_reentrant": False})
    tr.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    tr.model.train()
    assert_same(off, loss_and_grads(tr, inputs))
    tr.model.zero_grad()
    loss, got = loss_and_grads(tr, inputs_of(seq[:, :6], comp, torch.zeros_like(mask), adv))
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in got.values())
    assert logged(tr, "logit") == 0.0 and logged(tr, "attn") == 0.0


def test_grad_accumulation_of_two_equals_one_batch_of_twice_the_size(tmp_path):
    g = sharp_gpt()
    seq, comp, mask, adv = batch()
    half = [slice(0, 4), slice(4, 8)]
    comp, mask = comp.clone(), mask.clone()
    comp[4:], mask[4:] = comp[:4], mask[:4]  # halves with the same token counts (token means then add up)
    full = inputs_of(seq[:, :6], comp, mask, adv)
    one = loss_and_grads(trainer_for(ot.to_hf(g), tmp_path, align_layers="1,2"), full)
    tr = trainer_for(ot.to_hf(g), tmp_path, align_layers="1,2")
    tr.current_gradient_accumulation_steps = 2
    loss = sum(loss_and_grads(tr, {k: v[s] if v.dim() else v for k, v in full.items()})[0] for s in half)
    assert_same(one, (loss, grads(tr.model)))


def test_bf16_autocast_keeps_terms_close_to_fp32(tmp_path):
    g = sharp_gpt()
    seq, comp, mask, adv = batch()
    inputs = inputs_of(seq[:, :6], comp, mask, adv)
    fp32 = trainer_for(ot.to_hf(g), tmp_path)
    fp32._compute_loss(fp32.model, inputs)
    bf16 = trainer_for(ot.to_hf(g), tmp_path, bf16=True)
    loss = bf16._compute_loss(bf16.model, inputs)
    loss.backward()
    assert bf16.accelerator.mixed_precision == "bf16" and torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in grads(bf16.model).values())
    for name in ("logit", "attn"):
        assert logged(bf16, name) == pytest.approx(logged(fp32, name), rel=0.05, abs=1e-4)


# -----------------------------------------------------------------------------
# Training for real: the exit norm, a Llama-style model

def arithmetic_trainer(tmp_path, arm="oisd_pos", steps=2, **overrides):
    env = Env(Config(out_dir=str(tmp_path), digits=2, n_embd=32, prompts_per_step=2, group_size=4))
    cfg = ot.arm_config(env.cfg, arm)
    torch.manual_seed(0)
    hf = ot.to_hf(load_policy(env, cfg, GPT(env.model_config(cfg)).state_dict()))
    args = ot.trl_args(cfg, str(tmp_path / arm), steps, max_completion_length=env.max_new, logging_steps=1,
                       **overrides)
    return env, ot.OISDTrainer(model=hf, args=args, reward_funcs=lambda completions, **k: torch.rand(len(completions)).tolist(),
                               processing_class=ot.arithmetic_tokenizer(), train_dataset=ot.arithmetic_dataset(env, 16, 0))


def test_trl_args_carry_every_rl_knob_of_the_core_config(tmp_path):
    cfg = ot.arm_config(Config(prompts_per_step=3, group_size=5, rl_lr=2e-4, grad_clip=0.7, clip_eps=0.3, kl_beta=0.04,
                               num_iterations=2, temperature=0.8, scale_advantages=False, seed=7), "oisd_pos")
    args = ot.trl_args(cfg, str(tmp_path), 4, max_completion_length=9)
    got = (args.per_device_train_batch_size, args.num_generations, args.learning_rate, args.max_grad_norm, args.epsilon,
           args.beta, args.num_iterations, args.temperature, args.scale_rewards, args.seed, args.adv_weighting)
    assert got == (15, 5, 2e-4, 0.7, 0.3, 0.04, 2, 0.8, "none", 7, "positive")


def test_num_iterations_reuses_one_rollout_for_its_updates(tmp_path):
    env, tr = arithmetic_trainer(tmp_path, steps=4, num_iterations=2)
    sampled = []
    original = tr._generate_and_score_completions
    tr._generate_and_score_completions = lambda inputs: sampled.append(1) or original(inputs)
    tr.train()
    logged = [r for r in tr.state.log_history if "oisd/logit" in r]
    assert len(sampled) == 2 and len(logged) == 4  # 4 optimizer steps, each with the OISD terms, from 2 rollouts


def test_exit_norm_is_optimized_moves_is_saved_and_reloaded(tmp_path):
    from transformers import AutoModelForCausalLM
    env, tr = arithmetic_trainer(tmp_path)
    trained, frozen = tr.model.oisd_exit_ln[1], tr.model.oisd_exit_ln[0]  # layer 2 is aligned, layer 1 is not
    start = {n: p.detach().clone() for n, p in tr.model.oisd_exit_ln.named_parameters()}
    tr.train()
    in_opt = {id(p) for group in tr.optimizer.param_groups for p in group["params"]}
    assert all(id(p) in in_opt for p in trained.parameters()) and not any(id(p) in in_opt for p in frozen.parameters())
    now = dict(tr.model.oisd_exit_ln.named_parameters())
    assert not torch.equal(now["1.weight"], start["1.weight"]) and torch.equal(now["0.weight"], start["0.weight"])
    assert any("oisd/logit" in record for record in tr.state.log_history)
    tr.save_model(str(tmp_path / "saved"))
    assert not hasattr(AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")), "oisd_exit_ln")  # the pitfall
    back = ot.load_oisd_model(str(tmp_path / "saved"))
    for name, p in tr.model.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def tiny_llama(kind="llama"):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cls, config_cls = (LlamaForCausalLM, LlamaConfig) if kind == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    torch.manual_seed(0)
    return cls(config_cls(vocab_size=15, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=64, bos_token_id=EOS_ID, eos_token_id=EOS_ID,
                          pad_token_id=PAD_ID, tie_word_embeddings=False, attn_implementation="sdpa"))


def test_loading_keeps_a_llama_models_fp32_rope_buffers(tmp_path):
    """Restoring the exit norms changes nothing else: a bf16 Llama with exit norms, loaded by load_oisd_model or
    by the trainer with dtype bf16, keeps the fp32 rotary buffers a plain from_pretrained gives it."""
    from transformers import AutoModelForCausalLM
    ot.attach_exit_norms(tiny_llama(), "own").to(torch.bfloat16).save_pretrained(str(tmp_path / "llama"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
    want = {n: b.dtype for n, b in plain.named_buffers()}
    assert torch.float32 in want.values()  # the rotary inv_freq
    back = ot.load_oisd_model(str(tmp_path / "llama"))
    tr = trainer_for(str(tmp_path / "llama"), tmp_path, model_init_kwargs={"dtype": torch.bfloat16})
    for model in (back, tr.model):
        assert {n: b.dtype for n, b in model.named_buffers()} == want
        assert model.oisd_exit_ln[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_style_model_trains_one_step_with_both_terms(tmp_path, kind):
    from datasets import Dataset
    model = tiny_llama(kind)
    args = ot.OISDConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                         max_steps=1, learning_rate=1e-2, bf16=False, use_cpu=True, activation_checkpointing=False,
                         disable_dropout=True, report_to="none", logging_steps=1, align_layers="1", lambda_attn=0.1,
                         adv_weighting="positive")
    tr = ot.OISDTrainer(model=model, reward_funcs=lambda completions, **k: torch.rand(len(completions)).tolist(), args=args,
                        processing_class=ot.arithmetic_tokenizer(), train_dataset=Dataset.from_dict({"prompt": ["12+34=", "5+6="] * 4}))
    start = tr.model.oisd_exit_ln[0].weight.detach().clone()
    tr.train()
    log = next(r for r in tr.state.log_history if "oisd/logit" in r)
    assert log["oisd/logit"] > 0 and log["oisd/attn"] > 0 and torch.isfinite(torch.tensor(log["loss"]))
    assert not torch.equal(tr.model.oisd_exit_ln[0].weight, start)


def test_command_line_trains_a_local_model_with_a_named_reward(tmp_path):
    """python oisd_trl.py --model=DIR --reward=module:function --prompts=FILE: one step, saved with its exit norm."""
    tiny_llama().save_pretrained(tmp_path / "model")
    ot.arithmetic_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "my_rewards.py").write_text("import random\n\ndef coin(completions, **kwargs):\n"
                                            "    return [float(random.random() < 0.5) for _ in completions]\n")
    (tmp_path / "prompts.txt").write_text("12+34=\n5+6=\n")
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{HERE}")
    out = subprocess.run([sys.executable, os.path.join(HERE, "oisd_trl.py"), f"--model={tmp_path / 'model'}",
                          "--reward=my_rewards:coin", f"--prompts={tmp_path / 'prompts.txt'}", "--max_steps=1", "--batch=8",
                          "--group=4", "--max_completion_length=4", "--align_layers=1", f"--out_dir={tmp_path / 'out'}"],
                         capture_output=True, text=True, env=env, cwd=HERE, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    back = ot.load_oisd_model(str(tmp_path / "out" / "final"))
    assert len(back.oisd_exit_ln) == 2


def test_llama_captured_attention_equals_eager_attentions():
    """An independent check of the attention function (grouped-query heads, scaling, padding mask): the
    probabilities it keeps equal those of transformers' own eager attention."""
    model = tiny_llama()
    ids = torch.randint(0, 13, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    model.set_attn_implementation("eager")
    want = model(ids, attention_mask=mask, output_attentions=True).attentions
    ot.mark_eager(model, (1, 3))
    with ot.recording(model, (), (1, 3)) as rec:
        model(ids, attention_mask=mask)
    for layer in (1, 3):
        torch.testing.assert_close(rec["attn"][layer][1], want[layer - 1][1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rec["attn"][layer][0, :, 3:], want[layer - 1][0, :, 3:], rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Refusals: one line, a clear exception in a library, exit 2 on the command line

def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, use_cpu=True,
                activation_checkpointing=False, disable_dropout=True, report_to="none", bf16=False)
    return ot.OISDConfig(**{**base, **kw})


REFUSALS = {
    "layer out of range": (dict(align_layers="4"), None, "align_layers"),
    "layer zero": (dict(align_layers="0"), None, "align_layers"),
    "reentrant with the attention term": (dict(activation_checkpointing=True,
                                               activation_checkpointing_kwargs={"use_reentrant": True}), None, "reentrant"),
    "vllm": (dict(use_vllm=True), None, "vLLM"),
    "dropout left on": (dict(disable_dropout=False), "dropout", "dropout"),
    "zero-3": ({}, "zero3", "ZeRO-3"),
    "fsdp": ({}, "fsdp", "FSDP"),
    "quantized model": ({}, "quantized", "quantized"),
    "model split over devices": ({}, "split", "device_map"),
    "bad weighting": (dict(adv_weighting="sometimes"), None, "adv_weighting"),
    "DDP searching unused parameters": (dict(ddp_find_unused_parameters=True), None, "ddp_find_unused_parameters"),
    "trained exit norms dropped by from_pretrained": ({}, "plain load", "load_oisd_model"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_each_refusal_is_one_line(tmp_path, case):
    kw, tweak, word = REFUSALS[case]
    model = ot.to_hf(sharp_gpt())
    args = config(tmp_path, **kw)
    if tweak == "dropout":
        model.transformer.h[0].attn.attn_dropout.p = 0.1
    elif tweak == "zero3":
        args.deepspeed_plugin = types.SimpleNamespace(zero_stage=3)
    elif tweak == "fsdp":
        args.fsdp = ["full_shard"]
    elif tweak == "quantized":  # what a checkpoint saved quantized loads as
        model.is_quantized = True
    elif tweak == "split":
        model.hf_device_map = {"transformer.h.0": 0, "transformer.h.1": 1}
    elif tweak == "plain load":  # what AutoModelForCausalLM.from_pretrained gives for a saved OISD model
        del model.oisd_exit_ln
    with pytest.raises(ot.OISDError) as e:
        ot.check_supported(model, args)
    assert word in str(e.value) and "\n" not in str(e.value)
    if case == "dropout left on":  # the trainer refuses it before building anything
        with pytest.raises(ot.OISDError):
            ot.OISDTrainer(model=model, reward_funcs=lambda completions, **k: [0.0] * len(completions), args=args)
    if case == "trained exit norms dropped by from_pretrained":  # with the logit lens there is nothing to lose
        ot.check_supported(model, config(tmp_path, exit_norm="ln_f"))
    if case == "reentrant with the attention term":  # with the attention term off it is supported
        ot.check_supported(model, config(tmp_path, lambda_attn=0.0, **kw))


def test_unknown_layout_is_refused():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=15, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=64))
    with pytest.raises(ot.OISDError, match="LAYOUTS"):
        ot.check_supported(model, types.SimpleNamespace())


@pytest.mark.parametrize("argv", [["--align_layers=4"], ["--align_layers=2,2"],
                                  ["--model=/no/such/dir", "--reward=m:f", "--prompts=p.txt"],
                                  ["--model=.", "--reward=no_colon", "--prompts=requirements.txt"],
                                  ["--model=.", "--reward=m:f", "--prompts=/no/such/file"],
                                  ["--model=.", "--reward=m:f", "--prompts=requirements.txt", "--batch=6", "--group=4"]])
def test_command_line_refusals_exit_2_with_one_line(tmp_path, argv):
    out = subprocess.run([sys.executable, os.path.join(HERE, "oisd_trl.py"), f"--out_dir={tmp_path / 'out'}", *argv],
                         capture_output=True, text=True, cwd=HERE, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1, out.stderr
    assert not (tmp_path / "out").exists()  # refused before any work
