"""
Do the tests catch a wrong line? Each mutant below is one realistic bug in rlhf.py or lab.py (an off-by-one, a
swapped sign, a missing mask, a skipped call). For each, this script copies the repository to a temporary folder,
applies the bug, runs the tests of that file (stopping at the first failure: test_rlhf.py for rlhf.py, then
test_lab.py if it survives; test_lab.py for lab.py), and reports the bugs no test caught. Not part of CI (it runs
the suite once per mutant); run it after changing rlhf.py, lab.py or the tests:

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
CORE, LAB = "rlhf.py", "lab.py"

# (name, file, the line as it is there (a unique fragment of it), the same line with the bug)
MUTANTS = [
    # rlhf.py: the tokenizer
    ("bpe counts distinct chunks", CORE, "pairs[pair] += n", "pairs[pair] += 1"),
    ("bpe tie to the largest pair", CORE, "key=lambda pr: (pairs[pr], -pr[0], -pr[1])", "key=lambda pr: (pairs[pr], pr[0], pr[1])"),
    ("bpe one merge too few", CORE, "for new_id in range(256, vocab_size - 2):", "for new_id in range(256, vocab_size - 3):"),
    ("merge overlaps", CORE, "            i += 2", "            i += 1"),
    ("encode by latest merge", CORE, "pair = min(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, float(\"inf\")))",
     "pair = max(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, -1))"),
    ("pad equals eos", CORE, "{EOT: len(vocab), PAD: len(vocab) + 1}", "{EOT: len(vocab), PAD: len(vocab)}"),
    ("prompt budget ignores the response", CORE, "budget = tok.model_max_length - cfg.max_new_tokens - len(start)",
     "budget = tok.model_max_length - len(start)"),
    ("cut response keeps an end token", CORE,
     "out[-1][k] = r[:cfg.max_new_tokens] if len(r) + 1 > cfg.max_new_tokens else r + [tok.eos_token_id]",
     "out[-1][k] = r[:cfg.max_new_tokens - 1] + [tok.eos_token_id]"),
    ("prompt cut from the right", CORE, "out.append({\"prompt\": start + ids[-budget:]})", "out.append({\"prompt\": start + ids[:budget]})"),
    ("no start token", CORE, "out.append({\"prompt\": start + ids[-budget:]})", "out.append({\"prompt\": ids[-budget:]})"),
    # rlhf.py: the task and the simulated human
    ("rudeness free", CORE, "score = content - 0.5 * read_answer(response)[2]", "score = content - 0.0 * read_answer(response)[2]"),
    ("a wrong value is right", CORE, 'return "right" if value == p["answer"].lower() else "wrong value"', 'return "right"'),
    ("filler inside an answer stripped", CORE, "while any(len(words) > len(e) and words[-len(e):] == e for e in ENDINGS):",
     "while any(len(words) > len(e) and e[0] in words for e in ENDINGS):"),
    ("any subject answers", CORE, 'if form == ("answer", p["slot"], p["subject"]):', 'if form[:2] == ("answer", p["slot"]):'),
    ("two answers read as one", CORE,
     "if len(words) == len(pattern) and all(p == w or p == \"value\" for p, w in zip(pattern, words)):",
     "if len(words) >= len(pattern) and all(p == w or p == \"value\" for p, w in zip(pattern, words)):"),
    ("made up counts as admitting", CORE, 'if form == ("made up", p["slot"]):\n        return "made up"',
     'if form == ("made up", p["slot"]):\n        return "admits"'),
    ("success for any kind", CORE, 'return score, answer_kind(p, response, ended) == KINDS[p["family"]][0]',
     'return score, answer_kind(p, response, ended) != "never ended"'),
    ("never ended costs nothing", CORE, "- 1.0 * (not ended)", "- 0.0 * (not ended)"),
    ("annotator ignores the gold", CORE, "z = (ga - gb) / cfg.label_temperature", "z = 0.0"),
    ("held-out prompts leak", CORE, "p[\"split\"] = \"heldout\" if i < n_held else \"train\"",
     "p[\"split\"] = \"heldout\" if i < n_held else \"heldout\""),
    ("pairs of one response", CORE, "    while b == a:\n", "    while False:\n"),
    # rlhf.py: models, log-probs, sampling
    ("positions count padding", CORE, "return (mask.long().cumsum(-1) - 1).clamp(min=0)",
     "return torch.arange(mask.shape[-1]).expand(mask.shape)"),
    ("logits not shifted", CORE, "    return logits[:, :-1].float() / temperature", "    return logits[:, 1:].float() / temperature"),
    ("log-probs without temperature", CORE, "    return logits[:, :-1].float() / temperature", "    return logits[:, :-1].float()"),
    ("value read after the token", CORE, "hidden = out.hidden_states[-1][:, n_prompt - 1:-1]", "hidden = out.hidden_states[-1][:, n_prompt:]"),
    ("policy logits not shifted", CORE, "return out.logits[:, :-1].float() / temperature, values.float()",
     "return out.logits[:, 1:].float() / temperature, values.float()"),
    ("sampling without temperature", CORE, "cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)",
     "cdf = logits.float().softmax(-1).cumsum(-1)"),
    ("sampling the most likely token", CORE, "cdf = (logits.float() / temperature).softmax(-1).cumsum(-1)",
     "cdf = (logits.argmax(-1, keepdim=True) <= torch.arange(logits.shape[-1], device=logits.device)).float()"),
    ("sampling off by one", CORE, "torch.searchsorted(cdf, u, right=True)", "torch.searchsorted(cdf, u, right=True) + 1"),
    ("positions not advanced", CORE, "ids, pos = token[:, None], pos[:, -1:] + 1", "ids, pos = token[:, None], pos[:, -1:]"),
    ("ended rows keep their positions", CORE, "rows, token, mask, pos = rows[keep], token[keep], mask[keep], pos[keep]",
     "rows, token, mask = rows[keep], token[keep], mask[keep]"),
    ("tokens written to the first rows", CORE, "r_ids[rows, t] = token", "r_ids[:len(rows), t] = token"),
    ("uniforms of the rows still writing only", CORE, "u = torch.rand(len(q_ids), device=device)[rows]",
     "u = torch.rand(len(rows), device=device)"),
    ("every eval sample from one seed", CORE, "        torch.manual_seed(seed + k)", "        torch.manual_seed(seed)"),
    ("end token masked out", CORE, "r_mask = ((is_eos.cumsum(1) - is_eos) == 0).long()", "r_mask = (is_eos.cumsum(1) == 0).long()"),
    ("tokens after the end kept", CORE, "r_mask = ((is_eos.cumsum(1) - is_eos) == 0).long()", "r_mask = torch.ones_like(is_eos)"),
    ("everything ended", CORE, "return q_ids, q_mask, r_ids, r_mask, is_eos.sum(1) > 0", "return q_ids, q_mask, r_ids, r_mask, is_eos.sum(1) >= 0"),
    # rlhf.py: SFT and the reward model
    ("sft loss on the prompt", CORE, "loss_mask = pad([[0] * len(e[\"prompt\"]) + [1] * len(e[\"response\"])",
     "loss_mask = pad([[1] * len(e[\"prompt\"]) + [1] * len(e[\"response\"])"),
    ("sft not shifted", CORE, "logp = logprobs_of(logits[:, :-1].float(), ids[:, 1:])", "logp = logprobs_of(logits[:, 1:].float(), ids[:, 1:])"),
    ("masked mean over padding", CORE, "return (x * mask).sum(*dims) / mask.sum(*dims).clamp(min=1)",
     "return (x * mask).sum(*dims) / torch.ones_like(mask).sum(*dims)"),
    ("batches over the budget", CORE, "if batch and count + sizes[i] > budget:", "if batch and count > budget:"),
    ("bradley-terry sign", CORE, "return -F.logsigmoid(r_chosen - r_rejected).mean()", "return -F.logsigmoid(r_rejected - r_chosen).mean()"),
    ("reward at the last column", CORE, "last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # index of the last 1",
     "last = torch.full((len(ids),), mask.shape[1] - 1)  # index of the last 1"),
    ("rm scores not normalised", CORE, "score = (raw - rm.config.reward_mean) / rm.config.reward_std", "score = raw"),
    ("missing-EOS constant for ended", CORE, "return torch.where(ended, score, torch.full_like(score, cfg.missing_eos_score))",
     "return torch.where(~ended, score, torch.full_like(score, cfg.missing_eos_score))"),
    ("rm accuracy against the better one only", CORE, "(r[better] > r[worse]).tolist())", "(r[better] > 0).tolist())"),
    ("rankings: ties compared", CORE, "if rank[i] < rank[j] and gold[i] != gold[j]]", "if rank[i] < rank[j]]"),
    ("rankings: order reversed", CORE, "if rank[i] < rank[j] and gold[i] != gold[j]]", "if rank[i] > rank[j] and gold[i] != gold[j]]"),
    ("comparison rows not offset", CORE, "        better += [len(seqs) + i for i, _ in item[\"better\"]]",
     "        better += [i for i, _ in item[\"better\"]]"),
    ("rankings without noise", CORE, "noisy = [g / cfg.label_temperature - math.log(-math.log(1 - rng.random())) for g in gold]",
     "noisy = [g / cfg.label_temperature for g in gold]"),
    ("rankings keep unended samples", CORE, "mine = [texts[j + n * len(chunk)] for n in range(k) if ended[j + n * len(chunk)]]",
     "mine = [texts[j + n * len(chunk)] for n in range(k)]"),
    ("rankings skipped", CORE, "metrics = fit_reward_model(rm, tok, data[pairs] + rankings,", "metrics = fit_reward_model(rm, tok, data[pairs],"),
    ("no comparisons: nan", CORE, "loss = bradley_terry_loss(r[better], r[worse]) if len(better) else r.sum() * 0.0",
     "loss = bradley_terry_loss(r[better], r[worse])"),
    ("scale from unended samples too", CORE, "torch.cat([q_mask, r_mask], 1))[ended].float()", "torch.cat([q_mask, r_mask], 1)).float()"),
    # rlhf.py: PPO
    ("kl reward sign", CORE, "    rewards = -kl_coef * kl ", "    rewards = kl_coef * kl "),
    ("score on the last column", CORE, "    rewards[torch.arange(len(score)), last] += score", "    rewards[:, -1] += score"),
    ("gae without lambda", CORE, "        last = delta + gamma * lam * last", "        last = delta + gamma * last"),
    ("gae values past the end", CORE, "    values, rewards = values * mask, rewards * mask ", "    rewards = rewards * mask "),
    ("returns without values", CORE, "    return advantages, (advantages + values) * mask", "    return advantages, advantages * mask"),
    ("whitening over padding", CORE, "    mean = masked_mean(x, mask)\n", "    mean = x.mean()\n"),
    ("clip min instead of max", CORE, "    loss = masked_mean(torch.max(unclipped, clipped), mask)", "    loss = masked_mean(torch.min(unclipped, clipped), mask)"),
    ("value clip around returns", CORE, "    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)",
     "    v_clipped = returns + torch.clamp(values - returns, -clip_range, clip_range)"),
    ("kl controller unclipped", CORE, "    error = min(max(kl / cfg.kl_target - 1, -0.2), 0.2)", "    error = kl / cfg.kl_target - 1"),
    ("ref log-probs from the policy", CORE, "ref_logprobs = logprobs_of(response_logits(ref, ids, mask, P, cfg.temperature), r_ids)",
     "ref_logprobs = logprobs_of(response_logits(policy, ids, mask, P, cfg.temperature), r_ids)"),
    ("advantages not whitened", CORE, "    advantages = masked_whiten(advantages, r_maskf)", "    advantages = advantages * r_maskf"),
    ("gae gamma and lambda swapped", CORE, "compute_gae(rewards, old_values, r_maskf, cfg.gamma, cfg.lam)",
     "compute_gae(rewards, old_values, r_maskf, cfg.lam, cfg.gamma)"),
    ("ratio against the current policy", CORE, "ppo_policy_loss(new_logprobs, exp[\"old_logprobs\"][mb], exp[\"advantages\"][mb], m,",
     "ppo_policy_loss(new_logprobs, new_logprobs.detach(), exp[\"advantages\"][mb], m,"),
    ("advantage sign flipped in the update", CORE, "ppo_policy_loss(new_logprobs, exp[\"old_logprobs\"][mb], exp[\"advantages\"][mb], m,",
     "ppo_policy_loss(new_logprobs, exp[\"old_logprobs\"][mb], -exp[\"advantages\"][mb], m,"),
    ("value loss left out", CORE, "loss = pg_loss + cfg.vf_coef * vf_loss", "loss = pg_loss"),
    ("no zero_grad", CORE, "            opt.zero_grad(set_to_none=True)\n            loss.backward()", "            loss.backward()"),
    ("minibatch ignores the shuffle", CORE,
     "ids, mask, r_ids, m = exp[\"ids\"][mb], exp[\"mask\"][mb], exp[\"r_ids\"][mb], exp[\"r_mask\"][mb]\n            with autocast(ids.device):\n                logits, values",
     "ids, mask, r_ids, m = exp[\"ids\"], exp[\"mask\"], exp[\"r_ids\"], exp[\"r_mask\"]\n            with autocast(ids.device):\n                logits, values"),
    ("beta not adapted", CORE, "kl_coef = update_kl_coef(kl_coef, row[\"kl\"], cfg, cfg.rollout_batch_size)", "kl_coef = kl_coef"),
    ("value head not trained", CORE, "[*policy.parameters(), *value_head.parameters()], lr=cfg.ppo_lr", "[*policy.parameters()], lr=cfg.ppo_lr"),
    # rlhf.py: the evaluation
    ("eval: policy against itself", CORE, "win_rate(records[name], records[\"sft\"], \"gold\", cfg.seed)",
     "win_rate(records[name], records[name], \"gold\", cfg.seed)"),
    ("eval: no common random numbers", CORE, "scorers, ref=sft, seed=1000 * (cfg.seed + 1))\n               for who, model in",
     "scorers, ref=sft, seed=1000 * (cfg.seed + 1) + (who == \"sft\"))\n               for who, model in"),
    ("eval: kl against itself", CORE, "scorers, ref=sft, seed=1000 * (cfg.seed + 1))",
     "scorers, ref=model, seed=1000 * (cfg.seed + 1))"),
    ("eval: training prompts", CORE, "if p[\"split\"] == \"heldout\"][:cfg.eval_prompts]", "if p[\"split\"] == \"train\"][:cfg.eval_prompts]"),
    ("win rate ties count as wins", CORE, "(ra[key] > rb[key]) + 0.5 * (ra[key] == rb[key])", "(ra[key] >= rb[key]) + 0.0 * (ra[key] == rb[key])"),
    ("win rate of first samples only", CORE, "for ra in rs_a for rb in rs_b]", "for ra, rb in zip(rs_a, rs_b)]"),
    ("bootstrap over samples", CORE, "rows = torch.randint(len(x), (resamples, len(x))", "rows = torch.randint(len(x), (resamples, len(x) * x.shape[1])"),
    ("bootstrap unpaired", CORE, "means = (mean(x) - mean(y) if y is not None else mean(x)).sort().values",
     "means = (mean(x) - mean(y[torch.randperm(len(y))]) if y is not None else mean(x)).sort().values"),
    ("bootstrap interval too narrow", CORE, "means[int(0.025 * resamples)].item()", "means[int(0.25 * resamples)].item()"),
    ("difference not paired with sft", CORE, "figures[\"difference\"] = summarize(records[name], cfg.seed, sft=records[\"sft\"])",
     "figures[\"difference\"] = summarize(records[name], cfg.seed, sft=records[name])"),
    # rlhf.py: the stages
    ("later stages kept in the summary", CORE, "summary = {k: v for k, v in load_summary(cfg).items() if k not in later}",
     "summary = load_summary(cfg)"),
    ("stage seeds not reset", CORE, "            torch.manual_seed(cfg.seed)\n            figures", "            figures"),
    # lab.py: the data, the judge, your own data
    ("judge pairs from held-out prompts", LAB, 'if p["split"] == "train" and p["family"] == f] for f in FAMILIES}',
     'if p["split"] == "heldout" and p["family"] == f] for f in FAMILIES}'),
    ("judge pairs drawn with the data's rng", LAB, 'judge_pairs(prompts, random.Random(f"{cfg.seed} judge"), cfg)',
     'judge_pairs(prompts, random.Random(cfg.seed), cfg)'),
    ("file: chosen and rejected swapped", LAB, 'return dict(messages=prompt, text=text, chosen=chosen["content"], rejected=rejected["content"])',
     'return dict(messages=prompt, text=text, chosen=rejected["content"], rejected=chosen["content"])'),
    ("file: prompt without its last Assistant", LAB, 'for m in pair["messages"]) + ASSISTANT', 'for m in pair["messages"])'),
    ("file: judge shares the rm pairs", LAB, "rm_pairs, judge_pairs = train[:n_rm], train[n_rm:n_rm + cfg.n_judge]",
     "rm_pairs, judge_pairs = train[:n_rm], train[:cfg.n_judge]"),
    ("file: prompt repeated twice", LAB, "    if prompt is None or prompt == before_c[:len(prompt)]:", "    if prompt is None:"),
    ("file: differing earlier turns accepted", LAB, "    if before_c != before_r:\n        raise BadRow", "    if False:\n        raise BadRow"),
    ("file: chat template without the generation prompt", LAB,
     "prompt = chat_tok.apply_chat_template(pair[\"messages\"], tokenize=False, add_generation_prompt=True)",
     "prompt = chat_tok.apply_chat_template(pair[\"messages\"], tokenize=False, add_generation_prompt=False)"),
    ("file: chat model keeps its old end token", LAB, "        tok.eos_token = end_of_turn(tok)", "        pass"),
    ("file: most bad rows accepted", LAB, "    if len(pairs) < bad:  # most rows cannot be pairs", "    if not pairs and bad:  # most rows cannot be pairs"),
    ("file: held-out prompts train", LAB, 'train, heldout = [r for r in pairs if r["prompt"] not in held]', 'train, heldout = [r for r in pairs]'),
    ("old turns kept", LAB, "while len(rlhf.encode(tok, [text])[0]) > budget and text.find(HUMAN, 1) > 0:", "while False:"),
    ("crowd wrong values keep the old label", LAB,
     'out.append(rlhf.annotate(p, a, b, rng, cfg) if (a, b) != (pair["chosen"], pair["rejected"]) else pair)',
     'out.append(dict(pair, chosen=a, rejected=b))'),
    # lab.py: remedies
    ("ensemble min is max", LAB, "        return scores.min(0).values", "        return scores.max(0).values"),
    ("ensemble std added", LAB, "return scores.mean(0) - lam * scores.std(0, correction=0)", "return scores.mean(0) + lam * scores.std(0, correction=0)"),
    ("ensemble uses one model", LAB, "torch.stack([rlhf.rm_scores(m, ids, mask, ended, cfg) for m in rms])",
     "torch.stack([rlhf.rm_scores(rms[0], ids, mask, ended, cfg) for m in rms])"),
    ("refresh not applied", LAB, "            rms[:] = [refresh_reward_model(", "            _ = [refresh_reward_model("),
    ("refresh despite --rm_samples 0", LAB, 'if not can_rank or cfg.rm_samples == 0 or cfg.reward == "human":',
     'if not can_rank or cfg.reward == "human":'),
    ("refresh steps from 0", LAB, "for i in range(1, cfg.rm_refresh + 1)} - {0}", "for i in range(cfg.rm_refresh)} - {0}"),
    ("refresh spaced over N, not N + 1", LAB, "{round(cfg.ppo_steps * i / (cfg.rm_refresh + 1))", "{round(cfg.ppo_steps * i / cfg.rm_refresh)"),
    ("refresh forgets to normalise", LAB, "    rm.requires_grad_(False)\n    normalise(rm, sft, tok, train_prompts, cfg, device)\n    return rm",
     "    rm.requires_grad_(False)\n    return rm"),
    ("refresh without replay", LAB, "train = new + random.Random(seed).sample(rows_so_far, min(len(new), len(rows_so_far)))", "train = new"),
    ("human reward not normalised", LAB, "return torch.where(ended, (gold(ids, mask) - mean) / std, never_ended)",
     "return torch.where(ended, gold(ids, mask), never_ended)"),
    ("variant ppo without the value loss", LAB, "loss = (pg_loss + cfg.vf_coef * vf_loss) * share(m.sum())", "loss = pg_loss * share(m.sum())"),
    # lab.py: the evaluation's extras
    ("agreement ties count as wins", LAB, "rows.append([1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in d])",
     "rows.append([1.0 if x >= 0 else 0.0 for x in d])"),
    ("agreement over equal gold", LAB, "for a, b in pairs if a[\"gold\"] != b[\"gold\"]]", "for a, b in pairs]"),
    ("ceiling against the policy", LAB, 'figures["ceiling"] = rlhf.win_rate(best, records["sft"], "gold", seed)',
     'figures["ceiling"] = rlhf.win_rate(best, records[name], "gold", seed)'),
    ("judge win rate against itself", LAB, 'rlhf.win_rate(records[name], records["sft"], "judge", seed)',
     'rlhf.win_rate(records[name], records[name], "judge", seed)'),
    # lab.py: beyond PPO
    ("dpo without the reference", LAB, "r_chosen, r_rejected = beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)",
     "r_chosen, r_rejected = beta * logp_chosen, beta * logp_rejected"),
    ("dpo log-probs over the prompt", LAB, "return (lp * loss_mask[:, 1:]).sum(1), better, worse", "return lp.sum(1), better, worse"),
    ("rloo baseline includes itself", LAB, "return (R - (R.sum(1, keepdim=True) - R) / (k - 1)).view(-1)",
     "return (R - R.mean(1, keepdim=True)).view(-1)"),
    ("grpo over the batch", LAB, "return ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)).view(-1)",
     "return ((R - R.mean()) / (R.std() + eps)).view(-1)"),
    ("k3 sign", LAB, "    return torch.exp(d) - d - 1", "    return torch.exp(d) + d - 1"),
    ("rloo kl not in the reward", LAB, "advantages = rloo_advantages(score - kl_coef * kl.sum(1), cfg.group_size)",
     "advantages = rloo_advantages(score, cfg.group_size)"),
    ("grpo without its kl term", LAB, "(kl_coef * kl_loss if algo == \"grpo\" else 0.0)", "0.0"),
    ("best-of-n picks the lowest", LAB, "    order = sorted(range(N), key=lambda i: rewards[i])", "    order = sorted(range(N), key=lambda i: -rewards[i])"),
    ("best-of-n ties not shared", LAB, "        gold_sorted[i] = sum(tied) / len(tied)", "        pass"),
    ("best-of-n kl without the log", LAB, "        kl += pi_n * math.log(pi_n / p) if pi_n > 0 else 0.0", "        kl += pi_n / p if pi_n > 0 else 0.0"),
    # the real size: the human's share, sampling in chunks, flags from a file, the memory plan
    ("rank_prompts ignored", CORE, "ranked = train_prompts[:cfg.rank_prompts or None]", "ranked = train_prompts"),
    ("scale samples in one call", CORE, "generate(sft, tok, ids[i:i + cfg.sample_batch], cfg, device)",
     "generate(sft, tok, ids[i:i + 512], cfg, device)"),
    ("scale from the last chunk", CORE, "    raw = torch.cat(raw)", "    raw = raw[-1]"),
    ("rankings ignore sample_batch", CORE, "step = max(1, cfg.sample_batch // k)", "step = max(1, 512 // k)"),
    ("file comments read as flags", CORE, 'return line.split("#")[0].split()', "return line.split()"),
    ("plan: Adam without its moments", LAB, '("policy: weights, gradients, AdamW (16 bytes a parameter)", 16 * P)',
     '("policy: weights, gradients, AdamW (16 bytes a parameter)", 8 * P)'),
    ("plan: 16 numbers a token", LAB, "FP32 * tokens * (20 * d * L + logits * V)", "FP32 * tokens * (16 * d * L + logits * V)"),
    ("plan: no reward model in PPO", LAB, '4 * (P + k * P_rm)', '4 * P'),
    ("plan: judge not in the evaluation", LAB, 'k = 1 + ("judge" in rlhf.load_summary(cfg))', "k = 1"),
    ("peak not kept", LAB, "return dict(figures, memory=dict(plan_bytes=total, peak_bytes=peak, device=device.type))",
     "return figures"),
    # lab.py: torchrun, trackers, stale results
    ("ddp share without the processes", LAB, "return world() * float(n_local) / total if total else 0.0",
     "return float(n_local) / total if total else 0.0"),
    ("ddp part of one process", LAB, "    part = items[rank()::world()]", "    part = items"),
    ("tracker: rows not logged", LAB, "                    TRACKER[\"tensorboard\"].add_scalar(key, value, row[\"step\"])", "                    pass"),
    ("stale reports kept", LAB, "            with contextlib.suppress(FileNotFoundError):\n                os.remove(os.path.join(cfg.out_dir, name))",
     "            pass"),
    ("stale stages still listed", LAB, "    if stale:\n        rlhf.save_summary(", "    if False:\n        rlhf.save_summary("),
    ("out-of-date stage accepted", LAB, 'if before in summary and summary[before].get("finished", 0) > summary[stage].get("finished", 0):',
     'if False:'),
]


def run(mutant, python):
    name, file, old, new = mutant
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("rlhf.py", "lab.py", "test_rlhf.py", "test_lab.py", "course.py", "bench.py", "tutorial.md", "README.md",
                  "requirements.txt"):
            shutil.copy(os.path.join(HERE, f), tmp)
        shutil.copytree(os.path.join(HERE, "assets"), os.path.join(tmp, "assets"))  # the docs' figures read them
        path = os.path.join(tmp, file)
        source = open(path, encoding="utf-8").read()
        if old and source.count(old) != 1:
            return name, f"not applied: the line is in {file} {source.count(old)} times, not once", 0.0
        open(path, "w", encoding="utf-8").write(source.replace(old, new) if old else source)
        t0, verdict = time.time(), "SURVIVED"
        # course.py check (the graders against wrong solutions) is left out: it proves the graders, not the code; so is
        # the line-length check: a mutant's longer line would be "caught" by it without any test of its behaviour
        for tests in (["test_rlhf.py", "test_lab.py"] if file == CORE else ["test_lab.py"]):
            out = subprocess.run([python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", tests,
                                  "-k", "not each_exercise_grader and not reads_top_to_bottom"], cwd=tmp,
                                 capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            caught = [line.split(" ")[1].split("::")[-1] for line in out.stdout.splitlines() if line.startswith("FAILED")]
            if out.returncode:
                verdict = f"caught by {tests}::{caught[0]}" if caught else f"caught (exit {out.returncode})"
                break
        return name, verdict, time.time() - t0


def main():
    words = sys.argv[1:]
    mutants = [m for m in MUTANTS if not words or any(w in m[0] for w in words)]
    # first the unchanged code: a test that fails there would "catch" every mutant
    name, verdict, _ = run(("no change", CORE, "", ""), sys.executable)
    if verdict != "SURVIVED":
        sys.exit(f"mutants.py: the suite fails on the unchanged code ({verdict}); fix that first")
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
