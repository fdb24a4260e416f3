"""
Runs a planned grid seed by seed, two workers at a time, applying a fixed seed rule: each grid takes the
lowest unused seed from its first one while fewer than its target of seeds are valid or running; a seed
whose warm-up misses (--skip_missed prints "warm-up missed") is kept on record and replaced by the next.

    OMP_NUM_THREADS=1 python research/seed_scheduler.py PLAN.json        # resumable: run it again after a stop

PLAN.json: {"command": [...argv before --out_dir...], "workers": 2,
            "grids": [{"out_dir": ..., "args": [...], "first_seed": 200, "valid": 10, "share_warmup": dir?}]}
Grids are served in order. Each seed writes out_dir/seed<S>.log and, when its process ends, seed<S>.rc;
a seed with a log and no rc was stopped and is run again with --resume. A failed seed stops its grid.
"""

import glob
import json
import os
import subprocess
import sys
import time


def status(grid, seed):
    """'valid', 'missed', 'failed', or None (never run, or stopped before the end)."""
    rc_path = os.path.join(grid["out_dir"], f"seed{seed}.rc")
    if not os.path.exists(rc_path):
        return None
    if open(rc_path).read().strip() != "0":
        return "failed"
    return "missed" if "warm-up missed" in open(os.path.join(grid["out_dir"], f"seed{seed}.log")).read() else "valid"


def next_seed(grid, running):
    """The lowest seed this grid still needs, or None once its valid and running seeds reach the target."""
    seed, valid = grid["first_seed"], 0
    while True:
        state = status(grid, seed)
        if state == "failed":
            return None
        if state == "valid" or seed in running:
            valid += 1
        elif state is None:
            return seed if valid < grid["valid"] else None
        seed += 1


def start(plan, grid, seed):
    os.makedirs(grid["out_dir"], exist_ok=True)
    if grid.get("share_warmup"):  # the warm-up does not depend on RL settings: link the other grid's, if made
        seed_dir = os.path.join(grid["out_dir"], f"seed{seed}")
        os.makedirs(seed_dir, exist_ok=True)
        for path in glob.glob(os.path.join(grid["share_warmup"], f"seed{seed}", "warmup-*.pt")):
            target = os.path.join(seed_dir, os.path.basename(path))
            if not os.path.exists(target):
                os.link(path, target)
    argv = [*plan["command"], f"--out_dir={grid['out_dir']}", *grid["args"], f"--seeds={seed}", "--skip_missed", "--resume"]
    log = open(os.path.join(grid["out_dir"], f"seed{seed}.log"), "a")
    print(f"{time.strftime('%H:%M:%S')} start {grid['out_dir']} seed {seed}", flush=True)
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def main(plan_path):
    plan = json.load(open(plan_path))
    running = {}  # (grid index, seed) -> process
    while True:
        for key, proc in list(running.items()):
            if proc.poll() is not None:
                grid = plan["grids"][key[0]]
                with open(os.path.join(grid["out_dir"], f"seed{key[1]}.rc"), "w") as f:
                    f.write(f"{proc.returncode}\n")
                print(f"{time.strftime('%H:%M:%S')} end {grid['out_dir']} seed {key[1]}: {status(grid, key[1])}", flush=True)
                del running[key]
        while len(running) < plan["workers"]:
            for i, grid in enumerate(plan["grids"]):
                seed = next_seed(grid, {s for g, s in running if g == i})
                if seed is not None:
                    running[(i, seed)] = start(plan, grid, seed)
                    break
            else:
                break
        if not running:
            print("every grid has its seeds", flush=True)
            return
        time.sleep(5)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.exists(sys.argv[1]):
        sys.exit("usage: python research/seed_scheduler.py PLAN.json")
    main(sys.argv[1])
