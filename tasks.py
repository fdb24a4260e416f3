"""
Arithmetic tasks with an exact-answer reward, and the tokenizer over their small vocabulary.

    from tasks import get_tokenizer, make_task
    task = make_task("add", digits=3)
    prompt, answer = task.sample(random.Random(0))   # '864+394=', 1258
    task.solution(prompt)                            # '1258'  (the worked completion, without EOS)
    task.reward('1258<|endoftext|>', answer)         # 1.0

Every prompt of a task has the same length (operands are zero-padded), so a batch of prompts is a
rectangular tensor. The reward reads only the final answer (a sparse outcome reward): the completion
must end with the end-of-text token and parse strictly, or it earns 0.
"""

import random
import re

import tiktoken

CHARS = "0123456789+=,"
EOS = "<|endoftext|>"
PAD = "<|pad|>"
EVAL_SEED = 1234  # the held-out test and validation problems are the same for every run


class ArithmeticEncoding(tiktoken.Encoding):
    """A tiktoken Encoding whose encode() names an out-of-vocabulary character instead of panicking."""

    def encode(self, text, **kwargs):
        plain = text
        for special in self.special_tokens_set:
            plain = plain.replace(special, "")
        for ch in plain:
            if ch not in CHARS:
                raise ValueError(f"character {ch!r} is not in the vocabulary {CHARS!r}")
        return super().encode(text, **kwargs)


def get_tokenizer():
    """One token per character of CHARS (ids 0..12), then EOS (13) and PAD (14). Nothing is downloaded."""
    ranks = {ch.encode(): i for i, ch in enumerate(CHARS)}
    specials = {EOS: len(CHARS), PAD: len(CHARS) + 1}
    return ArithmeticEncoding(name="arithmetic", pat_str=r".", mergeable_ranks=ranks, special_tokens=specials)


class Task:
    """A family of problems. Subclasses define n_numbers, sample(), solution() and size."""

    n_numbers = 1  # how many comma-separated numbers a well-formed completion holds; the last is the answer

    def sample(self, rng):
        """rng: random.Random -> (prompt, answer) with prompt a string ending in '=' and answer an int."""
        raise NotImplementedError

    def solution(self, prompt):
        """The worked completion of a prompt, without the EOS token."""
        raise NotImplementedError

    def reward(self, completion, answer):
        """1.0 if the completion is exactly `n1,n2,...<|endoftext|>` with n_numbers numbers and the last
        equals answer, else 0.0 (empty, garbage, extra or missing numbers, or no EOS = truncated)."""
        if not completion.endswith(EOS):
            return 0.0
        numbers = completion[: -len(EOS)].split(",")
        if len(numbers) != self.n_numbers or not all(re.fullmatch(r"[0-9]+", n) for n in numbers):
            return 0.0
        return float(int(numbers[-1]) == answer)

    @property
    def completion_tokens(self):
        """Tokens in a correct completion, EOS included (one token per character)."""
        prompt, _ = self.sample(random.Random(0))
        return len(self.solution(prompt)) + 1


class Addition(Task):
    """n-digit addition: '041+265=' -> '0306'. The sum is zero-padded to digits+1."""

    def __init__(self, digits=3):
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.digits = digits
        self.size = 10 ** (2 * digits)

    def sample(self, rng):
        a, b = rng.randrange(10 ** self.digits), rng.randrange(10 ** self.digits)
        return f"{a:0{self.digits}d}+{b:0{self.digits}d}=", a + b

    def solution(self, prompt):
        a, b = prompt[:-1].split("+")
        return f"{int(a) + int(b):0{self.digits + 1}d}"


class Chain(Task):
    """Multi-step addition with intermediate results written out (the 'reasoning' analogue):
    '12+34+56=' -> '046,102'. Each running sum is zero-padded to digits+1; only the last one is graded."""

    def __init__(self, terms=3, digits=2):
        if not 2 <= terms <= 10:
            raise ValueError(f"terms must be in 2..10, got {terms}")
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.terms, self.digits = terms, digits
        self.n_numbers = terms - 1
        self.size = 10 ** (terms * digits)

    def sample(self, rng):
        xs = [rng.randrange(10 ** self.digits) for _ in range(self.terms)]
        return "+".join(f"{x:0{self.digits}d}" for x in xs) + "=", sum(xs)

    def solution(self, prompt):
        xs = [int(x) for x in prompt[:-1].split("+")]
        sums = [sum(xs[: i + 1]) for i in range(1, len(xs))]
        return ",".join(f"{s:0{self.digits + 1}d}" for s in sums)


TASKS = {"add": Addition, "chain": Chain}


def make_task(name, **options):
    """make_task('add', digits=3) or make_task('chain', terms=3, digits=2). Raises ValueError on bad input."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](**options)


def heldout_split(task, n_test=500, n_val=200):
    """Distinct problems fixed by EVAL_SEED: a test set and a separate validation set.
    Returns (test, val), lists of (prompt, answer). Training must exclude both (see sample_problems)."""
    n = n_test + n_val
    if task.size < 4 * n:
        raise ValueError(f"task has only {task.size} problems, too few for {n} held-out ones; make it harder")
    rng, seen, problems = random.Random(EVAL_SEED), set(), []
    while len(problems) < n:
        prompt, answer = task.sample(rng)
        if prompt not in seen:
            seen.add(prompt)
            problems.append((prompt, answer))
    return problems[:n_test], problems[n_test:]


def sample_problems(task, rng, n, exclude):
    """n training problems (repeats allowed) whose prompts are not in the set `exclude`."""
    problems = []
    while len(problems) < n:
        prompt, answer = task.sample(rng)
        if prompt not in exclude:
            problems.append((prompt, answer))
    return problems
