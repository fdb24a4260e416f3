"""
Tests of the handout and the grader. One handout with exercises 1-6 stubbed is built per run; in copies
of it, every stub is graded "not started", the reference body graded "passed", and mistakes students
really make, planted in the reference body, graded "failed" by the test that should catch each.

    python -m pytest -q classroom
"""

import ast
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import grade  # noqa: E402
import handout  # noqa: E402

# (the mistake, exercise, function, a text of its reference body, that text mistaken, the test that catches it)
MISTAKES = [
    ("log 0 clamped, not -inf", 1, "safe_log",
     'probs.float().masked_fill(zero, 1.0).log().masked_fill(zero, float("-inf"))', "probs.float().clamp_min(1e-30).log()",
     "test_safe_log_gradient_is_finite_at_zero"),  # finite where the docstring says -inf
    ("log of zero", 1, "safe_log", 'probs.float().masked_fill(zero, 1.0).log().masked_fill(zero, float("-inf"))',
     "probs.float().log()", "test_safe_log_gradient_is_finite_at_zero"),  # its gradient at 0 is 0 * inf = NaN
    ("0 log 0 as 0 * -inf", 1, "js_divergence",
     "logp, logq = logp.masked_fill(p == 0, 0.0), logq.masked_fill(q == 0, 0.0)", "pass",
     "test_js_divergence_matches_numpy_with_zero_entries"),
    ("mixture not halved", 1, "js_divergence", "m = (p + q) / 2", "m = p + q",
     "test_js_divergence_matches_numpy_with_zero_entries"),
    ("population std", 2, "group_advantages", "r.std(dim=1, keepdim=True)",
     "r.std(dim=1, keepdim=True, correction=0)", "test_group_advantages"),
    ("all-equal groups not zeroed", 2, "group_advantages", "adv.masked_fill(all_equal, 0.0).view(-1)", "adv.view(-1)",
     "test_group_advantages"),  # 0.3 - mean of eight 0.3s is not exactly 0 in float32
    ("batch mean, not group mean", 2, "group_advantages", "adv = r - r.mean(dim=1, keepdim=True)", "adv = r - r.mean()",
     "test_group_advantages"),
    ("no eps", 2, "group_advantages", "(r.std(dim=1, keepdim=True) + eps)", "r.std(dim=1, keepdim=True)",
     "test_group_advantages"),
    ("EOS mask off by one", 3, "response_mask", "is_eos.cumsum(dim=1) - is_eos", "is_eos.cumsum(dim=1)",
     "test_response_mask_includes_first_eos_and_nothing_after"),  # the EOS itself left out
    ("mask by multiplying", 3, "masked_mean", "values = torch.where(mask > 0, values, 0.0)", "values = values * mask",
     "test_masked_mean_reductions"),  # inf * 0 = NaN
    ("mean over every position", 3, "masked_mean", "values.sum() / mask.sum().clamp_min(1)",
     "values.sum() / mask.numel()", "test_masked_mean_reductions"),
    ("clip without the min", 3, "grpo_loss", "-torch.min(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)",
     "-ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv", "test_grpo_loss_clipping_and_kl"),
    ("logit teacher not detached", 4, "logit_alignment_loss", "teacher_logits.detach().float()",
     "teacher_logits.float()", "test_teacher_is_detached[logit]"),
    ("attention teacher not detached", 4, "attention_alignment_loss", "safe_log(teacher_attn.detach())",
     "safe_log(teacher_attn)", "test_teacher_is_detached[attn]"),
    ("log of zero (masked keys)", 4, "attention_alignment_loss", "safe_log(student_attn)", "student_attn.log()",
     "test_teacher_is_detached[attn]"),  # a NaN gradient
    ("weights forgotten", 4, "logit_alignment_loss", "weights.unsqueeze(1) * jsd", "jsd",
     "test_flipping_advantage_sign_flips_alignment_gradient[logit]"),
    ("temperature not applied", 5, "GPT.generate", "F.log_softmax(logits / (temperature or 1.0), dim=-1)",
     "F.log_softmax(logits, dim=-1)", "test_sampling_is_seeded_and_logprobs_are_at_the_temperature"),
    ("sampled at temperature 1", 5, "GPT.generate", "torch.multinomial(logp.exp(), 1, generator=generator)",
     "torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)",
     "test_sampling_draws_from_the_softmax_at_the_temperature"),  # its log-probabilities still at the temperature
    ("new keys before the old", 5, "KVCache.append",
     "torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)",
     "torch.cat([k, self.k[layer]], dim=2), torch.cat([v, self.v[layer]], dim=2)",
     "test_shared_prompt_forward_equals_full_forward"),
    ("a finished row goes on", 5, "GPT.generate", "tok = tok.masked_fill(done, eos_id)", "tok = tok",
     "test_generation_stops_rows_at_eos"),
    ("always accept", 6, "speculative_accept",
     "if ratio == 0 or torch.rand((), generator=generator, device=target.device) >= ratio:", "if False:",
     "test_speculative_accept_rule_reproduces_the_target_distribution"),
    ("resample from the target", 6, "speculative_accept", "residual = (target[i] - draft[i]).clamp_min(0)",
     "residual = target[i]", "test_speculative_accept_rule_reproduces_the_target_distribution"),
    ("no bonus token", 6, "speculative_accept", "return len(tokens), draw(target[len(tokens)], generator)",
     "return len(tokens), None", "test_speculative_accept_rule_reproduces_the_target_distribution"),
]


def function_node(text, name):
    """The ast node of function `name` ('f' or 'Class.f') in a module's source."""
    *owner, short = name.split(".")
    tree = ast.parse(text)
    scope = tree.body
    if owner:
        scope = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == owner[0])
    return next(n for n in scope if isinstance(n, ast.FunctionDef) and n.name == short)


def reference_body(n, name, old=None, new=None):
    """The repository's body of exercise n's function `name` after its docstring, with `old` replaced by `new`."""
    with open(os.path.join(ROOT, grade.EXERCISES[n]["file"])) as f:
        text = f.read()
    node = function_node(text, name)
    body = "".join(text.splitlines(keepends=True)[node.body[0].end_lineno: node.end_lineno])
    if old is not None:
        assert body.count(old) == 1, f"the mistake's text {old!r} is not once in the body of {name}"
        body = body.replace(old, new)
    return body


def stub_line(n, name, indent):
    return f'{indent}raise NotImplementedError("exercise {n}: implement {name} (see its docstring)")\n'


def restore(folder, n, name, body=None):
    """Put the reference body (or `body`) of exercise n's function `name` in place of its stub."""
    path = os.path.join(folder, grade.EXERCISES[n]["file"])
    with open(path) as f:
        text = f.read()
    indent = " " * function_node(text, name).body[0].col_offset
    assert text.count(stub_line(n, name, indent)) == 1, f"no stub of {name} in {path}"
    with open(path, "w") as f:
        f.write(text.replace(stub_line(n, name, indent), reference_body(n, name) if body is None else body))


def graded(folder, *args):
    """Run the copy's grader on the copy: (exit status, its lines)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")  # an edited module is never read from a stale .pyc
    result = subprocess.run([sys.executable, os.path.join(folder, "classroom", "grade.py"), *args], cwd=folder,
                            capture_output=True, text=True, env=env, timeout=600)
    return result.returncode, result.stdout.splitlines()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A handout of exercises 1-6 and what handout.py printed."""
    out = tmp_path_factory.mktemp("classroom") / "handout"
    result = subprocess.run([sys.executable, os.path.join(HERE, "handout.py"), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return out, result.stdout


@pytest.fixture
def copy(built, tmp_path):
    """A fresh copy of the handout, to edit."""
    return shutil.copytree(built[0], tmp_path / "handout", ignore=shutil.ignore_patterns("__pycache__"))


def test_the_handout_changes_nothing_but_the_stubbed_bodies_and_says_so(built):
    out, printed = built
    extras = {grade.EXERCISES[6][key] for key in ("file", "test_in")} | set(grade.EXERCISES[6]["also"])
    files = {os.path.relpath(os.path.join(d, f), out).replace(os.sep, "/") for d, _, names in os.walk(out)
             for f in names if "__pycache__" not in d}
    assert files == set(handout.CORE) | extras  # no trl_bridge/, no classroom tests, no other research file
    lines = printed.splitlines()
    for path in files:
        with open(os.path.join(ROOT, path), newline="") as f:
            source = f.read()
        with open(os.path.join(out, path), newline="") as f:
            copied = f.read()
        names = [(n, name) for n, e in grade.EXERCISES.items() if e["file"] == path for name in e["functions"]]
        expect = source.splitlines(keepends=True)
        for n, name in sorted(names, key=lambda x: -function_node(source, x[1]).lineno):
            node = function_node(source, name)
            expect[node.body[0].end_lineno: node.end_lineno] = [stub_line(n, name, " " * node.body[0].col_offset)]
        assert copied == "".join(expect), f"{path}: the copy is not the source with exactly {names} stubbed"
        (line,) = [line for line in lines if line.strip().startswith(f"{path}: ")]
        if names:
            assert line.endswith("every other line identical") and "outside every body" not in line, line
            assert all(f" {name} (lines" in line for _, name in names), line
        else:
            assert line.strip() == f"{path}: identical"
    assert len(lines) == 2 + len(files)


@pytest.mark.parametrize("args, says", [(["--exercises=12"], "unknown exercise '12'"),
                                        (["--exercises=1,x"], "unknown exercise 'x'"),
                                        (["--exercises=7"], "exercise 7 is predict, then run"), ([], "usage")])
def test_the_handout_refuses_a_bad_request_with_one_line_and_status_2(tmp_path, args, says):
    out = [str(tmp_path / "new")] if args else []
    result = subprocess.run([sys.executable, os.path.join(HERE, "handout.py"), *out, *args],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert not (tmp_path / "new").exists()


def test_the_handout_refuses_a_full_out_dir_and_a_function_the_source_lacks(tmp_path, capsys, monkeypatch):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    monkeypatch.setitem(grade.EXERCISES[2], "functions", ("group_advantages", "gone_function"))
    for out, says in [(tmp_path / "full", "is not an empty folder"),
                      (tmp_path / "new", "oisd.py has no function gone_function")]:
        with pytest.raises(SystemExit) as e:
            handout.main([str(out), "--exercises=1,2"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert os.listdir(tmp_path / "full") == ["notes.txt"] and not (tmp_path / "new").exists()


def test_each_selection_collects_exactly_its_own_tests_and_the_readme_uses_the_grader():
    for n, e in grade.EXERCISES.items():
        ids = subprocess.run([sys.executable, *grade.command([n])[1:], "--collect-only", "-p", "no:cacheprovider"],
                             cwd=ROOT, capture_output=True, text=True).stdout
        collected = {line.split("::")[1].split("[")[0] for line in ids.splitlines() if "::" in line}
        assert collected == set(e["tests"]), f"exercise {n}: -k collects {sorted(collected)}"
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert all(f"python classroom/grade.py --exercise={n}`" in readme for n in grade.EXERCISES)


def test_every_stub_is_not_started(built):
    status, lines = graded(built[0])
    assert status == 6 and len(lines) == 6, lines
    for n, line in zip(grade.EXERCISES, lines):
        assert line.startswith(f"exercise {n} (") and ": not started (" in line, line


@pytest.mark.parametrize("n", list(grade.EXERCISES))
def test_the_reference_body_passes_once_the_exercises_it_uses_are_done(copy, n):
    """Every other exercise still a stub: exercise n passes on its own, or waits on one it uses, then passes."""
    for name in grade.EXERCISES[n]["functions"]:
        restore(copy, n, name)
    uses = grade.EXERCISES[n].get("uses", ())
    if uses:
        status, lines = graded(copy, f"--exercise={n}")
        assert status == 1 and f": waiting on exercise {min(uses)} (" in lines[0], lines
        for m in uses:
            for name in grade.EXERCISES[m]["functions"]:
                restore(copy, m, name)
    status, lines = graded(copy, f"--exercise={n}")
    assert status == 0 and len(lines) == 1, lines
    assert lines[0].startswith(f"exercise {n} (") and "): passed (" in lines[0], lines


@pytest.mark.parametrize("n, name, old, new, test", [m[1:] for m in MISTAKES],
                         ids=[f"{m[1]}: {m[0]}" for m in MISTAKES])
def test_a_planted_mistake_is_graded_failed_by_the_test_that_catches_it(copy, n, name, old, new, test):
    for m in grade.EXERCISES[n].get("uses", ()):
        for other in grade.EXERCISES[m]["functions"]:
            restore(copy, m, other)
    for other in grade.EXERCISES[n]["functions"]:
        restore(copy, n, other, reference_body(n, other, old, new) if other == name else None)
    status, lines = graded(copy, f"--exercise={n}")
    assert status == 1 and f"): failed: {test}: " in lines[0], lines


def test_a_real_failure_is_shown_while_another_function_is_still_a_stub(copy):
    """Exercise 3 with masked_mean still a stub and response_mask off by one: the mask's own test fails for
    real, and the grader says so rather than "not started"."""
    restore(copy, 3, "response_mask", reference_body(3, "response_mask", "is_eos.cumsum(dim=1) - is_eos", "is_eos.cumsum(dim=1)"))
    restore(copy, 3, "grpo_loss")
    status, lines = graded(copy, "--exercise=3")
    assert status == 1 and "): failed: test_response_mask_includes_first_eos_and_nothing_after: " in lines[0], lines
    assert lines[0].endswith("(masked_mean still a stub)"), lines


def test_an_exercise_whose_tests_did_not_all_run_is_no_pass(copy):
    """A test renamed in the graded folder (so it no longer runs) makes a grader error, never a pass."""
    for name in grade.EXERCISES[1]["functions"]:
        restore(copy, 1, name)
    path = os.path.join(copy, "test_oisd.py")
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace("def test_safe_log_gradient_is_finite_at_zero(", "def renamed_safe_log_check("))
    status, lines = graded(copy, "--exercise=1")
    assert status == 1 and "grader error: test_safe_log_gradient_is_finite_at_zero did not run" in lines[0], lines


def test_an_endless_loop_fails_only_its_own_exercise(copy, monkeypatch, capsys):
    """Past the time limit, each exercise runs on its own: an endless loop in exercise 2 fails exercise 2,
    and exercise 1 (solved) still passes."""
    for name in grade.EXERCISES[1]["functions"]:
        restore(copy, 1, name)
    restore(copy, 2, "group_advantages", "    while True:\n        pass\n")
    monkeypatch.setattr(grade, "TIME_LIMIT", 20)
    with pytest.raises(SystemExit) as e:
        grade.main([str(copy), "--exercise=1,2"])
    lines = capsys.readouterr().out.splitlines()
    assert e.value.code == 1 and "): passed (" in lines[0] and "did not finish in 20 s" in lines[1], lines
