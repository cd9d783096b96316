"""
course.py -- the instructor's side of tutorial.md: the exercise list and its classic wrong solutions, the student
copy, the check that every exercise is graded, the runs and plots of the tutorial's experiments, and the figures of
the docs, each written from a stored run. Learners read rlhf.py and lab.py; nothing here is part of the method.

  python course.py student ../rlhf-lab        # a copy where each exercise raises NotImplementedError
  python course.py student ../rlhf-lab --exercises 5 7 8   # only these
  python course.py check                      # each grading test fails without its exercise, passes with it
  python course.py seeds --jobs 2 -- --threads 1     # the default run on seeds 0-4, the lab's figures of each
  python course.py remedies --jobs 2 -- --threads 1  # chapter 12's experiments on copies of those runs
  python course.py frontier --jobs 2 -- --threads 1  # chapter 13: best-of-n, DPO, RLOO, GRPO and PPO
  python course.py redraws                    # chapter 8: seed 0's evaluation drawn again with 8 other seeds
  python course.py bench --trl_python ~/.cache/trlbench/venv/bin/python   # chapter 12.4: bench.py against TRL
  python course.py collect runs/seeds/* && python course.py docs   # store the runs, write the docs' figures
"""

import argparse
import ast
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# What a student copy holds: what a learner needs; not this file, whose check needs the full rlhf.py and lab.py.
STUDENT_FILES = ["rlhf.py", "lab.py", "test_rlhf.py", "test_lab.py", "tutorial.md", "README.md", "requirements.txt",
                 "assets"]
TESTS = {"rlhf.py": "test_rlhf.py", "lab.py": "test_lab.py"}  # where each file's exercises are graded

# number -> (function, the pytest -k expression that grades it, exercises it needs first); the function is in
# rlhf.py, or in lab.py (LAB below). tutorial.md shows each as:  python -m pytest test_rlhf.py -k "<expression>"
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
    21: ("bootstrap_ci", "test_bootstrap_ci", ()),
}
LAB = {15, 16, 17, 18, 19}  # the exercises of lab.py's functions


def file_of(n):
    return "lab.py" if n in LAB else "rlhf.py"


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
          [("out.hidden_states[-1][:, n_prompt - 1:-1]", "out.hidden_states[-1][:, n_prompt:]")]),
         ("forgets the sampling temperature", [("out.logits[:, :-1].float() / temperature", "out.logits[:, :-1].float()")]),
         ("lets left padding shift the positions", [("position_ids=position_ids(mask), ", "")])],
    14: [("takes the ratio against the current policy (clipping never acts)",
          [("ppo_policy_loss(new_logprobs, exp[\"old_logprobs\"][mb]", "ppo_policy_loss(new_logprobs, new_logprobs.detach()")]),
         ("never clears the gradients between minibatches", [("opt.zero_grad(set_to_none=True)\n", "\n")]),
         ("computes the advantages from the critic being trained, not detached",
          [("exp[\"advantages\"][mb], m,", "(exp[\"returns\"][mb] - values) * m, m,")]),
         ("forgets the value loss", [("loss = pg_loss + cfg.vf_coef * vf_loss", "loss = pg_loss")]),
         ("takes one step on the whole rollout per epoch (no minibatches)",
          [(".split(cfg.minibatch_size)", ".split(len(exp[\"ids\"]))")]),
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
                                                                "(logits.float() / temperature).softmax(-1)")])],
    21: [("draws samples, not prompts",
          [("rows = torch.randint(len(x), (resamples, len(x)), generator=torch.Generator().manual_seed(seed))  # (B, P)",
            "x, y = (None if v is None else v.reshape(-1, 1) for v in (x, y))\n"
            "    rows = torch.randint(len(x), (resamples, len(x)), generator=torch.Generator().manual_seed(seed))")]),
         ("draws the policy's prompts and SFT's apart in a paired difference",
          [("means = (mean(x) - mean(y) if y is not None else mean(x)).sort().values",
            "means = mean(x).sort().values if y is None else (mean(x) - mean(y)[torch.randperm(resamples)]).sort().values")]),
         ("takes the percentile one place too high (the 976th of 1000)",
          [("means[math.ceil(0.975 * resamples) - 1]", "means[math.ceil(0.975 * resamples)]")]),
         ("takes the middle 90%, not 95%",
          [("means[int(0.025 * resamples)]", "means[int(0.05 * resamples)]"),
           ("means[math.ceil(0.975 * resamples) - 1]", "means[math.ceil(0.95 * resamples) - 1]")])]
}


def grading_command(n):
    return f'python -m pytest {TESTS[file_of(n)]} -k "{EXERCISES[n][1]}"'


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
        raise SystemExit(f"course.py: error: no top-level function {', '.join(sorted(missing))} in the source")
    return nodes


def blank_functions(source, numbers):
    """The source of rlhf.py or lab.py with the bodies of the given exercises (those whose function it has) replaced
    by a raise.
    The signature, decorators and docstring stay; every other line is untouched.
    Example: def f(x):\\n    \"\"\"Doc.\"\"\"\\n    return x
          -> def f(x):\\n    \"\"\"Doc.\"\"\"\\n    raise NotImplementedError("exercise 1: ...")
    """
    lines = source.splitlines(keepends=True)
    defined = {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    wanted = {EXERCISES[n][0]: n for n in numbers if EXERCISES[n][0] in defined}
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
    """The source of exercise n's file with its function made a classic wrong solution by the edits `fix`,
    [(old, new), ...], to the function as the file has it, each old found there exactly once."""
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


def make_student_copy(out, numbers=None, files=STUDENT_FILES, sources=None):
    """Write the student copy into the folder `out` (created; must be empty or new): the exercises `numbers` blank
    in rlhf.py and lab.py; `sources` {file: text} instead of the repository's own files."""
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
        if name in TESTS:
            text = blank_functions((sources or {}).get(name, text), numbers)
        elif name.endswith(".md"):
            text = without_instructor_notes(text)
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(text)
    return out


# -----------------------------------------------------------------------------
# The check: every exercise's grading test fails without its exercise, or with a classic mistake, and passes with it

def run_grading(jobs):
    """Run `pytest -k` jobs in this process: [(folder, test file, expression)] -> [(exit code, [(test, failure)])].
    One process for every folder saves importing torch each time; each folder's modules are imported afresh."""
    import pytest

    class Failures:
        def __init__(self):
            self.found = []

        def pytest_runtest_logreport(self, report):
            if report.failed:
                self.found.append((report.nodeid.split("::")[-1], report.longreprtext))

    results = []
    for folder, tests, expression in jobs:
        for name in ("rlhf", "lab", "test_rlhf", "test_lab"):
            sys.modules.pop(name, None)
        saved_path, saved_cwd = sys.path[:], os.getcwd()
        sys.path.insert(0, folder)
        os.chdir(folder)
        failures = Failures()
        try:
            # no:unraisableexception: its gc.collect cost 0.5 s per run, most of the check's time
            code = pytest.main(["-q", "-p", "no:cacheprovider", "-p", "no:unraisableexception",
                                tests, "-k", expression], plugins=[failures])
        finally:
            sys.path[:] = saved_path
            os.chdir(saved_cwd)
        results.append((int(code), failures.found))
    return results


def check():
    """Run each exercise's grading command on copies of rlhf.py and lab.py: the full ones (must pass), the student
    copy (must fail), one with only this exercise blank (must fail, with this exercise's error), one with
    every other exercise blank except those this one needs (must pass), and one per classic wrong
    solution in WRONG (must fail, naming this exercise; the graders of the exercises that need this one
    may fail too, but only naming this one). Returns a list of problems; empty when all is well."""
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        files = ["rlhf.py", "lab.py", "test_rlhf.py", "test_lab.py"]
        source = {f: open(os.path.join(HERE, f), encoding="utf-8").read() for f in TESTS}
        full = make_student_copy(os.path.join(tmp, "full"), numbers=[], files=files)
        student = make_student_copy(os.path.join(tmp, "student"), files=files)
        # only this exercise blank; and every exercise blank except this one and the ones it needs
        alone = {n: make_student_copy(os.path.join(tmp, f"only_{n}"), numbers=[n], files=files) for n in EXERCISES}
        done = {n: make_student_copy(os.path.join(tmp, f"done_{n}"), files=files,
                                     numbers=[m for m in EXERCISES if m != n and m not in EXERCISES[n][2]])
                for n in EXERCISES}
        wrong = {(n, i): make_student_copy(os.path.join(tmp, f"wrong_{n}_{i}"), numbers=[], files=files,
                                           sources={file_of(n): wrong_source(source[file_of(n)], n, fix)})
                 for n, cases in WRONG.items() for i, (_, fix) in enumerate(cases)}
        jobs = []
        for n, (_, expression, _) in EXERCISES.items():
            jobs += [(folder, TESTS[file_of(n)], expression) for folder in (full, student, alone[n], done[n])]
        for (n, i), folder in wrong.items():  # (the exercises that need one are in the same file)
            jobs.append((folder, TESTS[file_of(n)], " or ".join(EXERCISES[m][1] for m in [n] + dependents(n))))
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
                problems.append(f"exercise {n} ({func}): `-k {expression}` does not pass on the full {file_of(n)} "
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
# The tutorial's experiments: the default run on seeds, and copies of it with one thing changed, each a run of
# rlhf.py or lab.py that an instructor can repeat (the stored runs in assets/runs/ were made by these commands)

FAMS = ("helpful", "harmless", "honest")


def load_summary(run):
    path = os.path.join(run, "summary.json")
    if not os.path.exists(path):
        raise SystemExit(f"course.py: error: {path} not found; run `python rlhf.py --stage all --out_dir {run}` first")
    with open(path) as f:
        return json.load(f)


def run_stage(run, stage, flags, log, script="lab.py"):
    """One stage of lab.py (or rlhf.py) on a run folder, with that run's seed unless `flags` name one (a stage run
    alone takes --seed's default, 0)."""
    seed = [] if "--seed" in flags else ["--seed", str(load_summary(run)["data"]["config"]["seed"])]
    cmd = [sys.executable, os.path.join(HERE, script), "--stage", stage, "--out_dir", run] + seed + flags
    with open(log, "a") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode:
            raise SystemExit(f"course.py: error: {' '.join(cmd)} failed; see {log}")


def in_parallel(jobs, fn, n):
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda job: fn(*job), jobs))


def copy_run(src, dest, steps, flags):
    """dest: a copy of the finished run src, with the stages `steps` [(stage, flags)] run again by lab.py (kept if
    dest has its last stage already)."""
    last = steps[-1][0]
    if last in (load_summary(dest) if os.path.exists(os.path.join(dest, "summary.json")) else {}):
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    for stage, extra in steps:
        run_stage(dest, stage, extra + flags, dest + ".log")
    return dest


def run_seeds(seeds, out_dir, flags, jobs):
    """For each seed: seed_N, `rlhf.py --stage all` (the default run), and lab_seed_N, a copy of it with lab.py's
    judge and evaluation (the judge's verdict, the reward model where each policy goes). Finished runs are kept."""
    def one(seed):
        run = os.path.join(out_dir, f"seed_{seed}")
        if "eval" not in (load_summary(run) if os.path.exists(os.path.join(run, "summary.json")) else {}):
            env = dict(os.environ, **({"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))} if jobs > 1 else {}))
            cmd = [sys.executable, os.path.join(HERE, "rlhf.py"), "--stage", "all", "--seed", str(seed), "--out_dir", run]
            with open(run + ".log", "w") as log:
                if subprocess.run(cmd + flags, stdout=log, stderr=subprocess.STDOUT, env=env).returncode:
                    raise SystemExit(f"course.py: error: seed {seed} failed; see {run}.log")
            shutil.copy(run + ".log", os.path.join(run, "run.log"))  # the printed output, quoted by the docs
        copy_run(run, os.path.join(out_dir, f"lab_seed_{seed}"), [("judge", []), ("eval", [])], flags)
        print(f"seed {seed} done -> {run}")
        return run

    os.makedirs(out_dir, exist_ok=True)
    return in_parallel([(s,) for s in seeds], one, jobs)


# chapter 12: (name, seeds it runs on by default, [(stage, flags)]) on a copy of lab_seed_N
REMEDIES = [
    ("refresh", (0, 1, 2, 3, 4), [("ppo", ["--rm_refresh", "4"]), ("eval", [])]),
    ("human as the reward", (0, 1, 2, 3, 4), [("ppo", ["--reward", "human"]), ("eval", [])]),  # a perfect RM
    ("crowd pairs only", (0,), [("rm", ["--rm_samples", "0"]), ("ppo", []), ("eval", [])]),
    ("hacking, one RM", (0,), [("ppo", ["--kl_coef", "0", "--no-adaptive_kl"]), ("eval", [])]),
    ("hacking, refreshed RM", (0,), [("ppo", ["--kl_coef", "0", "--no-adaptive_kl", "--rm_refresh", "4"]),
                                     ("eval", [])]),
    ("hacking, ensemble of 3", (0,), [("rm", ["--rm_ensemble", "3"]), ("ppo", ["--kl_coef", "0", "--no-adaptive_kl"]),
                                      ("eval", [])]),
    ("hacking, ensemble min", (0,), [("ppo", ["--kl_coef", "0", "--no-adaptive_kl", "--rm_combine", "min"]),
                                     ("eval", [])]),
    ("hacking, ensemble mean − std", (0,), [("ppo", ["--kl_coef", "0", "--no-adaptive_kl", "--rm_combine",
                                                     "mean_minus_std"]), ("eval", [])]),
]
REMEDY_SOURCE = {"hacking, ensemble min": "hacking, ensemble of 3", "hacking, ensemble mean − std": "hacking, ensemble of 3"}


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def run_remedies(seeds, out_dir, base, flags, jobs, names=None):
    """Each remedy of REMEDIES (or `names`) on copies of the seeds' lab runs (base/lab_seed_N, made if missing): the
    folders out_dir/seed_N_<remedy>. An ensemble's PPO variants reuse the copy whose stage rm trained the ensemble."""
    run_seeds(seeds, base, flags, jobs)
    folder = lambda seed, name: os.path.join(out_dir, f"seed_{seed}_{slug(name)}")  # noqa: E731
    wanted = [(seed, n, steps) for n, on, steps in REMEDIES for seed in (seeds if names else on)
              if (names is None or n in names) and seed in seeds]
    os.makedirs(out_dir, exist_ok=True)
    for wave in ([w for w in wanted if w[1] not in REMEDY_SOURCE], [w for w in wanted if w[1] in REMEDY_SOURCE]):
        in_parallel([(folder(seed, REMEDY_SOURCE[n]) if n in REMEDY_SOURCE else os.path.join(base, f"lab_seed_{seed}"),
                      folder(seed, n), steps, flags) for seed, n, steps in wave],
                    lambda src, dest, steps, fl: copy_run(src, dest, steps, fl), jobs)
    return {(seed, n): folder(seed, n) for seed, n, _ in wanted}


# chapter 13: (method, stage, flags), each on a copy of lab_seed_N; the first is lab_seed_N itself (PPO at β 0.3)
FRONTIER = [("PPO", None, []), ("PPO", "ppo", ["--kl_coef", "0.1"]), ("PPO", "ppo", ["--kl_coef", "1"]),
            ("RLOO", "rloo", ["--kl_coef", "0.1"]), ("RLOO", "rloo", ["--kl_coef", "0.3"]),
            ("GRPO", "grpo", ["--kl_coef", "0.5"]), ("GRPO", "grpo", ["--kl_coef", "1"]),
            ("DPO", "dpo", ["--dpo_beta", "0.5"]), ("DPO", "dpo", ["--dpo_beta", "1"]), ("best-of-n", "bon", [])]


def frontier_slug(stage, extra):
    return (stage + "".join(extra)).replace("--kl_coef", "_b").replace("--dpo_beta", "_b").replace("--", "_").replace(".", "p")


def run_frontier(seeds, out_dir, base, flags, jobs):
    """For each seed, one copy of its lab run per setting of FRONTIER: out_dir/seed_N_<setting>."""
    run_seeds(seeds, base, flags, jobs)
    work = []
    for seed in seeds:
        for _, stage, extra in FRONTIER[1:]:
            steps = [(stage, extra)] + ([("eval", [])] if stage == "ppo" else [])
            work.append((os.path.join(base, f"lab_seed_{seed}"),
                         os.path.join(out_dir, f"seed_{seed}_{frontier_slug(stage, extra)}"), steps, flags))
    os.makedirs(out_dir, exist_ok=True)
    in_parallel(work, copy_run, jobs)


def run_redraws(run, out_dir, seeds):
    """The evaluation of one finished lab run drawn again with other seeds (its samples and its bootstrap): how much
    of a figure is the draw of the evaluation, with the same models."""
    os.makedirs(out_dir, exist_ok=True)
    for s in seeds:
        copy_run(run, os.path.join(out_dir, f"redraw_{s}"), [("eval", ["--seed", str(s)])], [])


# The work of ../shared/bench/trl/ (TRL 0.11.4's classic PPOTrainer.step) at two shapes, in the flags of bench.py
# and of trl_ppo_bench.py: the tiny GPT-2 of that README, and GPT-2-124M's shape with a smaller batch (minutes a run)
BENCH_SHAPES = {"tiny": ([], []), "gpt2-124m": (
    "--n_layer 12 --n_embd 768 --n_head 12 --vocab 50257 --batch 16 --minibatch 4 --steps 4 --warmup 1".split(),
    "--n-layer 12 --n-embd 768 --n-head 12 --vocab-size 50257 --batch-size 16 --mini-batch-size 4 --gen-batch-size 16 "
    "--steps 4 --warmup 1".split())}


def run_bench(out_dir, trl_python, trl_script, pairs, threads, huge_pages=False):
    """bench.py and TRL's step on the same work, one after the other (never at once), `pairs` times at each shape:
    out_dir/summary.json {'bench': {shape: {'rlhf': [s], 'trl': [s], 'ratio': [TRL / rlhf.py], ...}}}.
    huge_pages: both with PyTorch's THP_MEM_ALLOC_ENABLE=1 (CPU tensors of 2 MB and more on 2 MB pages)."""
    os.makedirs(out_dir, exist_ok=True)
    env = dict(os.environ, **({"THP_MEM_ALLOC_ENABLE": "1"} if huge_pages else {}))
    out = dict(threads=threads, huge_pages=huge_pages,
               cpu=subprocess.run(["lscpu"], capture_output=True, text=True).stdout)
    for shape, (ours, theirs) in BENCH_SHAPES.items():
        got = {k: [] for k in ("rlhf", "trl", "ratio", "gflops", "share", "update_share", "ceiling", "trl_gflops")}
        for i in range(pairs):
            for who, cmd in (("rlhf", [sys.executable, os.path.join(HERE, "bench.py")] + ours),
                             ("trl", [trl_python, trl_script] + theirs)):
                path = os.path.join(out_dir, f"{shape}_{who}_{i + 1}.json")
                with open(path[:-5] + ".log", "w") as log:
                    print(f"{shape} {who} {i + 1} ...", flush=True)
                    subprocess.run(cmd + ["--threads", str(threads), "--json", path], stdout=log,
                                   stderr=subprocess.STDOUT, check=True, env=env)
                with open(path) as f:
                    r = json.load(f)
                if who == "rlhf":
                    got["rlhf"].append(r["median"]["total"])
                    for k in ("gflops", "share", "update_share", "ceiling"):
                        got[k].append(r[k])
                else:
                    got["trl"].append(r["summary"]["total"]["median"])
                    got["trl_gflops"].append(r.get("achieved_gflops"))
            got["ratio"].append(got["trl"][-1] / got["rlhf"][-1])
        out[shape] = dict(got, ratio_median=statistics.median(got["ratio"]))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(dict(bench=out), f, indent=1)


def bench_table(run="bench"):
    """Seconds per PPO step, TRL's and rlhf.py's, each pair run one after the other; GFLOP/s and the share of the
    fp32 matmul ceiling measured by bench.py beside each of its runs."""
    b = stored(run)["bench"]
    lines = ["| shape | pair | TRL 0.11.4 (s) | rlhf.py (s) | TRL / rlhf.py | rlhf.py GFLOP/s (of the ceiling) | "
             "its update alone, of the ceiling |", "|---|---|---|---|---|---|---|"]
    for shape in BENCH_SHAPES:
        r = b[shape]
        lines += [f"| {shape} | {i + 1} | {r['trl'][i]:.2f} | {r['rlhf'][i]:.2f} | {r['ratio'][i]:.2f}× | "
                  f"{r['gflops'][i]:.0f} ({100 * r['share'][i]:.0f}% of {r['ceiling'][i]:.0f}) | "
                  f"{100 * r['update_share'][i]:.0f}% |" for i in range(len(r["ratio"]))]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The figures of the docs: every measured number in README.md and tutorial.md comes from a named run, whose
# summary.json (with its ppo_metrics.jsonl and printed log) `collect` copies into assets/runs/NAME/. In the docs, a
# number is written inside a span that names its source, and a table inside a block:
#   <!--f seed_0 eval.win_rate_gold .3f-->0.681<!--/f-->                   one run's figure (a {mean, ci}: the mean)
#   <!--f seed_0 eval.win_rate_gold .3f ci-->0.681 [0.665, 0.696]<!--/f--> the same with its 95% interval
#   <!--f thread1 eval.win_rate_gold range .2f-->0.65–0.69<!--/f-->        over a group of runs: median, min, max, range
#   <!--d thread1 eval.difference.gold higher|lower|no different-->higher<!--/d-->   a direction: the first word where
#       every run's interval lies above 0, the second where every one lies below, else the third
#   <!--n thread1 eval.difference.helpful.kinds.wrong_value above-->3<!--/n-->   how many runs' intervals lie above 0
#       (below 0, or include it: tie)
#   <!--table seeds thread1-->...<!--/table-->                              a table (TABLES below), from the same files
# `python course.py docs` rewrites every span and block from the files; a test fails when a doc differs, so a figure
# edited by hand, or a direction its intervals do not support, fails it.

RUNS = os.path.join(HERE, "assets", "runs")
GROUPS = {"seeds": [f"seed_{i}" for i in range(5)],  # seed 0 with 2 threads (the README's), seeds 1-4 with one
          "thread1": ["seed0_1thread"] + [f"seed_{i}" for i in range(1, 5)],  # seeds 0-4, one thread each
          "runs6": [f"seed_{i}" for i in range(5)] + ["seed0_1thread"],
          "lab": [f"lab_seed_{i}" for i in range(5)],  # thread1's runs with lab.py's judge and evaluation
          "refresh": [f"rem_seed_{i}_refresh" for i in range(5)], "human": [f"rem_seed_{i}_human_as_the_reward"
                                                                             for i in range(5)],
          "redraws": [f"redraw_{s}" for s in range(101, 109)],  # lab_seed_0's evaluation drawn again
          "grpo": [f"front_seed_{i}_grpo_b0p5" for i in range(3)]}  # GRPO at β 0.5, seeds 0-2
SPAN = re.compile(r"<!--([fdn]) ([^>]*?)-->(.*?)<!--/\1-->", re.S)
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
        for extra in ("ppo_metrics.jsonl", "probe.json", "memory_plans.json"):
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


def value(summary, path, whole=False):
    """summary['eval']['win_rate_gold'] for the path 'eval.win_rate_gold' (a key with a space, like 'wrong value', is
    written with _ : 'eval.ppo.helpful.kinds.wrong_value'); a figure with an interval gives its mean (whole: both)."""
    v = summary
    for key in path.split("."):
        v = v[int(key)] if isinstance(v, list) else v[key] if key in v else v[key.replace("_", " ")]
    return v["mean"] if isinstance(v, dict) and "mean" in v and not whole else v


def fmt(v, spec):
    return f"{v:{spec}}".replace("-", "−") if spec.startswith("+") else f"{v:{spec}}"


def runs_of(name):
    return GROUPS.get(name, [name])


def direction(name, path):
    """'above', 'below' or 'tie' for each run of `name`: where its 95% interval of the figure lies against 0."""
    out = []
    for run in runs_of(name):
        lo, hi = value(stored(run), path, whole=True)["ci"]
        out.append("above" if lo > 0 else "below" if hi < 0 else "tie")
    return out


def figure(kind, spec):
    """The text of one span: f 'RUN PATH FORMAT [ci]' or 'GROUP PATH median|min|max|range FORMAT'; d 'GROUP PATH
    up|down|tie words'; n 'GROUP PATH above|below|tie'."""
    parts = spec.split()
    if kind == "d":
        words, where = " ".join(parts[2:]).split("|"), set(direction(parts[0], parts[1]))
        return words[0] if where == {"above"} else words[1] if where == {"below"} else words[2]
    if kind == "n":
        return str(direction(parts[0], parts[1]).count(parts[2]))
    if parts[0] == "course":  # a count of this file's own: the exercises, their classic wrong solutions
        return str({"exercises": len(EXERCISES), "wrong": sum(map(len, WRONG.values()))}[parts[1]])
    if parts[0] in GROUPS and parts[2] in ("median", "min", "max", "range"):
        group, path, agg, f = parts
        xs = [value(stored(r), path) for r in GROUPS[group]]
        if agg == "range":
            return f"{fmt(min(xs), f)}–{fmt(max(xs), f)}"
        return fmt(dict(median=statistics.median, min=min, max=max)[agg](xs), f)
    run, path, f = parts[:3]
    if parts[3:] == ["ci"]:
        v = value(stored(run), path, whole=True)
        return f"{fmt(v['mean'], f)} [{fmt(v['ci'][0], f)}, {fmt(v['ci'][1], f)}]"
    return fmt(value(stored(run), path), f)


def render_docs(text):
    """`text` with every span and table block written anew from the stored runs."""
    text = SPAN.sub(lambda m: f"<!--{m.group(1)} {m.group(2)}-->{figure(m.group(1), m.group(2))}<!--/{m.group(1)}-->",
                    text)
    return BLOCK.sub(lambda m: f"<!--table {m.group(1)}-->\n{table(m.group(1))}\n<!--/table-->", text)


def table(spec):
    name, *args = spec.split()
    if name not in TABLES:
        raise SystemExit(f"course.py: error: no table {name!r}; tables: {', '.join(TABLES)}")
    return TABLES[name](*args).rstrip("\n")


def ci(f, spec=".2f"):
    return "–" if f is None else f"{fmt(f['mean'], spec)} [{fmt(f['ci'][0], spec)}, {fmt(f['ci'][1], spec)}]"


def eval_md(run):
    """A run's eval.md, from its summary: rlhf.py's table, and lab.py's rows where the lab evaluated it."""
    import lab
    e = stored(run)["eval"]
    return lab.lab_table(e) if "ceiling" in e else __import__("rlhf").eval_table(e)


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
    lines = ["| step | RM score | gold score | KL (nats) | entropy | clipfrac | approx_kl | value_ev |",
             "|---|---|---|---|---|---|---|---|"]
    for k in map(int, steps):
        r = rows[k]
        lines.append(f"| {k} | {r['rm_score']:.3f} | {r['gold']:.3f} | {r['kl']:.2f} | {r['entropy']:.3f} "
                     f"| {r['clipfrac']:.3f} | {r['approx_kl']:.4f} | {r['value_ev']:.2f} |")
    return "\n".join(lines)


def ppo_blocks_table(group, size="10"):
    """Means of the RM score and the gold score over blocks of PPO steps, for each run of a group."""
    size, runs = int(size), runs_of(group)
    n = len(ppo_rows(runs[0]))
    head = "| run | | " + " | ".join(f"steps {i + 1}–{min(n, i + size)}" for i in range(0, n, size)) + " |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for run in runs:
        rows = ppo_rows(run)
        for key, name in (("rm_score", "RM score"), ("gold", "gold score")):
            means = [sum(r[key] for r in rows[i:i + size]) / len(rows[i:i + size]) for i in range(0, n, size)]
            lines.append(f"| {run} | {name} | " + " | ".join(f"{v:+.2f}" for v in means) + " |")
    return "\n".join(lines)


def seed_row(name, s):
    """The figures of one default run (its summary.json) that the seed table and plot show."""
    e = s["eval"]
    return dict(run=name, seed=e["config"]["seed"], threads=e.get("threads"), rm=s["rm"]["heldout"]["acc_gold"],
                win=e["win_rate_gold"], gold=e["difference"]["gold"], kl=e["ppo"]["kl"],
                wv=(e["sft"]["helpful"]["kinds"]["wrong value"], e["ppo"]["helpful"]["kinds"]["wrong value"],
                    e["difference"]["helpful"]["kinds"]["wrong value"]),
                wall=sum(s[k]["wall_s"] for k in ("sft", "rm", "ppo", "eval") if k in s),
                **{f: (e["sft"][f]["success"], e["ppo"][f]["success"], e["difference"][f]["success"]) for f in FAMS})


def front_table(group="thread1"):
    """The README's table: the win rate, each family's success PPO − SFT, the helpful answers with a wrong value
    PPO − SFT, each with its interval."""
    lines = ["| seed | win rate over SFT | success PPO − SFT: helpful | harmless | honest | wrong values PPO − SFT |",
             "|---|---|---|---|---|---|"]
    for r in [seed_row(r, stored(r)) for r in runs_of(group)]:
        lines.append(f"| {r['seed']} | {ci(r['win'], '.3f')} | " + " | ".join(
            ci(r[f][2], "+.2f") for f in FAMS) + f" | {ci(r['wv'][2], '+.3f')} |")
    return "\n".join(lines)


def seeds_table(group="runs6"):
    """The default runs: the win rate over SFT, each family's success SFT → PPO with the difference's interval, the
    helpful answers with a wrong value, the gold score's difference, KL, the reward model's held-out accuracy."""
    rows = [seed_row(r, stored(r)) for r in runs_of(group)]
    head = ("| run | win rate [95%] | " + " | ".join(f"{f}: SFT → PPO, difference [95%]" for f in FAMS) +
            " | wrong values: SFT → PPO, difference [95%] | gold, PPO − SFT [95%] | KL | RM vs gold | wall s |")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        fam = lambda t: f"{t[0]['mean']:.2f} → {t[1]['mean']:.2f}, {ci(t[2])}"  # noqa: E731
        lines.append(f"| {r['run']} | {ci(r['win'], '.3f')} | " + " | ".join(fam(r[f]) for f in FAMS) +
                     f" | {r['wv'][0]['mean']:.3f} → {r['wv'][1]['mean']:.3f}, {ci(r['wv'][2], '.3f')} | "
                     f"{ci(r['gold'])} | {r['kl']['mean']:.2f} | {r['rm']:.3f} | {r['wall']:.0f} |")
    return "\n".join(lines)


def plot_seeds(rows, out):
    """Each figure per run with its 95% interval: what varies with the seed (the runs) and what with the draw of
    the evaluation (each interval). Success per family SFT and PPO, the helpful answers with a wrong value, and the
    win rate over SFT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 5, figsize=(22, 4.2))
    xs = list(range(len(rows)))
    labels = [r["run"].replace("seed_", "s").replace("seed0_1thread", "s0, 1 thread") for r in rows]

    def bars(ax, pick, colour, label, dx):
        ys = [pick(r)["mean"] for r in rows]
        err = [[y - pick(r)["ci"][0] for y, r in zip(ys, rows)], [pick(r)["ci"][1] - y for y, r in zip(ys, rows)]]
        ax.errorbar([x + dx for x in xs], ys, yerr=err, fmt="o", capsize=3, color=colour, label=label)

    for ax, f in zip(axes, FAMS):
        bars(ax, lambda r, f=f: r[f][0], "tab:gray", "SFT", -0.1)
        bars(ax, lambda r, f=f: r[f][1], "tab:blue", "PPO", 0.1)
        ax.set(title=f"{f}: success", ylabel="share of samples", ylim=(0, 1.05))
    bars(axes[3], lambda r: r["wv"][0], "tab:gray", "SFT", -0.1)
    bars(axes[3], lambda r: r["wv"][1], "tab:red", "PPO", 0.1)
    axes[3].set(title="helpful: a wrong value", ylabel="share of helpful samples", ylim=(0, None))
    bars(axes[4], lambda r: r["win"], "tab:blue", "PPO over SFT", 0.0)
    axes[4].axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axes[4].set(title="win rate over SFT (ties half)", ylabel="share of pairs won", ylim=(0.4, 0.8))
    for ax in axes:
        ax.set_xticks(xs, labels, rotation=45, fontsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("The default run on each seed, each figure with its 95% interval over the held-out prompts: the "
                 "spread of the points is the seed's, the length of the bars the evaluation's", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


NOISE = [("win rate over SFT", "eval.win_rate_gold", ".3f"), ("mean gold score, PPO", "eval.ppo.gold", "+.3f"),
         ("mean gold score, PPO − SFT", "eval.difference.gold", "+.3f"),
         ("helpful success, PPO − SFT", "eval.difference.helpful.success", "+.3f"),
         ("helpful answers with a wrong value, SFT", "eval.sft.helpful.kinds.wrong_value", ".3f"),
         ("helpful answers with a wrong value, PPO", "eval.ppo.helpful.kinds.wrong_value", ".3f"),
         ("helpful answers with a wrong value, PPO − SFT", "eval.difference.helpful.kinds.wrong_value", "+.3f"),
         ("KL to SFT (nats)", "eval.ppo.kl", ".3f"),
         ("RM agrees with gold on PPO's own helpful pairs", "eval.ppo.helpful.rm_own", ".3f")]


def noise_table(run="lab_seed_0", group="redraws"):
    """One run's evaluation against 8 others of the same models drawn with other seeds: each figure, its interval,
    the other draws' range, and how many of them fall inside the first draw's interval."""
    lines = [f"| figure | `{run}`'s own draw [95% interval] | 8 other draws, range | inside the interval |",
             "|---|---|---|---|"]
    for name, path, f in NOISE:
        own = value(stored(run), path, whole=True)
        others = [value(stored(r), path) for r in GROUPS[group]]
        inside = sum(own["ci"][0] <= x <= own["ci"][1] for x in others)
        lines.append(f"| {name} | {ci(own, f)} | {fmt(min(others), f)}–{fmt(max(others), f)} | {inside} of "
                     f"{len(others)} |")

    def figures(d, path=()):  # every {mean, ci} of an evaluation, by its path
        if isinstance(d, dict) and "ci" in d and "mean" in d:
            yield path, d
        elif isinstance(d, dict):
            for k, v in d.items():
                yield from figures(v, path + (k,))

    def at(d, path):
        for k in path:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    own = [(path, f) for path, f in figures(stored(run)["eval"]) if f.get("ci")]
    hits = [sum(f["ci"][0] <= at(stored(r)["eval"], path)["mean"] <= f["ci"][1] for r in GROUPS[group]) for path, f in own]
    lines.append(f"| every figure of the evaluation ({len(own)}; {sum(h < len(GROUPS[group]) - 1 for h in hits)} with "
                 f"fewer than {len(GROUPS[group]) - 1} inside) | | | {sum(hits)} of {len(GROUPS[group]) * len(own)} |")
    return "\n".join(lines)


def remedy_row(seed, name, s):
    e, p = s["eval"], s["ppo"]
    return dict(seed=seed, name=name, win=e["win_rate_gold"], gold=e["ppo"]["gold"], rm=e["ppo"]["rm"],
                kl=e["ppo"]["kl"], wv=e["difference"]["helpful"]["kinds"]["wrong value"],
                wv_sft=e["sft"]["helpful"]["kinds"]["wrong value"], wv_ppo=e["ppo"]["helpful"]["kinds"]["wrong value"],
                own=e["ppo"]["helpful"].get("rm_own"), ppo_s=p["wall_s"], **{f: e["ppo"][f]["success"] for f in FAMS})


def remedies_table(rows):
    lines = ["| seed | run | win rate over SFT [95%] | gold [95%] | RM score [95%] | KL (nats) | helpful / harmless / "
             "honest | wrong values SFT → PPO, difference [95%] | RM vs gold, PPO's helpful pairs [95%] | PPO s |",
             "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['name']} | {ci(r['win'], '.3f')} | {ci(r['gold'], '+.2f')} | "
                     f"{ci(r['rm'], '+.2f')} | {r['kl']['mean']:.2f} | "
                     + " / ".join(f"{r[f]['mean']:.2f}" for f in FAMS) +
                     f" | {r['wv_sft']['mean']:.3f} → {r['wv_ppo']['mean']:.3f}, {ci(r['wv'], '+.3f')} | "
                     f"{ci(r['own'])} | {r['ppo_s']:.0f} |")
    return "\n".join(lines)


def versus_table(*runs):
    """Stored runs in pairs, a lab run and a copy of it with one remedy: `versus A0 B0 A1 B1 ...`."""
    rows = []
    for base, other in zip(runs[::2], runs[1::2]):
        seed = stored(base)["data"]["config"]["seed"]
        name = re.sub(r"^rem_seed_\d+_", "", other).replace("_", " ")
        rows += [remedy_row(seed, "default", stored(base)), remedy_row(seed, name, stored(other))]
    return remedies_table(rows)


def hacking_table(seed="0"):
    names = ["default"] + [n for n, _, _ in REMEDIES if n.startswith("hacking")]
    runs = [f"lab_seed_{seed}"] + [f"rem_seed_{seed}_{slug(n)}" for n in names[1:]]
    return remedies_table([remedy_row(int(seed), n, stored(r)) for n, r in zip(names, runs)])


def sweep_rows(names):
    """One row per run: its β, the PPO policy's KL, gold, RM and judge scores, win rate."""
    rows = []
    for run in names:
        s = stored(run)
        c, e = s["ppo"]["config"], s["eval"]
        rows.append(dict(run=run, beta=f"β {c['kl_coef']:g}", kl=e["ppo"]["kl"]["mean"], gold=e["ppo"]["gold"]["mean"],
                         rm=e["ppo"]["rm"]["mean"], judge=e["ppo"]["judge"]["mean"], win=e["win_rate_gold"],
                         cis={k: e["ppo"][k] for k in ("gold", "rm", "judge")},
                         sft=(e["sft"]["gold"]["mean"], e["sft"]["rm"]["mean"], e["sft"]["judge"]["mean"])))
    return sorted(rows, key=lambda r: r["kl"])


def sweep_table(*runs):
    lines = ["| run | β | KL (nats) | gold [95%] | RM score [95%] | judge score [95%] | win rate over SFT [95%] |",
             "|---" * 7 + "|"]
    lines += [f"| {r['run']} | {r['beta']} | {r['kl']:.2f} | " + " | ".join(ci(r["cis"][k], "+.2f") for k in
                                                                          ("gold", "rm", "judge")) +
              f" | {ci(r['win'], '.3f')} |" for r in sweep_rows(runs)]
    return "\n".join(lines)


def plot_sweep(runs, out):
    """Distribution shift: the PPO policy's held-out gold score, and its RM and judge scores, against its distance
    from SFT (√KL, Gao et al.'s axis), for stored runs at several β."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sweep_rows(runs)
    xs = [0.0] + [math.sqrt(max(r["kl"], 0.0)) for r in rows]  # the SFT policy sits at KL 0
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot(xs, [rows[0]["sft"][0]] + [r["gold"] for r in rows], "s-", color="tab:orange")
    for label, x, y in [("SFT", 0.0, rows[0]["sft"][0])] + [(r["beta"], x, r["gold"]) for r, x in zip(rows, xs[1:])]:
        axes[0].annotate(label, (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7)
    axes[0].set(title="the simulated human", ylabel="mean gold score (points)")
    axes[1].plot(xs, [rows[0]["sft"][1]] + [r["rm"] for r in rows], "o-", label="reward model (what PPO maximises)")
    axes[1].plot(xs, [rows[0]["sft"][2]] + [r["judge"] for r in rows], "x:", label="judge (a second reward model)")
    axes[1].set(title="the reward models", ylabel="mean score (SFT samples: mean 0, std 1)")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.set(xlabel="√KL(π ‖ π_SFT), √nats per response (held-out prompts)")
        ax.grid(alpha=0.3)
    fig.suptitle("PPO at several β, held-out prompts: the further from SFT, the more the scores part", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"saved {out}")


def frontier_rows(seeds):
    """One row per (seed, method, setting) of the stored frontier runs: KL to SFT, gold score, win rate over SFT,
    success per family, seconds (front_seed_N_<setting>; the PPO default is lab_seed_N)."""
    rows = []
    for seed in map(int, seeds):
        for method, stage, extra in FRONTIER:
            s = stored(f"lab_seed_{seed}" if stage is None else f"front_seed_{seed}_{frontier_slug(stage, extra)}")
            setting = " ".join(extra).replace("--kl_coef", "β").replace("--dpo_beta", "β") or (
                "β 0.3" if method == "PPO" else "")
            if stage == "bon":
                for r in s["bon"]["rows"]:
                    rows.append(dict(seed=seed, method=method, setting=f"n {r['n']}", kl=r["kl"]["mean"],
                                     gold=r["gold"]["mean"], gold_ci=r["gold"], win=r["win_rate_gold"],
                                     seconds=s["bon"]["wall_s"], **{f: r[f"success_{f}"]["mean"] for f in FAMS}))
                continue
            e = s["eval"] if stage in (None, "ppo") else s[stage]
            pol = e["policy"]
            rows.append(dict(seed=seed, method=method, setting=setting, kl=e[pol]["kl"]["mean"],
                             gold=e[pol]["gold"]["mean"], gold_ci=e[pol]["gold"], win=e["win_rate_gold"],
                             sft_gold=e["sft"]["gold"]["mean"],
                             seconds=s["ppo"]["wall_s"] if stage in (None, "ppo") else e["train_s"],
                             **{f: e[pol][f]["success"]["mean"] for f in FAMS}))
    return rows


def at_matched_kl(rows, target=1.0):
    """For each seed and method, the setting whose KL is nearest `target` nats."""
    best = {}
    for r in rows:
        key = (r["seed"], r["method"])
        if key not in best or abs(r["kl"] - target) < abs(best[key]["kl"] - target):
            best[key] = r
    return [best[k] for k in sorted(best)]


def frontier_table(*seeds):
    lines = ["| seed | method | setting | KL (nats) | gold score [95%] | win rate over SFT [95%] | helpful | harmless | "
             "honest | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in at_matched_kl(frontier_rows(seeds or (0, 1, 2))):
        lines.append(f"| {r['seed']} | {r['method']} | {r['setting']} | {r['kl']:.2f} | {ci(r['gold_ci'], '+.2f')} | "
                     f"{ci(r['win'], '.3f')} | {r['helpful']:.2f} | {r['harmless']:.2f} | {r['honest']:.2f} | "
                     f"{r['seconds']:.0f} |")
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
            xs = [0.0] + [math.sqrt(max(r["kl"], 0.0)) for r in pts]
            ax.plot(xs, [sft] + [r["gold"] for r in pts], "o-" if method != "best-of-n" else ".-", color=colour,
                    label=method, markersize=4)
        ax.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
        ax.set(title=f"seed {seed}", xlabel="√KL(π ‖ π_SFT), √nats (held-out prompts)", xlim=(0, None))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold score (the simulated human, points)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("Was RL needed? Each method's gold score against its distance from SFT; SFT at 0", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


def bon_stored_table(seed):
    import lab
    return lab.bon_table(stored(f"front_seed_{seed}_bon")["bon"]["rows"])


def cost_table(run):
    """The wall time of each stage of a stored run, and inside PPO."""
    s = stored(run)
    lines = [f"| `{run}` | seconds |", "|---|---|"]
    lines += [f"| {k} | {s[k]['wall_s']:.1f} |" for k in ("sft", "rm", "judge", "ppo", "eval") if "wall_s" in s.get(k, {})]
    lines += [f"| ppo: {k} | {v:.1f} |" for k, v in s.get("ppo", {}).get("time_s", {}).items()]
    return "\n".join(lines)


def plot_costs(run, out):
    """Compute cost: the wall time of each stage and, inside PPO, of generation, scoring and training."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = load_summary(run)
    stages = {k: s[k]["wall_s"] for k in ("sft", "rm", "judge", "ppo", "eval") if "wall_s" in s.get(k, {})}
    ppo = s.get("ppo", {}).get("time_s", {})
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].barh(list(stages), list(stages.values()), color="tab:blue")
    axes[0].set(title="wall time per stage", xlabel="seconds")
    axes[1].barh(list(ppo), list(ppo.values()), color="tab:orange")
    axes[1].set(title=f"inside PPO ({s['ppo']['config']['ppo_steps']} steps)", xlabel="seconds")
    for a in axes:
        a.invert_yaxis()
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
    from rlhf import Config, load_data, load_scalar_model, load_tokenizer, pad, rm_scores, tokenize
    cfg = Config(out_dir=run)
    tok, rm = load_tokenizer(os.path.join(run, "tokenizer")), load_scalar_model(os.path.join(run, model), torch.device("cpu"))
    held = [p for p in load_data(cfg)["prompts"] if p["split"] == "heldout"]
    rows = []
    for family, answers in PROBE.items():
        prompts = [p for p in held if p["family"] == family][:n]
        scores = {}
        for name, make in answers.items():
            ex = tokenize(tok, [dict(prompt=p["prompt"], response=make(p)) for p in prompts], cfg)
            ids, mask = pad([r["prompt"] + r["response"] for r in ex], tok.pad_token_id, left=False)
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


GPT2_SIZES = {"124M (gpt2)": (12, 768, 12), "355M (gpt2-medium)": (24, 1024, 16), "774M (gpt2-large)": (36, 1280, 20)}


def memory_plans(run):
    """lab.py's memory plan of SFT, the reward model, PPO and the evaluation for GPT-2 124M, 355M and 774M with the
    recipe (assets/gpt2-124m.args, unchanged for the larger two) on a GPU, from a finished run's data and tokenizer
    (its sequence lengths): written to RUN/memory_plans.json, for README's table beside what the run measured."""
    import tempfile
    import lab
    import rlhf
    from transformers import GPT2Config
    rows = []
    for name, (n_layer, n_embd, n_head) in GPT2_SIZES.items():
        with tempfile.TemporaryDirectory() as folder:
            GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=50257).save_pretrained(folder)
            argv = ["@" + os.path.join(HERE, "assets", "gpt2-124m.args"), "--model", folder, "--out_dir", run]
            cfg = lab.LabConfig(**vars(rlhf.build_parser(lab.LabConfig, "lab.py").parse_args(argv)))
            tok = rlhf.load_tokenizer(os.path.join(run, "tokenizer"))
            plan = {stage: sum(n for _, n in lab.memory_plan(cfg, stage)) for stage in ("sft", "rm", "ppo", "eval")}
            rows.append(dict(model=name, parameters=lab.model_sizes(cfg, tok)[0], **plan))
    with open(os.path.join(run, "memory_plans.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n".join(map(str, rows)))


def memory_table(run):
    """README's memory table: the plan for each size (computed), and the run's own plan and measured peak."""
    with open(os.path.join(RUNS, run, "memory_plans.json")) as f:
        rows = json.load(f)
    s, gib = stored(run), lambda n: f"{n / 2 ** 30:.1f}"  # noqa: E731
    stages = ("sft", "rm", "ppo", "eval")
    lines = ["| GPT-2 | parameters | SFT | reward model | PPO | evaluation |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']}, planned | {r['parameters'] / 1e6:.0f}M | " + " | ".join(gib(r[k]) for k in stages) + " |"
              for r in rows]
    lines.append("| 124M, smoke schedule on the 2-core CPU, planned → measured | | " + " | ".join(
        f"{gib(s[k]['memory']['plan_bytes'])} → {gib(s[k]['memory']['peak_bytes'])}" for k in stages) + " |")
    return "\n".join(lines)


TABLES = {"eval": eval_md, "log": log_lines, "probe": probe_table, "ppo_steps": ppo_steps_table, "cost": cost_table,
          "ppo_blocks": ppo_blocks_table, "seeds": seeds_table, "front": front_table, "noise": noise_table, "versus": versus_table,
          "hacking": hacking_table, "sweep": sweep_table, "frontier": frontier_table, "bon": bon_stored_table,
          "bench": bench_table, "memory": memory_table}


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
    for name, help in (("seeds", "the default run (rlhf.py) on seeds, and a copy of each with lab.py's judge and "
                                 "evaluation"),
                       ("remedies", "chapter 12: the remedies for reward hacking, on copies of the seeds' runs"),
                       ("frontier", "chapter 13: best-of-n, DPO, RLOO, GRPO and PPO at several β, on copies")):
        c = sub.add_parser(name, help=help)
        c.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2] if name == "frontier" else [0, 1, 2, 3, 4])
        c.add_argument("--out_dir", default=f"runs/{name}")
        if name != "seeds":
            c.add_argument("--base", default="runs/seeds", help="the seeds' runs (made there if missing)")
        if name == "remedies":
            c.add_argument("--names", nargs="+", choices=[n for n, _, _ in REMEDIES],
                           help="these remedies on every seed asked for (default: each on its own seeds)")
        c.add_argument("--jobs", type=int, default=1, help="runs at a time (each gets cores / jobs threads)")
        c.add_argument("flags", nargs=argparse.REMAINDER, help="after --: flags for every rlhf.py and lab.py run")
    b = sub.add_parser("bench", help="chapter 12.4: bench.py and TRL's PPO step on the same work, alternating")
    b.add_argument("--trl_python", required=True, help="the python of a venv with TRL 0.11.4 (../shared/bench/trl)")
    b.add_argument("--trl_script", default=os.path.join(HERE, "..", "shared", "bench", "trl", "trl_ppo_bench.py"))
    b.add_argument("--out_dir", default="runs/bench")
    b.add_argument("--pairs", type=int, default=2)
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--huge_pages", action="store_true",
                   help="both programs with THP_MEM_ALLOC_ENABLE=1: CPU tensors of 2 MB and more on 2 MB pages")
    red = sub.add_parser("redraws", help="chapter 8: one run's evaluation drawn again with other seeds")
    red.add_argument("run", nargs="?", default="runs/seeds/lab_seed_0")
    red.add_argument("--out_dir", default="runs/redraws")
    red.add_argument("--seeds", nargs="+", type=int, default=list(range(101, 109)))
    for name, help in (("plot_seeds", "each figure per stored run with its interval (GROUP: e.g. runs6)"),
                       ("plot_sweep", "gold and RM score against KL, stored runs at several β"),
                       ("plot_frontier", "chapter 13's plot, from the stored frontier runs of SEEDS")):
        c = sub.add_parser(name, help=help)
        c.add_argument("names", nargs="+")
        c.add_argument("--out", default=f"{name[5:]}.png")
    costs = sub.add_parser("plot_costs", help="time per stage and inside PPO, from a finished run")
    costs.add_argument("run", help="a run folder with a summary.json")
    costs.add_argument("--out", default="compute_cost.png")
    probe = sub.add_parser("probe_rm", help="the reward model's mean score of fixed answers on held-out prompts")
    probe.add_argument("run", help="a run folder with a trained reward model (rm/)")
    col = sub.add_parser("collect", help="copy finished runs' summary.json (and logs) into assets/runs/ for the docs")
    col.add_argument("runs", nargs="+")
    col.add_argument("--names", nargs="+", help="the names to store them under (default: the folders' names)")
    mem = sub.add_parser("memory", help="README's memory table: the recipe's memory plan at GPT-2 124M/355M/774M")
    mem.add_argument("run", help="a finished run (its data and tokenizer give the sequence lengths)")
    sub.add_parser("docs", help="rewrite every figure and table of README.md and tutorial.md from assets/runs/")
    sub.add_parser("_grade").add_argument("jobs")  # used by check
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    flags = [f for f in getattr(args, "flags", []) if f != "--"]
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
    elif args.command == "seeds":
        run_seeds(args.seeds, args.out_dir, flags, args.jobs)
    elif args.command == "remedies":
        run_remedies(args.seeds, args.out_dir, args.base, flags, args.jobs, args.names)
    elif args.command == "frontier":
        run_frontier(args.seeds, args.out_dir, args.base, flags, args.jobs)
    elif args.command == "bench":
        run_bench(args.out_dir, args.trl_python, args.trl_script, args.pairs, args.threads, args.huge_pages)
    elif args.command == "redraws":
        run_redraws(args.run, args.out_dir, args.seeds)
    elif args.command == "plot_seeds":
        plot_seeds([seed_row(r, stored(r)) for name in args.names for r in runs_of(name)], args.out)
    elif args.command == "plot_sweep":
        plot_sweep(args.names, args.out)
    elif args.command == "plot_frontier":
        plot_frontier(frontier_rows(args.names), args.out)
    elif args.command == "plot_costs":
        plot_costs(args.run, args.out)
    elif args.command == "probe_rm":
        probe_rm(args.run)
    elif args.command == "collect":
        collect(args.runs, args.names)
    elif args.command == "memory":
        memory_plans(args.run)
    elif args.command == "docs":
        changed = docs()
        print(f"rewrote {', '.join(changed)}" if changed else "README.md and tutorial.md already match assets/runs/")
    elif args.command == "_grade":
        print(json.dumps(run_grading([tuple(job) for job in json.loads(args.jobs)])))


if __name__ == "__main__":
    main()
