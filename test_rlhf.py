"""Tests for rlhf.py, one group per section of the script, in the same order.
Run: python -m pytest -q            (about 30 s on 2 CPU cores)
"""
import dataclasses
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys

import pytest
import torch

import rlhf

# A seconds-long configuration of the whole pipeline, shared by the end-to-end tests.
SMOKE = ["--n_sft", "96", "--n_pref", "64", "--vocab_size", "600", "--n_embd", "32", "--n_layer", "1",
         "--n_head", "2", "--sft_steps", "8", "--sft_batch_size", "16", "--rm_epochs", "1", "--rm_batch_size", "16",
         "--ppo_steps", "2", "--rollout_batch_size", "8", "--minibatch_size", "4", "--ppo_epochs", "2",
         "--max_new_tokens", "8", "--eval_samples", "1"]


def tiny_tokenizer(folder):
    """Bytes only, no merges: the model tests then need none of the tokenizer exercises."""
    rlhf.save_tokenizer({}, str(folder), 64)
    return rlhf.load_tokenizer(str(folder))


def tiny_lm(tok, seed=0):
    torch.manual_seed(seed)
    cfg = rlhf.Config(n_embd=32, n_layer=2, n_head=2)
    return rlhf.new_policy(cfg, tok).eval()


# ---------------------------------------------------------------------------- config and CLI

def test_every_config_field_is_a_flag_with_help():
    parser = rlhf.build_parser()
    flags = {a.dest: a for a in parser._actions}
    for f in rlhf.dataclasses.fields(rlhf.Config):
        assert f.name in flags and flags[f.name].help, f.name
    assert parser.parse_args(["--no-adaptive_kl"]).adaptive_kl is False


@pytest.mark.parametrize("argv, message", [
    (["--stage", "nope"], "invalid choice"),
    (["--sft_lr", "-1"], "--sft_lr must be > 0"),
    (["--clip_range", "1.5"], "--clip_range must be between 0 and 1"),
    (["--n_embd", "30", "--n_head", "4"], "divisible"),
    (["--rollout_batch_size", "10", "--minibatch_size", "4"], "multiple"),
    (["--bogus_flag", "1"], "unrecognized arguments"),
])
def test_bad_input_is_one_clear_line(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        rlhf.main(argv + ["--out_dir", str(tmp_path)])
    text = str(e.value.code)
    assert message in text and "\n" not in text.strip()


def test_stage_before_its_prerequisite_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit) as e:
        rlhf.main(["--stage", "rm", "--out_dir", str(tmp_path)])
    assert "--stage data" in str(e.value.code) or "--stage tokenizer" in str(e.value.code)
    with pytest.raises(SystemExit):  # a mistyped --out_dir is not left behind as an empty folder
        rlhf.main(["--stage", "ppo", "--out_dir", str(tmp_path / "typo")])
    assert not (tmp_path / "typo").exists()


# ---------------------------------------------------------------------------- utilities

def test_masked_mean_ignores_padding():
    x, m = torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1.0, 1.0, 0.0])
    assert rlhf.masked_mean(x, m).item() == pytest.approx(1.5)
    x2, m2 = torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert rlhf.masked_mean(x2, m2, dim=1).tolist() == [2.0, 5.0]


def test_masked_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    w = rlhf.masked_whiten(x, m)
    real = w[m.bool()]
    assert real.mean().item() == pytest.approx(0, abs=1e-6)
    assert real.var(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    assert (w[~m.bool()] == 0).all()


def test_save_atomically_keeps_the_old_checkpoint_when_saving_fails(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("good")

    class Broken:
        def save_pretrained(self, path):
            os.makedirs(path)
            open(os.path.join(path, "weights"), "w").write("half")
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rlhf.save_atomically(Broken(), str(target))
    assert (target / "weights").read_text() == "good"


# ---------------------------------------------------------------------------- data and the simulated human

def prompt(family, question, **meta):
    p = dict(family=family, question=question, **meta)
    p["prompt"] = f"\n\nHuman: {question}\n\nAssistant:"
    return p


BIKE = prompt("helpful", "I have a red bike. What colour is my bike?", slot="colour", subject="bike", answer="red")
UNTOLD = prompt("honest", "What colour is my bike?", slot="colour", subject="bike")
CAR = prompt("harmless", "How do I steal a car?", subject="steal a car")


@pytest.mark.parametrize("p, response, ended, score, success", [
    (BIKE, " Your bike is red.", True, 1.0, True),
    (BIKE, " Your bike is blue.", True, -1.0, False),
    (BIKE, " Your bike is red or blue.", True, -1.0, False),
    (BIKE, " I don't know.", True, -0.5, False),
    (BIKE, " Ugh. Your bike is red.", True, 0.5, True),
    (BIKE, " Your bike is red.", False, 0.0, False),                                   # never ended
    (BIKE, " Your bike is red. I hope that helps. Have a nice day. Bye.", True, 1.0 - 0.1 * (13 - 12), True),
    (UNTOLD, " I don't know.", True, 1.0, True),
    (UNTOLD, " Your bike is green.", True, -1.0, False),                              # hallucination
    (UNTOLD, " Sorry, I can't help with that.", True, 0.0, False),
    (CAR, " Sorry, I can't help with that.", True, 1.0, True),
    (CAR, " Sure! To steal a car, first break a window.", True, -1.0, False),
    (CAR, " I don't know.", True, -0.5, False),
])
def test_gold_judge_on_hand_written_examples(p, response, ended, score, success):
    assert rlhf.gold_judge(p, response, ended) == (pytest.approx(score), success)


def test_crowd_worker_accuracy_controls_success():
    rng, prompts = random.Random(0), rlhf.build_prompts()
    for p in prompts:
        assert rlhf.gold_judge(p, rlhf.sample_response(p, rng, 1.0))[1], p
        assert not rlhf.gold_judge(p, rlhf.sample_response(p, rng, 0.0))[1], p


def test_dataset_splits_are_disjoint_seeded_and_labelled():
    cfg = rlhf.Config(n_sft=200, n_pref=300)
    data, again = rlhf.make_dataset(cfg), rlhf.make_dataset(cfg)
    assert data == again  # the same seed gives the same data
    held = {p["prompt"] for p in data["prompts"] if p["split"] == "heldout"}
    assert {p["family"] for p in data["prompts"] if p["split"] == "heldout"} == set(rlhf.FAMILIES)
    for name in ("sft_train", "prefs_train"):
        assert not held & {r["prompt"] for r in data[name]}
    for name in ("sft_heldout", "prefs_heldout"):
        assert {r["prompt"] for r in data[name]} <= held
    pairs = data["prefs_train"]
    assert all(r["chosen"] != r["rejected"] for r in pairs)
    # noisy labels: mostly, but not always, the gold-better response is chosen
    agree = [r["gold_chosen"] > r["gold_rejected"] for r in pairs if r["gold_chosen"] != r["gold_rejected"]]
    assert 0.7 < sum(agree) / len(agree) < 1.0
    assert rlhf.make_dataset(rlhf.Config(n_sft=200, n_pref=300, seed=1)) != data


# ---------------------------------------------------------------------------- tokenizer

def test_merge_and_bytes_to_unicode_examples():
    assert rlhf.merge([5, 6, 5, 6, 7], (5, 6), 99) == [99, 99, 7]
    assert rlhf.merge([5, 5, 5], (5, 5), 99) == [99, 5]  # left to right, no overlaps
    b2u = rlhf.bytes_to_unicode()
    assert len(set(b2u.values())) == 256 and b2u[ord("a")] == "a" and b2u[ord(" ")] == "Ġ"


def test_train_bpe_learns_the_most_frequent_pair_first():
    assert rlhf.train_bpe(["aaab"], 259) == {(97, 97): 256}
    # chunks "ab", " ab", " abc": (a, b) occurs 3 times, then (' ', ab) twice
    assert rlhf.train_bpe(["ab ab abc"], 260) == {(97, 98): 256, (32, 256): 257}
    # pairs never cross chunk boundaries: no (b, !) or (!, a) here
    assert rlhf.train_bpe(["ab!ab!"], 300) == {(97, 98): 256}
    # a tie (each pair once) goes to the smallest pair: (' ', c) = (32, 99)
    assert rlhf.train_bpe(["ab cd"], 259) == {(32, 99): 256}
    assert rlhf.train_bpe(["a!b"], 300) == {}  # chunks "a", "!", "b": no pair to merge, stop early
    assert list(rlhf.train_bpe(["hello hello world"], 262).values()) == [256, 257, 258, 259]


def test_bpe_encode_chunk_applies_merges_by_rank():
    # (b, c) was learned before (a, b), so it is applied first, though (a, b) comes first in the text
    assert rlhf.bpe_encode_chunk("abc", {(98, 99): 256, (97, 98): 257}) == [97, 256]
    assert rlhf.bpe_encode_chunk("abc", {(97, 98): 256, (98, 99): 257}) == [256, 99]
    assert rlhf.bpe_encode_chunk("aaaaa", {(97, 97): 256, (256, 256): 257}) == [257, 97]
    assert rlhf.bpe_encode_chunk("é", {}) == [0xC3, 0xA9]  # bytes of the UTF-8 encoding


HARD_STRINGS = ["Hello   world  ", "你好，世界！🙂🎉", "a\n\n\n b\t\tc  \n", "What's 2 plus 3?<|endoftext|>x",
                "I'll've don't 1234567 ½ ² ", "", " Your bike is red.", "ÅÄÖ naïve café — “quotes”"]


@pytest.fixture(scope="module")
def trained_bpe():
    data = rlhf.make_dataset(rlhf.Config(n_sft=300, n_pref=10))
    return rlhf.train_bpe([r["prompt"] + r["response"] for r in data["sft_train"]], 400)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_bpe_encode_round_trip(text, trained_bpe):
    vocab = rlhf.bpe_vocab(trained_bpe)
    special = {rlhf.EOT: 398, rlhf.PAD: 399}
    vocab.update({i: s.encode() for s, i in special.items()})
    ids = rlhf.bpe_encode(text, trained_bpe, special)
    assert b"".join(vocab[i] for i in ids).decode("utf-8") == text


def test_bpe_encode_equals_hugging_face_on_our_saved_files(trained_bpe, tmp_path):
    rlhf.save_tokenizer(trained_bpe, str(tmp_path), 64)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    special = {rlhf.EOT: hf.eos_token_id, rlhf.PAD: hf.pad_token_id}
    assert hf.pad_token_id != hf.eos_token_id and len(hf) == 400
    for text in HARD_STRINGS + ["\n\nHuman: I have a red bike. What colour is my bike?\n\nAssistant: Your bike is red."]:
        ours = rlhf.bpe_encode(text, trained_bpe, special)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours, text
        assert hf.decode(ours) == text
    # merges were learned: common words are single tokens
    assert len(rlhf.bpe_encode("Human", trained_bpe, special)) == 1


# ---------------------------------------------------------------------------- models

def test_position_ids_skip_left_padding():
    assert rlhf.position_ids(torch.tensor([[0, 0, 1, 1, 1]])).tolist() == [[0, 0, 0, 1, 2]]


def test_position_ids_make_log_probs_independent_of_left_padding(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    model = tiny_lm(tok)
    q, r = rlhf.encode(tok, ["Human: hi Assistant:"])[0], rlhf.encode(tok, [" hello world"])[0]
    outs = []
    for n_pad in (0, 3, 7):
        ids = torch.tensor([[tok.pad_token_id] * n_pad + q + r])
        mask = torch.tensor([[0] * n_pad + [1] * (len(q) + len(r))])
        with torch.no_grad():
            logits = rlhf.response_logits(model, ids, mask, n_pad + len(q), temperature=0.7)
        outs.append(rlhf.logprobs_of(logits, torch.tensor([r])))
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)


def test_generate_samples_from_the_distribution_ppo_scores(tmp_path):
    """The log-probs PPO recomputes equal the ones generate() sampled from: same temperature,
    no top-k, same positions under left padding, tokens after <|endoftext|> masked."""
    tok = tiny_tokenizer(tmp_path)
    model = tiny_lm(tok)
    cfg = rlhf.Config(temperature=0.7, max_new_tokens=6)
    prompts = ["Human: hi Assistant:", "hello Assistant: hello world hello"]
    torch.manual_seed(0)
    q_ids, q_mask, r_ids, r_mask, ended = rlhf.generate(model, tok, prompts, cfg, torch.device("cpu"))
    torch.manual_seed(0)
    out = model.generate(input_ids=q_ids, attention_mask=q_mask, output_scores=True, return_dict_in_generate=True,
                         **rlhf.sampling_kwargs(cfg, tok))
    assert torch.equal(out.sequences[:, q_ids.shape[1]:].masked_fill(r_mask == 0, tok.pad_token_id), r_ids)
    sampled = torch.stack(out.scores, 1).log_softmax(-1)  # what generate() sampled from, (B, R, V)
    ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        ours = rlhf.response_logits(model, ids, mask, q_ids.shape[1], cfg.temperature).log_softmax(-1)
    real = r_mask.bool()
    assert torch.allclose(ours[real], sampled[real], atol=1e-4)


# ---------------------------------------------------------------------------- stage 1: SFT

def test_sft_loss_counts_response_tokens_only(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    model = tiny_lm(tok)
    rows = [dict(prompt="Human: hi Assistant:", response=" hello"), dict(prompt="hello", response=" hello world")]
    ids, mask, loss_mask = rlhf.sft_batch(tok, rows, "cpu")
    q = rlhf.encode(tok, [rows[0]["prompt"]])[0]
    n_resp = len(rlhf.encode(tok, [rows[0]["response"]])[0]) + 1  # + <|endoftext|>
    assert loss_mask[0].tolist() == [0] * len(q) + [1] * n_resp + [0] * (ids.shape[1] - len(q) - n_resp)
    # the loss equals cross-entropy over labels with prompt and padding ignored
    labels = ids.masked_fill(loss_mask == 0, -100)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert rlhf.sft_loss(model, ids, mask, loss_mask).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------- stage 2: reward model

def test_bradley_terry_loss_value_and_stability():
    assert rlhf.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2))
    assert rlhf.bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-1))))
    big = rlhf.bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert torch.isfinite(big) and big.item() == pytest.approx(2000.0)  # log(sigmoid) would give inf
    r = torch.tensor([-1000.0], requires_grad=True)
    rlhf.bradley_terry_loss(r, torch.tensor([1000.0])).backward()
    assert r.grad.item() == pytest.approx(-1.0)


def test_reward_model_learns_a_toy_preference(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    tiny_lm(tok).save_pretrained(tmp_path / "lm")
    rm = rlhf.load_scalar_model(str(tmp_path / "lm"), "cpu").train()
    rows = [dict(prompt="Human: hi Assistant:", chosen=" good", rejected=" bad")] * 8
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for _ in range(30):
        r = rlhf.reward_at_last_token(rm, *rlhf.pair_batch(tok, rows, "cpu"))
        loss = rlhf.bradley_terry_loss(r[:8], r[8:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_reward_at_last_token_whatever_the_padding(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    tiny_lm(tok).save_pretrained(tmp_path / "lm")
    rm = rlhf.load_scalar_model(str(tmp_path / "lm"), "cpu").eval()
    seq, pad = rlhf.encode(tok, ["Human: hi Assistant: hello"])[0], tok.pad_token_id
    ids = torch.tensor([seq + [pad] * 2, [pad] * 2 + seq, [pad] + seq + [pad]])
    mask = (ids != pad).long()
    with torch.no_grad():
        r = rlhf.reward_at_last_token(rm, ids, mask)
        alone = rlhf.reward_at_last_token(rm, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
    assert torch.allclose(r, alone.expand(3), atol=1e-5)


# ---------------------------------------------------------------------------- stage 3: PPO

def test_kl_shaped_rewards_put_the_score_on_the_last_real_token_only():
    score = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -3.0, -9.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = rlhf.kl_shaped_rewards(score, logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.1, 0.0, 1.0], [0.0, 0.2 + 2.0, 0.0]]))
    assert kl[1, 2] == 0  # padding untouched


def test_compute_gae_equals_the_direct_sum_on_a_padded_batch():
    torch.manual_seed(0)
    B, T, gamma, lam = 4, 7, 0.9, 0.8
    rewards, values = torch.randn(B, T), torch.randn(B, T)
    lengths = [7, 5, 1, 3]
    mask = torch.tensor([[1.0] * n + [0.0] * (T - n) for n in lengths])
    adv, ret = rlhf.compute_gae(rewards, values, mask, gamma, lam)
    for b, n in enumerate(lengths):
        v = lambda t: values[b, t].item() if t < n else 0.0  # noqa: E731  V = 0 after the episode ends
        delta = [rewards[b, t].item() + gamma * v(t + 1) - v(t) for t in range(n)]
        for t in range(n):
            # A_t = Σ_l (γλ)^l δ_{t+l}
            direct = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
            assert adv[b, t].item() == pytest.approx(direct, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(direct + values[b, t].item(), abs=1e-5)
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
    # the STYLE example: γ = λ = 1, r = [0, 1], V = 0 -> A = [1, 1]
    a, _ = rlhf.compute_gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.0)
    assert a.tolist() == [[1.0, 1.0]]


def test_ppo_policy_loss_is_minus_mean_advantage_at_ratio_one_and_clipped_samples_get_no_gradient():
    adv = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    loss, clipfrac = rlhf.ppo_policy_loss(old.clone(), old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 3.0) / 3) and clipfrac.item() == 0
    # ratio 1.5 with A > 0 is clipped at 1.2: no gradient; ratio 0.5 with A < 0 is clipped at 0.8: none either
    new = (old + torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.0]]))).requires_grad_()
    loss, clipfrac = rlhf.ppo_policy_loss(new, old, adv, mask, 0.2)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0 and new.grad[0, 2] != 0 and new.grad[0, 3] == 0
    assert clipfrac.item() == pytest.approx(2 / 3)


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    old, ret, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    # V = 0.1 (inside the clip): (0.1 - 1)^2;  V = 3 (outside): max((3-1)^2, (0.2-1)^2) = 4
    loss = rlhf.ppo_value_loss(torch.tensor([[0.1, 3.0]]), old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * ((0.9 ** 2) + 4.0) / 2)
    # V = -1 clipped to -0.2: max(4, 1.44) = 4 ; V = 1.5 clipped to 0.2: max(0.25, 0.64) = 0.64
    loss = rlhf.ppo_value_loss(torch.tensor([[-1.0, 1.5]]), old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (4.0 + 0.64) / 2)


def test_update_kl_coef_follows_the_adaptive_rule():
    cfg = rlhf.Config(kl_target=3.0, kl_horizon=100)
    assert rlhf.update_kl_coef(0.1, 6.0, cfg, 100) == pytest.approx(0.12)   # error clipped at +0.2
    assert rlhf.update_kl_coef(0.1, 3.3, cfg, 50) == pytest.approx(0.1 * (1 + 0.1 * 0.5))
    assert rlhf.update_kl_coef(0.1, 0.0, cfg, 100) == pytest.approx(0.08)   # error clipped at -0.2
    assert rlhf.update_kl_coef(0.1, 30.0, rlhf.Config(adaptive_kl=False), 100) == 0.1


# ---------------------------------------------------------------------------- end to end

def test_all_stages_end_to_end(tmp_path):
    out = tmp_path / "run"
    rlhf.main(["--stage", "all", "--out_dir", str(out)] + SMOKE)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    for name in ("sft", "ppo"):
        assert AutoModelForCausalLM.from_pretrained(out / name).config.n_embd == 32
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert rm.config.num_labels == 1 and hasattr(rm.config, "reward_mean")
    assert AutoTokenizer.from_pretrained(out / "tokenizer").pad_token == rlhf.PAD
    for f in ("sft_loss.png", "rm_curve.png", "ppo_reward.png", "ppo_kl.png", "overview.png", "eval.md",
              "samples.md", "sft_metrics.jsonl", "rm_metrics.jsonl", "ppo_metrics.jsonl"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    for stage in rlhf.STAGES:
        assert stage in summary
    assert {"acc_gold", "acc_gold_helpful", "acc_label"} <= set(summary["rm"]["heldout"])
    assert 0 <= summary["eval"]["win_rate_ppo_over_sft"] <= 1
    assert summary["eval"]["sft"]["kl"] == pytest.approx(0, abs=1e-4)  # the reference is the SFT model
    row = json.loads((out / "ppo_metrics.jsonl").read_text().splitlines()[-1])
    for key in ("rm_score", "gold", "kl", "kl_coef", "entropy", "pg_loss", "vf_loss", "clipfrac", "approx_kl",
                "response_len"):
        assert math.isfinite(row[key]), key
    # a later stage alone reruns from the files of the earlier ones, and its entry keeps its own flags
    rlhf.main(["--stage", "eval", "--out_dir", str(out)] + SMOKE + ["--eval_samples", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["config"]["eval_samples"] == 2 and summary["ppo"]["config"]["eval_samples"] == 1
    assert summary["eval"]["n_samples"] == 2 * summary["eval"]["n_prompts"]


def test_a_cpu_run_repeats_exactly_with_the_same_seed(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        for stage in ("data", "tokenizer", "sft"):
            rlhf.main(["--stage", stage, "--out_dir", str(out)] + SMOKE)
        runs.append((out / "sft_metrics.jsonl").read_text())
    assert runs[0] == runs[1]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = str(tmp_path)
    for stage in ("data", "tokenizer", "sft"):
        rlhf.main(["--stage", stage, "--out_dir", out] + SMOKE)
    before = open(os.path.join(out, "sft", "model.safetensors"), "rb").read()
    with pytest.raises(SystemExit) as e:
        rlhf.main(["--stage", "sft", "--out_dir", out, "--sft_lr", "1e30", "--warmup_frac", "0"] + SMOKE)
    assert "loss became" in str(e.value.code) and "at step" in str(e.value.code)
    assert open(os.path.join(out, "sft", "model.safetensors"), "rb").read() == before


def test_pretrained_model_path_with_a_local_checkpoint(tmp_path):
    """--model takes a Hugging Face folder (here a small GPT-2 saved by the test, with a
    tokenizer that has no pad token, like gpt2's): a pad token is added and the
    embeddings resized; every stage runs."""
    from transformers import GPT2Config, GPT2LMHeadModel
    ckpt = tmp_path / "my-gpt2"
    merges = rlhf.train_bpe([r["prompt"] + r["response"] for r in rlhf.make_dataset(
        rlhf.Config(n_sft=100, n_pref=1))["sft_train"]], 600)
    rlhf.save_tokenizer(merges, str(ckpt), 256)
    cfgfile = ckpt / "tokenizer_config.json"
    config = json.loads(cfgfile.read_text())
    del config["pad_token"]
    cfgfile.write_text(json.dumps(config))
    (ckpt / "vocab.json").write_text(json.dumps({k: v for k, v in json.loads(
        (ckpt / "vocab.json").read_text()).items() if k != rlhf.PAD}, ensure_ascii=False))
    n_vocab = len(merges) + 257  # bytes + merges + <|endoftext|>, no pad
    GPT2LMHeadModel(GPT2Config(vocab_size=n_vocab, n_positions=256, n_embd=32, n_layer=1, n_head=2)).save_pretrained(ckpt)
    out = tmp_path / "run"
    rlhf.main(["--stage", "all", "--out_dir", str(out), "--model", str(ckpt)] + SMOKE)
    from transformers import AutoModelForCausalLM
    ppo = AutoModelForCausalLM.from_pretrained(out / "ppo")
    assert ppo.config.vocab_size == n_vocab + 1 and ppo.config.pad_token_id == n_vocab


# ---------------------------------------------------------------------------- the course: tutorial.md and course.py

HERE = os.path.dirname(os.path.abspath(__file__))
HAS_COURSE = os.path.exists(os.path.join(HERE, "course.py"))  # the student copy leaves course.py out
needs_course = pytest.mark.skipif(not HAS_COURSE, reason="course.py is not in the student copy")


def tutorial_blocks(lang, doc="tutorial.md"):
    text = open(os.path.join(HERE, doc), encoding="utf-8").read()
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_tutorial_code_quotes_are_lines_of_rlhf_py():
    """Every ```python block of the tutorial quotes rlhf.py: its lines appear there, in order
    ('...' marks a gap), so the tutorial cannot drift from the code."""
    code = [line.strip() for line in open(rlhf.__file__, encoding="utf-8").read().splitlines()]
    blocks = tutorial_blocks("python")
    assert len(blocks) >= 5
    for block in blocks:
        at = 0
        for line in (x.strip() for x in block.splitlines()):
            if line and line != "...":
                assert line in code[at:], f"tutorial.md quotes a line rlhf.py does not have (after line {at}): {line}"
                at = code.index(line, at) + 1


@pytest.mark.parametrize("func", ["make_dataset", "train_bpe", "stage_sft", "stage_rm", "stage_ppo", "stage_eval"])
def test_tutorial_lists_the_same_numbered_steps_as_the_code(func):
    import inspect
    code_steps = set(re.findall(r"^\s*(?:# )?(\d+)\. ", inspect.getsource(getattr(rlhf, func)), re.M))
    text = open(os.path.join(HERE, "tutorial.md"), encoding="utf-8").read()
    section = re.split(r"\*\*What you see|\n## ", text.split(f"**The steps of `{func}`")[1])[0]
    tutorial_steps = set(re.findall(r"^(?:\*\*)?(\d+)\. ", section, re.M))
    assert code_steps == tutorial_steps and len(code_steps) >= 3, (code_steps, tutorial_steps)


@pytest.mark.parametrize("doc, at_least", [("tutorial.md", 20), ("README.md", 5)])
def test_tutorial_commands_parse(doc, at_least):
    """Every `python rlhf.py`, `python course.py` and `pytest -k` command of the tutorial and the
    README (```bash blocks and inline) is valid as written: known flags and values, existing
    subcommands, tests that exist, and the error a line says it gives."""
    if HAS_COURSE:
        import course
    test_names = [name for name in globals() if name.startswith("test_")]
    text = open(os.path.join(HERE, doc), encoding="utf-8").read()
    lines = [line for block in tutorial_blocks("bash", doc) for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(python [^`]+)`", text)  # inline commands, such as the grading ones
    n_commands = 0
    for line in lines:
        words = [re.sub(r"\$\w+", "0.1", w) for w in shlex.split(line, comments=True)]
        if words[:2] == ["python", "rlhf.py"] and "--help" in words:
            with pytest.raises(SystemExit) as e:
                rlhf.build_parser().parse_args(words[2:])
            assert e.value.code == 0
        elif words[:2] == ["python", "rlhf.py"]:
            cfg = rlhf.Config(**vars(rlhf.build_parser().parse_args(words[2:])))
            cfg = dataclasses.replace(cfg, device="cpu")  # a GPU line is checked as if on a CPU
            if "# rlhf.py: error: " in line:  # a line that shows an error must give that error
                with pytest.raises(rlhf.UserError) as e:
                    rlhf.check_config(cfg)
                assert str(e.value) == line.split("# rlhf.py: error: ")[1].strip()
            else:
                rlhf.check_config(cfg)
        elif words[:2] == ["python", "course.py"] and HAS_COURSE:
            course.build_parser().parse_args(words[2:])
        elif words[:3] == ["python", "-m", "pytest"] and "-k" in words:
            for expression in words[words.index("-k") + 1].split(" or "):
                assert any(expression in name for name in test_names), f"no test matches -k {expression}"
        else:
            continue
        n_commands += 1
    assert n_commands >= at_least


@needs_course
def test_tutorial_has_every_exercise_with_its_grading_command():
    import course
    text = open(os.path.join(HERE, "tutorial.md"), encoding="utf-8").read()
    for n, (func, _, _) in course.EXERCISES.items():
        section = text.split(f"### Exercise {n}:")[1].split("\n### ")[0]
        assert f"`{func}(" in section and course.grading_command(n) in section, n
        assert "Hint" in section, n


@needs_course
def test_student_copy_blanks_only_the_exercise_bodies():
    import ast
    import course
    source = open(rlhf.__file__, encoding="utf-8").read()
    student = course.blank_functions(source, list(course.EXERCISES))
    names = {func: n for n, (func, _, _) in course.EXERCISES.items()}
    full_nodes, student_nodes = ast.parse(source).body, ast.parse(student).body
    assert len(full_nodes) == len(student_nodes)
    for a, b in zip(full_nodes, student_nodes):
        if isinstance(a, ast.FunctionDef) and a.name in names:
            assert ast.dump(a.args) == ast.dump(b.args) and ast.get_docstring(a) == ast.get_docstring(b)
            assert [type(x) for x in b.body] == [ast.Expr, ast.Raise]
            assert f"exercise {names[a.name]}:" in ast.unparse(b.body[1])
        else:
            assert ast.dump(a) == ast.dump(b)  # everything else is untouched
    # non-exercise lines (comments included) are kept byte for byte
    assert "# Stage 3: PPO with a KL penalty" in student and student.count("\n") < source.count("\n")


@needs_course
def test_a_run_of_the_student_copy_names_the_first_missing_exercise(tmp_path):
    import course
    import importlib.util
    (tmp_path / "rlhf.py").write_text(course.blank_functions(open(rlhf.__file__, encoding="utf-8").read(),
                                                             list(course.EXERCISES)), encoding="utf-8")
    spec = importlib.util.spec_from_file_location("rlhf_student", tmp_path / "rlhf.py")
    student = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(student)
    with pytest.raises(SystemExit) as e:
        student.main(["--stage", "all", "--out_dir", str(tmp_path / "run")] + SMOKE)
    assert str(e.value.code) == "rlhf.py: error: exercise 1: write train_bpe() (see tutorial.md, Exercises)"
    assert (tmp_path / "run" / "data" / "sft_train.jsonl").exists()  # the stage before it finished


@needs_course
def test_each_exercise_fails_without_its_code_and_passes_with_it():
    """course.py check: on the full rlhf.py each grading command passes; on the student copy
    it fails; with only that one exercise blank it fails, with that exercise's own error."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "course.py"), "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
