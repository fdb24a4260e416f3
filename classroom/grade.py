"""
Grade the exercises: run each one's tests and say, one line per exercise, how it stands.

    python classroom/grade.py                 # the folder above classroom/: a handout, or the repository itself
    python classroom/grade.py DIR --exercise=3

An exercise has passed (every one of its tests ran and passed); failed, with the first failing test and its
message (a test that met no stub, whatever else is still a stub); is not started (its tests met only its
stub, the NotImplementedError "exercise N: ..." a handout puts in); or is waiting on exercise M (its tests
met only exercise M's stub). The exit status is the number of exercises not passed; a bad argument is one
line and status 10, a failure of the grader itself one line and status 11. All the exercises' tests run in
one pytest process (offline, on the CPU, isolated from any pytest configuration around DIR) with a time
limit; past it, each exercise runs on its own, so that an endless loop costs only its own exercise.
EXERCISES below is the one table of what each exercise is: classroom/handout.py stubs its functions.
"""

import os
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

# number: the file and functions to write, the tests that grade them (in test_in; the most direct first:
# the first that fails is the one shown), the exercises whose functions those tests need too (uses), and
# what else they import (also: the handout copies it)
EXERCISES = {
    1: dict(file="oisd.py", functions=("js_divergence", "safe_log"), test_in="test_oisd.py",
            tests=("test_js_divergence_matches_numpy_with_zero_entries", "test_js_divergence_bounds_and_gradient",
                   "test_safe_log_gradient_is_finite_at_zero")),
    2: dict(file="oisd.py", functions=("group_advantages",), test_in="test_oisd.py",
            tests=("test_group_advantages", "test_signed_weights_cancel_within_each_group")),
    3: dict(file="oisd.py", functions=("response_mask", "masked_mean", "grpo_loss"), test_in="test_oisd.py",
            tests=("test_response_mask_includes_first_eos_and_nothing_after", "test_masked_mean_reductions",
                   "test_grpo_loss_clipping_and_kl", "test_grpo_loss_matches_a_slow_per_prefix_loop",
                   "test_k3_kl_and_ratio_are_finite_when_masked_positions_overflow")),
    4: dict(file="oisd.py", functions=("logit_alignment_loss", "attention_alignment_loss"), test_in="test_oisd.py",
            tests=("test_teacher_is_detached", "test_flipping_advantage_sign_flips_alignment_gradient",
                   "test_alignment_terms_match_a_numpy_loop"), uses=(1, 3)),
    5: dict(file="model.py", functions=("KVCache.append", "GPT.generate"), test_in="test_oisd.py",
            tests=("test_shared_prompt_forward_equals_full_forward", "test_kv_cache_generation_equals_naive_greedy",
                   "test_sampling_is_seeded_and_logprobs_are_at_the_temperature",
                   "test_sampling_draws_from_the_softmax_at_the_temperature", "test_generation_stops_rows_at_eos",
                   "test_sampled_rows_are_padded_after_their_eos")),
    6: dict(file="research/speculative.py", functions=("speculative_accept",), test_in="research/test_research.py",
            tests=("test_speculative_accept_rule_reproduces_the_target_distribution",
                   "test_speculative_greedy_equals_plain_greedy",
                   "test_speculative_sampling_matches_the_model_distribution"), uses=(5,),
            also=("research/experiments.py",)),
}
PREDICT_THEN_RUN = (7, 8, 9)  # the README's exercises with a training run and nothing to write
STUB = re.compile(r"NotImplementedError: exercise (\d+): implement (\S+)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_LIMIT = 100  # seconds for every exercise's tests in one process, then for each exercise on its own


def selection(numbers):
    """The pytest -k expression that selects exactly the tests of these exercises."""
    return " or ".join(test for n in numbers for test in EXERCISES[n]["tests"])


def command(numbers):
    """The pytest command (run in the graded folder) of these exercises' tests: the files, then -k."""
    files = sorted({EXERCISES[n]["test_in"] for n in numbers})
    return ["python", "-m", "pytest", "-q", *files, "-k", selection(numbers)]


def run_tests(folder, numbers, timeout):
    """Run the tests of `numbers` in folder, in one pytest process. Returns, in the order they ran, one
    (exercise, test name, seconds, first line of its failure or None) per test, and for a test file that
    does not import, (exercise, file, 0, its error) for each exercise tested there; None past `timeout` s.
    No pytest configuration file, PYTEST_ADDOPTS or stale bytecode around folder can change the run."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "results.xml")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTEST_ADDOPTS", "PYTEST_PLUGINS")}
        env.update(PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPYCACHEPREFIX=tmp)  # no plugin, no stale bytecode
        try:
            done = subprocess.run([sys.executable, "-B", *command(numbers)[1:], "-p", "no:cacheprovider", "-c", os.devnull,
                                   f"--rootdir={folder}", "--noconftest", "--continue-on-collection-errors",
                                   f"--junitxml={xml}"], cwd=folder, capture_output=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return None
        if done.returncode not in (0, 1) or not os.path.exists(xml):  # 0: all passed, 1: some failed
            why = "it collected none of these tests" if done.returncode == 5 else "is pytest installed?"
            raise RuntimeError(f"pytest exited with status {done.returncode} in {folder} ({why})")
        results = []
        for case in ET.parse(xml).iter("testcase"):
            name, problem = case.get("name"), next((c for c in case if c.tag in ("failure", "error", "skipped")), None)
            message = None if problem is None else (problem.get("message") or problem.tag).strip().splitlines()[0]
            if not case.get("classname"):  # a test file that does not import: its last error line says why
                path = name.replace(".", "/") + ".py"
                lines = [line[1:].strip() for line in (problem.text or "").splitlines() if line.startswith("E ")]
                results += [(n, path, 0.0, f"does not import: {lines[-1] if lines else message}")
                            for n in numbers if EXERCISES[n]["test_in"] == path]
                continue
            if problem is not None and problem.tag == "skipped":
                message = f"skipped: {message}"
            owner = [n for n in numbers if name.split("[")[0] in EXERCISES[n]["tests"]]
            results += [(owner[0], name, float(case.get("time", 0)), message)] if owner else []
        return results


def run_all(folder, numbers):
    """run_tests of every exercise at once, or, past TIME_LIMIT, of each on its own (a test that never
    ends then fails only its own exercise)."""
    results = run_tests(folder, numbers, TIME_LIMIT)
    if results is not None:
        return results
    results = []
    for n in numbers:
        alone = run_tests(folder, [n], TIME_LIMIT)
        results += alone if alone is not None else [(n, "its tests", TIME_LIMIT, f"did not finish in {TIME_LIMIT} s "
                                                                                 "(an endless loop?)")]
    return results


def verdict(n, results):
    """One line: how exercise n stands, from run_tests' results."""
    mine = [r for r in results if r[0] == n]
    order = {t: i for i, t in enumerate(EXERCISES[n]["tests"])}  # a file that does not import comes first
    failed = sorted(((name, message) for _, name, _, message in mine if message is not None),
                    key=lambda f: order.get(f[0].split("[")[0], -1))
    if not mine:
        return "grader error: none of its tests ran (a selection that collects nothing is no pass)"
    not_run = [t for t in EXERCISES[n]["tests"] if t not in {name.split("[")[0] for _, name, _, _ in mine}]
    if not_run and not failed:
        return f"grader error: {', '.join(not_run)} did not run (are the test files the handout's own?)"
    if not failed:
        return f"passed ({len(mine)} tests, {sum(r[2] for r in mine):.2f} s)"
    real = [(name, message) for name, message in failed if not STUB.search(message)]
    stubs = {}  # exercise: the functions whose stubs these tests met
    for m in filter(None, (STUB.search(message) for _, message in failed)):
        stubs.setdefault(int(m.group(1)), set()).add(m.group(2))
    if real:
        left = sorted(stubs.get(n, ()))
        return f"failed: {real[0][0]}: {real[0][1]}" + (f" ({', '.join(left)} still a stub)" if left else "")
    m = n if n in stubs else min(stubs)  # every failure met a stub
    names = [f for f in EXERCISES[m]["functions"] if f in stubs[m]]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    still = listed + (" is still a stub" if len(names) == 1 else " are still stubs")
    return f"not started ({still})" if m == n else f"waiting on exercise {m} ({still})"


def refuse(message):
    print(f"grade.py: {message}", file=sys.stderr)
    sys.exit(10)


def main(argv):
    chosen, folders = None, [a for a in argv if not a.startswith(("--exercise=", "--exercises="))]
    for arg in argv:
        if arg.startswith(("--exercise=", "--exercises=")):
            value = arg.split("=", 1)[1]
            if not all(x.isdigit() and int(x) in EXERCISES for x in value.split(",")):
                refuse(f"no exercise {value!r} to grade: the graded ones are {', '.join(map(str, EXERCISES))} "
                       f"({', '.join(map(str, PREDICT_THEN_RUN))}: predict, then run; nothing to grade)")
            chosen = sorted({int(x) for x in value.split(",")})
    if len(folders) > 1 or any(a.startswith("-") for a in folders):
        refuse(f"usage: python classroom/grade.py [DIR] [--exercise=N[,M]]; got {' '.join(argv)}")
    folder = folders[0] if folders else ROOT
    if not os.path.isdir(folder):
        refuse(f"{folder} is not a folder")
    present = [n for n, e in EXERCISES.items()
               if all(os.path.exists(os.path.join(folder, e[key])) for key in ("file", "test_in"))]
    chosen = present if chosen is None else chosen  # by default every exercise the folder has (6 needs research/)
    results = run_all(folder, [n for n in chosen if n in present]) if set(chosen) & set(present) else []
    not_passed = 0
    for n in chosen:
        missing = f"grader error: {folder} lacks {EXERCISES[n]['file']} or its tests"
        line = verdict(n, results) if n in present else missing
        uses = EXERCISES[n].get("uses")
        if line.startswith("failed") and uses:  # a mistake in an exercise it uses fails its tests too
            line += f" (its tests use exercise {' and '.join(map(str, uses))} too: do they pass?)"
        not_passed += not line.startswith("passed")
        print(f"exercise {n} ({', '.join(EXERCISES[n]['functions'])}): {line}")
        if len(chosen) == 1 and n in present and not line.startswith("passed"):
            shown = [f'"{a}"' if " " in a else a for a in command(chosen)]
            print(f"  every failure in full: {' '.join(shown)}")
    sys.exit(not_passed)


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except Exception as e:  # the grader's own failure: one line, and a status no count of exercises can be
        print(f"grade.py: the grader failed ({type(e).__name__}: {e}); please report it", file=sys.stderr)
        sys.exit(11)
