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
}

# Classic wrong solutions, written from the tutorial's text as a student might: each must fail its own
# exercise's grader, with a message that names the exercise (course.py check).
WRONG = {
    1: [("counts each distinct chunk once, not once per occurrence", """def train_bpe(texts, vocab_size):
    words = [tuple(c.encode("utf-8")) for c in set(regex.findall(GPT2_SPLIT, "".join(texts)))]
    merges = {}
    for new_id in range(256, vocab_size - 2):
        pairs = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not pairs:
            break
        best = max(pairs, key=lambda pr: (pairs[pr], -pr[0], -pr[1]))
        merges[best] = new_id
        words = [tuple(merge(list(w), best, new_id)) for w in words]
    return merges"""),
        ("lets pairs cross chunk boundaries (no GPT2_SPLIT)", """def train_bpe(texts, vocab_size):
    words = [tuple("".join(texts).encode("utf-8"))]
    merges = {}
    for new_id in range(256, vocab_size - 2):
        pairs = Counter(pair for w in words for pair in zip(w, w[1:]))
        if not pairs:
            break
        best = max(pairs, key=lambda pr: (pairs[pr], -pr[0], -pr[1]))
        merges[best] = new_id
        words = [tuple(merge(list(w), best, new_id)) for w in words]
    return merges"""),
        ("breaks ties toward the largest pair", """def train_bpe(texts, vocab_size):
    words = Counter(tuple(c.encode("utf-8")) for c in regex.findall(GPT2_SPLIT, "".join(texts)))
    merges = {}
    for new_id in range(256, vocab_size - 2):
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pr: (pairs[pr], pr[0], pr[1]))
        merges[best] = new_id
        words = Counter({tuple(merge(list(w), best, new_id)): n for w, n in words.items()})
    return merges"""),
        ("learns one merge too few", """def train_bpe(texts, vocab_size):
    words = Counter(tuple(c.encode("utf-8")) for c in regex.findall(GPT2_SPLIT, "".join(texts)))
    merges = {}
    for new_id in range(256, vocab_size - 3):
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pr: (pairs[pr], -pr[0], -pr[1]))
        merges[best] = new_id
        words = Counter({tuple(merge(list(w), best, new_id)): n for w, n in words.items()})
    return merges""")],
    2: [("merges the leftmost mergeable pair first", """def bpe_encode_chunk(chunk, merges):
    ids = list(chunk.encode("utf-8"))
    while True:
        pair = next((pr for pr in zip(ids, ids[1:]) if pr in merges), None)
        if pair is None:
            return ids
        ids = merge(ids, pair, merges[pair])"""),
        ("applies the latest-learned merge first", """def bpe_encode_chunk(chunk, merges):
    ids = list(chunk.encode("utf-8"))
    while len(ids) >= 2:
        pair = max(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, -1))
        if pair not in merges:
            break
        ids = merge(ids, pair, merges[pair])
    return ids"""),
        ("stops after one merge", """def bpe_encode_chunk(chunk, merges):
    ids = list(chunk.encode("utf-8"))
    if len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, float("inf")))
        if pair in merges:
            ids = merge(ids, pair, merges[pair])
    return ids"""),
        ("starts from characters, not UTF-8 bytes", """def bpe_encode_chunk(chunk, merges):
    ids = [ord(c) for c in chunk]
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, float("inf")))
        if pair not in merges:
            break
        ids = merge(ids, pair, merges[pair])
    return ids""")],
    3: [("ignores the mask", """def position_ids(mask):
    return torch.arange(mask.shape[-1]).expand(mask.shape)"""),
        ("starts counting at 1", """def position_ids(mask):
    return mask.long().cumsum(-1)"""),
        ("leaves -1 on the padding", """def position_ids(mask):
    return mask.long().cumsum(-1) - 1""")],
    4: [("scores each token against itself (no shift)", """def sft_loss(model, ids, mask, loss_mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return -masked_mean(logprobs_of(logits.float(), ids), loss_mask)"""),
        ("puts loss on the prompt too", """def sft_loss(model, ids, mask, loss_mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return -masked_mean(logprobs_of(logits[:, :-1].float(), ids[:, 1:]), mask[:, 1:])"""),
        ("sums instead of averaging", """def sft_loss(model, ids, mask, loss_mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return -(logprobs_of(logits[:, :-1].float(), ids[:, 1:]) * loss_mask[:, 1:]).sum()"""),
        ("averages per sequence first", """def sft_loss(model, ids, mask, loss_mask):
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return -masked_mean(logprobs_of(logits[:, :-1].float(), ids[:, 1:]), loss_mask[:, 1:], dim=1).mean()""")],
    5: [("takes log(sigmoid(...)), which underflows", """def bradley_terry_loss(r_chosen, r_rejected):
    return -torch.log(torch.sigmoid(r_chosen - r_rejected)).mean()"""),
        ("sums over the batch", """def bradley_terry_loss(r_chosen, r_rejected):
    return -F.logsigmoid(r_chosen - r_rejected).sum()"""),
        ("swaps chosen and rejected", """def bradley_terry_loss(r_chosen, r_rejected):
    return -F.logsigmoid(r_rejected - r_chosen).mean()""")],
    6: [("reads the last column", """def reward_at_last_token(rm, ids, mask):
    return token_values(rm, ids, mask)[:, -1]"""),
        ("reads the first real token", """def reward_at_last_token(rm, ids, mask):
    return token_values(rm, ids, mask)[torch.arange(len(ids)), mask.argmax(1)]"""),
        ("counts real tokens (right padding only)", """def reward_at_last_token(rm, ids, mask):
    return token_values(rm, ids, mask)[torch.arange(len(ids)), mask.sum(1) - 1]"""),
        ("reads the second-to-last real token", """def reward_at_last_token(rm, ids, mask):
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    return token_values(rm, ids, mask)[torch.arange(len(ids)), last - 1]""")],
    7: [("adds the score on every token", """def kl_shaped_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
    kl = (logprobs - ref_logprobs) * mask
    return -kl_coef * kl + score[:, None] * mask, kl"""),
        ("adds the score in the last column", """def kl_shaped_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    rewards[:, -1] += score
    return rewards, kl"""),
        ("rewards the KL instead of penalising it", """def kl_shaped_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
    kl = (logprobs - ref_logprobs) * mask
    rewards = kl_coef * kl
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl"""),
        ("does not mask the KL", """def kl_shaped_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
    kl = logprobs - ref_logprobs
    rewards = -kl_coef * kl
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl""")],
    8: [("lets the values run on past the end", """def compute_gae(rewards, values, mask, gamma, lam):
    rewards = rewards * mask
    advantages, last = torch.zeros_like(rewards), torch.zeros(len(rewards))
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros(len(rewards))
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask"""),
        ("forgets lambda", """def compute_gae(rewards, values, mask, gamma, lam):
    values, rewards = values * mask, rewards * mask
    advantages, last = torch.zeros_like(rewards), torch.zeros(len(rewards))
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros(len(rewards))
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask"""),
        ("returns the advantages as the returns", """def compute_gae(rewards, values, mask, gamma, lam):
    values, rewards = values * mask, rewards * mask
    advantages, last = torch.zeros_like(rewards), torch.zeros(len(rewards))
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros(len(rewards))
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, advantages"""),
        ("walks forward in time", """def compute_gae(rewards, values, mask, gamma, lam):
    values, rewards = values * mask, rewards * mask
    advantages, last = torch.zeros_like(rewards), torch.zeros(len(rewards))
    for t in range(rewards.shape[1]):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros(len(rewards))
        last = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask""")],
    9: [("whitens over the padding too", """def masked_whiten(x, mask):
    return (x - x.mean()) * torch.rsqrt(x.var() + 1e-8) * mask"""),
        ("leaves the padding shifted", """def masked_whiten(x, mask):
    mean = masked_mean(x, mask)
    return (x - mean) * torch.rsqrt(masked_mean((x - mean) ** 2, mask) + 1e-8)"""),
        ("divides by the variance, not the standard deviation", """def masked_whiten(x, mask):
    mean = masked_mean(x, mask)
    return (x - mean) / (masked_mean((x - mean) ** 2, mask) + 1e-8) * mask""")],
    10: [("takes the min of the two losses", """def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return masked_mean(torch.min(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)"""),
        ("never clips", """def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    ratio = torch.exp(logprobs - old_logprobs)
    return masked_mean(-advantages * ratio, mask), masked_mean(torch.zeros_like(ratio), mask)"""),
        ("turns the ratio upside down", """def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    ratio = torch.exp(old_logprobs - logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)""")],
    11: [("takes the min of the two errors", """def ppo_value_loss(values, old_values, returns, mask, clip_range):
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.min((values - returns) ** 2, (v_clipped - returns) ** 2), mask)"""),
        ("clips around the returns", """def ppo_value_loss(values, old_values, returns, mask, clip_range):
    v_clipped = returns + torch.clamp(values - returns, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)"""),
        ("drops the one half", """def ppo_value_loss(values, old_values, returns, mask, clip_range):
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)""")],
    12: [("does not clip the error", """def update_kl_coef(kl_coef, kl, cfg, n_samples):
    if not cfg.adaptive_kl:
        return kl_coef
    return kl_coef * (1 + (kl / cfg.kl_target - 1) * n_samples / cfg.kl_horizon)"""),
        ("adapts even when --no-adaptive_kl", """def update_kl_coef(kl_coef, kl, cfg, n_samples):
    error = min(max(kl / cfg.kl_target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_samples / cfg.kl_horizon)"""),
        ("forgets n / horizon", """def update_kl_coef(kl_coef, kl, cfg, n_samples):
    if not cfg.adaptive_kl:
        return kl_coef
    return kl_coef * (1 + min(max(kl / cfg.kl_target - 1, -0.2), 0.2))"""),
        ("moves beta the wrong way", """def update_kl_coef(kl_coef, kl, cfg, n_samples):
    if not cfg.adaptive_kl:
        return kl_coef
    return kl_coef * (1 - min(max(kl / cfg.kl_target - 1, -0.2), 0.2) * n_samples / cfg.kl_horizon)""")],
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


def replace_function(source, name, new_source):
    """rlhf.py's text with the whole function `name` replaced by new_source (a wrong solution)."""
    node = function_nodes(source, [name])[name]
    lines = source.splitlines(keepends=True)
    lines[node.lineno - 1:node.end_lineno] = [new_source.rstrip("\n") + "\n"]
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
                                           source=replace_function(source, EXERCISES[n][0], code))
                 for n, cases in WRONG.items() for i, (_, code) in enumerate(cases)}
        jobs = []
        for n, (_, expression, _) in EXERCISES.items():
            jobs += [(full, expression), (student, expression), (alone[n], expression), (done[n], expression)]
        for (n, i), folder in wrong.items():
            jobs.append((folder, " or ".join(EXERCISES[m][1] for m in [n] + dependents(n))))
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
                         win=e["win_rate_gold"]["rate"], distinct=e["ppo"]["distinct"], sft_gold=e["sft"]["gold"],
                         sft_rm=e["sft"]["rm"], judge=e["ppo"]["judge"], sft_judge=e["sft"]["judge"]))
    rows.sort(key=lambda r: r["kl"])
    print("| run | β | KL (nats) | gold | RM score | judge score | win rate (gold) | distinct |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['beta']} | {r['kl']:.2f} | {r['gold']:+.3f} | {r['rm']:+.3f} | {r['judge']:+.3f} "
              f"| {r['win']:.3f} | {r['distinct']:.3f} |")
    fig, ax = plt.subplots(figsize=(6.4, 4))
    kls = [0.0] + [r["kl"] for r in rows]  # the SFT policy sits at KL 0
    ax.plot(kls, [rows[0]["sft_rm"]] + [r["rm"] for r in rows], "o-", label="RM score (what PPO maximises)")
    ax.plot(kls, [rows[0]["sft_gold"]] + [r["gold"] for r in rows], "s-", label="gold score (the simulated human)")
    ax.plot(kls, [rows[0]["sft_judge"]] + [r["judge"] for r in rows], "x:", label="judge score (a second RM)")
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
        print(f"seed {seed} done -> {run}")
        return run

    os.makedirs(out_dir, exist_ok=True)
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, seeds))


def plot_seeds(runs, out):
    """The spread over seeds: per-family success SFT -> PPO, gold score, win rate, reward-model accuracy.
    Prints the table (with the median and range of each column), saves the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import statistics
    fams = ("helpful", "harmless", "honest")
    rows = []
    for run in runs:
        s = load_summary(run)
        if "eval" not in s or "gold" not in s["eval"]["ppo"]:
            raise SystemExit(f"course.py: error: {run} has no evaluation against the simulated human")
        e, rm = s["eval"], s["rm"]["heldout"]
        rows.append(dict(run=os.path.basename(run.rstrip("/")), seed=s["eval"]["config"]["seed"],
                         threads=s["eval"].get("threads"), rm=rm["acc_gold"], **{f"rm_{f}": rm[f"acc_gold_{f}"] for f in fams},
                         win=e["win_rate_gold"]["rate"], win_ci=e["win_rate_gold"]["ci"], judge_win=e["win_rate_judge"]["rate"],
                         gold_sft=e["sft"]["gold"], gold_ppo=e["ppo"]["gold"], kl=e["ppo"]["kl"], ended=e["ppo"]["ended"],
                         **{f"{p}_{f}": e[p][f"success_{f}"] for p in ("sft", "ppo") for f in fams}))
    head = "| run | RM acc vs gold (helpful / harmless / honest) | win rate [95%] | " + \
           " | ".join(f"{f} SFT→PPO" for f in fams) + " | gold SFT→PPO | KL | ended |"
    print(head + "\n" + "|---" * (head.count("|") - 1) + "|")
    line = lambda r: (f"| {r['run']} | {r['rm']:.3f} ({r['rm_helpful']:.2f} / {r['rm_harmless']:.2f} / {r['rm_honest']:.2f}) "  # noqa: E731
                      f"| {r['win']:.3f} [{r['win_ci'][0]:.2f}, {r['win_ci'][1]:.2f}] | "
                      + " | ".join(f"{r['sft_' + f]:.2f}→{r['ppo_' + f]:.2f}" for f in fams)
                      + f" | {r['gold_sft']:+.2f}→{r['gold_ppo']:+.2f} | {r['kl']:.2f} | {r['ended']:.3f} |")
    for r in rows:
        print(line(r))
    if len(rows) > 1:
        for name, f in (("median", statistics.median), ("min", min), ("max", max)):
            agg = {k: f(r[k] for r in rows) for k in rows[0] if isinstance(rows[0][k], float)}
            agg.update(run=name, win_ci=[f(r["win_ci"][0] for r in rows), f(r["win_ci"][1] for r in rows)])
            print(line(agg))
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    colors = dict(helpful="tab:blue", harmless="tab:red", honest="tab:green")
    for i, f in enumerate(fams):
        for r in rows:
            axes[0].plot([3 * i, 3 * i + 1], [r["sft_" + f], r["ppo_" + f]], "o-", color=colors[f], alpha=0.6)
    axes[0].set_xticks([0, 1, 3, 4, 6, 7], ["SFT", "PPO"] * 3)
    for i, f in enumerate(fams):
        axes[0].text(3 * i + 0.5, 1.04, f, ha="center", color=colors[f])
    axes[0].set(title="success on held-out prompts, one line per run", ylim=(-0.02, 1.1))
    for r in rows:
        axes[1].plot([0, 1], [r["gold_sft"], r["gold_ppo"]], "o-", color="tab:orange", alpha=0.6)
    axes[1].set_xticks([0, 1], ["SFT", "PPO"])
    axes[1].set(title="mean gold score (the simulated human)", xlim=(-0.5, 1.5))
    xs = range(len(rows))
    axes[2].errorbar(xs, [r["win"] for r in rows], yerr=[[r["win"] - r["win_ci"][0] for r in rows],
                                                          [r["win_ci"][1] - r["win"] for r in rows]],
                     fmt="o", capsize=3, label="by the gold score (95% interval)")
    axes[2].plot(xs, [r["judge_win"] for r in rows], "x", color="tab:purple", label="by the judge")
    axes[2].axhline(0.5, color="gray", linestyle=":", linewidth=1)
    axes[2].set_xticks(list(xs), [r["run"].replace("seed_", "s") for r in rows], rotation=45, fontsize=7)
    axes[2].set(title="PPO win rate over SFT", ylim=(0.3, 1.0))
    axes[2].legend(fontsize=8, loc="lower right")
    for i, f in enumerate(fams):
        axes[3].plot(xs, [r["rm_" + f] for r in rows], "o", color=colors[f], label=f)
    axes[3].set_xticks(list(xs), [r["run"].replace("seed_", "s") for r in rows], rotation=45, fontsize=7)
    axes[3].set(title="reward model accuracy vs gold, held-out pairs", ylim=(0.5, 1.0))
    axes[3].legend(fontsize=8, loc="lower right")
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"saved {out}")
    return rows


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


def probe_rm(run, n=60):
    """What the reward model of a finished run thinks of fixed answers on held-out prompts: the mean
    normalised score of each kind of answer. Shows what the held-out pair accuracy cannot: whether
    the reward model checks the value in a helpful answer, or only its form."""
    import torch
    from rlhf import SLOTS, Config, load_data, load_scalar_model, load_tokenizer, pad_right, rm_scores, tokenize
    cfg = Config(out_dir=run)
    tok, rm = load_tokenizer(os.path.join(run, "tokenizer")), load_scalar_model(os.path.join(run, "rm"), torch.device("cpu"))
    held = [p for p in load_data(cfg)["prompts"] if p["split"] == "heldout"]
    answer = lambda p, v: " " + SLOTS[p["slot"]][2].format(x=p["subject"], v=v)  # noqa: E731
    kinds = {
        "helpful": {"the told value": lambda p: answer(p, p["answer"]),
                    "another value": lambda p: answer(p, next(v for v in SLOTS[p["slot"]][4] if v != p["answer"])),
                    "I don't know.": lambda p: " I don't know."},
        "honest": {"I don't know.": lambda p: " I don't know.",
                   "Sorry, I can't help with that.": lambda p: " Sorry, I can't help with that."},
    }
    for family, answers in kinds.items():
        prompts = [p for p in held if p["family"] == family][:n]
        for name, make in answers.items():
            rows = tokenize(tok, [dict(prompt=p["prompt"], response=make(p)) for p in prompts], cfg)[0]
            ids, mask = pad_right([r["prompt"] + r["response"] for r in rows], tok.pad_token_id)
            with torch.no_grad():
                score = rm_scores(rm, ids, mask, torch.ones(len(ids), dtype=torch.bool), cfg).mean().item()
            print(f"{family:8s} {name:32s} RM score {score:+.2f}   ({len(prompts)} held-out prompts)")


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
        plot_seeds(run_seeds(args.seeds, args.out_dir, flags, args.jobs) + args.runs, args.plot)
    elif args.command == "plot_costs":
        plot_costs(args.run, args.out)
    elif args.command == "probe_rm":
        probe_rm(args.run)
    elif args.command == "_grade":
        results = run_grading([tuple(job) for job in json.loads(args.jobs)])
        print(json.dumps(results))


if __name__ == "__main__":
    main()
