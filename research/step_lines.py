"""
Counts the lines a reader opens to follow one default RL step (no KL term, not the control arm), in the
three core files: every function rl_step runs through, whole, docstrings included. The README's reading
order quotes its total.

    python research/step_lines.py
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP = {
    "oisd.py": ["rl_step", "rollout", "group_advantages", "response_mask", "step_loss", "rl_loss", "forward_responses",
                "layer_list", "alignment_weights", "token_logprobs", "grpo_loss", "masked_mean", "logit_alignment_loss",
                "attention_alignment_loss", "js_divergence", "safe_log"],
    "model.py": ["GPT.generate", "GPT.forward", "GPT.embed", "GPT.block", "GPT.exit_logits", "Block.forward",
                 "CausalSelfAttention.forward", "MLP.forward", "KVCache.length", "KVCache.append", "KVCache.repeat_interleave"],
    "tasks.py": ["batch_rewards", "completion_texts", "Task.reward", "Task.parse"],
}


def functions(path):
    """{'name' or 'Class.name': ast node} of a file's top-level functions and methods."""
    found = {}
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        elif isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return found


def count():
    """Prints one line per function and returns (lines, lines without docstrings)."""
    total = bare = 0
    for path, names in STEP.items():
        found = functions(os.path.join(ROOT, path))
        for name in names:
            node = found[name]
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            lines = node.end_lineno - start + 1
            first = node.body[0]
            doc = first.end_lineno - first.lineno + 1 if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) else 0
            total, bare = total + lines, bare + lines - doc
            print(f"{path:9} {name:28} {lines:3d} lines ({doc} of docstring)")
    print(f"one RL step: {total} lines, {bare} without docstrings")
    return total, bare


if __name__ == "__main__":
    count()
