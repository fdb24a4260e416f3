"""
OISD inside Hugging Face TRL: GRPOTrainer plus the two OISD terms of oisd.py, for real models and launchers
(accelerate, torchrun). An optional extra with its own requirements: pip install -r trl_bridge/requirements.txt

    python trl_bridge/oisd_trl.py          # our arithmetic task inside TRL: grpo vs oisd_pos from the warm-up, ~2-4 min on 1 CPU thread
    python trl_bridge/oisd_trl.py --model=DIR --reward=my_module:my_reward --prompts=prompts.txt   # any local causal LM
    torchrun --nproc_per_node=2 trl_bridge/oisd_trl.py --smoke   # 2 processes (gloo): exit norms identical on both ranks
    python trl_bridge/oisd_trl.py --measure=speed     # seconds per TRL step, OISD against plain GRPO, alternated
    python trl_bridge/oisd_trl.py --measure=memory    # peak memory of both terms, chunked against unchunked, and of bf16 weights

How it hooks in: TRL's forward returns only log-probabilities (a fused LM head), so forward hooks keep, during
TRL's own training forward, the residual stream after each aligned block and the backbone's final-normed
hidden state; the exit and teacher logits are then two extra unembeddings at the response positions
(hidden[:, -C-1:-1] for C completion tokens; the teacher's without grad), in chunks of positions. With the
attention term on, an attention function runs eager (fp32 probabilities) in the aligned layers and the last
one and sdpa in every other; it keeps the probabilities while a training forward is recorded, and the
attention term reads their response rows in chunks of positions too. The terms
themselves are oisd.py's logit_alignment_loss and attention_alignment_loss (js_divergence,
alignment_weights): the same math, not a second copy.

Simplifications, stated up front: the OISD terms are reduced per micro-batch (masked_mean, token or
sequence) and divided by the gradient-accumulation steps as TRL divides its own loss, so only TRL's
per-micro-batch loss types are allowed (bnpo, the default here, grpo, dr_grpo, sapo, luspo); GPT-2's training forward
gets the positions generation used (positions_from_mask); exit norms exist for every layer 1..L-1 but only
the aligned ones train. Refused (one line, before training): TRL's global-token loss types (dapo, cispo,
vespo), vLLM generation, DeepSpeed ZeRO-3 and FSDP (the exit head reads the unembedding outside the
module's forward), DDP's search for unused parameters, reentrant checkpointing with the attention term on,
dropout left on, an aligned layer out of range, a layout not in LAYOUTS, PEFT, a quantized model, a model split
over devices.
"""

import argparse
import copy
import glob
import importlib
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

# The core (model.py, oisd.py, tasks.py) lives one folder up, at the repository root: importable from any cwd.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from model import GPT, GPTConfig  # noqa: E402
from oisd import (Config, Env, alignment_weights, arm_config, attention_alignment_loss, evaluate, layer_list,  # noqa: E402
                  load_policy, logit_alignment_loss, warmup)
from tasks import CHARS, EOS, PAD, sample_problems  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded: every model and tokenizer is local
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import transformers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402
from trl import GRPOConfig, GRPOTrainer, __version__ as trl_version  # noqa: E402
from trl.trainer.utils import create_model_from_path  # noqa: E402

# Where each model family keeps its blocks, its final norm and each block's attention (model.config.model_type).
LAYOUTS = {
    "gpt2": dict(blocks="transformer.h", norm="transformer.ln_f", attn="attn", backbone="transformer", absolute=True),
    **{name: dict(blocks="model.layers", norm="model.norm", attn="self_attn", backbone="model", absolute=False)
       for name in ("llama", "mistral", "qwen2", "qwen3")},
}
ATTN_IMPL = "oisd_eager_where_needed"  # registered below with AttentionInterface and AttentionMaskInterface


class OISDError(ValueError):
    """A setting the bridge does not support; the message is one line saying what to change."""


# -----------------------------------------------------------------------------
# The config: TRL's GRPOConfig plus OISD's knobs, named as in oisd.Config.

@dataclass
class OISDConfig(GRPOConfig):
    align_layers: str = field(default="2", metadata={"help": "aligned layer(s), 1-based, comma-separated, 1..L-1"})
    lambda_logit: float = field(default=1.0, metadata={"help": "weight of the logit alignment term"})
    lambda_attn: float = field(default=0.1, metadata={"help": "weight of the attention alignment term"})
    adv_weighting: str = field(default="signed", metadata={"help": "signed | positive | none"})
    exit_norm: str = field(default="own", metadata={"help": "own: a norm per exit | ln_f: the logit lens"})
    align_reduction: str = field(default="token", metadata={"help": "token | sequence (oisd.masked_mean)"})
    exit_chunk: int = field(default=256, metadata={"help": "response positions per exit-logit chunk; 0: all at once"})
    attn_chunk: int = field(default=256, metadata={"help": "response positions per attention-term chunk; 0: all at once"})
    loss_type: str = field(default="bnpo", metadata={"help": "TRL's; the OISD terms need a per-micro-batch one: "
                                                              "bnpo (token mean, as oisd.py), grpo, dr_grpo, sapo or luspo"})


# -----------------------------------------------------------------------------
# Where things live in a Hugging Face model

def get_path(obj, dotted):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def layout(model):
    kind = model.config.model_type
    if kind not in LAYOUTS:
        raise OISDError(f"model type {kind!r} is not in LAYOUTS ({', '.join(LAYOUTS)}); add where its blocks, "
                        "final norm and attention live")
    return LAYOUTS[kind]


def blocks(model):
    return get_path(model, layout(model)["blocks"])


def final_norm(model):
    return get_path(model, layout(model)["norm"])


def attach_exit_norms(model, exit_norm="own"):
    """Give `model` a norm of its own for each exit l = 1..L-1, `model.oisd_exit_ln[l-1]`, each a copy of the
    final norm (every exit starts as the logit lens of its layer, as oisd.load_policy does), unless it has
    them already; record the mode in the config so that save_pretrained keeps it. Returns the model."""
    model.config.oisd_exit_norm = exit_norm
    if exit_norm == "own" and not hasattr(model, "oisd_exit_ln"):
        model.oisd_exit_ln = nn.ModuleList(copy.deepcopy(final_norm(model)) for _ in range(len(blocks(model)) - 1))
    return model


def exit_norm_module(model, layer):
    """The norm of layer `layer`'s exit head: its own, or the final norm (exit_norm='ln_f')."""
    return model.oisd_exit_ln[layer - 1] if getattr(model.config, "oisd_exit_norm", "ln_f") == "own" else final_norm(model)


def exit_logits(norm, head, h):
    """h: (..., d) residual stream -> (..., V) fp32 logits through `norm` and the unembedding `head`, outside
    autocast (as model.py's exit heads: the same numbers under any precision)."""
    with torch.autocast(h.device.type, enabled=False):
        x = norm(h.to(next(norm.parameters()).dtype)) if norm is not None else h
        return F.linear(x.float(), head.weight.float(), None if head.bias is None else head.bias.float())


def load_oisd_model(path, **kwargs):
    """A saved model with its exit norms: from_pretrained(path, **kwargs) (its defaults: the saved dtype, the
    CPU), then restore_exit_norms. OISDTrainer given a path loads it as GRPOTrainer would instead."""
    from transformers import AutoModelForCausalLM
    return restore_exit_norms(AutoModelForCausalLM.from_pretrained(path, **kwargs), path)


def restore_exit_norms(model, path):
    """The exit norms saved in `path` (a local folder of safetensors files) put back on `model` (a plain
    from_pretrained drops them); returns the model, its other weights and buffers untouched. Raises OISDError
    if the config says it has exit norms but the folder does not hold their weights."""
    if getattr(model.config, "oisd_exit_norm", None) != "own":
        return model
    from safetensors.torch import load_file
    saved = {}
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        saved.update({k: v for k, v in load_file(file).items() if k.startswith("oisd_exit_ln.")})
    attach_exit_norms(model, "own")  # copies of the final norm: its dtype and device
    expected = {f"oisd_exit_ln.{k}" for k in model.oisd_exit_ln.state_dict()}
    if set(saved) != expected:
        raise OISDError(f"{path} declares exit norms but holds {len(saved)} of their {len(expected)} tensors in "
                        "*.safetensors (only a local folder of safetensors files is read)")
    model.oisd_exit_ln.load_state_dict({k[len("oisd_exit_ln."):]: v for k, v in saved.items()})
    return model


# -----------------------------------------------------------------------------
# Our GPT <-> GPT2LMHeadModel, exit norms included

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # HF stores (in, out)


def to_hf(model):
    """Our GPT -> a GPT2LMHeadModel with the same logits, exit norms (exit_norm='own') as oisd_exit_ln."""
    c = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=c.vocab_size, n_positions=c.block_size, n_embd=c.n_embd,
                                    n_layer=c.n_layer, n_head=c.n_head, activation_function="gelu",  # exact erf GELU, as nn.GELU()
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                                    bos_token_id=c.vocab_size - 2, eos_token_id=c.vocab_size - 2,
                                    pad_token_id=c.vocab_size - 1, tie_word_embeddings=True))
    attach_exit_norms(hf, c.exit_norm)
    state = {}
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight in both
        state[key.replace("exit_ln.", "oisd_exit_ln.", 1) if key.startswith("exit_ln.") else key] = (
            value.t() if key.endswith(CONV1D) else value)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(next(model.parameters()).device)


def from_hf(hf):
    """A GPT2LMHeadModel made by to_hf (and trained) -> our GPT with the same logits and exit norms."""
    c = hf.config
    exit_norm = getattr(c, "oisd_exit_norm", "ln_f")
    model = GPT(GPTConfig(vocab_size=c.vocab_size, block_size=c.n_positions, n_layer=c.n_layer, n_head=c.n_head,
                          n_embd=c.n_embd, exit_norm=exit_norm))
    state = {}
    for key, value in hf.state_dict().items():
        if key.startswith("oisd_exit_ln."):
            state["exit_ln." + key[len("oisd_exit_ln."):]] = value
        elif key.startswith("transformer."):
            state[key] = value.t() if key.endswith(CONV1D) else value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model.to(next(hf.parameters()).device)


# -----------------------------------------------------------------------------
# Attention probabilities: eager in the layers that need them, sdpa elsewhere

def attention_where_needed(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """An AttentionInterface function: eager, with fp32 probabilities, in the attention modules marked by
    mark_eager (module.oisd_layer set), and plain sdpa in every other. A marked module keeps its probabilities
    in module.oisd_store while recording() is on, the first time only (a checkpoint recompute runs it again,
    and must run the same eager code). The mask is sdpa's (boolean, or None for plain causal attention), which
    is why ATTN_IMPL is registered with AttentionMaskInterface too: without it the function gets no mask."""
    if getattr(module, "oisd_layer", None) is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    B, nh, T, hs = query.shape
    rep = nh // key.size(1)  # grouped-query attention: each key/value head serves `rep` query heads
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)  # (B, nh, K, hs)
    scores = query.float() @ key.float().transpose(-2, -1) * (hs**-0.5 if scaling is None else scaling)  # (B, nh, T, K)
    if attention_mask is None:  # sdpa's mask may be skipped for plain causal attention
        K = key.size(2)
        attention_mask = torch.ones(T, K, dtype=torch.bool, device=query.device).tril(K - T)
    if attention_mask.dtype == torch.bool:  # the most negative float, not -inf: a row with no key stays finite
        attention_mask = torch.zeros(attention_mask.shape, device=query.device).masked_fill(
            ~attention_mask, torch.finfo(torch.float32).min)
    probs = (scores + attention_mask.float()).softmax(dim=-1)  # (B, nh, T, K), masked keys exactly 0
    store = getattr(module, "oisd_store", None)
    if store is not None:
        store.setdefault(module.oisd_layer, probs)
    out = probs.to(value.dtype) @ value  # (B, nh, T, hs)
    return out.transpose(1, 2).contiguous(), probs


def mark_eager(model, layers):
    """Switch `model` to ATTN_IMPL with eager attention in `layers` (1-based) only, for good: generation and
    the checkpoint recompute must run the same code as the recorded forward."""
    model.set_attn_implementation(ATTN_IMPL)
    for layer in layers:
        getattr(blocks(model)[layer - 1], layout(model)["attn"]).oisd_layer = layer


ALL_ATTENTION_FUNCTIONS.register(ATTN_IMPL, attention_where_needed)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPL, sdpa_mask)


# -----------------------------------------------------------------------------
# The OISD terms at the response positions, from what TRL's forward left behind

def logit_term(student_h, teacher_h, norm, head, weights, mask, reduction="token", chunk=0):
    """oisd.logit_alignment_loss of the exit logits (norm, head on student_h: (N, R, d)) against the final
    logits (head on teacher_h, the final-normed hidden state, without grad). chunk > 0: the masked positions
    in chunks of `chunk`, each under activation checkpointing, so that only one chunk's (chunk, V) logits
    exist at a time, forward and backward; the per-position weights are set so that the chunks' sums add up
    to the same masked_mean. Returns a scalar."""
    if not chunk:
        with torch.no_grad():
            teacher = exit_logits(None, head, teacher_h)  # (N, R, V)
        return logit_alignment_loss(exit_logits(norm, head, student_h), teacher, weights, mask, reduction)
    per_row = chunk_weights(weights, mask, reduction)  # (N,)
    keep = mask > 0  # (N, R)
    hs, ht, w = student_h[keep], teacher_h[keep], per_row.unsqueeze(1).expand_as(mask)[keep]  # (M, d), (M, d), (M,)

    def piece(hs, ht, w):  # (m, d), (m, d), (m,) -> the sum of w * JSD over these m positions
        with torch.no_grad():
            teacher = exit_logits(None, head, ht)[:, None]  # (m, 1, V)
        ones = w.new_ones(w.size(0), 1)
        return logit_alignment_loss(exit_logits(norm, head, hs)[:, None], teacher, w, ones, "token") * w.size(0)

    # zero times the norm's parameters: an all-masked micro-batch still uses them (DDP needs every one used)
    total = sum(p.sum() for p in norm.parameters()) * 0.0
    for i in range(0, hs.size(0), chunk):
        total = total + checkpoint(piece, hs[i:i + chunk], ht[i:i + chunk], w[i:i + chunk], use_reentrant=False)
    return total


def chunk_weights(weights, mask, reduction):
    """weights: (N,), mask: (N, R) -> (N,) per-position weights c_n such that the sum over every unmasked
    position (n, r) of c_n * value[n, r] is masked_mean(weights[:, None] * value, mask, reduction): what a sum
    over chunks of positions needs to add up to the unchunked term."""
    if reduction == "token":
        return weights / mask.sum().clamp_min(1)
    return weights / (mask.size(0) * mask.sum(1).clamp_min(1))


def attention_term(student, teacher, weights, mask, reduction="token", chunk=0, first=0):
    """oisd.attention_alignment_loss of the rows first..first+R-1 (R = mask.size(1), the response positions)
    of student: (N, nh, Q, K) attention probabilities of an aligned layer, against the same rows of teacher
    (the last layer's; no gradient flows into it). chunk > 0: the R rows in slices of `chunk`
    (ChunkedAttentionTerm), so that the JSD's intermediates (about 11 copies of the rows unchunked, measured)
    exist for one slice at a time, forward and backward. Returns a scalar."""
    rows = slice(first, first + mask.size(1))
    if not chunk:
        return attention_alignment_loss(student[:, :, rows], teacher[:, :, rows], weights, mask, reduction)
    per_row = chunk_weights(weights, mask, reduction).detach()
    return ChunkedAttentionTerm.apply(student, teacher.detach(), per_row, mask, chunk, first)


def slices(n, chunk):
    """(start, end) of consecutive slices of 0..n-1, `chunk` long (the last may be shorter)."""
    return [(i, min(i + chunk, n)) for i in range(0, n, chunk)]


class ChunkedAttentionTerm(torch.autograd.Function):
    """The sum over slices of rows of sum_{n,r} c_n * mask * JSD(rows): forward without a graph; backward
    recomputes each slice with a graph and writes its gradient into one zero buffer of the attention's shape
    (autograd of slices would allocate a full-size zero gradient per slice, and one more for the rows)."""

    @staticmethod
    def piece(s, t, c, m):  # (N, nh, r, K), (N, nh, r, K), (N,), (N, r) -> the sum of c_n * JSD over these positions
        return attention_alignment_loss(s, t, c, m, "token") * m.sum().clamp_min(1)

    @staticmethod
    def forward(ctx, student, teacher, per_row, mask, chunk, first):
        ctx.save_for_backward(student, teacher, per_row, mask)
        ctx.chunk, ctx.first = chunk, first
        R, piece, f = mask.size(1), ChunkedAttentionTerm.piece, first
        return sum((piece(student[:, :, f + i:f + j], teacher[:, :, f + i:f + j], per_row, mask[:, i:j])
                    for i, j in slices(R, chunk)), student.new_zeros(()))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        student, teacher, per_row, mask = ctx.saved_tensors
        grad, f = torch.zeros_like(student), ctx.first  # rows outside first..first+R-1: 0
        for i, j in slices(mask.size(1), ctx.chunk):
            with torch.enable_grad():
                s = student[:, :, f + i:f + j].detach().requires_grad_()
                grad[:, :, f + i:f + j], = torch.autograd.grad(
                    ChunkedAttentionTerm.piece(s, teacher[:, :, f + i:f + j], per_row, mask[:, i:j]), s, grad_out)
        return grad, None, None, None, None, None


def first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)


def positions_from_mask(model):
    """From now on, a forward of `model` without position_ids gets the positions generation used,
    (mask.cumsum(-1) - 1).clamp_min(0), for layouts with absolute positions (GPT-2). TRL's forwards (the
    training one, the old policy's and the reference model's log-probs) pass none, so a left-padded prompt's
    tokens would otherwise sit as many positions later as it has pads, unlike at sampling time and unlike
    oisd.py, whose prompts are never padded. A no-op for other layouts (rotary positions are relative)."""
    def hook(module, args, kwargs):
        if kwargs.get("position_ids") is None and kwargs.get("attention_mask") is not None:
            kwargs["position_ids"] = (kwargs["attention_mask"].long().cumsum(-1) - 1).clamp_min(0)
        return args, kwargs
    if layout(model)["absolute"]:
        get_path(model, layout(model)["backbone"]).register_forward_pre_hook(hook, with_kwargs=True)


@contextmanager
def recording(model, layers, attn_layers):
    """Within the block: forward hooks keep the output of each block in `layers` (the residual stream after it)
    and the backbone's final-normed hidden state; the attention modules of `attn_layers` keep their
    probabilities (marked by mark_eager). Only the first forward's values are kept (a checkpoint recompute runs
    the layers again).
    Yields the dict {'hidden': {l: (N, T, d)}, 'final': (N, T, d), 'attn': {l: (N, nh, T, T)}}."""
    rec, handles, lay = {"hidden": {}, "attn": {}}, [], layout(model)

    def keep_block(layer):
        def hook(module, args, output):
            rec["hidden"].setdefault(layer, first_tensor(output))
        return hook

    def keep_final(module, args, output):
        rec.setdefault("final", first_tensor(output))

    for layer in layers:
        handles.append(blocks(model)[layer - 1].register_forward_hook(keep_block(layer)))
    handles.append(get_path(model, lay["backbone"]).register_forward_hook(keep_final))
    attns = [getattr(blocks(model)[layer - 1], lay["attn"]) for layer in attn_layers]
    for attn in attns:  # marked by mark_eager
        attn.oisd_store = rec["attn"]
    try:
        yield rec
    finally:
        for h in handles:
            h.remove()
        for attn in attns:
            attn.oisd_store = None


# -----------------------------------------------------------------------------
# What is supported, checked before training

def uses_reentrant(args):
    return bool(args.activation_checkpointing and (args.activation_checkpointing_kwargs or {}).get("use_reentrant", False))


def has_dropout(model):
    """Any dropout left: an nn.Dropout with p > 0, or an attention module's attention_dropout (Llama, Qwen)."""
    return any((isinstance(m, nn.Dropout) and m.p > 0) or float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0
               for m in model.modules())


# TRL's loss types that reduce per micro-batch and divide by the accumulation steps, as the OISD terms do
PER_MICRO_BATCH_LOSS_TYPES = ("bnpo", "grpo", "dr_grpo", "sapo", "luspo")


def check_supported(model, args, peft_config=None):
    """Raise OISDError (one line) for anything the bridge does not support; nothing has been built yet."""
    L = len(blocks(model))  # raises for an unknown layout
    if getattr(model, "is_quantized", False):
        raise OISDError("the model is quantized: quantized models are not supported (nor PEFT, through which most "
                        "of them train); load it unquantized")
    if len({d for d in (getattr(model, "hf_device_map", None) or {}).values()}) > 1:
        raise OISDError("the model is split over several devices (device_map): the exit heads read the final norm "
                        "and unembedding from one; load it on one device per process (device_map=None)")
    if (args.exit_norm == "own" and getattr(model.config, "oisd_exit_norm", None) == "own"
            and not hasattr(model, "oisd_exit_ln")):
        raise OISDError("the model was saved with trained exit norms that a plain from_pretrained drops (they would "
                        "start afresh): load it with oisd_trl.load_oisd_model, or pass its path")
    try:
        layers = layer_list(args)
    except ValueError:
        raise OISDError(f"align_layers expects comma-separated integers, got {args.align_layers!r}") from None
    if len(set(layers)) != len(layers) or not all(1 <= layer < L for layer in layers):
        raise OISDError(f"align_layers={args.align_layers!r}: need distinct layers in 1..{L - 1} (this model has {L})")
    for name, allowed in (("adv_weighting", ("signed", "positive", "none")), ("exit_norm", ("own", "ln_f")),
                          ("align_reduction", ("token", "sequence"))):
        if getattr(args, name) not in allowed:
            raise OISDError(f"{name} must be one of {', '.join(allowed)}; got {getattr(args, name)!r}")
    for name in ("lambda_logit", "lambda_attn"):
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            raise OISDError(f"{name} must be a finite number >= 0, got {getattr(args, name)}")
    for name in ("exit_chunk", "attn_chunk"):
        if getattr(args, name) < 0:
            raise OISDError(f"{name} must be >= 0 (0: unchunked), got {getattr(args, name)}")
    on = args.lambda_logit > 0 or args.lambda_attn > 0
    if on and args.loss_type not in PER_MICRO_BATCH_LOSS_TYPES:
        raise OISDError(f"loss_type={args.loss_type!r}: with the OISD terms (a mean per micro-batch) use bnpo "
                        "(OISDConfig's default), grpo, dr_grpo, sapo or luspo; dapo, cispo and vespo normalise globally")
    if args.use_vllm:
        raise OISDError("vLLM generation is not supported: its weight sync would push the exit norms too (untested); "
                        "set use_vllm=False")
    plugin = getattr(args, "deepspeed_plugin", None)
    if plugin is not None and getattr(plugin, "zero_stage", 0) == 3:
        raise OISDError("DeepSpeed ZeRO-3 is not supported: the exit heads read the sharded unembedding outside its "
                        "module's forward; use ZeRO-1/2 or DDP")
    if args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() in ("1", "true"):
        raise OISDError("FSDP is not supported: the exit heads read the sharded unembedding outside its module's "
                        "forward; use DDP or DeepSpeed ZeRO-1/2")
    if peft_config is not None:
        raise OISDError("PEFT is not supported: the layout paths and the exit norms assume the full model")
    if args.lambda_attn > 0 and uses_reentrant(args):
        raise OISDError("reentrant gradient checkpointing leaves the captured attention without gradient; set "
                        "activation_checkpointing_kwargs={'use_reentrant': False} or lambda_attn=0")
    if on and args.ddp_find_unused_parameters:
        raise OISDError("ddp_find_unused_parameters=True is not supported with the OISD terms on: the exit heads run "
                        "outside DDP's forward, so DDP would mark their norms unused, then ready again; leave it unset")
    if on and not args.disable_dropout and has_dropout(model):
        raise OISDError("dropout is on (TRL's disable_dropout=False): the teacher and the policy would be different "
                        "functions; set disable_dropout=True")


# -----------------------------------------------------------------------------
# The trainer

class OISDTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is TRL's GRPO loss + (lambda_logit * L_logit + lambda_attn * L_attn) / accumulation
    steps, the two OISD terms computed from TRL's own forward by oisd.py's functions. Logs oisd/logit and
    oisd/attn (before their lambda). `model` is a loaded model, or a path, loaded as GRPOTrainer loads one
    (TRL's create_model_from_path with args.model_init_kwargs: fp32 by default), exit norms restored."""

    def __init__(self, model, reward_funcs=None, args=None, *pargs, peft_config=None, **kwargs):
        if not isinstance(args, OISDConfig):
            raise OISDError(f"args must be an OISDConfig (TRL's GRPOConfig plus OISD's fields), got {type(args).__name__}")
        if kwargs.get("quantization_config") is not None or (args.model_init_kwargs or {}).get("quantization_config"):
            raise OISDError("quantization_config: quantized models are not supported (nor PEFT, through which "
                            "most of them train); load it unquantized")
        if isinstance(model, str):  # with the keyword arguments GRPOTrainer would load it with
            kw = dict(args.model_init_kwargs or {})
            if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
                kw["device_map"] = None
            kw.setdefault("trust_remote_code", args.trust_remote_code)
            model = restore_exit_norms(create_model_from_path(model, **kw), model)
        check_supported(model, args, peft_config)
        self.oisd_layers, L = layer_list(args), len(blocks(model))
        attach_exit_norms(model, args.exit_norm)
        self.oisd_attn_layers = (*self.oisd_layers, L) if args.lambda_attn > 0 else ()
        for i, norm in enumerate(getattr(model, "oisd_exit_ln", []), start=1):  # only the aligned exits' own norms
            # with the logit term on take part in the loss: the rest are frozen, not merely unused (DDP rejects those)
            norm.requires_grad_(args.exit_norm == "own" and args.lambda_logit > 0 and i in self.oisd_layers)
        if args.disable_dropout:  # TRL zeroes nn.Dropout modules; attention modules that hold a plain float too
            for m in model.modules():
                if isinstance(getattr(m, "attention_dropout", None), float):
                    m.attention_dropout = 0.0
        if self.oisd_attn_layers:
            mark_eager(model, self.oisd_attn_layers)
        if args.lambda_logit > 0 or args.lambda_attn > 0:  # transformers would search for unused parameters
            args.ddp_find_unused_parameters = False  # without checkpointing; every trainable one is used here
        super().__init__(model, reward_funcs, args, *pargs, peft_config=peft_config, **kwargs)
        for m in (self.model, getattr(self, "ref_model", None)):  # every forward TRL takes log-probs from
            if m is not None:
                positions_from_mask(m)

    def _compute_loss(self, model, inputs):
        args = self.args
        if args.lambda_logit == 0 and args.lambda_attn == 0:
            return super()._compute_loss(model, inputs)
        advantages = inputs["advantages"]
        if advantages.dim() != 1:
            raise OISDError("per-token advantages (N, C) are not supported; OISD weights each rollout by one advantage")
        hidden = self.oisd_layers if args.lambda_logit > 0 else ()
        with recording(self.model, hidden, self.oisd_attn_layers) as rec:
            loss = super()._compute_loss(model, inputs)
        C = inputs["completion_ids"].size(1)
        mask = inputs["completion_mask"].float()  # (N, C): 1 up to and including EOS, as oisd.response_mask
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        weights = alignment_weights(advantages, args.adv_weighting)  # (N,)
        red, terms, n = args.align_reduction, {}, len(self.oisd_layers)
        if args.lambda_logit > 0:  # positions -C-1..-2 predict the C completion tokens
            head, teacher = self.model.get_output_embeddings(), rec["final"][:, -C - 1:-1]
            terms["logit"] = sum(logit_term(rec["hidden"][layer][:, -C - 1:-1], teacher, exit_norm_module(self.model, layer),
                                            head, weights, mask, red, args.exit_chunk) for layer in self.oisd_layers) / n
        if args.lambda_attn > 0:  # attention (N, nh, T, T); its rows T-C-1..T-2 are the response positions
            attn, L = rec["attn"], self.oisd_attn_layers[-1]
            first = attn[L].size(2) - C - 1
            terms["attn"] = sum(attention_term(attn[layer], attn[L], weights, mask, red, args.attn_chunk, first)
                                for layer in self.oisd_layers) / n
        mode = "train" if self.model.training else "eval"
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0  # as TRL scales its loss
        extra = args.lambda_logit * terms.get("logit", 0.0) + args.lambda_attn * terms.get("attn", 0.0)
        for name, value in terms.items():
            self._metrics[mode][f"oisd/{name}"].append(self.accelerator.gather(value.detach()).mean().item())
        return loss + extra / normalizer


# -----------------------------------------------------------------------------
# The arithmetic task inside TRL

def arithmetic_tokenizer():
    """tasks.get_tokenizer() as a Hugging Face tokenizer: one token per character of CHARS (ids 0..12), EOS 13,
    PAD 14; left padding, as TRL wants for prompts. Built locally, nothing downloaded. A character outside
    CHARS becomes PAD (tasks' tokenizer raises instead); the task's prompts never hold one."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {ch: i for i, ch in enumerate(CHARS)} | {EOS: len(CHARS), PAD: len(CHARS) + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([EOS, PAD])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, padding_side="left")


def arithmetic_reward(env):
    """TRL reward function: tasks' exact-answer reward on the completion's token ids (EOS included, so a
    truncated completion earns 0, as in oisd.py)."""
    def reward(completion_ids, answer, **kwargs):
        return [env.task.reward(env.tok.decode(ids), a) for ids, a in zip(completion_ids, answer)]
    reward.__name__ = "exact_answer"
    return reward


class TimeLimit(TrainerCallback):
    """Stop training after `seconds` of wall time."""

    def __init__(self, seconds):
        self.seconds, self.start = seconds, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.time()

    def on_step_end(self, args, state, control, **kwargs):
        if time.time() - self.start > self.seconds:
            control.should_training_stop = True


class StepTimer(TrainerCallback):
    """Wall seconds of every optimizer step (generation, forward, backward, optimizer)."""

    def __init__(self):
        self.seconds, self.t0 = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self.t0)


def trl_args(cfg, out_dir, max_steps, max_completion_length, **overrides):
    """The OISDConfig of an arm of oisd.Config `cfg`: its batch (prompts_per_step x group_size), learning rate,
    clip, num_iterations, token-mean loss and OISD knobs; fp32 on the CPU (TRL would pick bf16), no
    checkpointing, dropout off. `overrides` replace any of these. TRL's max_steps counts optimizer steps, so
    with num_iterations = mu it samples one rollout batch every mu of them (oisd.py's rl_steps counts rollouts)."""
    kw = dict(output_dir=out_dir, per_device_train_batch_size=cfg.prompts_per_step * cfg.group_size,
              num_generations=cfg.group_size, max_completion_length=max_completion_length, learning_rate=cfg.rl_lr,
              lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=cfg.grad_clip, epsilon=cfg.clip_eps,
              beta=cfg.kl_beta, num_iterations=cfg.num_iterations, loss_type="bnpo", scale_rewards="group" if cfg.scale_advantages else "none",
              temperature=cfg.temperature, top_k=0, top_p=1.0, max_steps=max_steps, bf16=False,
              use_cpu=not torch.cuda.is_available(), activation_checkpointing=False, disable_dropout=True,
              report_to="none", save_strategy="no", logging_steps=25, seed=cfg.seed, data_seed=cfg.seed,
              align_layers=cfg.align_layers, lambda_logit=cfg.lambda_logit, lambda_attn=cfg.lambda_attn,
              adv_weighting=cfg.adv_weighting, exit_norm=cfg.exit_norm, disable_tqdm=True)
    return OISDConfig(**{**kw, **overrides})


def arithmetic_dataset(env, n, seed):
    from datasets import Dataset
    rng = random.Random(seed)
    problems = sample_problems(env.task, rng, n, env.exclude)  # never a reordering of a held-out problem
    return Dataset.from_dict({"prompt": [p for p, _ in problems], "answer": [a for _, a in problems]})


def train_arithmetic_arm(env, arm, warm_state, seconds, max_steps, out_dir, callbacks=()):
    """One arm of oisd.py inside TRL from the warm-up weights: returns (trained GPT, trainer)."""
    cfg = arm_config(env.cfg, arm)
    hf = to_hf(load_policy(env, cfg, warm_state))
    args = trl_args(cfg, os.path.join(out_dir, arm), max_steps, max_completion_length=env.max_new)
    trainer = OISDTrainer(model=hf, args=args, reward_funcs=arithmetic_reward(env), processing_class=arithmetic_tokenizer(),
                          train_dataset=arithmetic_dataset(env, cfg.prompts_per_step * max_steps, cfg.seed),
                          callbacks=[TimeLimit(seconds), *callbacks])
    trainer.train()
    return from_hf(trainer.model).to(env.device), trainer


def run_arithmetic(a):
    """Warm-up (cached), then each arm inside TRL for a.seconds; held-out final and exit accuracy before/after."""
    env = Env(Config(out_dir=a.out_dir, align_layers=a.align_layers, seed=a.seed))
    layer, L = layer_list(env.cfg)[0], env.cfg.n_layer
    print(f"trl {trl_version} | transformers {transformers.__version__} | torch {torch.__version__} | device "
          f"{env.device} | threads {torch.get_num_threads()}\narms {a.arms}: aligned layer(s) {env.cfg.align_layers} of "
          f"{L}, {a.max_steps} TRL steps each ({env.cfg.prompts_per_step} prompts x {env.cfg.group_size} rollouts), "
          f"from the warm-up checkpoint")
    warm_state = warmup(env)
    before = evaluate(env, load_policy(env, env.cfg, warm_state), env.test, layers=[layer, L], lens=False)
    rows = {"warm-up start": before}
    for arm in a.arms.split(","):
        t0 = time.time()
        model, trainer = train_arithmetic_arm(env, arm, warm_state, a.seconds, a.max_steps, a.out_dir)
        rows[arm] = evaluate(env, model, env.test, layers=[layer, L], lens=False)
        rows[arm]["steps"], rows[arm]["seconds"] = trainer.state.global_step, time.time() - t0
        print(f"{arm}: {trainer.state.global_step} TRL steps in {rows[arm]['seconds']:.0f}s")
    print(f"\nheld-out greedy accuracy ({len(env.test)} problems), one seed ({a.seed}): final layer and exit L{layer}")
    for name, res in rows.items():
        steps = f"  ({res['steps']} steps)" if "steps" in res else ""
        print(f"{name:<16} final {res[f'acc_L{L}']:6.1%}   exit L{layer} {res[f'acc_L{layer}']:6.1%}{steps}")
    with open(os.path.join(a.out_dir, "trl_results.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def run_model(a):
    """Any local causal LM directory with a named reward function ('module:function') and a prompts file."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    module, _, name = a.reward.partition(":")
    try:
        reward = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise OISDError(f"--reward={a.reward}: cannot import it ({type(e).__name__}: {e})") from None
    with open(a.prompts) as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    args = OISDConfig(output_dir=a.out_dir, per_device_train_batch_size=a.batch, num_generations=a.group,
                      max_completion_length=a.max_completion_length, max_steps=a.max_steps, learning_rate=a.lr,
                      bf16=a.bf16, use_cpu=not torch.cuda.is_available(), activation_checkpointing=a.checkpointing,
                      activation_checkpointing_kwargs={"use_reentrant": False}, disable_dropout=True,
                      report_to="none", save_strategy="no", logging_steps=1, align_layers=a.align_layers,
                      lambda_logit=a.lambda_logit, lambda_attn=a.lambda_attn, adv_weighting=a.adv_weighting, disable_tqdm=True)
    trainer = OISDTrainer(model=a.model, args=args, reward_funcs=reward, processing_class=tok,
                          train_dataset=Dataset.from_dict({"prompt": prompts}))
    trainer.train()
    trainer.save_model(os.path.join(a.out_dir, "final"))
    print(f"saved to {os.path.join(a.out_dir, 'final')} (reload with oisd_trl.load_oisd_model)")


# -----------------------------------------------------------------------------
# Two processes (torchrun): a few steps per arm, then the exit norms compared across ranks

def random_reward(completions, **kwargs):
    """Uniform random rewards: an untrained model earns 0 everywhere, and all-zero advantages train nothing."""
    return torch.rand(len(completions)).tolist()


def run_smoke(a):
    import torch.distributed as dist
    env = Env(Config(out_dir=a.out_dir, digits=2, align_layers="2", n_embd=32, prompts_per_step=2, group_size=4))
    torch.manual_seed(0)
    state = GPT(env.model_config(env.cfg)).state_dict()  # a random tiny model, the same on every rank
    ok = True
    for arm in a.arms.split(","):
        cfg = arm_config(env.cfg, arm)
        hf = to_hf(load_policy(env, cfg, state))
        start = torch.cat([p.detach().flatten().clone() for p in hf.oisd_exit_ln[1].parameters()])
        # no search for unused parameters in any arm (as with TRL's default checkpointing): in the grpo arm DDP
        # would then stop on the exit norms, which the loss does not use, were they not frozen
        args = trl_args(cfg, os.path.join(a.out_dir, arm), a.max_steps, max_completion_length=env.max_new,
                        logging_steps=1, exit_chunk=a.chunk, attn_chunk=a.chunk, ddp_find_unused_parameters=False)
        trainer = OISDTrainer(model=hf, args=args, reward_funcs=random_reward, processing_class=arithmetic_tokenizer(),
                              train_dataset=arithmetic_dataset(env, 64, cfg.seed))
        trainer.train()
        norm = torch.cat([p.detach().flatten() for p in trainer.model.oisd_exit_ln[1].parameters()])
        world = dist.get_world_size() if dist.is_initialized() else 1
        gathered = [torch.empty_like(norm) for _ in range(world)]
        dist.all_gather(gathered, norm) if world > 1 else gathered.__setitem__(0, norm)
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        moved = not torch.equal(norm, start)
        expect_moved = cfg.lambda_logit > 0
        ok &= same and moved == expect_moved
        wrapped = f"{type(trainer.model_wrapped).__name__} over {dist.get_backend()}" if world > 1 else "one process"
        print(f"rank {trainer.accelerator.process_index}/{world} {arm} ({wrapped}): {trainer.state.global_step} steps, "
              f"exit norm L2 identical on all ranks: {same}, moved: {moved} (expected {expect_moved}), "
              f"oisd/logit logged: {'oisd/logit' in str(trainer.state.log_history)}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if ok else 1)  # sys.exit with the gloo group alive sometimes aborts at interpreter exit


# -----------------------------------------------------------------------------
# Measurements

def measure_speed(a):
    """Seconds per TRL step, plain GRPOTrainer (a grpo arm through GRPOTrainer itself) and OISDTrainer (oisd,
    both terms on), alternated: rounds x (steps of each), the first step of every train() dropped."""
    env = Env(Config(out_dir=a.out_dir, seed=a.seed))
    warm_state = warmup(env)
    times = {"grpo": [], "oisd": []}
    for _ in range(a.rounds):
        for arm in ("grpo", "oisd"):
            cfg = arm_config(env.cfg, arm)
            timer = StepTimer()
            args = trl_args(cfg, os.path.join(a.out_dir, "speed", arm), a.max_steps, max_completion_length=env.max_new)
            trainer_cls = GRPOTrainer if arm == "grpo" else OISDTrainer
            hf = to_hf(load_policy(env, cfg, warm_state))
            trainer_cls(model=hf, args=args, reward_funcs=arithmetic_reward(env), processing_class=arithmetic_tokenizer(),
                        train_dataset=arithmetic_dataset(env, cfg.prompts_per_step * a.max_steps, cfg.seed),
                        callbacks=[timer]).train()
            times[arm] += timer.seconds[1:]
    med = {arm: statistics.median(t) for arm, t in times.items()}
    print(f"seconds per TRL step (median of {len(times['grpo'])} steps each, {a.rounds} alternated rounds, "
          f"{env.cfg.prompts_per_step}x{env.cfg.group_size} rollouts): plain GRPO {med['grpo']:.3f}, "
          f"OISD {med['oisd']:.3f}, ratio {med['oisd'] / med['grpo']:.2f}x")
    return med


def peak_increase_mib(run):
    """Peak RSS during run() minus the RSS just before it, in MiB (Linux: /proc/self/statm and ru_maxrss). The
    baseline is the current RSS, not the peak so far, which freed temporaries may have set higher; a run whose
    own peak stays below that earlier one cannot be measured this way, and raises."""
    before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if peak <= peak_before:
        raise RuntimeError("the run's peak memory stayed below an earlier peak of this process: measure it alone")
    return (peak * 1024 - before) / 2 ** 20


def measure_memory_one(chunk, vocab, tokens, d, dtype=torch.float32):
    """Peak RSS increase (MiB) of logit_term forward + backward on random tensors with weights and hidden
    states in `dtype` (run in a fresh process); with bf16 each chunk casts the unembedding to fp32."""
    torch.manual_seed(0)
    head, norm = nn.Linear(d, vocab, bias=False).to(dtype), nn.LayerNorm(d).to(dtype)
    student = torch.randn(1, tokens, d, dtype=dtype, requires_grad=True)
    teacher, mask, w = torch.randn(1, tokens, d, dtype=dtype), torch.ones(1, tokens), torch.ones(1)
    return peak_increase_mib(lambda: logit_term(student, teacher, norm, head, w, mask, "token", chunk).backward())


def measure_attention_memory_one(chunk, heads, rows, keys):
    """Peak RSS increase (MiB) of attention_term forward + backward on the `rows` response rows of random
    (1, heads, keys, keys) attention probabilities, as training has them: the probabilities exist before, and
    backward makes a gradient of their full shape (run in a fresh process)."""
    torch.manual_seed(0)
    student = torch.randn(1, heads, keys, keys).softmax(-1).requires_grad_()
    teacher = torch.randn(1, heads, keys, keys).softmax(-1)
    return peak_increase_mib(lambda: attention_term(student, teacher, torch.ones(1), torch.ones(1, rows), "token",
                                                    chunk, first=keys - rows - 1).backward())


def measure_memory(a):
    """Each setting in a fresh process; glibc's mmap threshold fixed at 64 KiB so that freed large tensors go back
    to the system (with its default, moving threshold the peak RSS depends on the order of allocations)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    logit, attn = "logit term, vocab 50,257, 2,048 completion tokens", "attention term, 16 heads, 2,048 positions " \
        "of which 1,024 completion tokens (the probabilities: 256 MiB; their response rows: 128 MiB)"
    runs = ([(f"{logit}, hidden 64", "memory_one", c, []) for c in (0, 1024, 256, 64)]
            + [(attn, "attn_memory_one", c, []) for c in (0, 256, 64)]
            + [(f"{logit}, hidden 1,024, {w} weights (fp32 unembedding: 196 MiB)", "memory_one", 256,
                ["--hidden=1024", f"--weights={w}"]) for w in ("fp32", "bf16")])
    for what, measure, chunk, extra in runs:
        t0 = time.time()
        run = subprocess.run([sys.executable, __file__, f"--measure={measure}", f"--chunk={chunk}", *extra], env=env,
                             capture_output=True, text=True)
        if run.returncode:
            last = (run.stderr.strip().splitlines() or ["no message"])[-1]
            raise OISDError(f"--measure={measure} --chunk={chunk} failed: {last}")
        out = run.stdout.strip()
        print(f"{what}, forward + backward, {'unchunked' if chunk == 0 else f'chunks of {chunk}'}: "
              f"peak RSS +{float(out):.0f} MiB ({time.time() - t0:.1f} s with the process start)", flush=True)


# -----------------------------------------------------------------------------

def main(argv):
    p = argparse.ArgumentParser(prog="oisd_trl.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=os.path.join(ROOT, "out", "trl"),
                   help="warm-up cache, TRL outputs and trl_results.json (default: out/trl at the repository root)")
    p.add_argument("--arms", default="grpo,oisd_pos", help="arms of oisd.ARMS to train inside TRL")
    p.add_argument("--align_layers", default="2", help="aligned layer(s), 1-based, comma-separated")
    p.add_argument("--seconds", type=float, default=900.0, help="wall seconds of TRL training per arm at most")
    p.add_argument("--max_steps", type=int, default=300, help="TRL steps per arm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a tiny random model, a few steps per arm, exit norms compared across ranks")
    p.add_argument("--measure", default="", choices=["", "speed", "memory", "memory_one", "attn_memory_one"])
    p.add_argument("--rounds", type=int, default=3, help="--measure=speed: alternated rounds")
    p.add_argument("--chunk", type=int, default=256, help="positions per chunk of both terms in --smoke and --measure=*memory_one")
    p.add_argument("--hidden", type=int, default=64, help="--measure=memory_one: hidden size")
    p.add_argument("--weights", default="fp32", choices=["fp32", "bf16"], help="--measure=memory_one: weight dtype")
    g = p.add_argument_group("any local model (--model)")
    g.add_argument("--model", default="", help="a local Hugging Face causal LM directory")
    g.add_argument("--reward", default="", help="module:function, a TRL reward function")
    g.add_argument("--prompts", default="", help="a text file, one prompt per line")
    g.add_argument("--batch", type=int, default=8)
    g.add_argument("--group", type=int, default=4)
    g.add_argument("--max_completion_length", type=int, default=64)
    g.add_argument("--lr", type=float, default=1e-6)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (a GPU with native bf16)")
    g.add_argument("--checkpointing", action="store_true", help="non-reentrant activation checkpointing")
    g.add_argument("--lambda_logit", type=float, default=1.0)
    g.add_argument("--lambda_attn", type=float, default=0.1)
    g.add_argument("--adv_weighting", default="positive")
    a = p.parse_args(argv)
    try:  # every check first: a refused invocation leaves nothing behind
        if a.model and not (a.reward and a.prompts):
            raise OISDError("--model needs --reward=module:function and --prompts=FILE")
        if a.model and not os.path.isdir(a.model):
            raise OISDError(f"--model={a.model} is not a local directory (nothing is downloaded)")
        n_layer, layers = Config().n_layer, a.align_layers.split(",")
        if not (a.model or a.measure or a.smoke) and not (
                len(set(layers)) == len(layers) and all(x.isdigit() and 1 <= int(x) < n_layer for x in layers)):
            raise OISDError(f"--align_layers={a.align_layers}: need distinct layers in 1..{n_layer - 1}")
        if a.model and a.reward.count(":") != 1:
            raise OISDError(f"--reward={a.reward}: expected module:function")
        if a.model and not os.path.isfile(a.prompts):
            raise OISDError(f"--prompts={a.prompts} is not a file")
        if a.model and (a.group < 2 or a.batch % a.group):
            raise OISDError(f"--batch={a.batch} must be a multiple of --group={a.group} (at least 2)")
        try:
            os.makedirs(a.out_dir, exist_ok=True)
        except OSError as e:
            raise OISDError(f"--out_dir={a.out_dir} is not a usable directory ({e.strerror})") from None
        if a.measure == "memory_one":
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.weights]
            print(measure_memory_one(a.chunk, 50257, 2048, a.hidden, dtype))
        elif a.measure == "attn_memory_one":
            print(measure_attention_memory_one(a.chunk, 16, 1024, 2048))
        elif a.measure == "memory":
            measure_memory(a)
        elif a.measure == "speed":
            measure_speed(a)
        elif a.model:
            run_model(a)
        elif a.smoke:
            run_smoke(a)
        else:
            run_arithmetic(a)
    except OISDError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
