"""
Self-speculative decoding with an exit as the draft model (beyond the paper).

    from speculative import speculative_generate
    tokens, stats = speculative_generate(model, idx, max_new_tokens=12, draft_layer=2, n_draft=4)

Notation, as in the README: the *target* is the full model (blocks 1..L and its head), with next-token
distribution p_L; the *draft* is the exit head of layer l (blocks 1..l only), with distribution p_l. They
are OISD's teacher and student. The draft proposes a few tokens cheaply, the target checks them all in
one pass, and the output is still the target's: token for token under greedy decoding, in distribution
under sampling (speculative_accept). What OISD's logit term raises, the exit's agreement with the final
layer, is what the acceptance rate measures.
"""

import torch
import torch.nn.functional as F

from model import KVCache


@torch.inference_mode()
def speculative_generate(model, idx, max_new_tokens, draft_layer, n_draft, temperature=0.0, eos_id=None,
                         generator=None):
    """
    Self-speculative decoding of one sequence: the draft, the exit head of `draft_layer` (blocks 1..l
    only), proposes up to n_draft tokens, then blocks l+1..L run once over the drafted positions, starting
    from the layer-l states the draft already computed, and the target (the full model) keeps the longest
    acceptable prefix plus one token of its own. Exact: greedy gives model.generate(temperature=0)'s
    tokens; sampling gives tokens distributed as the target's (speculative_accept).
    idx: (1, P). Returns tokens (1, P+R), like generate's (EOS included, nothing after it), and stats
    {drafted, checked (drafts the rule looked at: up to and including the first rejected one), accepted,
    passes (target passes over blocks l+1..L, the prompt's included), tokens}. The per-token acceptance
    rate is accepted / checked; accepted / drafted also counts the drafts never looked at.
    """
    L, l = model.config.n_layer, draft_layer
    if idx.size(0) != 1:
        raise ValueError(f"speculative_generate decodes one sequence; got a batch of {idx.size(0)}")
    if not 1 <= l < L or n_draft < 1 or max_new_tokens < 1:
        raise ValueError(f"need 1 <= draft_layer < {L}, n_draft >= 1 and max_new_tokens >= 1, "
                         f"got {l}, {n_draft} and {max_new_tokens}")

    def choose(logits):  # (V,) logits -> a token and the fp32 probabilities it was drawn from (None if greedy)
        if temperature == 0:
            return int(logits.argmax()), None
        probs = F.softmax(logits.float() / temperature, dim=-1)
        return draw(probs, generator), probs

    cache = KVCache()
    out = [choose(model(idx, cache=cache)[0][0, -1])[0]]  # the prompt: a full pass
    stats = dict(drafted=0, checked=0, accepted=0, passes=1)
    # invariant: the cache holds every position but the newest token's, out[-1]
    while len(out) < max_new_tokens and out[-1] != eos_id:
        n = min(n_draft, max_new_tokens - len(out) - 1)  # the last new token is always the target's
        drafts, draft_probs, states, tok = [], [], [], out[-1]
        for i in range(n + 1):  # blocks 1..l on the newest token, then on each draft that needs checking
            x = model.embed(idx.new_tensor([[tok]]), cache.length(1))
            for layer in range(1, l + 1):
                x = model.block(layer)(x, cache)[0]
            states.append(x)  # (1, 1, C): layer l at this position
            if i == n:
                break
            tok, probs = choose(model.exit_logits(x, l)[0, -1])
            drafts.append(tok)
            draft_probs.append(probs)
            if tok == eos_id:  # nothing follows EOS: no bonus position to verify
                break
        start = cache.length(L)  # the position of out[-1]
        x = torch.cat(states, dim=1)  # (1, m, C), m = len(drafts) or len(drafts) + 1
        for layer in range(l + 1, L + 1):
            x = model.block(layer)(x, cache)[0]
        logits = model.exit_logits(x, L)[0]  # (m, V): the target at each position
        if temperature == 0:  # speculative_accept on one-hot distributions, without building them: the
            best = logits.argmax(-1).tolist()  # drafts the target would have chosen, then its own token
            n_ok = next((i for i, (d, b) in enumerate(zip(drafts, best)) if d != b), len(drafts))
            last = best[n_ok] if n_ok < len(best) else None
        else:
            target = F.softmax(logits.float() / temperature, dim=-1)  # (m, V): p_L at each position
            n_ok, last = speculative_accept(target, torch.stack(draft_probs) if drafts else target[:0], drafts,
                                            generator)
        out += drafts[:n_ok] + ([] if last is None else [last])
        cache.truncate(start + 1 + n_ok)  # positions start..start+n_ok: the old newest token and the accepted
        # drafts; `last` (now out[-1]) is not in the cache, so the invariant holds again
        stats["drafted"] += len(drafts)
        stats["checked"] += n_ok + (n_ok < len(drafts))
        stats["accepted"] += n_ok
        stats["passes"] += 1
    if eos_id is not None and eos_id in out:
        out = out[: out.index(eos_id) + 1]
    stats["tokens"] = len(out)
    return torch.cat([idx, idx.new_tensor([out])], dim=1), stats


def speculative_accept(target, draft, tokens, generator=None):
    """
    The exact acceptance rule of speculative sampling (Leviathan et al. 2023; Chen et al. 2023).
    target: (m, V) the target's probabilities p_L at the m verified positions; draft: (k, V) the draft's
    probabilities p_l each drafted token was sampled from; tokens: the k drafted token ids; m is k, or k+1
    when the position after the last draft was verified too (a bonus token is possible).
    Token i is accepted with probability min(1, p_L(x) / p_l(x)) at its position; at the first rejection
    the replacement is drawn from the normalised residual max(0, p_L - p_l) and the rest is dropped; if
    all k are accepted, a bonus token is drawn from p_L at position k when it exists.
    With one-hot distributions (greedy) this is: the longest prefix the target agrees with, then the
    target's own token. Returns (number accepted, the target's token as an int, or None); draw(p, generator)
    below samples one token id from p.
    """
    for i, x in enumerate(tokens):
        ratio = target[i, x] / draft[i, x]
        if ratio >= 1:
            continue  # the target likes this token at least as much as the draft did: always accepted
        if ratio == 0 or torch.rand((), generator=generator, device=target.device) >= ratio:  # rejected
            residual = (target[i] - draft[i]).clamp_min(0)
            return i, draw(residual / residual.sum(), generator)
    if target.size(0) > len(tokens):
        return len(tokens), draw(target[len(tokens)], generator)
    return len(tokens), None


def draw(probs, generator=None):
    """One token id from probs (V,); a one-hot distribution (greedy) gives its token without using the generator."""
    if probs.max() == 1:
        return int(probs.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))
