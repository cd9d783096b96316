"""
course.py -- the instructor's side of tutorial.md: the exercise list, the student copy,
the check that every exercise is graded, and the plots of the tutorial's experiments.
Learners read rlhf.py; nothing here is part of the algorithm.

  python course.py student ../rlhf-lab        # a copy where each exercise raises NotImplementedError
  python course.py student ../rlhf-lab --exercises 5 7 8   # only these
  python course.py check                      # each grading test fails without its exercise, passes with it
  python course.py plot_sweep runs/beta_* --out assets/kl_sweep.png    # gold and RM score against KL
  python course.py plot_costs runs/default --out assets/compute_cost.png  # where the time goes
"""

import argparse
import ast
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# What a student copy holds: what a learner needs; not this file, whose check needs the full rlhf.py.
STUDENT_FILES = ["rlhf.py", "test_rlhf.py", "tutorial.md", "README.md", "requirements.txt", "assets"]

# number -> (function in rlhf.py, the pytest -k expression that grades it, exercises it needs first)
# tutorial.md shows each as:  python -m pytest test_rlhf.py -k "<expression>"
EXERCISES = {
    1: ("train_bpe", "test_train_bpe", ()),
    2: ("bpe_encode_chunk", "test_bpe_encode", (1,)),
    3: ("position_ids", "test_position_ids", ()),
    4: ("sft_loss", "test_sft_loss", (3,)),
    5: ("bradley_terry_loss", "test_bradley_terry_loss", ()),
    6: ("reward_at_last_token", "test_reward_at_last_token", (3,)),
    7: ("kl_shaped_rewards", "test_kl_shaped_rewards", ()),
    8: ("compute_gae", "test_compute_gae", ()),
    9: ("masked_whiten", "test_masked_whiten", ()),
    10: ("ppo_policy_loss", "test_ppo_policy_loss", ()),
    11: ("ppo_value_loss", "test_ppo_value_loss", ()),
    12: ("update_kl_coef", "test_update_kl_coef", ()),
}


def grading_command(n):
    return f'python -m pytest test_rlhf.py -k "{EXERCISES[n][1]}"'


def stub_message(n):
    return f"exercise {n}: write {EXERCISES[n][0]}() (see tutorial.md, Exercises)"


# -----------------------------------------------------------------------------
# The student copy

def blank_functions(source, numbers):
    """rlhf.py's text with the bodies of the given exercises replaced by a raise.
    The signature, decorators and docstring stay; every other line is untouched.
    Example: def f(x):\\n    \"\"\"Doc.\"\"\"\\n    return x
          -> def f(x):\\n    \"\"\"Doc.\"\"\"\\n    raise NotImplementedError("exercise 1: ...")
    """
    lines = source.splitlines(keepends=True)
    wanted = {EXERCISES[n][0]: n for n in numbers}
    nodes = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    if len(nodes) != len(wanted):
        missing = set(wanted) - {node.name for node in nodes}
        raise SystemExit(f"course.py: error: rlhf.py has no top-level function {', '.join(sorted(missing))}")
    for node in sorted(nodes, key=lambda nd: nd.lineno, reverse=True):  # bottom up: line numbers stay valid
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            raise SystemExit(f"course.py: error: exercise function {node.name}() needs a docstring (it is the task)")
        indent = " " * node.body[0].col_offset
        stub = f"{indent}raise NotImplementedError({stub_message(wanted[node.name])!r})\n"
        # lines are 1-based; keep up to the docstring's last line, replace the rest of the body
        lines[doc.end_lineno:node.end_lineno] = [stub]
    return "".join(lines)


def make_student_copy(out, numbers=None, files=STUDENT_FILES):
    """Write the student copy into the folder `out` (created; must be empty or new)."""
    numbers = sorted(EXERCISES) if numbers is None else numbers
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"course.py: error: {out} is not empty; pick a new folder")
    os.makedirs(out, exist_ok=True)
    for name in files:
        src = os.path.join(HERE, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out, name))
        elif name == "rlhf.py":
            with open(src, encoding="utf-8") as f:
                text = blank_functions(f.read(), numbers)
            with open(os.path.join(out, name), "w", encoding="utf-8") as f:
                f.write(text)
        else:
            shutil.copy(src, os.path.join(out, name))
    return out


# -----------------------------------------------------------------------------
# The check: every exercise's grading test fails without its exercise and passes with it

def run_grading(jobs):
    """Run `pytest -k` jobs in this process: [(folder, expression)] -> [(exit code, failure texts)].
    One process for every folder saves importing torch each time; each folder's rlhf and
    test_rlhf are imported afresh."""
    import pytest

    class Failures:
        def __init__(self):
            self.texts = []

        def pytest_runtest_logreport(self, report):
            if report.failed:
                self.texts.append(report.longreprtext)

    results = []
    for folder, expression in jobs:
        for name in ("rlhf", "test_rlhf"):
            sys.modules.pop(name, None)
        saved_path, saved_cwd = sys.path[:], os.getcwd()
        sys.path.insert(0, folder)
        os.chdir(folder)
        failures = Failures()
        try:
            # no:unraisableexception: its gc.collect cost 0.5 s per run, most of the check's time
            code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                                "test_rlhf.py", "-k", expression], plugins=[failures])
        finally:
            sys.path[:] = saved_path
            os.chdir(saved_cwd)
        results.append((int(code), failures.texts))
    return results


def check():
    """Run each exercise's grading command on four copies of rlhf.py: the full one (must pass),
    the student copy (must fail), one with only this exercise blank (must fail, with this
    exercise's error), and one with every other exercise blank except those this one needs
    (must pass). Returns a list of problems; empty when all is well."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        files = ["rlhf.py", "test_rlhf.py"]
        full = make_student_copy(os.path.join(tmp, "full"), numbers=[], files=files)
        student = make_student_copy(os.path.join(tmp, "student"), files=files)
        # only this exercise blank; and every exercise blank except this one and the ones it needs
        alone = {n: make_student_copy(os.path.join(tmp, f"only_{n}"), numbers=[n], files=files) for n in EXERCISES}
        done = {n: make_student_copy(os.path.join(tmp, f"done_{n}"), files=files,
                                     numbers=[m for m in EXERCISES if m != n and m not in EXERCISES[n][2]])
                for n in EXERCISES}
        jobs = []
        for n, (_, expression, _) in EXERCISES.items():
            jobs += [(full, expression), (student, expression), (alone[n], expression), (done[n], expression)]
        # a fresh process: pytest's module cache must not hold this repository's rlhf
        out = subprocess.run([sys.executable, __file__, "_grade", json.dumps(jobs)], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            return [f"the grading run failed: {out.stderr.strip()[-2000:]}"]
        results = iter(json.loads(out.stdout.strip().splitlines()[-1]))
        for n, (func, expression, _) in EXERCISES.items():
            (full_code, _), (student_code, _), (alone_code, alone_failures), (done_code, done_failures) = (
                next(results), next(results), next(results), next(results))
            if full_code != 0:
                problems.append(f"exercise {n} ({func}): `-k {expression}` does not pass on the full rlhf.py "
                                f"(pytest exit code {full_code}; 5 means no test was selected)")
            if student_code != 1:
                problems.append(f"exercise {n} ({func}): `-k {expression}` does not fail on the student copy "
                                f"(pytest exit code {student_code})")
            # with only this exercise blank, its tests must fail, and because of it
            if alone_code != 1 or not any(f"exercise {n}:" in text for text in alone_failures):
                problems.append(f"exercise {n} ({func}): `-k {expression}` does not catch a missing {func}()")
            # a student who has done this exercise and the ones it needs passes, whatever else is blank
            if done_code != 0:
                blocking = sorted({int(m) for text in done_failures for m in re.findall(r"exercise (\d+):", text)})
                problems.append(f"exercise {n} ({func}): `-k {expression}` also needs exercises {blocking}; "
                                f"add them to its line in EXERCISES (and to its Hint in tutorial.md)")
    return problems


# -----------------------------------------------------------------------------
# Plots for the tutorial's experiments (from the summary.json of finished runs)

def load_summary(run):
    path = os.path.join(run, "summary.json")
    if not os.path.exists(path):
        raise SystemExit(f"course.py: error: {path} not found; run `python rlhf.py --stage all --out_dir {run}` first")
    with open(path) as f:
        return json.load(f)


def plot_sweep(runs, out):
    """Distribution shift: for each finished run, the held-out gold and RM scores of the PPO
    policy against its KL to the SFT model. Prints the table, saves the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = []
    for run in runs:
        s = load_summary(run)
        if "eval" not in s:
            raise SystemExit(f"course.py: error: {run} has no evaluation; run `python rlhf.py --stage eval "
                             f"--out_dir {run}`")
        if "ppo" not in s:
            raise SystemExit(f"course.py: error: {run} has no PPO stage; run `python rlhf.py --stage ppo --out_dir {run}`")
        c, e = s["ppo"]["config"], s["eval"]
        beta = f"β {c['kl_coef']:g}" + (f" → target {c['kl_target']:g}" if c["adaptive_kl"] else "")
        rows.append(dict(run=run, beta=beta, kl=e["ppo"]["kl"], gold=e["ppo"]["gold"], rm=e["ppo"]["rm"],
                         win=e["win_rate_ppo_over_sft"], distinct=e["ppo"]["distinct"], sft_gold=e["sft"]["gold"],
                         sft_rm=e["sft"]["rm"]))
    rows.sort(key=lambda r: r["kl"])
    print("| run | β | KL (nats) | gold | RM score | win rate | distinct |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['beta']} | {r['kl']:.2f} | {r['gold']:+.3f} | {r['rm']:+.3f} | {r['win']:.3f} "
              f"| {r['distinct']:.3f} |")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    kls = [0.0] + [r["kl"] for r in rows]  # the SFT policy sits at KL 0
    ax.plot(kls, [rows[0]["sft_rm"]] + [r["rm"] for r in rows], "o-", label="RM score (what PPO maximises)")
    ax.plot(kls, [rows[0]["sft_gold"]] + [r["gold"] for r in rows], "s-", label="gold score (the simulated human)")
    for label, kl, gold in [("SFT", 0.0, rows[0]["sft_gold"])] + [(r["beta"], r["kl"], r["gold"]) for r in rows]:
        ax.annotate(label, (kl, gold), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set(title="PPO policies on held-out prompts, by KL to the SFT model", xlabel="KL(π || π_SFT) per response, nats",
           ylabel="mean score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


def plot_costs(run, out):
    """Compute cost: the wall time of each stage and, inside PPO, of generation, scoring and training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = load_summary(run)
    stages = {k: s[k]["wall_s"] for k in ("sft", "rm", "ppo", "eval") if k in s and "wall_s" in s[k]}
    ppo = s.get("ppo", {}).get("time_s", {})
    print("| stage | seconds |\n|---|---|")
    for k, v in stages.items():
        print(f"| {k} | {v:.1f} |")
    for k, v in ppo.items():
        print(f"| ppo: {k} | {v:.1f} |")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].barh(list(stages), list(stages.values()), color="tab:blue")
    axes[0].set(title="wall time per stage", xlabel="seconds")
    axes[0].invert_yaxis()
    if ppo:
        axes[1].barh(list(ppo), list(ppo.values()), color="tab:orange")
        axes[1].invert_yaxis()
    axes[1].set(title=f"inside PPO ({s['ppo']['config']['ppo_steps']} steps)", xlabel="seconds")
    for a in axes:
        a.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


def build_parser():
    p = argparse.ArgumentParser(description="Instructor tools for tutorial.md.")
    sub = p.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="write the student copy")
    student.add_argument("out", help="a new or empty folder, outside this repository")
    student.add_argument("--exercises", nargs="+", type=int, choices=sorted(EXERCISES), metavar="N",
                         help="blank only these exercises (default: all)")
    sub.add_parser("check", help="check that each exercise's grading test fails without it and passes with it")
    sweep = sub.add_parser("plot_sweep", help="gold and RM score against KL, from finished runs")
    sweep.add_argument("runs", nargs="+", help="run folders with a summary.json holding an eval")
    sweep.add_argument("--out", default="kl_sweep.png")
    costs = sub.add_parser("plot_costs", help="time per stage and inside PPO, from a finished run")
    costs.add_argument("run", help="a run folder with a summary.json")
    costs.add_argument("--out", default="compute_cost.png")
    sub.add_parser("_grade").add_argument("jobs")  # used by check
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "student":
        if os.path.abspath(args.out).startswith(HERE + os.sep):
            raise SystemExit(f"course.py: error: {args.out} is inside this repository, where pytest would collect its "
                             f"tests too; pick a folder outside, e.g. ../rlhf-lab")
        numbers = sorted(args.exercises or EXERCISES)
        make_student_copy(args.out, numbers)
        print(f"student copy in {args.out}/: exercises {', '.join(map(str, numbers))} raise NotImplementedError; "
              f"grade one with e.g. `{grading_command(numbers[0])}`")
    elif args.command == "check":
        problems = check()
        print("\n".join(problems) if problems else f"all {len(EXERCISES)} exercises are graded: each grading test "
                                                   "fails without its exercise and passes with it")
        sys.exit(1 if problems else 0)
    elif args.command == "plot_sweep":
        plot_sweep(args.runs, args.out)
    elif args.command == "plot_costs":
        plot_costs(args.run, args.out)
    elif args.command == "_grade":
        results = run_grading([tuple(job) for job in json.loads(args.jobs)])
        print(json.dumps(results))


if __name__ == "__main__":
    main()
