"""
Do the tests catch a wrong line? Each mutant below is one realistic bug in rlhf.py (an off-by-one, a
swapped sign, a missing mask, a skipped call). For each, this script copies the repository to a
temporary folder, applies the bug, runs the test suite (stopping at the first failure), and reports
the bugs no test caught. Not part of CI (it runs the suite once per mutant); run it after changing
rlhf.py or the tests:

  python .ci/mutants.py              # every mutant, 2 at a time
  python .ci/mutants.py gae kl       # only the mutants whose name contains one of these words
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, the line as it is in rlhf.py (a unique fragment of it), the same line with the bug)
MUTANTS = [
    # tokenizer
    ("bpe counts distinct chunks", "pairs[pair] += n", "pairs[pair] += 1"),
    ("bpe tie to the largest pair", "key=lambda pr: (pairs[pr], -pr[0], -pr[1])", "key=lambda pr: (pairs[pr], pr[0], pr[1])"),
    ("bpe one merge too few", "for new_id in range(256, vocab_size - 2):", "for new_id in range(256, vocab_size - 3):"),
    ("merge overlaps", "            i += 2", "            i += 1"),
    ("encode by latest merge", "pair = min(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, float(\"inf\")))",
     "pair = max(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, -1))"),
    ("special tokens not split off", "for part in regex.split(\"(\" + \"|\".join(regex.escape(s) for s in special) + \")\", text):",
     "for part in [text]:"),
    ("pad equals eos", "token_to_id[EOT], token_to_id[PAD] = len(vocab), len(vocab) + 1",
     "token_to_id[EOT], token_to_id[PAD] = len(vocab), len(vocab)"),
    ("prompt budget ignores the response", "budget = tok.model_max_length - cfg.max_new_tokens - len(start)",
     "budget = tok.model_max_length - len(start)"),
    ("cut response keeps an end token", "item[k] = r[:cfg.max_new_tokens] if len(r) + 1 > cfg.max_new_tokens else r + [tok.eos_token_id]",
     "item[k] = r[:cfg.max_new_tokens - 1] + [tok.eos_token_id]"),
    ("old turns kept", "while len(ids) > budget and text.find(HUMAN, 1) > 0:", "while False:"),
    ("prompt cut from the right", "ids = ids[-budget:]", "ids = ids[:budget]"),
    ("no start token", "item = {\"prompt\": start + ids}", "item = {\"prompt\": ids}"),
    # data and the simulated human
    ("rudeness free", "score = content - 0.5 * rude", "score = content - 0.0 * rude"),
    ("a wrong value is right", 'return "right" if value == p["answer"].lower() else "wrong value"', 'return "right"'),
    ("filler inside an answer stripped", "while any(len(words) > len(e) and words[-len(e):] == e for e in ENDINGS):",
     "while any(len(words) > len(e) and e[0] in words for e in ENDINGS):"),
    ("any subject answers", 'if form == ("answer", p["slot"], p["subject"]):', 'if form[:2] == ("answer", p["slot"]):'),
    ("two answers read as one", "if len(words) == len(pattern) and all(p == w or p == \"value\" for p, w in zip(pattern, words)):",
     "if len(words) >= len(pattern) and all(p == w or p == \"value\" for p, w in zip(pattern, words)):"),
    ("made up counts as admitting", 'if form == ("made up", p["slot"]):\n        return "made up"',
     'if form == ("made up", p["slot"]):\n        return "admits"'),
    ("success for any kind", 'return score, kind == KINDS[p["family"]][0]', 'return score, kind != "never ended"'),
    ("held-out prompts leak", "p[\"split\"] = \"heldout\" if i < n_held else \"train\"", "p[\"split\"] = \"heldout\" if i < n_held else \"heldout\""),
    ("judge pairs from held-out prompts", "data[\"prefs_judge\"] = [label_pair(draw(\"train\"), rng, cfg)",
     "data[\"prefs_judge\"] = [label_pair(draw(\"heldout\"), rng, cfg)"),
    ('file: chosen and rejected swapped', 'return dict(messages=prompt, text=text, chosen=chosen["content"], rejected=rejected["content"])',
     'return dict(messages=prompt, text=text, chosen=rejected["content"], rejected=chosen["content"])'),
    ('file: prompt without its last Assistant', 'for m in pair["messages"]) + ASSISTANT',
     'for m in pair["messages"])'),
    ("file: judge shares the rm pairs", "rm_pairs, judge_pairs = train[:n_rm], train[n_rm:n_rm + cfg.n_judge]",
     "rm_pairs, judge_pairs = train[:n_rm], train[:cfg.n_judge]"),
    # models, log-probs, sampling
    ("positions count padding", "return (mask.long().cumsum(-1) - 1).clamp(min=0)", "return torch.arange(mask.shape[-1]).expand(mask.shape)"),
    ("logits not shifted", "    return logits[:, :-1].float() / temperature", "    return logits[:, 1:].float() / temperature"),
    ("log-probs without temperature", "    return logits[:, :-1].float() / temperature", "    return logits[:, :-1].float()"),
    ("value read after the token", "hidden = out.hidden_states[-1][:, n_prompt - 1:-1]",
     "hidden = out.hidden_states[-1][:, n_prompt:]"),
    ("policy logits not shifted", "return out.logits[:, :-1].float() / temperature, values.float()",
     "return out.logits[:, 1:].float() / temperature, values.float()"),
    ("sampling without temperature", "cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)",
     "cdf = logits.float().softmax(-1).cumsum(-1)"),
    ("sampling the most likely token", "cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)",
     "cdf = (logits.float() / temperature).softmax(-1).cumsum(-1) * 0 + (logits.argmax(-1, keepdim=True) <= torch.arange(logits.shape[-1])).float()"),
    ("positions not advanced", "ids, pos = token[:, None], pos[:, -1:] + 1", "ids, pos = token[:, None], pos[:, -1:]"),
    ("ended rows keep their positions", "rows, token, mask, pos = rows[keep], token[keep], mask[keep], pos[keep]",
     "rows, token, mask = rows[keep], token[keep], mask[keep]"),
    ("tokens written to the first rows", "r_ids[rows, t] = token", "r_ids[:len(rows), t] = token"),
    ("uniforms of the rows still writing only", "u = torch.rand(len(q_ids), device=device)[rows]",
     "u = torch.rand(len(rows), device=device)"),
    ("every eval sample from one seed", "            torch.manual_seed(seed + k)", "            torch.manual_seed(seed)"),
    ("end token masked out", "r_mask = ((is_eos.cumsum(1) - is_eos) == 0).long()", "r_mask = (is_eos.cumsum(1) == 0).long()"),
    ("tokens after the end kept", "r_mask = ((is_eos.cumsum(1) - is_eos) == 0).long()", "r_mask = torch.ones_like(is_eos)"),
    ("everything ended", "ended = is_eos.sum(1) > 0", "ended = is_eos.sum(1) >= 0"),
    # stage 1 and 2
    ("sft loss on the prompt", "loss_mask = torch.tensor([[0] * len(e[\"prompt\"]) + [1] * len(e[\"response\"])",
     "loss_mask = torch.tensor([[1] * len(e[\"prompt\"]) + [1] * len(e[\"response\"])"),
    ("sft not shifted", "logp = logprobs_of(logits[:, :-1].float(), ids[:, 1:])", "logp = logprobs_of(logits[:, 1:].float(), ids[:, 1:])"),
    ('bradley-terry sign', 'return -F.logsigmoid(r_chosen - r_rejected).mean()\n',
     'return -F.logsigmoid(r_rejected - r_chosen).mean()\n'),
    ("reward at the last column", "last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # index of the last 1 in each row of mask",
     "last = torch.full((len(ids),), mask.shape[1] - 1)"),
    ("rm scores not normalised", "score = (raw - rm.config.reward_mean) / rm.config.reward_std", "score = raw"),
    ("missing-EOS constant for ended", "return torch.where(ended, score, torch.full_like(score, cfg.missing_eos_score))",
     "return torch.where(~ended, score, torch.full_like(score, cfg.missing_eos_score))"),
    ("missing-EOS constant added", "return torch.where(ended, score, torch.full_like(score, cfg.missing_eos_score))",
     "return score + cfg.missing_eos_score * (~ended).float()"),
    ("rm accuracy against the better one only", "wins = iter((r[better] > r[worse]).tolist())", "wins = iter((r[better] > 0).tolist())"),
    ("rankings: ties compared", "better = [(i, j) for i in range(n) for j in range(n) if rank[i] < rank[j] and gold[i] != gold[j]]",
     "better = [(i, j) for i in range(n) for j in range(n) if rank[i] < rank[j]]"),
    ("rankings: order reversed", "better = [(i, j) for i in range(n) for j in range(n) if rank[i] < rank[j] and gold[i] != gold[j]]",
     "better = [(i, j) for i in range(n) for j in range(n) if rank[i] > rank[j] and gold[i] != gold[j]]"),
    ("comparison rows not offset", "        better += [base + i for i, _ in item[\"better\"]]", "        better += [i for i, _ in item[\"better\"]]"),
    ("rankings without noise", "noisy = [g / cfg.label_temperature - math.log(-math.log(1 - rng.random())) for g in gold]",
     "noisy = [g / cfg.label_temperature for g in gold]"),
    ("rankings keep unended samples", "mine = [texts[j + n * len(chunk)] for n in range(k) if ended[j + n * len(chunk)]]",
     "mine = [texts[j + n * len(chunk)] for n in range(k)]"),
    ("rankings skipped", "    metrics = fit_reward_model(rm, tok, data[pairs_name] + rankings, data[\"prefs_heldout\"], cfg, device, name, seed)",
     "    metrics = fit_reward_model(rm, tok, data[pairs_name], data[\"prefs_heldout\"], cfg, device, name, seed)"),
    ("refresh forgets to normalise", "    rm.requires_grad_(False)\n    normalise_reward(rm, sft, tok, prompts[:2 * cfg.eval_prompts], cfg, device)\n    return rm",
     "    rm.requires_grad_(False)\n    return rm"),
    ("no comparisons: nan", "loss = (bradley_terry_loss(r[better], r[worse]) if len(better) else r.sum() * 0.0) * share(n)",
     "loss = bradley_terry_loss(r[better], r[worse]) * share(n)"),
    ("rankings generate per chunk misaligned", "_, _, r_ids, r_mask, ended = generate(policy, tok, prompt_ids[i:i + step] * k, cfg, device)",
     "_, _, r_ids, r_mask, ended = generate(policy, tok, prompt_ids[i:i + 128] * k, cfg, device)"),
    ("refresh not applied", "            rms[:] = [refresh_reward_model(", "            _ = [refresh_reward_model("),
    ("refresh despite --rm_samples 0", "    if not can_rank or cfg.rm_samples == 0:", "    if not can_rank:"),
    ("refresh steps from 0", "for i in range(1, cfg.rm_refresh + 1)}", "for i in range(cfg.rm_refresh)}"),
    ("refresh spaced over N, not N + 1", "steps = {round(cfg.ppo_steps * i / (cfg.rm_refresh + 1))", "steps = {round(cfg.ppo_steps * i / cfg.rm_refresh)"),
    ("refresh on your own data", "refresh_at = refresh_steps(cfg, can_rank=bool(train_prompts[0].get(\"family\")))",
     "refresh_at = refresh_steps(cfg, can_rank=True)"),
    ("ensemble min is max", "        return scores.min(0).values", "        return scores.max(0).values"),
    ("ensemble uses one model", "        return ensemble_reward(torch.stack([rm_scores(m, ids, mask, ended, cfg) for m in rms]), cfg.rm_combine,",
     "        return ensemble_reward(torch.stack([rm_scores(rms[0], ids, mask, ended, cfg) for m in rms]), cfg.rm_combine,"),
    ("own agreement ties count as wins", "hits.append(1.0 if d > 0 else 0.5 if d == 0 else 0.0)", "hits.append(1.0 if d >= 0 else 0.0)"),
    # beyond PPO
    ("dpo without the reference", "r_chosen, r_rejected = beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)",
     "r_chosen, r_rejected = beta * logp_chosen, beta * logp_rejected"),
    ("rloo baseline includes itself", "return (R - (R.sum(1, keepdim=True) - R) / (k - 1)).view(-1)", "return (R - R.mean(1, keepdim=True)).view(-1)"),
    ("grpo over the batch", "return ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)).view(-1)",
     "return ((R - R.mean()) / (R.std() + eps)).view(-1)"),
    ("k3 sign", "    return torch.exp(d) - d - 1", "    return torch.exp(d) + d - 1"),
    ("rloo kl not in the reward", "advantages = rloo_advantages(score - kl_coef * kl.sum(1), cfg.group_size)",
     "advantages = rloo_advantages(score, cfg.group_size)"),
    ("best-of-n picks the lowest", "    order = sorted(range(N), key=lambda i: rewards[i])", "    order = sorted(range(N), key=lambda i: -rewards[i])"),
    ("best-of-n kl without the log", "        kl += pi_n * math.log(pi_n / p) if pi_n > 0 else 0.0", "        kl += pi_n / p if pi_n > 0 else 0.0"),
    # data from a file
    ("file: prompt repeated twice", "    if prompt is None or prompt == before_c[:len(prompt)]:", "    if prompt is None:"),
    ("file: differing earlier turns accepted", "    if before_c != before_r:\n        raise BadRow", "    if False:\n        raise BadRow"),
    ("file: chat template without the generation prompt",
     "prompt = chat_tok.apply_chat_template(pair[\"messages\"], tokenize=False, add_generation_prompt=True)",
     "prompt = chat_tok.apply_chat_template(pair[\"messages\"], tokenize=False, add_generation_prompt=False)"),
    ("file: chat model keeps its old end token", "            tok.eos_token = end_of_turn(tok)", "            pass"),
    ("file: most bad rows accepted", "    if len(pairs) < bad:  # most rows cannot be pairs", "    if not pairs and bad:  # most rows cannot be pairs"),
    ("tracker: rows not logged", "        track(\"ppo\", row)", "        pass"),
    ("ddp share without the processes", "return world() * float(n_local) / total if total else 0.0",
     "return float(n_local) / total if total else 0.0"),
    ("ddp batch not split", "    return items[rank()::world()]", "    return items"),
    # stage 3 PPO
    ("kl reward sign", "    rewards = -kl_coef * kl                               # padding stays 0: kl is masked",
     "    rewards = kl_coef * kl"),
    ("score on the last column", "    rewards[torch.arange(len(score)), last] += score", "    rewards[:, -1] += score"),
    ("gae without lambda", "        last = delta + gamma * lam * last", "        last = delta + gamma * last"),
    ("gae values past the end", "    values, rewards = values * mask, rewards * mask      # subtle: V = 0 after the end, so δ stops there",
     "    rewards = rewards * mask"),
    ("returns without values", "    return advantages, (advantages + values) * mask", "    return advantages, advantages * mask"),
    ("clip min instead of max", "    loss = masked_mean(torch.max(unclipped, clipped), mask)", "    loss = masked_mean(torch.min(unclipped, clipped), mask)"),
    ("value clip around returns", "    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)",
     "    v_clipped = returns + torch.clamp(values - returns, -clip_range, clip_range)"),
    ("kl controller unclipped", "    error = min(max(kl / cfg.kl_target - 1, -0.2), 0.2)", "    error = kl / cfg.kl_target - 1"),
    ('ref log-probs from the policy', 'ref_logprobs = logprobs_of(response_logits(ref, ids, mask, P, cfg.temperature), r_ids)\n        score = score_fn',
     'ref_logprobs = logprobs_of(response_logits(policy, ids, mask, P, cfg.temperature), r_ids)\n        score = score_fn'),
    ("advantages not whitened", "    advantages = masked_whiten(advantages, r_maskf)", "    advantages = advantages * r_maskf"),
    # ("old values unmasked": left out, an equivalent mutant: compute_gae and the value loss mask padding themselves)
    ("gae gamma and lambda swapped", "advantages, returns = compute_gae(rewards, old_values, r_maskf, cfg.gamma, cfg.lam)",
     "advantages, returns = compute_gae(rewards, old_values, r_maskf, cfg.lam, cfg.gamma)"),
    ('ratio against the reference', 'pg_loss, clipfrac = ppo_policy_loss(new_logprobs, exp["old_logprobs"][mb], exp["advantages"][mb], m,\n                                                    cfg.clip_range)\n                vf_loss',
     'pg_loss, clipfrac = ppo_policy_loss(new_logprobs, new_logprobs.detach(), exp["advantages"][mb], m,\n                                                    cfg.clip_range)\n                vf_loss'),
    ('advantage sign flipped in the update', 'pg_loss, clipfrac = ppo_policy_loss(new_logprobs, exp["old_logprobs"][mb], exp["advantages"][mb], m,\n                                                    cfg.clip_range)\n                vf_loss',
     'pg_loss, clipfrac = ppo_policy_loss(new_logprobs, exp["old_logprobs"][mb], -exp["advantages"][mb], m,\n                                                    cfg.clip_range)\n                vf_loss'),
    ("value loss left out", "loss = (pg_loss + cfg.vf_coef * vf_loss) * share(m.sum())", "loss = pg_loss * share(m.sum())"),
    ('no zero_grad', '            opt.zero_grad(set_to_none=True)\n            loss.backward()\n            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.max_grad_norm)\n            opt.step()\n            with torch.no_grad():',
     '            loss.backward()\n            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.max_grad_norm)\n            opt.step()\n            with torch.no_grad():'),
    ('minibatch ignores the shuffle', 'ids, mask, P, r_ids, m = exp["ids"][mb], exp["mask"][mb], exp["n_prompt"], exp["r_ids"][mb], exp["r_mask"][mb]\n            with autocast(ids.device):\n                logits, values',
     'ids, mask, P, r_ids, m = exp["ids"], exp["mask"], exp["n_prompt"], exp["r_ids"], exp["r_mask"]\n            with autocast(ids.device):\n                logits, values'),
    ("beta not adapted", "kl_coef = update_kl_coef(kl_coef, row[\"kl\"], cfg, cfg.rollout_batch_size)", "kl_coef = kl_coef"),
    # evaluation
    ("eval: policy against itself", "figures[f\"win_rate_{key}\"] = win_rate(records[name], records[\"sft\"], key, cfg.seed)",
     "figures[f\"win_rate_{key}\"] = win_rate(records[name], records[name], key, cfg.seed)"),
    ("eval: no common random numbers", "records[who] = evaluate_policy(model, tok, prompts, cfg, device, scorers, ref=sft, seed=cfg.seed + 1)",
     "records[who] = evaluate_policy(model, tok, prompts, cfg, device, scorers, ref=sft)"),
    ("eval: kl against itself", "scorers, ref=sft, seed=cfg.seed + 1)", "scorers, ref=model, seed=cfg.seed + 1)"),
    ("eval: ceiling against the policy", "figures[\"win_rate_ceiling\"] = win_rate([dict(r, gold=1.0) for r in records[\"sft\"]], records[\"sft\"], \"gold\", cfg.seed)",
     "figures[\"win_rate_ceiling\"] = win_rate([dict(r, gold=1.0) for r in records[\"sft\"]], records[name], \"gold\", cfg.seed)"),
    ("win rate ties count as wins", "1.0 if x[key] > y[key] else 0.5 if x[key] == y[key] else 0.0", "1.0 if x[key] >= y[key] else 0.0"),
    ("bootstrap without replacement", "means = x[torch.randint(len(x), (resamples, len(x)), generator=g)].mean(1)",
     "means = x[torch.stack([torch.randperm(len(x), generator=g) for _ in range(resamples)])].mean(1)"),
    # bookkeeping
    ("stale eval kept", "            with contextlib.suppress(FileNotFoundError):\n                os.remove(os.path.join(cfg.out_dir, name))",
     "            pass"),
    ("stale stages still listed", "            stale.append(s)\n            del summary[s]", "            stale.append(s)"),
]


def run(mutant, python):
    name, old, new = mutant
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("rlhf.py", "test_rlhf.py", "course.py", "bench.py", "tutorial.md", "README.md", "requirements.txt"):
            shutil.copy(os.path.join(HERE, f), tmp)
        shutil.copytree(os.path.join(HERE, "assets"), os.path.join(tmp, "assets"))  # the student copy takes them
        path = os.path.join(tmp, "rlhf.py")
        source = open(path, encoding="utf-8").read()
        if old and source.count(old) != 1:
            return name, "not applied: the line is not in rlhf.py exactly once", 0.0
        open(path, "w", encoding="utf-8").write(source.replace(old, new) if old else source)
        t0 = time.time()
        # course.py check (the graders against wrong solutions) is left out: it proves the graders, not rlhf.py
        out = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "test_rlhf.py",
                              "-k", "not each_exercise_grader"], cwd=tmp,
                             capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        caught = [line.split(" ")[1].split("::")[-1] for line in out.stdout.splitlines() if line.startswith("FAILED")]
        return name, (f"caught by {caught[0]}" if caught else "SURVIVED" if out.returncode == 0
                      else f"caught (exit {out.returncode})"), time.time() - t0


def main():
    words = sys.argv[1:]
    mutants = [m for m in MUTANTS if not words or any(w in m[0] for w in words)]
    # first the unchanged code: a test that fails there would "catch" every mutant
    name, verdict, _ = run(("no change", "", ""), sys.executable)
    if verdict != "SURVIVED":
        sys.exit(f"mutants.py: the suite fails on the unchanged rlhf.py ({verdict}); fix that first")
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda m: run(m, sys.executable), mutants))
    for name, verdict, seconds in results:
        print(f"{name:45s} {verdict} ({seconds:.0f}s)")
    survived = [name for name, verdict, _ in results if not verdict.startswith("caught")]
    print(f"\n{len(results) - len(survived)} of {len(results)} mutants caught" +
          (f"; not caught: {', '.join(survived)}" if survived else ""))
    sys.exit(1 if survived else 0)


if __name__ == "__main__":
    main()
