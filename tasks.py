"""
Arithmetic tasks with an exact-answer reward, and the tokenizer over their small vocabulary.

    from tasks import get_tokenizer, make_task
    task = make_task("add", digits=3)
    prompt, answer = task.sample(random.Random(0))   # '864+394=', 1258
    task.solution(prompt)                            # '1258'  (the worked completion, without EOS)
    task.reward('1258<|endoftext|>', answer)         # 1.0
    batch_rewards(task, tok, completion, problems, G)  # (N,) 0/1 rewards of a batch of sampled token ids

Every prompt of a task has the same length (operands are zero-padded), so a batch of prompts is a
rectangular tensor. The reward reads only the final answer (a sparse outcome reward): the completion
must end with the end-of-text token and parse strictly, or it earns 0.

Held out means held out: a problem whose operands are a reordering of a held-out problem's ('b+a=' for a
held-out 'a+b=') has the same answer, so training never samples it either (see problem_key).
"""

import math
import random
import re
from collections import Counter

import tiktoken
import torch

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
    """One token per character of CHARS (ids 0..12), then EOS (13) and PAD (14). Nothing is downloaded.
    PAD is reserved and never used: prompts of a task have equal length, and rollouts are padded with EOS."""
    ranks = {ch.encode(): i for i, ch in enumerate(CHARS)}
    specials = {EOS: len(CHARS), PAD: len(CHARS) + 1}
    return ArithmeticEncoding(name="arithmetic", pat_str=r".", mergeable_ranks=ranks, special_tokens=specials)


class Task:
    """A family of problems 'x1+x2+...+xn=' whose answer is the sum. Subclasses set terms, digits,
    n_numbers and define solution()."""

    n_numbers = 1  # how many comma-separated numbers a well-formed completion holds; the last is the answer

    def sample(self, rng):
        """rng: random.Random -> (prompt, answer) with prompt a string ending in '=' and answer an int."""
        xs = [rng.randrange(10 ** self.digits) for _ in range(self.terms)]
        return "+".join(f"{x:0{self.digits}d}" for x in xs) + "=", sum(xs)

    @property
    def size(self):
        """How many distinct prompts the task has."""
        return 10 ** (self.terms * self.digits)

    def solution(self, prompt):
        """The worked completion of a prompt, without the EOS token."""
        raise NotImplementedError

    def operands(self, prompt):
        return [int(x) for x in prompt[:-1].split("+")]

    def parse(self, completion):
        """The numbers of a well-formed completion `n1,n2,...<|endoftext|>` holding n_numbers numbers,
        or None (empty, garbage, extra or missing numbers, or no EOS = truncated). The zero padding of
        the worked solutions is not required: '306' reads like '0306'."""
        if not completion.endswith(EOS):
            return None
        numbers = completion[: -len(EOS)].split(",")
        if len(numbers) != self.n_numbers or not all(re.fullmatch(r"[0-9]+", n) for n in numbers):
            return None
        return [int(n) for n in numbers]

    def reward(self, completion, answer):
        """1.0 if the completion is well-formed (see parse) and its last number equals answer, else 0.0."""
        numbers = self.parse(completion)
        return float(numbers is not None and numbers[-1] == answer)

    def steps(self, completion, prompt):
        """Which of the completion's numbers are the correct running sums: a list of n_numbers bools
        (all False if the completion is malformed). The process metric of the chain task."""
        numbers = self.parse(completion)
        xs = self.operands(prompt)
        truth = [sum(xs[: i + 1]) for i in range(len(xs) - self.n_numbers, len(xs))]
        return [False] * self.n_numbers if numbers is None else [n == t for n, t in zip(numbers, truth)]

    @property
    def completion_tokens(self):
        """Tokens in a correct completion, EOS included (one token per character)."""
        prompt, _ = self.sample(random.Random(0))
        return len(self.solution(prompt)) + 1


class Addition(Task):
    """n-digit addition: '041+265=' -> '0306'. The sum is zero-padded to digits+1; one number (n_numbers = 1)."""

    def __init__(self, digits=3):
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        self.terms, self.digits = 2, digits

    def solution(self, prompt):
        return f"{sum(self.operands(prompt)):0{self.digits + 1}d}"


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

    def solution(self, prompt):
        xs = self.operands(prompt)
        return ",".join(f"{sum(xs[: i + 1]):0{self.digits + 1}d}" for i in range(1, len(xs)))


TASKS = {"add": Addition, "chain": Chain}


def make_task(name, **options):
    """make_task('add', digits=3) or make_task('chain', terms=3, digits=2). Raises ValueError on bad input."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name](**options)


def completion_texts(tok, completion):
    """completion: (N, R) sampled token ids -> N strings, each cut just after its first EOS (a row without
    EOS, truncated, is kept whole and earns 0)."""
    rows = completion.tolist()
    return [tok.decode(row[: row.index(tok.eot_token) + 1] if tok.eot_token in row else row) for row in rows]


def batch_rewards(task, tok, completion, problems, group_size):
    """The outcome reward of a batch. completion: (N, R) token ids, group_size consecutive rows per problem
    of `problems` (a list of (prompt, answer)) -> (N,) float tensor of 0/1 (Task.reward), on completion's device."""
    answers = [a for _, a in problems for _ in range(group_size)]
    return torch.tensor([task.reward(text, a) for text, a in zip(completion_texts(tok, completion), answers)],
                        device=completion.device)


def problem_key(task, prompt):
    """The operands as a sorted tuple: every reordering of a problem has the same key (and answer)."""
    return tuple(sorted(task.operands(prompt)))


def orderings(key):
    """How many distinct prompts share this key: the permutations of a multiset."""
    return math.factorial(len(key)) // math.prod(math.factorial(c) for c in Counter(key).values())


def heldout_split(task, n_test=500, n_val=200):
    """Problems fixed by EVAL_SEED, no two of them reorderings of each other: a test set and a separate
    validation set. Returns (test, val), lists of (prompt, answer). Training must exclude every reordering
    of both: pass heldout_keys(task, test + val) to sample_problems."""
    n = n_test + n_val
    if task.size < 4 * n:
        raise ValueError(f"task has only {task.size} problems, too few for {n} held-out ones; make it harder")
    rng, seen, problems = random.Random(EVAL_SEED), set(), []
    while len(problems) < n:
        prompt, answer = task.sample(rng)
        if problem_key(task, prompt) not in seen:
            seen.add(problem_key(task, prompt))
            problems.append((prompt, answer))
    return problems[:n_test], problems[n_test:]


def heldout_keys(task, problems):
    return {problem_key(task, prompt) for prompt, _ in problems}


def trainable_size(task, exclude):
    """How many distinct prompts training can sample: all of them but every reordering of a held-out one."""
    return task.size - sum(orderings(key) for key in exclude)


def sample_problems(task, rng, n, exclude):
    """n training problems (repeats allowed), none of them a reordering of a problem whose key is in `exclude`."""
    problems = []
    while len(problems) < n:
        prompt, answer = task.sample(rng)
        if problem_key(task, prompt) not in exclude:
            problems.append((prompt, answer))
    return problems
