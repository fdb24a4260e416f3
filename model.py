"""
A small GPT (nanoGPT's GPT-2 layout) with an explicit exit head after every layer.

    from model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=15))
    logits, exits, attns = model(idx, exit_layers=(2,), attn_layers=(2, 4))

Layers are numbered 1..n_layer everywhere, the KV cache included: "layer l" is the residual stream after
block l, and the "exit head" of layer l reads the next token off it: its own LayerNorm, then the shared
(tied) unembedding. The exit head of layer n_layer is the model's ordinary head (ln_f, lm_head). With
exit_norm='ln_f' every exit uses ln_f instead of a norm of its own: the plain logit lens.

One function computes the policy, whatever is asked of it: every layer's output comes from the fused
scaled_dot_product_attention kernel, and the attention probabilities of the layers asked for are
computed beside it (in fp32) for the loss that needs them; the exit heads run in fp32 even under bf16
autocast. So the sampler, plain GRPO and GRPO+OISD all compute the same log-probabilities (bit for bit
on the CPU, eager, fp32 or bf16; elsewhere up to kernel rounding, which is then the same for every arm).
generate() samples a batch with a KV cache. Decoding with an exit as the draft model is in research/speculative.py.
There is no dropout anywhere: RL needs the sampled policy and the trained policy to be the same function.
"""

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 15
    block_size: int = 32      # longest sequence (prompt + completion)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    exit_norm: str = "own"    # 'own': a LayerNorm per exit head; 'ln_f': all exits share ln_f (logit lens);
                              # 'ln_f_frozen': the logit lens read through a detached ln_f and unembedding


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.n_head, self.layer = config.n_head, layer

    def forward(self, x, cache=None, need_attn=False):
        """x: (B, T, C), the T newest positions. cache: a KVCache holding the earlier positions, or None.
        Returns y (B, T, C) and, if need_attn, the attention probabilities (B, nh, T, T_keys) in fp32."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:
            k, v = cache.append(self.layer, k, v)  # (B, nh, T_keys, hs): earlier positions, then these T
        start = k.size(2) - T  # absolute position of the first query
        # query i sits at position start+i and sees keys 0..start+i; a single query sees every key
        visible = None if T == 1 else torch.ones(T, k.size(2), dtype=torch.bool, device=x.device).tril(start)
        if visible is None or start > 0:  # one query, or queries after cached keys: an explicit mask
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        else:  # a fresh sequence: the causal kernel
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        att = None
        if need_attn:  # the kernel does not return its probabilities: recompute them, in fp32, for the loss
            att = (q.float() @ k.float().transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T_keys)
            if visible is not None:
                att = att.masked_fill(~visible, float("-inf"))
            att = att.softmax(dim=-1)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y), att


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, need_attn=False):
        y, att = self.attn(self.ln_1(x), cache, need_attn)
        x = x + y
        x = x + self.mlp(self.ln_2(x))
        return x, att


class KVCache:
    """Keys and values of the positions seen so far, per layer 1..n_layer: (B, nh, T_seen, hs) each, grown
    by concatenation. It is differentiable, so a training forward can run a prompt once and share its keys
    and values with all the rollouts of that prompt (repeat_interleave), exactly as the sampler does.
    Layers may hold different lengths for a while (research/speculative.py drafts with the lower ones)."""

    def __init__(self):
        self.k, self.v = {}, {}

    def length(self, layer=1):
        return self.k[layer].size(2) if layer in self.k else 0

    def append(self, layer, k, v):
        """k, v: (B, nh, T_new, hs), the new positions of `layer`. Stores them after the ones already held and
        returns that layer's keys and values so far: (B, nh, T_seen + T_new, hs) each."""
        if layer in self.k:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def repeat_interleave(self, n):
        """Copy each row n times: row b becomes rows b*n .. b*n+n-1."""
        self.k = {layer: k.repeat_interleave(n, dim=0) for layer, k in self.k.items()}
        self.v = {layer: v.repeat_interleave(n, dim=0) for layer, v in self.v.items()}

    def truncate(self, length):
        """Forget every position >= length, in every layer (the rollback after a rejected draft)."""
        self.k = {layer: k[:, :, :length] for layer, k in self.k.items()}
        self.v = {layer: v[:, :, :length] for layer, v in self.v.items()}


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        if config.exit_norm not in ("own", "ln_f", "ln_f_frozen"):
            raise ValueError(f"exit_norm must be 'own', 'ln_f' or 'ln_f_frozen', got {config.exit_norm!r}")
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList(Block(config, layer) for layer in range(1, config.n_layer + 1)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied unembedding, as in GPT-2
        # exit_ln[l-1] is the norm of layer l's exit head, l = 1..n_layer-1 (layer n_layer's is ln_f)
        if config.exit_norm == "own":
            self.exit_ln = nn.ModuleList(nn.LayerNorm(config.n_embd) for _ in range(config.n_layer - 1))
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's scaled init of the residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def reset_exit_heads(self):
        """Set every exit norm equal to ln_f, so each exit starts as the logit lens of its layer."""
        if self.config.exit_norm == "own":
            with torch.no_grad():
                for ln in self.exit_ln:
                    ln.load_state_dict(self.transformer.ln_f.state_dict())

    def block(self, layer):
        """Block `layer`, 1..n_layer."""
        return self.transformer.h[layer - 1]

    def embed(self, idx, start=0):
        """idx: (B, T) token ids at positions start..start+T-1 -> (B, T, C), the input of block 1."""
        if start + idx.size(1) > self.config.block_size:
            raise ValueError(f"sequence of length {start + idx.size(1)} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + idx.size(1), device=idx.device)
        return self.transformer.wte(idx) + self.transformer.wpe(pos)

    def exit_logits(self, x, layer):
        """x: (B, T, C) residual stream after block `layer` (1..n_layer) -> (B, T, vocab) fp32 logits.
        Norm and unembedding run in fp32 under any autocast, so every caller gets the same numbers.
        With exit_norm='ln_f_frozen' an exit below the last reads through ln_f and the unembedding detached:
        the same numbers as 'ln_f', but a loss on the exit trains only blocks 1..layer and the embeddings."""
        last = layer == self.config.n_layer
        norm = self.transformer.ln_f if last or self.config.exit_norm != "own" else self.exit_ln[layer - 1]
        weights = (norm.weight, norm.bias, self.lm_head.weight)
        if self.config.exit_norm == "ln_f_frozen" and not last:
            weights = [w.detach() for w in weights]
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(F.layer_norm(x.float(), norm.normalized_shape, *weights[:2], norm.eps), weights[2])

    def forward(self, idx, exit_layers=(), attn_layers=(), cache=None, stop_layer=None):
        """
        idx: (B, T) token ids; with a cache they sit at positions cache.length() .. cache.length()+T-1.
        exit_layers: layers (1..n_layer) whose exit-head logits to return.
        attn_layers: layers whose attention probabilities to return.
        stop_layer: run blocks 1..stop_layer only and use that layer's exit head (early exit).
        Returns logits (B, T, vocab) of the last layer run, exits {l: (B, T, vocab)}, attns {l: (B, nh, T, T_keys)}.
        """
        stop_layer = stop_layer or self.config.n_layer
        x = self.embed(idx, cache.length() if cache is not None else 0)  # (B, T, C)
        exits, attns = {}, {}
        for layer in range(1, stop_layer + 1):
            x, att = self.block(layer)(x, cache, need_attn=layer in attn_layers)
            if att is not None:
                attns[layer] = att
            if layer in exit_layers:
                exits[layer] = self.exit_logits(x, layer)
        logits = exits[stop_layer] if stop_layer in exits else self.exit_logits(x, stop_layer)
        return logits, exits, attns

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens, temperature=1.0, num_samples=1, eos_id=None,
                 generator=None, exit_layer=None):
        """Sample num_samples completions of each prompt, all rows in one batch.
        idx: (B, P) prompts of equal length. temperature 0 is greedy.
        exit_layer: sample from that layer's exit head, running only blocks 1..exit_layer.
        Returns tokens (B*num_samples, P+R) and the log-probabilities at the sampling temperature (at 1 when
        greedy) of the R sampled tokens (B*num_samples, R); sample j of prompt b is row b*num_samples+j.
        A row that has emitted eos_id keeps emitting it, with the log-probability the model gives eos_id there;
        the loop stops early (R < max_new_tokens) once every row has emitted it. generator: the
        torch.Generator of the draws (torch.multinomial's), so a seed gives the same samples."""
        n_layer = exit_layer or self.config.n_layer
        cache = KVCache()
        logits = self(idx, cache=cache, stop_layer=n_layer)[0][:, -1]  # (B, vocab): the prompt, run once
        cache.repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)  # (N, vocab), N = B*num_samples
        seq = idx.repeat_interleave(num_samples, dim=0)  # (N, P)
        done = torch.zeros(seq.size(0), dtype=torch.bool, device=idx.device)
        logprobs = []
        for step in range(max_new_tokens):
            logp = F.log_softmax(logits / (temperature or 1.0), dim=-1)  # (N, vocab), at temperature 1 when greedy
            tok = logits.argmax(-1) if temperature == 0 else torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            if eos_id is not None:
                tok = tok.masked_fill(done, eos_id)
                done = done | (tok == eos_id)
            seq = torch.cat([seq, tok[:, None]], dim=1)
            logprobs.append(logp.gather(1, tok[:, None]).squeeze(1))
            if step == max_new_tokens - 1 or (eos_id is not None and bool(done.all())):
                break  # no forward for a token that will not be sampled
            logits = self(tok[:, None], cache=cache, stop_layer=n_layer)[0][:, -1]  # (N, vocab): one new position
        return seq, torch.stack(logprobs, 1)


def logit_lens(model):
    """A copy of the model whose exit heads all read through the trained ln_f (the logit lens), for a
    fair look at arms whose own exit norms were never trained (every arm without alignment)."""
    lens = copy.deepcopy(model)
    lens.config = dataclasses.replace(model.config, exit_norm="ln_f")
    return lens
