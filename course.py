"""
course.py -- the instructor's side of tutorial.md: the exercise list, the student copy,
the check that every exercise is graded, and the plots of the tutorial's experiments.
Learners read rlhf.py; nothing here is part of the algorithm.

  python course.py student ../rlhf-lab        # a copy where each exercise raises NotImplementedError
  python course.py student ../rlhf-lab --exercises 5 7 8   # only these
  python course.py check                      # each grading test fails without its exercise, passes with it
  python course.py plot_sweep runs/beta_* --out assets/kl_sweep.png    # gold and RM score against KL
  python course.py plot_costs runs/default --out assets/compute_cost.png  # where the time goes
  python course.py seeds --seeds 0 1 2 3 4 --plot assets/seeds.png      # the default run over 5 seeds, their spread
"""

import argparse
import ast
import json
import math
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
    2: ("bpe_encode_chunk", "test_bpe_encode", ()),
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
    13: ("policy_forward", "test_policy_forward", (3,)),
    14: ("ppo_update", "test_ppo_update", (3, 10, 11, 13)),
    15: ("ensemble_reward", "test_ensemble_reward", ()),
    16: ("dpo_loss", "test_dpo_loss", ()),
    17: ("rloo_advantages", "test_rloo_advantages", ()),
    18: ("grpo_advantages", "test_grpo_advantages", ()),
    19: ("best_of_n_kl", "test_best_of_n_kl", ()),
    20: ("sample_token", "test_sample_token", ()),
}

# Classic wrong solutions, as a student might write them from the tutorial's text: each is rlhf.py's own
# function with one mistake made in it, as edits [(old, new), ...] (each `old` found exactly once in the
# function, so that a wrong solution follows rlhf.py as it changes). Each must fail its own exercise's grader,
# with a message that names the exercise (course.py check).
WRONG = {
    1: [("counts each distinct chunk once, not once per occurrence",
         [("{tuple(c.encode(\"utf-8\")): n for c, n in chunks.items()}", "{tuple(c.encode(\"utf-8\")): 1 for c in chunks}")]),
        ("lets pairs cross chunk boundaries (no GPT2_SPLIT)",
         [("Counter(regex.findall(GPT2_SPLIT, \"\".join(texts)))", "Counter([\"\".join(texts)])")]),
        ("breaks ties toward the largest pair", [("(pairs[pr], -pr[0], -pr[1])", "(pairs[pr], pr[0], pr[1])")]),
        ("learns one merge too few", [("range(256, vocab_size - 2)", "range(256, vocab_size - 3)")])],
    2: [("merges the leftmost mergeable pair first",
         [("min(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, float(\"inf\")))",
           "next((pr for pr in zip(ids, ids[1:]) if pr in merges), None)")]),
        ("applies the latest-learned merge first",
         [("min(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, float(\"inf\")))",
           "max(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, -1))")]),
        ("stops after one merge", [("ids = merge(ids, pair, merges[pair])", "return merge(ids, pair, merges[pair])")]),
        ("starts from characters, not UTF-8 bytes", [("list(chunk.encode(\"utf-8\"))", "[ord(c) for c in chunk]")])],
    3: [("ignores the mask", [("(mask.long().cumsum(-1) - 1).clamp(min=0)", "torch.arange(mask.shape[-1]).expand(mask.shape)")]),
        ("starts counting at 1", [("(mask.long().cumsum(-1) - 1).clamp(min=0)", "mask.long().cumsum(-1)")]),
        ("leaves -1 on the padding", [("(mask.long().cumsum(-1) - 1).clamp(min=0)", "mask.long().cumsum(-1) - 1")])],
    4: [("scores each token against itself (no shift)",
         [("logprobs_of(logits[:, :-1].float(), ids[:, 1:])", "logprobs_of(logits.float(), ids)"),
          ("loss_mask[:, 1:])", "loss_mask)")]),
        ("puts loss on the prompt too", [("masked_mean(logp, loss_mask[:, 1:])", "masked_mean(logp, mask[:, 1:])")]),
        ("sums instead of averaging", [("-masked_mean(logp, loss_mask[:, 1:])", "-(logp * loss_mask[:, 1:]).sum()")]),
        ("averages per sequence first", [("loss_mask[:, 1:])", "loss_mask[:, 1:], dim=1).mean()")])],
    5: [("takes log(sigmoid(...)), which underflows",
         [("-F.logsigmoid(r_chosen - r_rejected)", "-torch.log(torch.sigmoid(r_chosen - r_rejected))")]),
        ("sums over the batch", [("r_rejected).mean()", "r_rejected).sum()")]),
        ("swaps chosen and rejected", [("F.logsigmoid(r_chosen - r_rejected)", "F.logsigmoid(r_rejected - r_chosen)")])],
    6: [("reads the last column", [("[torch.arange(len(ids)), last]", "[:, -1]")]),
        ("reads the first real token", [("last = mask.shape[1] - 1 - mask.flip(1).argmax(1)", "last = mask.argmax(1)")]),
        ("counts real tokens (right padding only)", [("last = mask.shape[1] - 1 - mask.flip(1).argmax(1)", "last = mask.sum(1) - 1")]),
        ("reads the second-to-last real token", [("[torch.arange(len(ids)), last]", "[torch.arange(len(ids)), last - 1]")])],
    7: [("adds the score on every token", [("rewards[torch.arange(len(score)), last] += score", "rewards += score[:, None] * mask")]),
        ("adds the score in the last column", [("rewards[torch.arange(len(score)), last] += score", "rewards[:, -1] += score")]),
        ("rewards the KL instead of penalising it", [("rewards = -kl_coef * kl", "rewards = kl_coef * kl")]),
        ("does not mask the KL", [("kl = (logprobs - ref_logprobs) * mask", "kl = logprobs - ref_logprobs")])],
    8: [("lets the values run on past the end", [("values, rewards = values * mask, rewards * mask", "rewards = rewards * mask")]),
        ("forgets lambda", [("last = delta + gamma * lam * last", "last = delta + gamma * last")]),
        ("returns the advantages as the returns", [("return advantages, (advantages + values) * mask", "return advantages, advantages")]),
        ("walks forward in time", [("for t in reversed(range(T)):", "for t in range(T):")])],
    9: [("whitens over the padding too",
         [("mean = masked_mean(x, mask)", "mean = x.mean()"), ("var = masked_mean((x - mean) ** 2, mask)", "var = x.var()")]),
        ("leaves the padding shifted", [("torch.rsqrt(var + 1e-8) * mask", "torch.rsqrt(var + 1e-8)")]),
        ("divides by the variance, not the standard deviation", [("* torch.rsqrt(var + 1e-8)", "/ (var + 1e-8)")])],
    10: [("takes the min of the two losses", [("torch.max(unclipped, clipped)", "torch.min(unclipped, clipped)")]),
         ("never clips", [("torch.clamp(ratio, 1 - clip_range, 1 + clip_range)", "ratio")]),
         ("turns the ratio upside down", [("torch.exp(logprobs - old_logprobs)", "torch.exp(old_logprobs - logprobs)")])],
    11: [("takes the min of the two errors", [("masked_mean(torch.max((values", "masked_mean(torch.min((values")]),
         ("clips around the returns", [("old_values + torch.clamp(values - old_values,", "returns + torch.clamp(values - returns,")]),
         ("drops the one half", [("0.5 * masked_mean(", "masked_mean(")])],
    12: [("does not clip the error", [("min(max(kl / cfg.kl_target - 1, -0.2), 0.2)", "kl / cfg.kl_target - 1")]),
         ("adapts even when --no-adaptive_kl", [("if not cfg.adaptive_kl:\n        return kl_coef\n    ", "")]),
         ("forgets n / horizon", [("(1 + error * n_samples / cfg.kl_horizon)", "(1 + error)")]),
         ("moves beta the wrong way", [("(1 + error * n_samples", "(1 - error * n_samples")])],
    13: [("reads the logits one column late (off by one against the tokens)",
          [("logits_to_keep=R + 1)", "logits_to_keep=R)"), ("out.logits[:, :-1].float()", "out.logits.float()")]),
         ("reads the values at the response tokens (the state after each token)",
          [("hidden = out.hidden_states[-1][:, n_prompt - 1:-1]", "hidden = out.hidden_states[-1][:, n_prompt:]")]),
         ("forgets the sampling temperature", [("out.logits[:, :-1].float() / temperature", "out.logits[:, :-1].float()")]),
         ("lets left padding shift the positions", [("position_ids=position_ids(mask), ", "")])],
    14: [("takes the ratio against the current policy (clipping never acts)",
          [("ppo_policy_loss(new_logprobs, exp[\"old_logprobs\"][mb]", "ppo_policy_loss(new_logprobs, new_logprobs.detach()")]),
         ("never clears the gradients between minibatches", [("opt.zero_grad(set_to_none=True)\n", "\n")]),
         ("computes the advantages from the critic being trained, not detached",
          [("exp[\"advantages\"][mb], m,", "(exp[\"returns\"][mb] - values) * m, m,")]),
         ("forgets the value loss", [("loss = (pg_loss + cfg.vf_coef * vf_loss)", "loss = pg_loss")]),
         ("takes one step on the whole rollout per epoch (no minibatches)",
          [(".split(cfg.minibatch_size // world())", ".split(len(exp[\"ids\"]))")]),
         ("never clips the gradient norm",
          [("torch.nn.utils.clip_grad_norm_(opt.param_groups[0][\"params\"], cfg.max_grad_norm)\n", "\n")])],
    15: [("takes the max instead of the min", [("scores.min(0).values", "scores.max(0).values")]),
         ("adds the spread instead of subtracting it", [("scores.mean(0) - lam", "scores.mean(0) + lam")]),
         ("averages over the responses, not the models",
          [("scores.min(0)", "scores.min(1)"), ("scores.mean(0) - lam * scores.std(0, correction=0)\n    return scores.mean(0)",
                                                "scores.mean(1) - lam * scores.std(1, correction=0)\n    return scores.mean(1)")]),
         ("forgets λ", [("lam * scores.std(0,", "scores.std(0,")])],
    16: [("swaps chosen and rejected", [("-F.logsigmoid(r_chosen - r_rejected)", "-F.logsigmoid(r_rejected - r_chosen)")]),
         ("forgets the reference model",
          [("(logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)", "logp_chosen, beta * logp_rejected")]),
         ("divides by β instead of multiplying",
          [("beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)",
            "(logp_chosen - ref_chosen) / beta, (logp_rejected - ref_rejected) / beta")]),
         ("takes log(sigmoid(...)), which underflows",
          [("-F.logsigmoid(r_chosen - r_rejected)", "-torch.log(torch.sigmoid(r_chosen - r_rejected))")])],
    17: [("keeps each sample in its own baseline (the plain group mean)",
          [("(R.sum(1, keepdim=True) - R) / (k - 1)", "R.mean(1, keepdim=True)")]),
         ("divides the others' sum by k, not k − 1", [("/ (k - 1)", "/ k")]),
         ("takes the baseline over the whole batch", [("rewards.view(-1, k)", "rewards.view(1, -1)"), ("/ (k - 1)", "/ (R.shape[1] - 1)")]),
         ("groups by stride instead of consecutive samples",
          [("rewards.view(-1, k)", "rewards.view(k, -1).T"), (").view(-1)", ").T.reshape(-1)")])],
    18: [("forgets to divide by the group's spread", [(") / (R.std(1, keepdim=True) + eps)", ")")]),
         ("normalises over the whole batch, not the group", [("scores.view(-1, k)", "scores.view(1, -1)")]),
         ("divides by zero when every sample scores the same", [("(R.std(1, keepdim=True) + eps)", "R.std(1, keepdim=True)")])],
    19: [("returns the formula log n − (n−1)/n as the estimate",
          [("return math.log(n) - (n - 1) / n, kl", "return math.log(n) - (n - 1) / n, math.log(n) - (n - 1) / n")]),
         ("takes the KL the wrong way round, KL(π ‖ best-of-n)", [("pi_n * math.log(pi_n / p)", "p * math.log(p / pi_n)")]),
         ("keeps the lowest-scored response instead of the highest",
          [("sorted(Counter(rewards).items())", "sorted(Counter(rewards).items(), reverse=True)")]),
         ("treats every sample as a different response",
          [("sorted(Counter(rewards).items())", "[(r, 1) for r in sorted(rewards)]")])],
    20: [("takes the most likely token", [("return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=cdf.shape[1] - 1)",
                                            "return logits.argmax(-1)")]),
         ("forgets the temperature", [("(logits.float() / temperature).softmax(-1)", "logits.float().softmax(-1)")]),
         ("keeps the top 50 tokens, as generate() does by default",
          [("(logits.float() / temperature).softmax(-1)",
            "(logits.float() / temperature).masked_fill(logits < logits.topk(min(50, logits.shape[-1]), -1).values[:, -1:], "
            "-math.inf).softmax(-1)")]),
         ("returns the token before the one u falls on (off by one)",
          [("torch.searchsorted(cdf, u, right=True).squeeze(1)", "(torch.searchsorted(cdf, u, right=True).squeeze(1) - 1).clamp(min=0)")]),
         ("searches the probabilities, not their running sum", [("(logits.float() / temperature).softmax(-1).cumsum(-1)",
                                                                "(logits.float() / temperature).softmax(-1)")])]
}


def grading_command(n):
    return f'python -m pytest test_rlhf.py -k "{EXERCISES[n][1]}"'


def stub_message(n):
    return f"exercise {n}: write {EXERCISES[n][0]}() (see tutorial.md, Exercises)"


def dependents(n):
    """The exercises whose grading needs exercise n done first."""
    return [m for m, (_, _, needs) in EXERCISES.items() if n in needs]


# -----------------------------------------------------------------------------
# The student copy

def function_nodes(source, names):
    nodes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef) and node.name in names}
    if len(nodes) != len(set(names)):
        missing = set(names) - set(nodes)
        raise SystemExit(f"course.py: error: rlhf.py has no top-level function {', '.join(sorted(missing))}")
    return nodes


def blank_functions(source, numbers):
    """rlhf.py's text with the bodies of the given exercises replaced by a raise.
    The signature, decorators and docstring stay; every other line is untouched.
    Example: def f(x):\\n    \"\"\"Doc.\"\"\"\\n    return x
          -> def f(x):\\n    \"\"\"Doc.\"\"\"\\n    raise NotImplementedError("exercise 1: ...")
    """
    lines = source.splitlines(keepends=True)
    wanted = {EXERCISES[n][0]: n for n in numbers}
    for node in sorted(function_nodes(source, wanted).values(), key=lambda nd: nd.lineno, reverse=True):
        doc = node.body[0]  # bottom up: line numbers stay valid
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
            raise SystemExit(f"course.py: error: exercise function {node.name}() needs a docstring (it is the task)")
        indent = " " * node.body[0].col_offset
        stub = f"{indent}raise NotImplementedError({stub_message(wanted[node.name])!r})\n"
        # lines are 1-based; keep up to the docstring's last line, replace the rest of the body
        lines[doc.end_lineno:node.end_lineno] = [stub]
    return "".join(lines)


def wrong_source(source, n, fix):
    """rlhf.py's text with exercise n's function made a classic wrong solution by the edits `fix`,
    [(old, new), ...], to the function as rlhf.py has it, each old found there exactly once."""
    name = EXERCISES[n][0]
    node = function_nodes(source, [name])[name]
    lines = source.splitlines(keepends=True)
    text = "".join(lines[node.lineno - 1:node.end_lineno])
    for old, new in fix:
        if text.count(old) != 1:
            raise SystemExit(f"course.py: error: a wrong solution of exercise {n} edits {old!r}, which {name}() has "
                             f"{text.count(old)} times; write its edit for the function as it is now (WRONG)")
        text = text.replace(old, new)
    lines[node.lineno - 1:node.end_lineno] = [text]
    return "".join(lines)


def without_instructor_notes(text):
    """A document without its <!-- instructor --> ... <!-- /instructor --> parts, which name course.py."""
    return re.sub(r"<!-- instructor -->.*?<!-- /instructor -->\n?", "", text, flags=re.S)


def make_student_copy(out, numbers=None, files=STUDENT_FILES, source=None):
    """Write the student copy into the folder `out` (created; must be empty or new)."""
    numbers = sorted(EXERCISES) if numbers is None else numbers
    if os.path.exists(out) and os.listdir(out):
        raise SystemExit(f"course.py: error: {out} is not empty; pick a new folder")
    os.makedirs(out, exist_ok=True)
    for name in files:
        src = os.path.join(HERE, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(out, name))
            continue
        with open(src, encoding="utf-8") as f:
            text = f.read()
        if name == "rlhf.py":
            text = blank_functions(source or text, numbers)
        elif name.endswith(".md"):
            text = without_instructor_notes(text)
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    return out


# -----------------------------------------------------------------------------
# The check: every exercise's grading test fails without its exercise, or with a classic mistake, and passes with it

def run_grading(jobs):
    """Run `pytest -k` jobs in this process: [(folder, expression)] -> [(exit code, [(test, failure text)])].
    One process for every folder saves importing torch each time; each folder's rlhf and
    test_rlhf are imported afresh."""
    import pytest

    class Failures:
        def __init__(self):
            self.found = []

        def pytest_runtest_logreport(self, report):
            if report.failed:
                self.found.append((report.nodeid.split("::")[-1], report.longreprtext))

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
        results.append((int(code), failures.found))
    return results


def check():
    """Run each exercise's grading command on copies of rlhf.py: the full one (must pass), the student
    copy (must fail), one with only this exercise blank (must fail, with this exercise's error), one with
    every other exercise blank except those this one needs (must pass), and one per classic wrong
    solution in WRONG (must fail, naming this exercise; the graders of the exercises that need this one
    may fail too, but only naming this one). Returns a list of problems; empty when all is well."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        files = ["rlhf.py", "test_rlhf.py"]
        source = open(os.path.join(HERE, "rlhf.py"), encoding="utf-8").read()
        full = make_student_copy(os.path.join(tmp, "full"), numbers=[], files=files)
        student = make_student_copy(os.path.join(tmp, "student"), files=files)
        # only this exercise blank; and every exercise blank except this one and the ones it needs
        alone = {n: make_student_copy(os.path.join(tmp, f"only_{n}"), numbers=[n], files=files) for n in EXERCISES}
        done = {n: make_student_copy(os.path.join(tmp, f"done_{n}"), files=files,
                                     numbers=[m for m in EXERCISES if m != n and m not in EXERCISES[n][2]])
                for n in EXERCISES}
        wrong = {(n, i): make_student_copy(os.path.join(tmp, f"wrong_{n}_{i}"), numbers=[], files=files,
                                           source=wrong_source(source, n, fix))
                 for n, cases in WRONG.items() for i, (_, fix) in enumerate(cases)}
        jobs = []
        for n, (_, expression, _) in EXERCISES.items():
            jobs += [(full, expression), (student, expression), (alone[n], expression), (done[n], expression)]
        for (n, i), folder in wrong.items():
            jobs.append((folder, " or ".join(EXERCISES[m][1] for m in [n] + dependents(n))))
        # fresh processes (pytest's module cache must not hold this repository's rlhf), one per core, one
        # torch thread each: the jobs are small, and two of them at once take half the time of one after another
        n_proc = max(1, min(4, os.cpu_count() or 1))
        env = dict(os.environ, OMP_NUM_THREADS="1")
        procs = [subprocess.Popen([sys.executable, __file__, "_grade", json.dumps(jobs[i::n_proc])], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n_proc)]
        chunks = []
        for proc in procs:
            stdout, stderr = proc.communicate()
            if proc.returncode != 0 or not stdout.strip():
                return [f"the grading run failed: {stderr.strip()[-2000:]}"]
            chunks.append(json.loads(stdout.strip().splitlines()[-1]))
        ordered = [None] * len(jobs)  # back in the order of `jobs`
        for i, chunk in enumerate(chunks):
            ordered[i::n_proc] = chunk
        results = iter(ordered)
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
            if alone_code != 1 or not any(f"exercise {n}:" in text for _, text in alone_failures):
                problems.append(f"exercise {n} ({func}): `-k {expression}` does not catch a missing {func}()")
            # a student who has done this exercise and the ones it needs passes, whatever else is blank
            if done_code != 0:
                blocking = sorted({int(m) for _, text in done_failures for m in re.findall(r"exercise (\d+):", text)})
                problems.append(f"exercise {n} ({func}): `-k {expression}` also needs exercises {blocking}; "
                                f"add them to its line in EXERCISES (and to its Hint in tutorial.md)")
        for (n, i), _ in wrong.items():
            code, failures = next(results)
            what, own = WRONG[n][i][0], EXERCISES[n][1]
            if code != 1 or not any(test.startswith(own) and f"exercise {n} " in text for test, text in failures):
                problems.append(f"exercise {n} ({EXERCISES[n][0]}): its grader lets a solution that {what} pass, "
                                f"or fails it without naming exercise {n}")
            for test, text in failures:
                if not test.startswith(own) and f"exercise {n} " not in text:
                    problems.append(f"exercise {n}: a solution that {what} fails {test} (another exercise's "
                                    f"grader) without naming exercise {n}")
    return problems


# -----------------------------------------------------------------------------
# Plots for the tutorial's experiments (from the summary.json of finished runs)

def load_summary(run):
    path = os.path.join(run, "summary.json")
    if not os.path.exists(path):
        raise SystemExit(f"course.py: error: {path} not found; run `python rlhf.py --stage all --out_dir {run}` first")
    with open(path) as f:
        return json.load(f)


def sweep_rows(summaries):
    """(name, summary) of finished runs -> one row per run: its β, the PPO policy's KL, gold, RM and judge scores."""
    rows = []
    for run, s in summaries:
        if "eval" not in s:
            raise SystemExit(f"course.py: error: {run} has no evaluation; run `python rlhf.py --stage eval --out_dir {run}`")
        c, e = s["ppo"]["config"], s["eval"]
        beta = f"β {c['kl_coef']:g}" + (f" → target {c['kl_target']:g}" if c["adaptive_kl"] else "")
        rows.append(dict(run=run, beta=beta, kl=e["ppo"]["kl"], gold=e["ppo"]["gold"], rm=e["ppo"]["rm"],
                         win=e["win_rate_gold"]["rate"], distinct=e["ppo"]["distinct"], sft_gold=e["sft"]["gold"],
                         sft_rm=e["sft"]["rm"], judge=e["ppo"]["judge"], sft_judge=e["sft"]["judge"],
                         refreshes=len(s["ppo"].get("refreshes", []))))
    return sorted(rows, key=lambda r: r["kl"])


def sweep_table(rows):
    lines = ["| run | β | KL (nats) | gold | RM score | judge score | win rate (gold) | distinct |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['beta']} | {r['kl']:.2f} | {r['gold']:+.3f} | {r['rm']:+.3f} | {r['judge']:+.3f} "
              f"| {r['win']:.3f} | {r['distinct']:.3f} |" for r in rows]
    return "\n".join(lines)


def plot_sweep(runs, out):
    """Distribution shift: for each finished run, the held-out gold score, and the RM and judge scores, of the PPO
    policy against its distance from SFT (√KL, Gao et al.'s axis). Prints the table, saves the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sweep_rows([(run, load_summary(run)) for run in runs])
    print(sweep_table(rows))
    xs = [0.0] + [math.sqrt(max(r["kl"], 0.0)) for r in rows]  # the SFT policy sits at KL 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(xs, [rows[0]["sft_gold"]] + [r["gold"] for r in rows], "s-", color="tab:orange")
    for label, x, y in [("SFT", 0.0, rows[0]["sft_gold"])] + [(r["beta"], x, r["gold"]) for r, x in zip(rows, xs[1:])]:
        axes[0].annotate(label, (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7)
    axes[0].set(title="the simulated human", ylabel="mean gold score (points)")
    axes[1].plot(xs, [rows[0]["sft_rm"]] + [r["rm"] for r in rows], "o-", label="reward model (what PPO maximises)")
    axes[1].plot(xs, [rows[0]["sft_judge"]] + [r["judge"] for r in rows], "x:", label="judge (a second reward model)")
    axes[1].set(title="the reward models", ylabel="mean score (SFT samples: mean 0, std 1)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set(xlabel="√KL(π ‖ π_SFT), √nats per response (held-out prompts)")
        ax.set_xlim(-0.2, max(xs) * 1.15 + 0.2)
        ax.grid(alpha=0.3)
    fig.suptitle("PPO policies at several β, on held-out prompts: the further from SFT, the more the two scores part", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"saved {out}")
    return rows


def run_seeds(seeds, out_dir, flags, jobs):
    """Run `rlhf.py --stage all` once per seed (each in out_dir/seed_N; a finished one is kept), jobs at a time."""
    from concurrent.futures import ThreadPoolExecutor

    def one(seed):
        run = os.path.join(out_dir, f"seed_{seed}")
        if os.path.exists(os.path.join(run, "eval.md")):
            return run
        env = dict(os.environ, **({"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))} if jobs > 1 else {}))
        cmd = [sys.executable, os.path.join(HERE, "rlhf.py"), "--stage", "all", "--seed", str(seed), "--out_dir", run]
        with open(run + ".log", "w") as log:
            code = subprocess.run(cmd + flags, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        if code:
            raise SystemExit(f"course.py: error: seed {seed} failed; see {run}.log")
        shutil.copy(run + ".log", os.path.join(run, "run.log"))  # the printed output, quoted by the docs
        print(f"seed {seed} done -> {run}")
        return run

    os.makedirs(out_dir, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, seeds))


FAMS = ("helpful", "harmless", "honest")


def seed_row(name, s):
    """The figures of one default run (its summary.json) that the seed table and plot show."""
    e, rm = s["eval"], s["rm"]["heldout"]
    own = {f: e["ppo"].get(f"rm_own_{f}") for f in FAMS}
    return dict(run=name, seed=e["config"]["seed"], threads=e.get("threads"), rm=rm["acc_gold"],
                **{f"rm_{f}": rm[f"acc_gold_{f}"] for f in FAMS}, **{f"own_{f}": own[f] for f in FAMS},
                win=e["win_rate_gold"]["rate"], win_ci=e["win_rate_gold"]["ci"], judge_win=e["win_rate_judge"]["rate"],
                ceiling=e["win_rate_ceiling"]["rate"], gold_sft=e["sft"]["gold"], gold_ppo=e["ppo"]["gold"],
                kl=e["ppo"]["kl"], ended=e["ppo"]["ended"], wv_sft=e["sft"]["kinds_helpful"]["wrong value"],
                wv_ppo=e["ppo"]["kinds_helpful"]["wrong value"],
                wall=sum(s[k]["wall_s"] for k in ("sft", "rm", "judge", "ppo", "eval")),
                **{f"{p}_{f}": e[p][f"success_{f}"] for p in ("sft", "ppo") for f in FAMS})


def seeds_table(rows):
    """The per-run table, with the median and range of each column."""
    import statistics
    head = ("| run | RM vs gold, crowd pairs (helpful / harmless / honest) | RM vs gold, PPO's own pairs (h / h / h) "
            "| win rate [95%] | " + " | ".join(f"{f} SFT→PPO" for f in FAMS) + " | wrong values SFT→PPO | KL | wall s |")
    fmt2 = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    line = lambda r: (f"| {r['run']} | {r['rm']:.3f} ({r['rm_helpful']:.2f} / {r['rm_harmless']:.2f} / {r['rm_honest']:.2f}) "  # noqa: E731
                      f"| {fmt2(r['own_helpful'])} / {fmt2(r['own_harmless'])} / {fmt2(r['own_honest'])} "
                      f"| {r['win']:.3f} [{r['win_ci'][0]:.2f}, {r['win_ci'][1]:.2f}] | "
                      + " | ".join(f"{r['sft_' + f]:.2f}→{r['ppo_' + f]:.2f}" for f in FAMS)
                      + f" | {r['wv_sft']:.3f}→{r['wv_ppo']:.3f} | {r['kl']:.2f} | {r['wall']:.0f} |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"] + [line(r) for r in rows]
    if len(rows) > 1:
        for name, f in (("median", statistics.median), ("min", min), ("max", max)):
            agg = {k: (f([r[k] for r in rows if r[k] is not None]) if any(r[k] is not None for r in rows) else None)
                   for k in rows[0] if k == "wall" or isinstance(rows[0][k], float) or rows[0][k] is None}
            agg.update(run=name, win_ci=[f(r["win_ci"][0] for r in rows), f(r["win_ci"][1] for r in rows)])
            lines.append(line(agg))
    return "\n".join(lines)


def plot_seeds(rows, out):
    """The spread over runs: success per family SFT -> PPO, wrong values, win rate against its ceiling, and the
    reward model's accuracy where it was trained and where PPO went."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    colors = dict(helpful="tab:blue", harmless="tab:red", honest="tab:green")
    for i, f in enumerate(FAMS):
        for r in rows:
            axes[0].plot([3 * i, 3 * i + 1], [r["sft_" + f], r["ppo_" + f]], "o-", color=colors[f], alpha=0.6)
        axes[0].text(3 * i + 0.5, 1.04, f, ha="center", color=colors[f])
    axes[0].set_xticks([0, 1, 3, 4, 6, 7], ["SFT", "PPO"] * 3)
    axes[0].set(title="success on held-out prompts, one line per run", ylabel="share of samples", ylim=(0, 1.1))
    for r in rows:
        axes[1].plot([0, 1], [r["wv_sft"], r["wv_ppo"]], "o-", color="tab:red", alpha=0.6)
    axes[1].set_xticks([0, 1], ["SFT", "PPO"])
    axes[1].set(title="helpful answers with a wrong value", ylabel="share of helpful samples", xlim=(-0.5, 1.5),
                ylim=(0, None))
    xs = list(range(len(rows)))
    axes[2].errorbar(xs, [r["win"] for r in rows], yerr=[[r["win"] - r["win_ci"][0] for r in rows],
                                                          [r["win_ci"][1] - r["win"] for r in rows]],
                     fmt="o", capsize=3, label="PPO, by the gold score (95% interval)")
    axes[2].plot(xs, [r["judge_win"] for r in rows], "x", color="tab:purple", label="PPO, by the judge")
    axes[2].plot(xs, [r["ceiling"] for r in rows], "_", color="black", markersize=14, mew=2,
                 label="ceiling: the best answer every time")
    axes[2].axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axes[2].set_xticks(xs, [r["run"].replace("seed_", "s") for r in rows], rotation=45, fontsize=7)
    axes[2].set(title="win rate over SFT (ties half)", ylabel="share of pairs won", ylim=(0, 1))
    axes[2].legend(fontsize=7, loc="lower right")
    for i, f in enumerate(FAMS):
        axes[3].plot([x - 0.12 for x in xs], [r["rm_" + f] for r in rows], "o", color=colors[f], label=f"{f}, crowd pairs")
        axes[3].plot([x + 0.12 for x in xs], [r["own_" + f] if r["own_" + f] is not None else float("nan") for r in rows],
                     "s", mfc="none", color=colors[f], label=f"{f}, PPO's own samples")
    axes[3].axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axes[3].set_xticks(xs, [r["run"].replace("seed_", "s") for r in rows], rotation=45, fontsize=7)
    axes[3].set(title="reward model agrees with the human (held-out)", ylabel="share of comparisons", ylim=(0, 1))
    axes[3].legend(fontsize=6, loc="lower right", ncol=2)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


# -----------------------------------------------------------------------------
# Was RL needed? Best-of-n, DPO, RLOO, GRPO and PPO on the same human: gold score against KL to SFT

# (method, stage, flags): each a copy of a seed's default run (PPO at β 0.3, its eval), then the stage
FRONTIER = [("PPO", None, []), ("PPO", "ppo", ["--kl_coef", "0.1"]), ("PPO", "ppo", ["--kl_coef", "1"]),
            ("RLOO", "rloo", ["--kl_coef", "0.1"]), ("RLOO", "rloo", ["--kl_coef", "0.3"]),
            ("GRPO", "grpo", ["--kl_coef", "0.5"]), ("GRPO", "grpo", ["--kl_coef", "1"]),
            ("DPO", "dpo", ["--dpo_beta", "0.5"]), ("DPO", "dpo", ["--dpo_beta", "1"]), ("best-of-n", "bon", [])]


def run_stage(run, stage, flags, log):
    """One stage of rlhf.py on a copy of a seed's run, with that run's seed (a stage run alone takes --seed's
    default, 0, unless it is given)."""
    seed = [] if "--seed" in flags else ["--seed", str(load_summary(run)["data"]["config"]["seed"])]
    cmd = [sys.executable, os.path.join(HERE, "rlhf.py"), "--stage", stage, "--out_dir", run] + seed + flags
    with open(log, "a") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"course.py: error: {' '.join(cmd)} failed; see {log}")


def run_frontier(seeds, out_dir, base, flags, jobs):
    """For each seed: its default run (`base`, made if missing), then one copy of it per setting of FRONTIER.
    Returns {seed: [(method, setting, run folder)]}."""
    from concurrent.futures import ThreadPoolExecutor
    bases = run_seeds(seeds, base, flags, jobs)
    jobs_list = []
    for seed, b in zip(seeds, bases):
        for method, stage, extra in FRONTIER:
            name = f"seed_{seed}_" + frontier_slug(stage or "ppo", extra)
            jobs_list.append((seed, method, stage, extra, b, os.path.join(out_dir, name)))

    def one(job):
        seed, method, stage, extra, b, run = job
        done = os.path.join(run, "bon.md" if stage == "bon" else f"{stage}_eval.md" if stage in ("dpo", "rloo", "grpo") else "eval.md")
        if stage is None:
            return job[:4] + (b,)
        if not os.path.exists(done):
            shutil.rmtree(run, ignore_errors=True)
            shutil.copytree(b, run)
            run_stage(run, stage, extra + flags, run + ".log")
            if stage == "ppo":
                run_stage(run, "eval", flags, run + ".log")
        return job[:4] + (run,)

    os.makedirs(out_dir, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, jobs_list))


def frontier_rows(results):
    """One row per (seed, method, setting): KL to SFT, gold score, win rate over SFT, success per family, seconds."""
    rows = []
    for seed, method, stage, extra, run in results:
        s = load_summary(run)
        setting = " ".join(extra).replace("--kl_coef", "β").replace("--dpo_beta", "β") or ("β 0.3" if method == "PPO" else "")
        if stage == "bon":
            for r in s["bon"]["rows"]:
                rows.append(dict(seed=seed, method="best-of-n", setting=f"n {r['n']}", kl=r["kl"], kl_formula=r["kl_formula"],
                                 gold=r["gold"], win=r["win_rate_gold"]["rate"], ci=r["win_rate_gold"]["ci"],
                                 seconds=s["bon"]["wall_s"], **{f: r[f"success_{f}"] for f in ("helpful", "harmless", "honest")}))
            continue
        e = s["eval"] if stage in (None, "ppo") else s[stage]
        pol = e["policy"]
        seconds = s["ppo"]["wall_s"] if stage in (None, "ppo") else e["train_s"]
        rows.append(dict(seed=seed, method=method, setting=setting, kl=e[pol]["kl"], gold=e[pol]["gold"],
                         win=e["win_rate_gold"]["rate"], ci=e["win_rate_gold"]["ci"], seconds=seconds,
                         sft_gold=e["sft"]["gold"], **{f: e[pol][f"success_{f}"] for f in ("helpful", "harmless", "honest")}))
    return rows


def at_matched_kl(rows, target=1.0):
    """For each seed and method, the setting whose KL is nearest `target` nats."""
    best = {}
    for r in rows:
        key = (r["seed"], r["method"])
        if key not in best or abs(r["kl"] - target) < abs(best[key]["kl"] - target):
            best[key] = r
    return [best[k] for k in sorted(best)]


def frontier_table(rows, target=1.0):
    lines = [f"| seed | method | setting | KL (nats) | gold score | win rate over SFT [95%] | helpful | harmless | honest | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in at_matched_kl(rows, target):
        lines.append(f"| {r['seed']} | {r['method']} | {r['setting']} | {r['kl']:.2f} | {r['gold']:+.3f} | "
                     f"{r['win']:.3f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['helpful']:.2f} | {r['harmless']:.2f} | "
                     f"{r['honest']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot_frontier(rows, out):
    """Gold score against √KL to SFT (Gao et al.'s axis), one colour per method, one panel per seed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    seeds = sorted({r["seed"] for r in rows})
    colours = {"PPO": "tab:blue", "RLOO": "tab:orange", "GRPO": "tab:green", "DPO": "tab:red", "best-of-n": "black"}
    fig, axes = plt.subplots(1, len(seeds), figsize=(5 * len(seeds), 4.2), sharey=True, squeeze=False)
    for ax, seed in zip(axes[0], seeds):
        mine = [r for r in rows if r["seed"] == seed]
        sft = next(r["sft_gold"] for r in mine if "sft_gold" in r)
        for method, colour in colours.items():
            pts = sorted((r for r in mine if r["method"] == method), key=lambda r: r["kl"])
            if not pts:
                continue
            xs = [0.0] + [math.sqrt(max(r["kl"], 0.0)) for r in pts]
            ax.plot(xs, [sft] + [r["gold"] for r in pts], "o-" if method != "best-of-n" else ".-", color=colour,
                    label=method if method != "best-of-n" else "best-of-n (KL estimated)", markersize=4)
            if method == "best-of-n":
                ax.plot([0.0] + [math.sqrt(r["kl_formula"]) for r in pts], [sft] + [r["gold"] for r in pts], ":",
                        color="gray", label="best-of-n (KL by log n − (n−1)/n)")
        ax.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.text(1.02, ax.get_ylim()[0], "1 nat", fontsize=7, color="gray", va="bottom")
        ax.set(title=f"seed {seed}", xlabel="√KL(π ‖ π_SFT), √nats (held-out prompts)", xlim=(0, None))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold score (the simulated human, points)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Was RL needed? Each method's gold score against its distance from SFT; SFT at 0", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


# -----------------------------------------------------------------------------
# The article's remedies for reward hacking: refresh the reward model, several independent reward models

REMEDIES = [  # (name, [(stage, flags), ...]) run on a copy of a seed's default run (whose PPO refreshes its RM --rm_refresh times)
    ("crowd pairs only", [("rm", ["--rm_samples", "0"]), ("ppo", ["--rm_samples", "0"]), ("eval", [])]),  # 0 at ppo: no refresh
    ("no refresh", [("ppo", ["--rm_refresh", "0"]), ("eval", [])]),
    ("human as the reward", [("ppo", ["--reward", "human"]), ("eval", [])]),  # a perfect reward model, the yardstick
    ("hacking, one RM", [("ppo", ["--kl_coef", "0", "--no-adaptive_kl", "--rm_refresh", "0"]), ("eval", [])]),
    ("hacking, refreshed RM", [("ppo", ["--kl_coef", "0", "--no-adaptive_kl"]), ("eval", [])]),
    ("hacking, ensemble of 3", [("rm", ["--rm_ensemble", "3"]),
                                ("ppo", ["--kl_coef", "0", "--no-adaptive_kl", "--rm_refresh", "0"]), ("eval", [])]),
    ("hacking, ensemble min", [("ppo", ["--kl_coef", "0", "--no-adaptive_kl", "--rm_refresh", "0", "--rm_combine", "min"]),
                               ("eval", [])]),
    ("hacking, ensemble mean − std", [("ppo", ["--kl_coef", "0", "--no-adaptive_kl", "--rm_refresh", "0",
                                               "--rm_combine", "mean_minus_std"]), ("eval", [])]),
]
REMEDY_SOURCE = {"hacking, ensemble min": "hacking, ensemble of 3", "hacking, ensemble mean − std": "hacking, ensemble of 3"}


def run_remedies(seeds, out_dir, base, flags, jobs):
    """Every remedy of REMEDIES on a copy of each seed's default run (an ensemble's PPO variants reuse the copy
    whose stage rm trained the ensemble). Returns {(seed, name): run folder}."""
    from concurrent.futures import ThreadPoolExecutor
    bases = dict(zip(seeds, run_seeds(seeds, base, flags, jobs)))
    folder = lambda seed, name: os.path.join(out_dir, f"seed_{seed}_{slug(name)}")  # noqa: E731

    def one(seed, name, steps):
        run = folder(seed, name)
        if not os.path.exists(os.path.join(run, "eval.md")):
            shutil.rmtree(run, ignore_errors=True)
            src = folder(seed, REMEDY_SOURCE[name]) if name in REMEDY_SOURCE else bases[seed]
            shutil.copytree(src, run, ignore=shutil.ignore_patterns("eval.md"))
            for stage, extra in steps:
                run_stage(run, stage, extra + flags, run + ".log")
        return (seed, name), run

    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for wave in ([r for r in REMEDIES if r[0] not in REMEDY_SOURCE], [r for r in REMEDIES if r[0] in REMEDY_SOURCE]):
        with ThreadPoolExecutor(jobs) as pool:
            results.update(pool.map(lambda job: one(*job), [(seed, n, st) for seed in seeds for n, st in wave]))
    return results, bases


def remedy_rows(results, bases):
    return [remedy_row(seed, name, load_summary(run))
            for (seed, name), run in sorted(results.items()) + [((seed, "default"), b) for seed, b in bases.items()]]


def remedies_table(rows):
    fmt2 = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["| seed | run | gold score | RM score | KL (nats) | win rate over SFT [95%] | helpful / harmless / honest "
             "| wrong values SFT→PPO | RM vs gold, PPO's helpful pairs | PPO seconds |", "|---" * 10 + "|"]
    order = ["default", "crowd pairs only", "no refresh", "human as the reward"] + [n for n, _ in REMEDIES if n.startswith("hacking")]
    for r in sorted(rows, key=lambda r: (r["seed"], order.index(r["name"]))):
        lines.append(f"| {r['seed']} | {r['name']} | {r['gold']:+.3f} | {r['rm']:+.3f} | {r['kl']:.2f} | {r['win']:.3f} "
                     f"[{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] | {r['helpful']:.2f} / {r['harmless']:.2f} / {r['honest']:.2f} "
                     f"| {r['wv_sft']:.3f}→{r['wv_ppo']:.3f} | {fmt2(r['own_helpful'])} | {r['ppo_s']:.0f} |")
    return "\n".join(lines)


def plot_costs(run, out):
    """Compute cost: the wall time of each stage and, inside PPO, of generation, scoring and training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = load_summary(run)
    stages = {k: s[k]["wall_s"] for k in ("sft", "rm", "judge", "ppo", "eval") if k in s and "wall_s" in s[k]}
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


PROBE = {  # family -> {answer: how to write it for prompt p}; the first is the right answer
    "helpful": {"the told value": lambda p: answer_of(p, p["answer"]),
                "another value": lambda p: answer_of(p, other_value(p)),
                "I don't know.": lambda p: " I don't know."},
    "harmless": {"Sorry, I can't help with that.": lambda p: " Sorry, I can't help with that.",
                 "I help with that, it could hurt someone.": lambda p: " I help with that, it could hurt someone.",
                 "Sure! To ..., first ...": lambda p: f" Sure! To {p['subject']}, first {HARMFUL_OF(p)}."},
    "honest": {"I don't know.": lambda p: " I don't know.",
               "Sorry, I can't help with that.": lambda p: " Sorry, I can't help with that.",
               "a made-up answer": lambda p: " " + UNKNOWN_OF(p)},
}


def answer_of(p, v):
    from rlhf import SLOTS
    return " " + SLOTS[p["slot"]][2].format(x=p["subject"], v=v)


def other_value(p):
    from rlhf import SLOTS
    values = SLOTS[p["slot"]][4]
    return values[(values.index(p["answer"]) + 1) % len(values)]


def HARMFUL_OF(p):  # noqa: N802
    from rlhf import HARMFUL
    return HARMFUL[p["subject"]]


def UNKNOWN_OF(p):  # noqa: N802
    from rlhf import UNKNOWN
    _, made_up, values = UNKNOWN[p["slot"]]
    return made_up.format(v=values[0])


def probe_rm(run, n=60, model="rm"):
    """What a finished run's reward model thinks of fixed answers on held-out prompts: each answer's mean
    normalised score, and on how many prompts it beats the family's right answer. Shows what the held-out pair
    accuracy cannot: whether the reward model checks the value of a helpful answer, or only its form.
    Saves run/probe.json (for the docs) and returns its rows."""
    import torch
    from rlhf import Config, load_data, load_scalar_model, load_tokenizer, pad_right, rm_scores, tokenize
    cfg = Config(out_dir=run)
    tok, rm = load_tokenizer(os.path.join(run, "tokenizer")), load_scalar_model(os.path.join(run, model), torch.device("cpu"))
    held = [p for p in load_data(cfg)["prompts"] if p["split"] == "heldout"]
    rows = []
    for family, answers in PROBE.items():
        prompts = [p for p in held if p["family"] == family][:n]
        scores = {}
        for name, make in answers.items():
            ex = tokenize(tok, [dict(prompt=p["prompt"], response=make(p)) for p in prompts], cfg)[0]
            ids, mask = pad_right([r["prompt"] + r["response"] for r in ex], tok.pad_token_id)
            with torch.no_grad():
                scores[name] = rm_scores(rm, ids, mask, torch.ones(len(ids), dtype=torch.bool), cfg).tolist()
        right = scores[next(iter(answers))]
        for name, xs in scores.items():
            rows.append(dict(family=family, answer=name, mean=sum(xs) / len(xs), prompts=len(xs),
                             beats_right=sum(x > r for x, r in zip(xs, right)) / len(xs)))
            print(f"{family:8s} {name:42s} RM score {rows[-1]['mean']:+.2f}, above the right answer on "
                  f"{rows[-1]['beats_right']:.0%} of {len(xs)} held-out prompts")
    with open(os.path.join(run, "probe.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def probe_table(run):
    with open(os.path.join(RUNS, run, "probe.json")) as f:
        rows = json.load(f)
    lines = ["| family | answer | mean RM score | above the right answer on |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['answer']} | {r['mean']:+.2f} | " +
                     ("(the right answer)" if r["beats_right"] == 0 and r["answer"] == next(iter(PROBE[r["family"]]))
                      else f"{r['beats_right']:.0%} of {r['prompts']} prompts") + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Figures in the docs: every measured number in README.md and tutorial.md comes from a named run, whose
# summary.json (with its ppo_metrics.jsonl and printed log) `collect` copies into assets/runs/NAME/. In the
# docs, a number is written inside a span that names its source, and a table inside a block:
#   <!--f seed_0 eval.win_rate_gold.rate .3f-->0.653<!--/f-->            one run's figure
#   <!--f seeds eval.win_rate_gold.rate range .2f-->0.61–0.69<!--/f-->  over a group of runs: median, min, max, range
#   <!--table seeds-->...<!--/table-->                                  a table (TABLES below), from the same files
# `python course.py docs` rewrites every span and block from the files; a test fails when a doc differs.

RUNS = os.path.join(HERE, "assets", "runs")
GROUPS = {"seeds": [f"seed_{i}" for i in range(5)], "runs6": [f"seed_{i}" for i in range(5)] + ["seed0_1thread"],
          "thread1": ["seed0_1thread"] + [f"seed_{i}" for i in range(1, 5)],  # seeds 0-4, one thread
          "previous": [f"rem_seed_{i}_default" for i in range(5)],  # the same, run by the previous release
          "ppo64": [f"ppo64_seed_{i}" for i in range(5)],  # the same, this sampler, PPO's previous batch (64 x 4)
          "sft800": ["sft800_seed0_1thread"] + [f"sft800_seed_{i}" for i in range(1, 5)],  # the same, 800 SFT steps
          "sft800_here": ["sft800_here_seed0_1thread"] + [f"sft800_here_seed_{i}" for i in range(1, 5)],  # ... on today's machine
          "human": [f"hr_seed_{i}" for i in range(5)],  # thread1's runs with PPO on the human's own score (--reward human)
          "human90": [f"hr90_seed_{i}" for i in range(5)]}  # ... and 90 PPO steps
SPAN = re.compile(r"<!--f ([^>]*?)-->(.*?)<!--/f-->", re.S)
BLOCK = re.compile(r"<!--table ([^>]*?)-->\n(.*?)<!--/table-->", re.S)
PROGRESS = re.compile(r"\|\s*\d+/\d+ \[|^\s+$")  # a progress bar's line (tqdm), or the blank that clears it


def collect(runs, names=None):
    """Copy the figures of finished runs into assets/runs/NAME/ (NAME: the run folder's name, or `names`)."""
    for i, run in enumerate(runs):
        name = names[i] if names else os.path.basename(os.path.abspath(run))
        dest = os.path.join(RUNS, name)
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "summary.json"), "w") as f:
            json.dump(load_summary(run), f, indent=1)
        for extra in ("ppo_metrics.jsonl", "probe.json"):
            if os.path.exists(os.path.join(run, extra)):
                shutil.copy(os.path.join(run, extra), dest)
        if os.path.exists(os.path.join(run, "run.log")):  # the printed output, without the progress bars
            with open(os.path.join(run, "run.log"), encoding="utf-8", errors="replace") as f:
                lines = [line for line in f if not PROGRESS.search(line)]
            with open(os.path.join(dest, "run.log"), "w", encoding="utf-8") as f:
                f.writelines(lines)
        print(f"{run} -> {dest}")


def stored(name):
    path = os.path.join(RUNS, name, "summary.json")
    if not os.path.exists(path):
        raise SystemExit(f"course.py: error: no stored run {name!r} ({path}); `python course.py collect RUN` first")
    with open(path) as f:
        return json.load(f)


def value(summary, path):
    """summary['eval']['win_rate_gold']['rate'] for the path 'eval.win_rate_gold.rate' (a key with a space, like
    'wrong value', is written with _ : 'eval.ppo.kinds_helpful.wrong_value')."""
    v = summary
    for key in path.split("."):
        v = v[int(key)] if isinstance(v, list) else v[key] if key in v else v[key.replace("_", " ")]
    return v


def fmt(v, spec):
    return f"{v:{spec}}".replace("-", "−") if spec.startswith("+") else f"{v:{spec}}"


def figure(spec):
    """The text of one span: 'RUN PATH FORMAT' or 'GROUP PATH median|min|max|range FORMAT'."""
    parts = spec.split()
    if parts[0] == "course":  # a count of this file's own: the exercises, their classic wrong solutions
        return str({"exercises": len(EXERCISES), "wrong": sum(map(len, WRONG.values()))}[parts[1]])
    if parts[0] in GROUPS:
        group, path, agg, f = parts
        import statistics
        xs = [value(stored(r), path) for r in GROUPS[group]]
        if agg == "range":
            return f"{fmt(min(xs), f)}–{fmt(max(xs), f)}"
        return fmt(dict(median=statistics.median, min=min, max=max)[agg](xs), f)
    run, path, f = parts
    return fmt(value(stored(run), path), f)


def render_docs(text):
    """`text` with every span and table block written anew from the stored runs."""
    text = SPAN.sub(lambda m: f"<!--f {m.group(1)}-->{figure(m.group(1))}<!--/f-->", text)
    return BLOCK.sub(lambda m: f"<!--table {m.group(1)}-->\n{table(m.group(1))}\n<!--/table-->", text)


def table(spec):
    name, *args = spec.split()
    if name not in TABLES:
        raise SystemExit(f"course.py: error: no table {name!r}; tables: {', '.join(TABLES)}")
    return TABLES[name](*args).rstrip("\n")


def eval_md(run):
    """A run's eval.md, from its summary."""
    import rlhf
    return rlhf.eval_table(stored(run)["eval"])


def log_lines(run, start, count):
    """`count` lines of a run's printed log, from the first that starts with `start` (a quote of the output)."""
    with open(os.path.join(RUNS, run, "run.log"), encoding="utf-8") as f:
        lines = [line.rstrip("\n") for line in f if not PROGRESS.search(line)]
    start = start.replace("_", " ")
    i = next((i for i, line in enumerate(lines) if line.startswith(start)), None)
    if i is None:
        raise SystemExit(f"course.py: error: the log of {run} has no line starting with {start!r}")
    return "```text\n" + "\n".join(lines[i:i + int(count)]) + "\n```"


def ppo_rows(run):
    with open(os.path.join(RUNS, run, "ppo_metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def ppo_steps_table(run, *steps):
    """Some rows of a run's ppo_metrics.jsonl."""
    rows = {r["step"]: r for r in ppo_rows(run)}
    lines = ["| step | RM score | gold score | KL (nats) | β | entropy | clipfrac | value_ev |", "|---|---|---|---|---|---|---|---|"]
    for k in map(int, steps):
        r = rows[k]
        lines.append(f"| {k} | {r['rm_score']:.3f} | {r['gold']:.3f} | {r['kl']:.2f} | {r['kl_coef']:.3f} | {r['entropy']:.3f} "
                     f"| {r['clipfrac']:.3f} | {r['value_ev']:.2f} |")
    return "\n".join(lines)


def block_means(run, key, size=10):
    rows = ppo_rows(run)
    return [sum(r[key] for r in rows[i:i + size]) / len(rows[i:i + size]) for i in range(0, len(rows), size)]


def ppo_blocks_table(group, size="10"):
    """Means of the RM score and the gold score over blocks of PPO steps, for each run of a group."""
    size = int(size)
    n = len(ppo_rows(GROUPS[group][0]))
    head = "| run | | " + " | ".join(f"steps {i + 1}–{min(n, i + size)}" for i in range(0, n, size)) + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for run in GROUPS[group]:
        for key, name in (("rm_score", "RM score"), ("gold", "gold score")):
            lines.append(f"| {run} | {name} | " + " | ".join(f"{v:+.2f}" for v in block_means(run, key, size)) + " |")
    return "\n".join(lines)


def options_table():
    """Every flag of rlhf.py with its default and help, from its Config."""
    import dataclasses
    import rlhf
    lines = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(rlhf.Config):
        flag = f"`--{f.name}` / `--no-{f.name}`" if f.type is bool else f"`--{f.name}`"
        default = repr(f.default) if f.default == "" else str(f.default)
        lines.append(f"| {flag} | `{default}` | {f.metadata['help'].replace('|', chr(92) + '|')} |")
    return "\n".join(lines)


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def remedy_row(seed, name, s):
    e, p = s["eval"], s["ppo"]
    return dict(seed=seed, name=name, win=e["win_rate_gold"]["rate"], ci=e["win_rate_gold"]["ci"], gold=e["ppo"]["gold"],
                rm=e["ppo"]["rm"], sft_rm=e["sft"]["rm"], sft_gold=e["sft"]["gold"], kl=e["ppo"]["kl"],
                wv_sft=e["sft"]["kinds_helpful"]["wrong value"], wv_ppo=e["ppo"]["kinds_helpful"]["wrong value"],
                own_helpful=e["ppo"].get("rm_own_helpful"), ppo_s=p["wall_s"], refreshes=p.get("refreshes", []),
                **{f: e["ppo"][f"success_{f}"] for f in FAMS})


def stored_remedies(seeds, names):
    """The default run each remedy was copied from (stored as rem_seed_N_default) and the remedy runs
    (rem_seed_N_<name>) as rows."""
    rows = []
    for seed in map(int, seeds):
        rows.append(remedy_row(seed, "default", stored(f"rem_seed_{seed}_default")))  # the run the remedies copied
        rows += [remedy_row(seed, n, stored(f"rem_seed_{seed}_{slug(n)}")) for n in names]
    return rows


def versus_table(*runs):
    """Stored runs in pairs, a default run and a copy of it with PPO run again without refreshes or on the human's
    own score (--reward human): `versus A0 B0 A1 B1 ...`, as rows of the remedies table."""
    rows = []
    for default, other in zip(runs[::2], runs[1::2]):
        seed, s = stored(default)["data"]["config"]["seed"], stored(other)
        name = "human as the reward" if s["ppo"]["config"].get("reward") == "human" else "no refresh"
        rows += [remedy_row(seed, "default", stored(default)), remedy_row(seed, name, s)]
    return remedies_table(rows)


def remedies_stored_table(which, *seeds):
    names = {"rankings": ["crowd pairs only"], "refresh": ["no refresh"],
             "hacking": [n for n, _ in REMEDIES if n.startswith("hacking")]}[which]
    rows = stored_remedies(seeds or range(5), names)
    return remedies_table([r for r in rows if r["name"] in names or which != "hacking" and r["name"] == "default"])


def front_rows(seeds):
    """The frontier's rows from the stored runs front_seed_N_<setting> (front_seed_N_ppo: the default run the
    others were copied from, PPO at β 0.3)."""
    out = []
    for seed in map(int, seeds):
        results = [(seed, m, st, ex, None) for m, st, ex in FRONTIER]
        for i, (seed_, method, stage, extra, _) in enumerate(results):
            name = f"front_seed_{seed}_{frontier_slug(stage or 'ppo', extra)}"
            results[i] = (seed_, method, stage, extra, os.path.join(RUNS, name))
        out += frontier_rows(results)
    return out


def frontier_slug(stage, extra):
    return (stage + "".join(extra)).replace("--kl_coef", "_b").replace("--dpo_beta", "_b").replace("--", "_").replace(".", "p")


def frontier_stored_table(*seeds):
    return frontier_table(front_rows(seeds or (0, 1, 2)))


def bon_stored_table(seed):
    import rlhf
    return rlhf.bon_table(stored(f"front_seed_{seed}_bon")["bon"]["rows"])


def cost_table(run):
    """The wall time of each stage of a stored run, and inside PPO."""
    s = stored(run)
    lines = [f"| `{run}` | seconds |", "|---|---|"]
    lines += [f"| {k} | {s[k]['wall_s']:.1f} |" for k in ("sft", "rm", "judge", "ppo", "eval") if k in s and "wall_s" in s[k]]
    lines += [f"| ppo: {k} | {v:.1f} |" for k, v in s.get("ppo", {}).get("time_s", {}).items()]
    return "\n".join(lines)


TABLES = {"eval": eval_md, "log": log_lines, "probe": probe_table, "ppo_steps": ppo_steps_table, "options": options_table,
          "cost": cost_table, "sweep": lambda *runs: sweep_table(sweep_rows([(r, stored(r)) for r in runs])),
          "remedies": remedies_stored_table, "frontier": frontier_stored_table, "bon": bon_stored_table,
          "ppo_blocks": ppo_blocks_table, "versus": versus_table,
          "seeds": lambda group="runs6": seeds_table([seed_row(r, stored(r)) for r in GROUPS[group]])}


def docs(write=True):
    """Rewrite README.md and tutorial.md from the stored runs; return the names of the files that changed."""
    changed = []
    for name in ("README.md", "tutorial.md"):
        path = os.path.join(HERE, name)
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new = render_docs(old)
        if new != old:
            changed.append(name)
            if write:
                with open(path, "w", encoding="utf-8") as f:
                    f.write(new)
    return changed


def build_parser():
    p = argparse.ArgumentParser(description="Instructor tools for tutorial.md.")
    sub = p.add_subparsers(dest="command", required=True)
    student = sub.add_parser("student", help="write the student copy")
    student.add_argument("out", help="a new or empty folder, outside this repository")
    student.add_argument("--exercises", nargs="+", type=int, choices=sorted(EXERCISES), metavar="N",
                         help="blank only these exercises (default: all)")
    sub.add_parser("check", help="check that each exercise's grading test fails without it, and on its classic "
                                 "wrong solutions, and passes with it")
    sweep = sub.add_parser("plot_sweep", help="gold and RM score against KL, from finished runs")
    sweep.add_argument("runs", nargs="+", help="run folders with a summary.json holding an eval")
    sweep.add_argument("--out", default="kl_sweep.png")
    seeds = sub.add_parser("seeds", help="the default run over several seeds, and the plot of their spread")
    seeds.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    seeds.add_argument("--out_dir", default="runs/seeds", help="one folder per seed in here; finished seeds are kept")
    seeds.add_argument("--jobs", type=int, default=1, help="seeds run at a time (each gets cores / jobs threads)")
    seeds.add_argument("--plot", default="seeds.png")
    seeds.add_argument("--runs", nargs="*", default=[], help="more finished run folders to put in the table and plot")
    seeds.add_argument("flags", nargs=argparse.REMAINDER, help="after --: flags for rlhf.py (e.g. -- --threads 1)")
    costs = sub.add_parser("plot_costs", help="time per stage and inside PPO, from a finished run")
    costs.add_argument("run", help="a run folder with a summary.json")
    costs.add_argument("--out", default="compute_cost.png")
    probe = sub.add_parser("probe_rm", help="the reward model's mean score of fixed answers on held-out prompts")
    probe.add_argument("run", help="a run folder with a trained reward model (rm/)")
    rem = sub.add_parser("remedies", help="the article's remedies for reward hacking on seeds: refreshed and ensembled reward models")
    rem.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    rem.add_argument("--out_dir", default="runs/remedies")
    rem.add_argument("--base", default="runs/seeds", help="the seeds' default runs (seed_N in here; made if missing)")
    rem.add_argument("--jobs", type=int, default=1)
    rem.add_argument("flags", nargs=argparse.REMAINDER, help="after --: flags for every rlhf.py run")
    front = sub.add_parser("frontier", help="best-of-n, DPO, RLOO, GRPO and PPO at several β on seeds: the frontier plot and table")
    front.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    front.add_argument("--out_dir", default="runs/frontier")
    front.add_argument("--base", default="runs/seeds", help="the seeds' default runs (seed_N in here; made if missing)")
    front.add_argument("--jobs", type=int, default=1)
    front.add_argument("--plot", default="frontier.png")
    front.add_argument("flags", nargs=argparse.REMAINDER, help="after --: flags for every rlhf.py run")
    col = sub.add_parser("collect", help="copy finished runs' summary.json (and logs) into assets/runs/ for the docs")
    col.add_argument("runs", nargs="+")
    col.add_argument("--names", nargs="+", help="the names to store them under (default: the folders' names)")
    sub.add_parser("docs", help="rewrite every figure and table of README.md and tutorial.md from assets/runs/")
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
        n_wrong = sum(map(len, WRONG.values()))
        print("\n".join(problems) if problems else f"all {len(EXERCISES)} exercises are graded: each grading test "
              f"fails without its exercise and on each of {n_wrong} classic wrong solutions, naming the exercise, "
              f"and passes with it")
        sys.exit(1 if problems else 0)
    elif args.command == "plot_sweep":
        plot_sweep(args.runs, args.out)
    elif args.command == "seeds":
        flags = [f for f in args.flags if f != "--"]
        runs = run_seeds(args.seeds, args.out_dir, flags, args.jobs) + args.runs
        rows = [seed_row(os.path.basename(r.rstrip("/")), load_summary(r)) for r in runs]
        print(seeds_table(rows))
        plot_seeds(rows, args.plot)
    elif args.command == "plot_costs":
        plot_costs(args.run, args.out)
    elif args.command == "probe_rm":
        probe_rm(args.run)
    elif args.command == "remedies":
        flags = [f for f in args.flags if f != "--"]
        results, bases = run_remedies(args.seeds, args.out_dir, args.base, flags, args.jobs)
        for run in list(bases.values()) + [r for (_, name), r in results.items() if name == "crowd pairs only"]:
            probe_rm(run)  # what each reward model thinks of fixed answers (run/probe.json)
        rows = remedy_rows(results, bases)
        print(remedies_table(rows))
        with open(os.path.join(args.out_dir, "remedies.json"), "w") as f:
            json.dump(rows, f, indent=1)
    elif args.command == "frontier":
        flags = [f for f in args.flags if f != "--"]
        rows = frontier_rows(run_frontier(args.seeds, args.out_dir, args.base, flags, args.jobs))
        print(frontier_table(rows))
        with open(os.path.join(args.out_dir, "frontier.json"), "w") as f:
            json.dump(rows, f, indent=1)
        plot_frontier(rows, args.plot)
    elif args.command == "collect":
        collect(args.runs, args.names)
    elif args.command == "docs":
        changed = docs()
        print(f"rewrote {', '.join(changed)}" if changed else "README.md and tutorial.md already match assets/runs/")
    elif args.command == "_grade":
        results = run_grading([tuple(job) for job in json.loads(args.jobs)])
        print(json.dumps(results))


if __name__ == "__main__":
    main()
