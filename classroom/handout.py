"""
Make a handout: a copy of the core in which each chosen exercise's functions keep their signature and
docstring, and their body becomes one `raise NotImplementedError("exercise N: ...")`.

    python classroom/handout.py OUT_DIR                    # exercises 1-6
    python classroom/handout.py OUT_DIR --exercises=1,3,4

The copy holds the top-level files, classroom/grade.py, and, only with exercise 6, the decoder and the
research tests it needs. Every other line is the source's, byte for byte: the script compares the copy
with the source, file by file, and prints it. In the copy, `python -m pytest -q` runs (each stub fails
its tests) and `python classroom/grade.py` grades. It refuses an unknown exercise, one with nothing to
write (7-9), an OUT_DIR that is not empty, or a function the source no longer has: one line, status 2.
"""

import ast
import difflib
import os
import sys

from grade import EXERCISES, PREDICT_THEN_RUN, ROOT

CORE = ("README.md", "requirements.txt", "oisd.py", "model.py", "tasks.py", "harness.py", "test_oisd.py",
        "classroom/grade.py")


def refuse(message):
    print(f"handout.py: {message}", file=sys.stderr)
    sys.exit(2)


def functions(source):
    """{name: node} of a module's functions and of its classes' methods ('Class.method')."""
    found = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef):
            found[node.name] = node
        if isinstance(node, ast.ClassDef):
            found.update({f"{node.name}.{f.name}": f for f in node.body if isinstance(f, ast.FunctionDef)})
    return found


def body_lines(node):
    """The 1-based first and last line of a function's body after its docstring."""
    first = node.body[0]
    docstring = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and type(first.value.value) is str
    return (first.end_lineno + 1 if docstring else first.lineno), node.end_lineno


def stubbed(source, path, stubs):
    """source with the body of each function in stubs {name: exercise} replaced by one raise."""
    found, lines = functions(source), source.splitlines(keepends=True)
    for name, n in stubs.items():
        if name not in found:
            refuse(f"{path} has no function {name} (exercise {n}); fix EXERCISES in classroom/grade.py")
        if body_lines(found[name])[0] > found[name].end_lineno:
            refuse(f"{name} in {path} has nothing but its docstring to stub (exercise {n})")
    for name in sorted(stubs, key=lambda name: -found[name].lineno):  # bottom up: line numbers above stay valid
        first, last = body_lines(found[name])
        indent = " " * found[name].body[0].col_offset
        lines[first - 1: last] = [f'{indent}raise NotImplementedError("exercise {stubs[name]}: implement {name} '
                                  f'(see its docstring)")\n']
    return "".join(lines)


def compare(source, copy, path):
    """One line: the copy of `path` against the source, read back from disk: identical, or which function
    bodies became exactly one stub line (each changed block must be a whole body of the source's, replaced
    by one `raise NotImplementedError("exercise ...`), else the line says where else it differs."""
    a, b = source.splitlines(keepends=True), copy.splitlines(keepends=True)
    if a == b:
        return f"{path}: identical"
    spans = {body_lines(node): name for name, node in functions(source).items()}
    stubbed, other = [], []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag == "equal":
            continue
        name = spans.get((i1 + 1, i2))
        if name and j2 - j1 == 1 and b[j1].strip().startswith('raise NotImplementedError("exercise '):
            stubbed.append(f"{name} (lines {i1 + 1}-{i2} -> 1)")
        else:
            other.append(f"lines {i1 + 1}-{i2}")
    if other:
        return f"{path}: DIFFERS beyond the stubbed bodies, at {', '.join(other)}"
    return f"{path}: body replaced in {', '.join(stubbed)}; every other line identical"


def main(argv):
    chosen, rest = list(EXERCISES), [a for a in argv if not a.startswith(("--exercise=", "--exercises="))]
    for arg in argv:
        if arg.startswith(("--exercise=", "--exercises=")):
            chosen = []
            for x in arg.split("=", 1)[1].split(","):
                if x.isdigit() and int(x) in PREDICT_THEN_RUN:
                    refuse(f"exercise {x} is predict, then run: nothing to stub (give out its README text); "
                           f"choose from {', '.join(map(str, EXERCISES))}")
                if not (x.isdigit() and int(x) in EXERCISES):
                    refuse(f"unknown exercise {x!r}: choose from {', '.join(map(str, EXERCISES))}")
                chosen = sorted(set(chosen) | {int(x)})
    if len(rest) != 1 or rest[0].startswith("-"):
        refuse(f"usage: python classroom/handout.py OUT_DIR [--exercises=1,3,4]; got {' '.join(argv)!r}")
    out = rest[0]
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        refuse(f"{out} exists and is not an empty folder; name a new one")
    needed = (p for n in chosen for p in (EXERCISES[n]["file"], EXERCISES[n]["test_in"], *EXERCISES[n].get("also", ())))
    paths = list(dict.fromkeys([*CORE, *needed]))  # the core, then what a chosen exercise adds (6: research/)
    stubs = {}  # path: {function: exercise}
    for n in chosen:
        stubs.setdefault(EXERCISES[n]["file"], {}).update({name: n for name in EXERCISES[n]["functions"]})
    sources = {}
    for path in paths:
        with open(os.path.join(ROOT, path), newline="") as f:
            sources[path] = f.read()
    copies = {path: stubbed(text, path, stubs[path]) if path in stubs else text for path, text in sources.items()}
    for path, text in copies.items():  # everything is checked before anything is written
        os.makedirs(os.path.dirname(os.path.join(out, path)), exist_ok=True)
        with open(os.path.join(out, path), "w", newline="") as f:
            f.write(text)
    print(f"handout of exercises {', '.join(map(str, chosen))} in {out}; compared with the source, file by file:")
    for path in paths:
        with open(os.path.join(out, path), newline="") as f:
            print("  " + compare(sources[path], f.read(), path))
    subset = f" --exercise={','.join(map(str, chosen))}" if chosen != list(EXERCISES) else ""  # the rest are solved
    print(f"grade it with: python classroom/grade.py {out}{subset}")


if __name__ == "__main__":
    main(sys.argv[1:])
