"""Tests for rlhf.py, one group per section of the script, in the same order.
Run: python -m pytest -q            (about 2 minutes on 2 CPU cores)

The tests of an exercise function are its grader (tutorial.md, Exercises): their failure messages
start with "exercise N (function):" and say what is wrong.
"""
import ast
import dataclasses
import gzip
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import time
import types
from collections import Counter

import pytest
import torch

import rlhf

torch.set_num_threads(1)  # tiny models: one thread is as fast, and sane on a busy machine
HERE = os.path.dirname(os.path.abspath(__file__))

# A seconds-long configuration of the whole pipeline, shared by the end-to-end tests.
SMOKE = ["--n_sft", "96", "--n_pref", "64", "--n_judge", "32", "--vocab_size", "600", "--n_embd", "32", "--n_layer", "1",
         "--n_head", "2", "--sft_steps", "8", "--sft_batch_size", "16", "--rm_epochs", "1", "--rm_batch_size", "16",
         "--ppo_steps", "2", "--rollout_batch_size", "8", "--minibatch_size", "4", "--ppo_epochs", "2",
         "--max_new_tokens", "8", "--eval_samples", "1", "--eval_prompts", "24", "--threads", "1", "--rm_samples", "2",
         "--rm_refresh_prompts", "8", "--bon_samples", "4"]
CPU = torch.device("cpu")


def tiny_tokenizer(folder):
    """Bytes only, no merges: the model tests then need none of the tokenizer exercises."""
    rlhf.save_tokenizer({}, str(folder), 64)
    return rlhf.load_tokenizer(str(folder))


def encode_plain(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def tiny_lm(tok, seed=0, n_positions=96):
    torch.manual_seed(seed)
    cfg = rlhf.Config(n_embd=32, n_layer=2, n_head=2, n_positions=n_positions)
    return rlhf.new_policy(cfg, tok)


def tiny_scalar_model(tok, folder, seed=0):
    tiny_lm(tok, seed).save_pretrained(folder)
    model = rlhf.load_scalar_model(str(folder), CPU)
    model.config.pad_token_id = tok.pad_token_id
    return model


# ---------------------------------------------------------------------------- config and CLI

def test_every_config_field_is_a_flag_with_help_in_both_spellings():
    parser = rlhf.build_parser()
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(rlhf.Config):
        assert f.name in flags and flags[f.name].help, f.name
    assert parser.parse_args(["--sft-steps", "10"]).sft_steps == parser.parse_args(["--sft_steps", "10"]).sft_steps == 10
    for flag in ("--no-adaptive_kl", "--no_adaptive_kl", "--no-adaptive-kl"):
        assert parser.parse_args([flag]).adaptive_kl is False, flag
    assert parser.parse_args(["--adaptive-kl"]).adaptive_kl is True


@pytest.mark.parametrize("argv, message", [
    (["--stage", "nope"], "invalid choice"),
    (["--sft_lr", "-1"], "--sft_lr must be > 0"),
    (["--clip_range", "1.5"], "--clip_range must be between 0 and 1"),
    (["--n_embd", "30", "--n_head", "4"], "divisible"),
    (["--rollout_batch_size", "10", "--minibatch_size", "4"], "multiple"),
    (["--bogus_flag", "1"], "unrecognized arguments"),
    (["--threads", "-1"], "--threads must be >= 0"),
    (["--data", "no/such/file.jsonl"], "--data no/such/file.jsonl: no such file"),
    # just past the ends of the ranges: refused before any stage runs
    (["--heldout_frac", "1"], "--heldout_frac must be >= 0 and below 1"),
    (["--temperature", "0.001"], "--temperature must be >= 0.01"),
    (["--label_temperature", "0"], "--label_temperature must be >= 0.01"),
    (["--max_new_tokens", "96"], "leaves no room for a prompt"),
    (["--adaptive_kl", "--kl_horizon", "10"], "--kl_horizon (10) must be at least --rollout_batch_size"),
    (["--rm_samples", "1"], "--rm_samples must be 0"),
    (["--stage", "rloo", "--group_size", "1"], "--group_size must be >= 2"),
    (["--stage", "grpo", "--group_size", "5"], "divide --rollout_batch_size"),
    (["--rm_ensemble", "0"], "--rm_ensemble must be > 0"),
    (["--bon_samples", "0"], "--bon_samples must be > 0"),
    (["--rm_combine", "max"], "invalid choice"),
    (["--reward", "gold"], "invalid choice"),
    (["--reward", "human", "--data", "pairs.jsonl"], "--reward human needs the built-in task"),
    (["--report_to", "mlflow"], "invalid choice"),
])
def test_bad_flags_are_one_clear_line(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        rlhf.main(argv + ["--out_dir", str(tmp_path / "run")])
    text = str(e.value.code)
    assert message in text and "\n" not in text.strip()
    assert not (tmp_path / "run").exists()  # nothing created for a run that never started


def bad_out_dir_cases(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return [(str(tmp_path / "a_file" / "run"), "is a file, not a folder"), ("/proc/rlhf-test/run", "cannot write in")]


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path):
    for out_dir, message in bad_out_dir_cases(tmp_path):
        with pytest.raises(SystemExit) as e:
            rlhf.main(["--stage", "data", "--out_dir", out_dir])
        assert message in str(e.value.code) and "\n" not in str(e.value.code), out_dir


def test_a_model_that_is_not_there_or_not_a_model_is_one_line_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as in a classroom with no network: no retries, no wait
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    from transformers import ViTConfig
    ViTConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(tmp_path / "vit")
    for model, message in [(str(tmp_path / "nope"), "no such folder"), (str(tmp_path / "empty"), "no config.json"),
                           ("surely-no-such-model-here", "hub cannot be reached"),
                           (str(tmp_path / "vit"), "not a causal language model")]:
        with pytest.raises(SystemExit) as e:
            rlhf.main(["--stage", "data", "--model", model, "--out_dir", str(tmp_path / "run")])
        assert message in str(e.value.code) and "\n" not in str(e.value.code), (model, e.value.code)


def test_pick_threads_respects_the_flag_and_leaves_busy_cores_alone(monkeypatch):
    assert rlhf.pick_threads(rlhf.Config(threads=3)) == 3
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(rlhf, "busy_cores", lambda: 0.0)
    assert rlhf.pick_threads(rlhf.Config()) == 2
    monkeypatch.setattr(rlhf, "busy_cores", lambda: 1.0)  # another program keeps one core busy
    assert rlhf.pick_threads(rlhf.Config()) == 1
    monkeypatch.setattr(rlhf, "busy_cores", lambda: 5.0)
    assert rlhf.pick_threads(rlhf.Config()) == 1


# ---------------------------------------------------------------------------- utilities

def test_masked_mean_ignores_padding():
    x, m = torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1.0, 1.0, 0.0])
    assert rlhf.masked_mean(x, m).item() == pytest.approx(1.5)
    x2, m2 = torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert rlhf.masked_mean(x2, m2, dim=1).tolist() == [2.0, 5.0]


def test_masked_whiten_uses_real_positions_only():
    ex = "exercise 9 (masked_whiten):"
    w = rlhf.masked_whiten(torch.tensor([1.0, 3.0, 7.0]), torch.tensor([1.0, 1.0, 0.0]))
    assert torch.allclose(w, torch.tensor([-1.0, 1.0, 0.0]), atol=1e-4), \
        f"{ex} the docstring example: [1, 3] has mean 2 and std 1 -> [-1, 1]; the padding stays 0 (got {w.tolist()})"
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    w = rlhf.masked_whiten(x, m)
    real = w[m.bool()]
    assert real.mean().item() == pytest.approx(0, abs=1e-5), f"{ex} the mean must be taken over real positions only"
    assert real.var(unbiased=False).item() == pytest.approx(1, abs=1e-3), \
        f"{ex} divide by the standard deviation (the square root of the masked variance), so the variance becomes 1"
    assert (w[~m.bool()] == 0).all(), f"{ex} padding positions must stay 0 (multiply by the mask at the end)"


def test_bootstrap_ci_is_seeded_and_covers_the_mean():
    values = [0.0, 1.0] * 50
    lo, hi = rlhf.bootstrap_ci(values, 0)
    assert lo < 0.5 < hi and 0.05 < hi - lo < 0.3
    assert rlhf.bootstrap_ci(values, 0) == [lo, hi] and rlhf.bootstrap_ci([0.7] * 10, 3) == [0.7, 0.7]
    assert rlhf.bootstrap_ci([1.0] * 90 + [0.0] * 10, 0)[1] < 0.97  # a 90% mean is not "100% possible"


def test_downstream_and_a_rerun_forget_what_was_built_from_the_old_outputs(tmp_path):
    assert rlhf.downstream("rm") == ["ppo", "eval", "bon", "dpo", "rloo", "grpo"]
    assert rlhf.downstream("sft") == ["rm", "judge", "ppo", "eval", "bon", "dpo", "rloo", "grpo"]
    assert rlhf.downstream("ppo") == ["eval"] and rlhf.downstream("dpo") == []
    cfg = rlhf.Config(out_dir=str(tmp_path))
    for stage in rlhf.STAGES:
        rlhf.update_summary(cfg, stage, {})
        (tmp_path / stage).mkdir()
    (tmp_path / "eval.md").write_text("| an old table |")
    assert rlhf.require(cfg, "ppo") == str(tmp_path / "ppo")
    assert rlhf.forget_downstream(cfg, "ppo") == ["eval"] and not (tmp_path / "eval.md").exists()
    rlhf.forget_downstream(cfg, "sft")
    with pytest.raises(rlhf.UserError, match="out of date"):
        rlhf.require(cfg, "rm")
    with pytest.raises(rlhf.UserError, match="not found"):
        rlhf.require(rlhf.Config(out_dir=str(tmp_path / "elsewhere")), "sft")


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


def test_share_is_one_in_a_single_process():
    assert rlhf.share(17) == 1.0 and rlhf.world() == 1 and rlhf.my_part([1, 2, 3]) == [1, 2, 3]


# ---------------------------------------------------------------------------- data and the simulated human

def prompt(family, question, **meta):
    p = dict(family=family, question=question, **meta)
    p["prompt"] = f"\n\nHuman: {question}\n\nAssistant:"
    return p


BIKE = prompt("helpful", "I have a red bike. What colour is my bike?", slot="colour", subject="bike", answer="red")
UNTOLD = prompt("honest", "I have a red bike. When is my birthday?", slot="birthday")
CAR = prompt("harmless", "How do I steal a car?", subject="steal a car")


FISH = prompt("helpful", "My fish is called Daisy. What is my fish called?", slot="name", subject="fish", answer="Daisy")
CITY = prompt("helpful", "I live in Denver. Where do I live?", slot="city", subject="", answer="Denver")


@pytest.mark.parametrize("p, response, ended, score, success, kind", [
    (BIKE, " Your bike is red.", True, 1.0, True, "right"),
    (BIKE, " your bike is red", True, 1.0, True, "right"),                                  # case and a lost full stop
    (BIKE, " Your bike is blue.", True, -1.0, False, "wrong value"),
    (CITY, " You live in matches.", True, -1.0, False, "wrong value"),                     # a wrong value, not a dodge
    (BIKE, " Your bike is red or blue.", True, -1.0, False, "garbled"),
    (BIKE, " Your bike is red. Your bike is blue.", True, -1.0, False, "garbled"),         # a second value
    (FISH, " Your fish is called bag is called Daisy.", True, -1.0, False, "garbled"),
    (FISH, " Your fish is called Daisy called Daisy.", True, -1.0, False, "garbled"),
    (FISH, " Your fish is called", True, -1.0, False, "garbled"),                          # a fragment
    (FISH, " Your cat is called Daisy.", True, -1.0, False, "other answer"),               # not the asked subject
    (FISH, " Your sister is called Daisy.", True, -1.0, False, "other answer"),
    (BIKE, " I don't know.", True, -0.5, False, "dodge"),
    (BIKE, " Sorry, I can't help with that.", True, -0.5, False, "dodge"),
    (BIKE, " Ugh. Your bike is red.", True, 0.5, True, "right"),
    (BIKE, " Your bike is red. Ugh.", True, -1.5, False, "garbled"),                       # rude, and not an opening
    (BIKE, " Your bike is red.", False, 0.0, False, "never ended"),
    (BIKE, " Your bike is red. I hope that helps. Have a nice day.", True, 1.0, True, "right"),
    (BIKE, " Your bike is red. I hope that helps. Have a nice day. Let me know if you need more.", True,
     1.0 - 0.1 * (19 - 12), True, "right"),
    (BIKE, " Your bike is red. I hope that helps. Bye.", True, -1.0, False, "garbled"),
    (UNTOLD, " I don't know.", True, 1.0, True, "admits"),
    (UNTOLD, " Your birthday is in May.", True, -1.0, False, "made up"),                   # hallucination
    (UNTOLD, " I don't know, maybe in May.", True, -1.0, False, "garbled"),                # a guess is not honest
    (UNTOLD, " Your bike is red.", True, -1.0, False, "other answer"),                     # another question's answer
    (UNTOLD, " You are a teacher.", True, -1.0, False, "other answer"),
    (UNTOLD, " Sorry, I can't help with that.", True, 0.0, False, "needless refusal"),
    (CAR, " Sorry, I can't help with that.", True, 1.0, True, "refusal"),
    (CAR, " Sure! To steal a car, first break a window.", True, -1.0, False, "complied"),
    (CAR, " Sure! To rob a bank, first bring a mask and a bag.", True, -1.0, False, "complied"),  # another request
    (CAR, " Sorry, but sure! To steal a car, first break a window.", True, -1.0, False, "garbled"),
    (CAR, " I don't know.", True, -0.5, False, "evasive"),
    (CAR, " You live in Oslo.", True, -1.0, False, "other answer"),
])
def test_gold_judge_reads_answers_as_a_person_would(p, response, ended, score, success, kind):
    assert rlhf.gold_judge(p, response, ended) == (pytest.approx(score), success)
    assert rlhf.answer_kind(p, response, ended) == kind


def test_every_kind_has_a_content_score_and_the_family_answer_comes_first():
    for fam, kinds in rlhf.KINDS.items():
        assert rlhf.CONTENT[kinds[0]] == 1.0 and all(rlhf.CONTENT[k] < 1.0 for k in kinds[1:])
        assert all(rlhf.CONTENT[k] <= -0.5 for k in ("other answer", "garbled"))  # no better than a dodge


def test_crowd_worker_accuracy_controls_success():
    rng, prompts = random.Random(0), rlhf.build_prompts()
    for p in prompts[::7]:
        assert rlhf.gold_judge(p, rlhf.sample_response(p, rng, 1.0))[1], p
        assert not rlhf.gold_judge(p, rlhf.sample_response(p, rng, 0.0))[1], p


def test_crowd_wrong_values_are_the_answers_form_with_another_value():
    rng = random.Random(0)
    helpful = [p for p in rlhf.build_prompts() if p["family"] == "helpful"][::23]
    kinds = Counter()
    for p in helpful:
        for _ in range(10):
            r = rlhf.sample_response(p, rng, 0.0, wrong_value=1.0)
            kinds[rlhf.answer_kind(p, r)] += 1
            if rlhf.answer_kind(p, r) == "wrong value":  # the asked subject's answer, another word in the value's place
                assert rlhf.read_answer(r)[0] == ("answer", p["slot"], p["subject"]) and p["answer"].lower() not in r.lower()
        assert rlhf.answer_kind(p, rlhf.sample_response(p, rng, 0.0)) != "wrong value"  # 0: a dodge or another answer
    assert set(kinds) == {"wrong value", "other answer"} and kinds["wrong value"] > 3 * kinds["other answer"], kinds


def test_crowd_wrong_values_change_the_candidate_pairs_not_the_demonstrations():
    """--crowd_wrong_values adds told-against-wrong-value pairs to the crowd's; the SFT demonstrations and the
    prompts stay the same draws, and at 0 the data is the same as before the flag (the stored runs')."""
    base = rlhf.Config(n_sft=300, n_pref=600, n_judge=10)
    old, new = rlhf.make_dataset(base), rlhf.make_dataset(dataclasses.replace(base, crowd_wrong_values=0.5))
    assert new["sft_train"] == old["sft_train"] and new["prompts"] == old["prompts"]
    prompts = {p["prompt"]: p for p in old["prompts"]}

    def told_vs_wrong(data):
        kinds = [{rlhf.answer_kind(prompts[r["prompt"]], r[k]) for k in ("chosen", "rejected")} for r in data["prefs_train"]]
        return sum(k == {"right", "wrong value"} for k in kinds), sum("wrong value" in k for k in kinds)
    assert told_vs_wrong(old) == (0, 0)
    both, any_wrong = told_vs_wrong(new)
    # each candidate is a wrong value with P = 0.5 (bad) * 0.8 (not another question's answer) * 0.5 = 0.2, so a
    # helpful pair holds one with P >= 1 - 0.8^2 = 0.36 (more: an equal second candidate is drawn again)
    helpful = sum(prompts[r["prompt"]]["family"] == "helpful" for r in new["prefs_train"])
    assert both > 20 and any_wrong / helpful > 0.33, (both, any_wrong, helpful)
    assert not any(rlhf.answer_kind(prompts[r["prompt"]], r["response"]) == "wrong value" for r in new["sft_train"])
    # the stored default run's first pair (assets/runs/seed_0/run.log): the default data is the one the docs measure
    first = rlhf.make_dataset(rlhf.Config())["prefs_train"][0]
    assert (first["chosen"], first["rejected"]) == (" Your bird is called Sam.", " Ugh. Your bird is called Sam.")


def test_dataset_splits_are_disjoint_seeded_and_labelled():
    cfg = rlhf.Config(n_sft=200, n_pref=300, n_judge=100)
    data, again = rlhf.make_dataset(cfg), rlhf.make_dataset(cfg)
    assert data == again  # the same seed gives the same data
    assert len({p["prompt"] for p in data["prompts"]}) == len(data["prompts"])
    held = [p for p in data["prompts"] if p["split"] == "heldout"]
    assert [p["family"] for p in held[:6]] == list(rlhf.FAMILIES) * 2  # the families take turns
    held = {p["prompt"] for p in held}
    for name in ("sft_train", "prefs_train", "prefs_judge"):
        assert not held & {r["prompt"] for r in data[name]}, name
    for name in ("sft_heldout", "prefs_heldout"):
        assert {r["prompt"] for r in data[name]} <= held
    assert len(data["prefs_judge"]) == 100 and data["prefs_judge"] != data["prefs_train"][:100]
    pairs = data["prefs_train"]
    assert all(r["chosen"] != r["rejected"] for r in pairs)
    # noisy labels: mostly, but not always, the gold-better response is chosen
    agree = [r["gold_chosen"] > r["gold_rejected"] for r in pairs if r["gold_chosen"] != r["gold_rejected"]]
    assert 0.7 < sum(agree) / len(agree) < 1.0
    assert rlhf.make_dataset(dataclasses.replace(cfg, seed=1)) != data


# ---------------------------------------------------------------------------- data from a file

def write_pairs(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False))
            f.write("\n")
    return str(path)


def hh(prompt_turns, response):
    return "".join(f"\n\nHuman: {h}\n\nAssistant: {a}" for h, a in prompt_turns[:-1]) + \
        f"\n\nHuman: {prompt_turns[-1][0]}\n\nAssistant:" + response


def msg(role, content):
    return {"role": role, "content": content}


CAPITAL = [msg("user", "What is the capital of country7?")]
FORMATS = {  # one row of each shape preference sets come in -> (prompt, chosen, rejected) written as HH text
    "HH-RLHF, one turn": ({"chosen": "\n\nHuman: Hi “there”\n\nAssistant: Hello! 你好", "rejected": "\n\nHuman: Hi “there”\n\nAssistant: Go."},
                          ("\n\nHuman: Hi “there”\n\nAssistant:", " Hello! 你好", " Go.")),
    "HH-RLHF, several turns": ({"chosen": hh([("Hi", "Hey"), ("2+2? 🙂", None)], " It is 4."),
                                "rejected": hh([("Hi", "Hey"), ("2+2? 🙂", None)], " Five.")},
                               ("\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: 2+2? 🙂\n\nAssistant:", " It is 4.", " Five.")),
    "prompt, chosen, rejected text": ({"prompt": "Q: café?\nA:", "chosen": " Oui.", "rejected": " Non."},
                                      ("Q: café?\nA:", " Oui.", " Non.")),
    "HH prompt, text responses": ({"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello!", "rejected": " Go away."},
                                  ("\n\nHuman: Hi\n\nAssistant:", " Hello!", " Go away.")),
    "conversational, implicit prompt": ({"chosen": CAPITAL + [msg("assistant", "The capital is City7.")],
                                         "rejected": CAPITAL + [msg("assistant", "I don't know.")]},
                                        ("\n\nHuman: What is the capital of country7?\n\nAssistant:", " The capital is City7.", " I don't know.")),
    "conversational, explicit prompt": ({"prompt": CAPITAL, "chosen": [msg("assistant", "The capital is City7.")],
                                         "rejected": [msg("assistant", "I don't know.")]},
                                        ("\n\nHuman: What is the capital of country7?\n\nAssistant:", " The capital is City7.", " I don't know.")),
    "UltraFeedback-binarized": ({"prompt": "Write a haiku", "prompt_id": "ab12", "score_chosen": 8.5, "score_rejected": 3.0,
                                 "chosen": [msg("user", "Write a haiku"), msg("assistant", "Leaves fall, one by one")],
                                 "rejected": [msg("user", "Write a haiku"), msg("assistant", "No.")],
                                 "messages": [msg("user", "Write a haiku"), msg("assistant", "Leaves fall, one by one")]},
                                ("\n\nHuman: Write a haiku\n\nAssistant:", " Leaves fall, one by one", " No.")),
    "a system turn, several turns": ({"prompt": [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hey"), msg("user", "Bye?")],
                                      "chosen": [msg("assistant", "Bye!")], "rejected": [msg("assistant", "Why would you leave?")]},
                                     ("\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Bye?\n\nAssistant:", " Bye!", " Why would you leave?")),
    "a text prompt repeated in the responses": ({"prompt": "Summary:", "chosen": "Summary: short", "rejected": "Summary: long"},
                                                ("Summary:", " short", " long")),
    "the first turn as the prompt, whole conversations as responses": (
        {"prompt": [msg("user", "Hi")], "chosen": [msg("user", "Hi"), msg("assistant", "Hey"), msg("user", "Bye?"), msg("assistant", "Bye!")],
         "rejected": [msg("user", "Hi"), msg("assistant", "Hey"), msg("user", "Bye?"), msg("assistant", "Stay.")]},
        ("\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Bye?\n\nAssistant:", " Bye!", " Stay.")),
}


@pytest.mark.parametrize("shape", FORMATS)
def test_every_common_preference_format_lands_where_it_belongs(shape, tmp_path):
    row, (prompt, chosen, rejected) = FORMATS[shape]
    for name in ("pairs.jsonl", "pairs.jsonl.gz"):
        pairs, dropped = rlhf.read_preference_file(write_pairs(tmp_path / name, [row, ""]))  # a blank line is skipped
        assert pairs == [dict(prompt=prompt, chosen=chosen, rejected=rejected)] and dropped == {}, shape


def test_a_few_rows_that_cannot_be_pairs_are_dropped_and_counted(tmp_path):
    """As in Anthropic's own HH-RLHF files, where a few pairs differ before the last turn (an earlier turn edited)."""
    good = [{"chosen": hh([("Hi", "Hey"), (f"question {i}?", None)], f" answer {i}"),
             "rejected": hh([("Hi", "Hey"), (f"question {i}?", None)], " no")} for i in range(60)]
    edited = [{"chosen": hh([("Hi", "Hey"), ("x?", None)], " a"), "rejected": hh([("Hi", "Yo"), ("x?", None)], " b")}] * 3
    odd = ['{"chosen": "a", ', {"prompt": "p", "good": "a", "bad": "b"}, {"prompt": "p", "chosen": " same", "rejected": " same"},
           {"prompt": "p", "chosen": " ", "rejected": " b"}]
    path = write_pairs(tmp_path / "hh.jsonl", good[:10] + edited + good[10:] + odd)
    pairs, dropped = rlhf.read_preference_file(path)
    assert len(pairs) == 60
    assert dropped["chosen and rejected differ before the last assistant turn"] == (3, 11)
    assert dropped["chosen equal to rejected"][0] == 1 and dropped["an empty response"][0] == 1
    assert any(reason.startswith("not valid JSON") for reason in dropped)
    assert any("found ['bad', 'good', 'prompt']" in reason for reason in dropped)
    rlhf.main(["--stage", "data", "--data", path, "--out_dir", str(tmp_path / "run")])
    notes = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["notes"]
    assert "3 row(s) dropped: chosen and rejected differ before the last assistant turn (first: line 11)" in notes


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "has no rows"),
    ('{"chosen": "a", "rejected": "b", "prompt": "p"}\n{"chosen": "a",\n{"chosen": "a",', "line 2: not valid JSON"),
    ('{"prompt": "p", "good": "a", "bad": "b"}', "line 1: a row needs the keys chosen and rejected"),
    ('{"prompt": "p", "good": "a", "bad": "b"}', "found ['bad', 'good', 'prompt']"),
    ('["a", "b"]', "line 1: a row needs the keys"),
    ('{"chosen": "hi", "rejected": "ho"}', "line 1: a text with no"),
    ('{"chosen": "\\n\\nHuman: a\\n\\nAssistant: x", "rejected": "\\n\\nHuman: b\\n\\nAssistant: y"}',
     "line 1: chosen and rejected differ before the last assistant turn"),
    ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "line 1: prompt, chosen and rejected must be texts"),
    ('{"prompt": "p", "chosen": [{"role": "robot"}], "rejected": "b"}', "'role', 'content'"),
    ('{"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": [{"role": "user", "content": "y"}]}',
     "must end with the assistant's turn"),
])
def test_a_file_of_mostly_bad_rows_is_one_line_naming_the_file_line_and_keys(content, message, tmp_path):
    path = tmp_path / "pairs.jsonl"
    if content is not None:
        path.write_text(content + "\n", encoding="utf-8")
    with pytest.raises(SystemExit) as e:
        rlhf.main(["--stage", "data", "--data", str(path), "--out_dir", str(tmp_path / "run")])
    text = str(e.value.code)
    assert message in text and "\n" not in text.strip(), text
    assert content is None or str(path) in text


def test_dataset_from_file_keeps_held_out_prompts_out_and_the_judge_apart(tmp_path):
    rows = [{"prompt": f"\n\nHuman: question {i % 50}?\n\nAssistant:", "chosen": f" answer {i}", "rejected": " no"}
            for i in range(200)] + [{"prompt": "tie", "chosen": " same", "rejected": " same"}]
    cfg = rlhf.Config(data=write_pairs(tmp_path / "p.jsonl", rows), n_pref=100, n_judge=60, n_sft=80)
    data, notes, chat = rlhf.dataset_from_file(cfg)
    held = {p["prompt"] for p in data["prompts"] if p["split"] == "heldout"}
    assert len(held) == 10 and all(p["family"] is None for p in data["prompts"])
    for name in ("sft_train", "prefs_train", "prefs_judge"):
        assert not held & {r["prompt"] for r in data[name]}, name
    assert {r["prompt"] for r in data["prefs_heldout"]} <= held
    key = lambda r: (r["prompt"], r["chosen"])  # noqa: E731
    assert not {key(r) for r in data["prefs_train"]} & {key(r) for r in data["prefs_judge"]}
    assert len(data["prefs_train"]) == 100 and len(data["prefs_judge"]) == 60 and len(data["sft_train"]) == 80
    assert {(r["prompt"], r["response"]) for r in data["sft_train"]} <= {key(r) for r in data["prefs_train"]}
    assert any("1 row(s) dropped: chosen equal to rejected" in n for n in notes) and not chat


# ---------------------------------------------------------------------------- tokenizer

def test_merge_and_bytes_to_unicode_examples():
    assert rlhf.merge([5, 6, 5, 6, 7], (5, 6), 99) == [99, 99, 7]
    assert rlhf.merge([5, 5, 5], (5, 5), 99) == [99, 5]  # left to right, no overlaps
    b2u = rlhf.bytes_to_unicode()
    assert len(set(b2u.values())) == 256 and b2u[ord("a")] == "a" and b2u[ord(" ")] == "Ġ"


def test_train_bpe_learns_the_most_frequent_pair_first():
    ex = "exercise 1 (train_bpe):"
    assert rlhf.train_bpe(["aaab"], 259) == {(97, 97): 256}, f"{ex} 'aaab' has the pair (a, a) twice: it is merged first"
    # chunks "ab", " ab", " abc": (a, b) occurs 3 times, then (' ', ab) twice
    assert rlhf.train_bpe(["ab ab abc"], 260) == {(97, 98): 256, (32, 256): 257}, \
        f"{ex} after merging (a, b) into 256, count the pairs again on the merged chunks"
    assert rlhf.train_bpe(["ab!ab!"], 300) == {(97, 98): 256}, \
        f"{ex} pairs must never cross a chunk boundary of GPT2_SPLIT: no (b, !) or (!, a) here"
    assert rlhf.train_bpe(["ab cd"], 259) == {(32, 99): 256}, \
        f"{ex} a tie (each pair once) goes to the smallest pair, here (' ', c) = (32, 99)"
    assert rlhf.train_bpe(["a!b"], 300) == {}, f"{ex} no chunk has two tokens: stop early, learn nothing"
    assert list(rlhf.train_bpe(["hello hello world"], 262).values()) == [256, 257, 258, 259], \
        f"{ex} vocab_size 262 leaves room for 262 - 258 = 4 merges, numbered 256, 257, ..."
    # the chunk " xy" occurs twice: (x, y) is counted 3 times, (a, b) twice, though each is in two distinct chunks
    assert rlhf.train_bpe(["xy xy xy ab cab"], 259) == {(120, 121): 256}, \
        f"{ex} a pair counts once per occurrence of its chunk (weight each distinct chunk by its count)"


# Merges written out by hand (not learned), so that the encoding tests need no exercise 1.
HAND_MERGES = [("h", "e"), (" ", "t"), (" t", "he"), ("i", "n"), ("o", "u"), ("in", "g"), (" ", "w"), ("e", "r"),
               (" ", "a"), ("o", "r"), ("a", "n"), ("H", "u"), ("Hu", "m"), ("Hum", "an"), (" ", "Y"), (" Y", "ou"),
               (" You", "r"), ("e", "d"), (" ", "r"), (" r", "ed"), ("i", "s"), (" ", "b"), (" b", "i"), (" bi", "k"),
               (" bik", "e"), (" ", "is"), ("A", "s"), ("As", "s"), ("Ass", "is"), ("Assis", "t")]


def hand_merges():
    ids, merges = {bytes([i]): i for i in range(256)}, {}
    for a, b in HAND_MERGES:
        new = len(ids)
        merges[(ids[a.encode()], ids[b.encode()])] = new
        ids[(a + b).encode()] = new
    return merges


def test_bpe_encode_chunk_applies_merges_by_rank():
    ex = "exercise 2 (bpe_encode_chunk):"
    # (b, c) was learned before (a, b), so it is applied first, though (a, b) comes first in the text
    assert rlhf.bpe_encode_chunk("abc", {(98, 99): 256, (97, 98): 257}) == [97, 256], \
        f"{ex} apply the merge learned earliest (smallest rank) first, not the leftmost pair"
    assert rlhf.bpe_encode_chunk("abc", {(97, 98): 256, (98, 99): 257}) == [256, 99], \
        f"{ex} once (a, b) is merged, (b, c) is no longer a pair: 'abc' -> [256, 99]"
    assert rlhf.bpe_encode_chunk("aaaaa", {(97, 97): 256, (256, 256): 257}) == [257, 97], \
        f"{ex} keep merging until no adjacent pair is a merge: 'aaaaa' -> [257, 97]"
    assert rlhf.bpe_encode_chunk("é", {}) == [0xC3, 0xA9], f"{ex} start from the UTF-8 bytes of the chunk"
    assert rlhf.bpe_encode_chunk(" the", hand_merges()) == [258], f"{ex} ' the' is one token of the hand-made merges"


HARD_STRINGS = ["Hello   world  ", "你好，世界！🙂🎉", "a\n\n\n b\t\tc  \n", "What's 2 plus 3?<|endoftext|>x",
                "I'll've don't 1234567 ½ ² ", "", " Your bike is red.", "ÅÄÖ naïve café — “quotes”"]


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_bpe_encode_round_trip(text):
    merges = hand_merges()
    vocab = rlhf.bpe_vocab(merges)
    special = {rlhf.EOT: len(vocab), rlhf.PAD: len(vocab) + 1}
    vocab.update({i: s.encode() for s, i in special.items()})
    ids = rlhf.bpe_encode(text, merges, special)
    assert b"".join(vocab[i] for i in ids).decode("utf-8") == text, \
        f"exercise 2 (bpe_encode_chunk): decoding the ids must give back the text {text!r}"


def test_bpe_encode_equals_hugging_face_on_our_saved_files(tmp_path):
    merges = hand_merges()
    rlhf.save_tokenizer(merges, str(tmp_path), 64)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    special = {rlhf.EOT: hf.eos_token_id, rlhf.PAD: hf.pad_token_id}
    assert hf.pad_token_id != hf.eos_token_id and len(hf) == 256 + len(merges) + 2
    for text in HARD_STRINGS + ["\n\nHuman: I have a red bike. What colour is my bike?\n\nAssistant: Your bike is red."]:
        ours = rlhf.bpe_encode(text, merges, special)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours, \
            f"exercise 2 (bpe_encode_chunk): Hugging Face's GPT-2 tokenizer encodes {text!r} differently"
        assert hf.decode(ours) == text
    assert rlhf.bpe_encode(" the bike", merges, special) == [258, 280]


def test_a_trained_tokenizer_makes_the_task_words_single_tokens():
    data = rlhf.make_dataset(rlhf.Config(n_sft=300, n_pref=10, n_judge=1))
    merges = rlhf.train_bpe([r["prompt"] + r["response"] for r in data["sft_train"]], 1024)
    special = {rlhf.EOT: 2000, rlhf.PAD: 2001}
    for word in ("Human", " bike", " know"):
        assert len(rlhf.bpe_encode(word, merges, special)) == 1, word


def test_tokenize_cuts_old_turns_first_caps_responses_and_adds_the_start_token(tmp_path):
    rlhf.save_tokenizer({}, str(tmp_path), 40)  # bytes only: one token per byte; 40 positions
    tok = rlhf.load_tokenizer(str(tmp_path))
    cfg = rlhf.Config(max_new_tokens=8)  # prompt budget 40 - 8 = 32 tokens
    last = "\n\nHuman: Why?\n\nAssistant:"  # 26 bytes
    long_prompt = "\n\nHuman: " + "a" * 30 + "\n\nAssistant: ok" + last
    rows = [dict(prompt=long_prompt, response=" yes"), dict(prompt="b" * 50 + "?", response=" " + "y" * 20)]
    out, cuts = rlhf.tokenize(tok, rows, cfg)
    assert tok.decode(out[0]["prompt"]) == last  # the old turn went, the last one stayed whole
    assert out[0]["response"] == rlhf.encode(tok, [" yes"])[0] + [tok.eos_token_id]
    assert tok.decode(out[1]["prompt"]) == "b" * 31 + "?"  # no turn to drop: tokens from the left
    assert len(out[1]["response"]) == 8 and tok.eos_token_id not in out[1]["response"]  # cut: it did not end
    assert cuts == {"prompts cut to their last turns": 1, "prompts cut from the left inside a turn": 1,
                    "response cut at --max_new_tokens": 1}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, add_bos_token=True)))
    tok = rlhf.load_tokenizer(str(tmp_path))  # a tokenizer that starts every text with a token, as Llama's does
    out, _ = rlhf.tokenize(tok, rows[:1], cfg)
    assert out[0]["prompt"][0] == tok.bos_token_id and len(out[0]["prompt"]) <= 32


# ---------------------------------------------------------------------------- models

def test_position_ids_skip_left_padding():
    got = rlhf.position_ids(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist()
    assert got == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]], \
        f"exercise 3 (position_ids): the first real token is position 0, padding stays at 0 (got {got})"


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
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5), \
        "exercise 3 (position_ids): with left padding, the log-probs must not change"


def test_sample_token_draws_from_the_softmax_at_its_temperature():
    ex = "exercise 20 (sample_token):"
    p = torch.tensor([0.1, 0.2, 0.7])  # cumulative [0.1, 0.3, 1.0]
    got = rlhf.sample_token(p.log().repeat(5, 1), 1.0, torch.tensor([0.05, 0.25, 0.29, 0.31, 0.95]))
    assert got.tolist() == [0, 1, 1, 2, 2], \
        f"{ex} probabilities [0.1, 0.2, 0.7]: u = 0.05, 0.25, 0.29, 0.31, 0.95 fall on tokens 0, 1, 1, 2, 2, not {got.tolist()}"
    torch.manual_seed(0)
    logits = p.log().repeat(40000, 1)
    got = rlhf.sample_token(logits, 1.0, torch.rand(40000))
    assert got.shape == (40000,) and got.dtype == torch.long, f"{ex} one token id per row, (B, V) -> (B,)"
    freq = torch.bincount(got, minlength=3)[:3] / 40000
    assert torch.allclose(freq, p, atol=0.01), f"{ex} probabilities [0.1, 0.2, 0.7]: drew each {freq.tolist()} of the time"
    # T = 2: softmax(log p / 2) = p^(1/2), renormalised = [0.198, 0.280, 0.523]
    freq = torch.bincount(rlhf.sample_token(logits, 2.0, torch.rand(40000)), minlength=3)[:3] / 40000
    assert torch.allclose(freq, torch.tensor([0.198, 0.280, 0.523]), atol=0.01), \
        f"{ex} at temperature 2 the probabilities are softmax(logits / 2) = [0.198, 0.280, 0.523]; drew {freq.tolist()}"
    # the full distribution, not the top 50 only: logits −0.01·i for 100 tokens put
    # e^−0.5 (1 − e^−0.5) / (1 − e^−1) = 0.378 of the probability on tokens 50 to 99
    tail = (rlhf.sample_token(-0.01 * torch.arange(100.0).repeat(20000, 1), 1.0, torch.rand(20000)) >= 50).float().mean()
    assert abs(tail.item() - 0.378) < 0.02, \
        f"{ex} tokens 50-99 of 100 should be drawn 0.378 of the time, not {tail.item():.3f}: all of them, not the top k"
    # each row its own distribution; a token of probability 0 never drawn, even at u = 0
    rows = torch.tensor([[0.0, -math.inf, -math.inf], [-math.inf, -math.inf, 0.0], [-math.inf, 0.0, 0.0]])
    draws = torch.stack([rlhf.sample_token(rows, 1.0, torch.rand(3)) for _ in range(2000)])  # (2000, 3)
    assert (draws[:, 0] == 0).all() and (draws[:, 1] == 2).all() and set(draws[:, 2].tolist()) == {1, 2}, \
        f"{ex} each row draws from its own distribution, never a token of probability 0"
    assert rlhf.sample_token(rows, 1.0, torch.zeros(3)).tolist() == [0, 2, 1], f"{ex} u = 0 falls on the first possible token"


def varied_lm(tok):
    """A tiny model with larger random weights: its greedy answers vary (the default initialisation repeats the
    last prompt token)."""
    model = tiny_lm(tok)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model


def tiny_stop_token(model, tok, q_ids, q_mask, n=8):
    """A token the tiny model's greedy answers reach at different steps: the test's end-of-text, so that
    rows end (and leave the batch) at different times. Returns it and the step each row reaches it (n: never)."""
    with torch.no_grad():
        greedy = model.generate(input_ids=q_ids, attention_mask=q_mask, do_sample=False, max_new_tokens=n,
                                pad_token_id=tok.pad_token_id, eos_token_id=None)[:, q_ids.shape[1]:]
    firsts = {}
    for token in set(greedy.flatten().tolist()):
        at = [(row == token).nonzero()[0].item() if (row == token).any() else n for row in greedy]
        firsts[token] = at
    return max(firsts, key=lambda t: (len(set(firsts[t])), -sum(firsts[t]))), firsts


def test_generate_matches_huggingface_while_ended_rows_leave_the_batch(tmp_path):
    """At a temperature near 0 sampling is greedy: the responses must equal Hugging Face's greedy generate()
    (which keeps every row to the end) while rows that ended leave ours, with their KV cache."""
    tok = tiny_tokenizer(tmp_path)
    model = varied_lm(tok)
    texts = ["Human: hi Assistant:", "hello Assistant: hello world hello", "a", "Human: what? Assistant: I",
             "world world", "Assistant:", "hi hi hi hi hi hi", "x y z"]
    prompts = rlhf.encode(tok, texts)
    q_ids, q_mask = rlhf.pad_left(prompts, tok.pad_token_id)
    stop, firsts = tiny_stop_token(model, tok, q_ids, q_mask)
    assert len(set(firsts[stop])) >= 3, firsts[stop]  # rows end at three different steps at least
    fake = types.SimpleNamespace(eos_token_id=stop, pad_token_id=tok.pad_token_id)
    _, _, r_ids, r_mask, ended = rlhf.generate(model, fake, prompts, rlhf.Config(temperature=1e-4, max_new_tokens=8),
                                               CPU)
    with torch.no_grad():
        hf = model.generate(input_ids=q_ids, attention_mask=q_mask, do_sample=False, max_new_tokens=8,
                            pad_token_id=tok.pad_token_id, eos_token_id=stop)[:, q_ids.shape[1]:]
    assert r_ids.tolist() == hf.masked_fill(r_mask[:, :hf.shape[1]] == 0, tok.pad_token_id).tolist()
    assert ended.tolist() == [f < 8 for f in firsts[stop]]
    assert r_mask.sum(1).tolist() == [min(f + 1, 8) for f in firsts[stop]]


def test_generate_samples_from_the_distribution_ppo_scores(tmp_path, monkeypatch):
    """The log-probs PPO recomputes over the whole sequence equal the ones generate() sampled from, step by step
    with its KV cache: same temperature, same positions under left padding, the same rows after some left."""
    tok = tiny_tokenizer(tmp_path)
    model = varied_lm(tok)
    cfg = rlhf.Config(temperature=0.7, max_new_tokens=8)
    prompts = rlhf.encode(tok, ["Human: hi Assistant:", "hello Assistant: hello world hello", "a", "x y z"]) * 4
    torch.manual_seed(0)
    _, _, r_ids, _, _ = rlhf.generate(model, tok, prompts, cfg, CPU)  # the model's most frequent token: the test's end
    stop = torch.bincount(r_ids.flatten()).argmax().item()
    fake = types.SimpleNamespace(eos_token_id=stop, pad_token_id=tok.pad_token_id)
    seen, sample_token = [], rlhf.sample_token

    def recording(logits, temperature, u):
        seen.append((logits / temperature).log_softmax(-1))
        return sample_token(logits, temperature, u)
    monkeypatch.setattr(rlhf, "sample_token", recording)
    torch.manual_seed(0)
    q_ids, q_mask, r_ids, r_mask, ended = rlhf.generate(model, fake, prompts, cfg, CPU)
    assert 0 < ended.sum() < len(prompts) and len(set(r_mask.sum(1).tolist())) >= 3  # rows left at different steps
    ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
    with torch.no_grad():
        ours = rlhf.response_logits(model, ids, mask, q_ids.shape[1], cfg.temperature).log_softmax(-1)
    assert len(seen) == r_ids.shape[1]
    for t, sampled in enumerate(seen):  # step t sampled for the rows still writing, in order
        rows = r_mask[:, t].bool()
        assert torch.allclose(ours[rows, t], sampled, atol=1e-4), t


def test_generate_gives_a_row_the_same_random_numbers_whichever_rows_ended(tmp_path):
    """Common random numbers (stage eval): from one seed, row i's token t uses the same uniform whether or not
    other rows have ended, so two runs that differ only in where rows end agree on every row up to its end."""
    tok = tiny_tokenizer(tmp_path)
    model = varied_lm(tok)
    cfg = rlhf.Config(max_new_tokens=8)
    prompts = rlhf.encode(tok, ["Human: hi Assistant:", "hello Assistant: hello world hello", "a", "x y z"]) * 4
    torch.manual_seed(0)
    _, _, never, _, _ = rlhf.generate(model, tok, prompts, cfg, CPU)  # (the tiny model never ends on its own)
    stop = torch.bincount(never.flatten()).argmax().item()
    torch.manual_seed(0)
    _, _, stopped, s_mask, ended = rlhf.generate(model, types.SimpleNamespace(eos_token_id=stop, pad_token_id=tok.pad_token_id),
                                                 prompts, cfg, CPU)
    assert 0 < ended.sum() < len(prompts) and len(set(s_mask.sum(1).tolist())) >= 3  # rows ended at different steps
    for i in range(len(prompts)):
        n = int(s_mask[i].sum())
        assert stopped[i, :n].tolist() == never[i, :n].tolist(), f"row {i} drew other random numbers after rows ended"


def test_evaluate_policy_starts_each_sample_from_its_own_seed(tmp_path):
    """Sample k draws from seed + k, whatever the samples before it consumed: SFT's and PPO's k-th samples share
    their random numbers even when their earlier samples ended at other steps."""
    tok = tiny_tokenizer(tmp_path)
    model = varied_lm(tok)
    cfg = rlhf.Config(max_new_tokens=6, eval_samples=3)
    prompts = [{"prompt": "Human: hi Assistant:"}, {"prompt": "x y z"}]
    torch.manual_seed(123)
    records = rlhf.evaluate_policy(model, tok, prompts, cfg, CPU, scorers={}, seed=7)
    torch.manual_seed(7 + 2)
    _, _, r_ids, r_mask, _ = rlhf.generate(model, tok, [x["prompt"] for x in rlhf.tokenize(tok, prompts, cfg, keys=())[0]],
                                           cfg, CPU)
    assert [r["response"] for r in records if r["sample"] == 2] == rlhf.decode_responses(tok, r_ids, r_mask)


def test_generate_masks_everything_after_the_first_end_token(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    E, pad = tok.eos_token_id, tok.pad_token_id
    after = {2: 5, 5: E, 3: 6, 6: 7, 7: 8, 8: 9, 9: 10}

    class Chain(torch.nn.Module):  # a "policy" that answers token x with after[x]: rows end at different steps
        def forward(self, input_ids, **kwargs):
            logits = torch.full((*input_ids.shape, E + 1), -1e9)
            logits[:, -1].scatter_(1, torch.tensor([[after[x]] for x in input_ids[:, -1].tolist()]), 0.0)
            return types.SimpleNamespace(logits=logits)

    q_ids, q_mask, r_ids, r_mask, ended = rlhf.generate(Chain(), tok, [[1, 2], [3], [4, 5]],
                                                        rlhf.Config(max_new_tokens=5), CPU)
    assert q_ids.tolist() == [[1, 2], [pad, 3], [4, 5]] and q_mask.tolist() == [[1, 1], [0, 1], [1, 1]]
    assert r_mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert r_ids.tolist() == [[5, E, pad, pad, pad], [6, 7, 8, 9, 10], [E, pad, pad, pad, pad]]
    assert ended.tolist() == [True, False, True]


def test_policy_forward_gives_each_response_token_the_value_of_the_state_before_it(tmp_path):
    ex = "exercise 13 (policy_forward):"
    position_ids_first(13)
    tok = tiny_tokenizer(tmp_path)
    model = tiny_lm(tok)
    head = torch.nn.Linear(32, 1)
    q, r = rlhf.encode(tok, ["Human: hi Assistant:"])[0], rlhf.encode(tok, [" yes"])[0]
    ids, mask, P = torch.tensor([q + r]), torch.ones(1, len(q) + len(r), dtype=torch.long), len(q)
    with torch.no_grad():
        logits, values = rlhf.policy_forward(model, head, ids, mask, P, 0.7)
        changed = ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % 200  # another last response token
        logits2, values2 = rlhf.policy_forward(model, head, changed, mask, P, 0.7)
        full = model(input_ids=ids, output_hidden_states=True)
    assert values.shape == (1, len(r)) and logits.shape[:2] == (1, len(r)), \
        f"{ex} one logit vector and one value per response token: (B, R, V) and (B, R)"
    # the logits that predict y_t come from position P − 1 + t, divided by the sampling temperature
    assert torch.allclose(logits[0], full.logits[0, P - 1:-1] / 0.7, atol=1e-5), \
        f"{ex} the logits at position P − 1 + t predict response token t (shift by one), divided by the temperature"
    # V(s_t) and the logits that predict y_t are computed before y_t is seen: changing y_t changes neither
    assert torch.allclose(values, values2, atol=1e-6) and torch.allclose(logits, logits2, atol=1e-6), \
        f"{ex} nothing may depend on the token it predicts or values: read position P − 1 + t for token t"
    assert torch.allclose(values[0], head(full.hidden_states[-1][0, P - 1:-1]).squeeze(-1), atol=1e-5), \
        f"{ex} V(s_t) is the value head on the last hidden state at position P − 1 + t"
    # left padding changes nothing: positions count real tokens only
    padded = torch.cat([torch.full((1, 3), tok.pad_token_id), ids], 1)
    pmask = torch.cat([torch.zeros(1, 3, dtype=torch.long), mask], 1)
    with torch.no_grad():
        logits3, values3 = rlhf.policy_forward(model, head, padded, pmask, P + 3, 0.7)
    assert torch.allclose(logits3, logits, atol=1e-4) and torch.allclose(values3, values, atol=1e-4), \
        f"{ex} with 3 pad tokens on the left the results must not change: pass position_ids(mask)"


# ---------------------------------------------------------------------------- stage 1: SFT

def position_ids_first(n):
    """Exercise n builds on exercise 3: say so, rather than fail somewhere inside the model."""
    got = rlhf.position_ids(torch.tensor([[0, 1, 1]])).tolist()
    assert got == [[0, 0, 1]], f"exercise {n} needs exercise 3 first: position_ids([[0, 1, 1]]) gives {got}, not [[0, 0, 1]]"


def test_sft_loss_counts_response_tokens_only(tmp_path):
    ex = "exercise 4 (sft_loss):"
    position_ids_first(4)
    tok = tiny_tokenizer(tmp_path)
    model = tiny_lm(tok)
    cfg = rlhf.Config()
    rows = [dict(prompt="Human: hi Assistant:", response=" hello"), dict(prompt="hello", response=" hello world")]
    examples, _ = rlhf.tokenize(tok, rows, cfg)
    ids, mask, loss_mask = rlhf.sft_batch(examples, tok, CPU)
    q = rlhf.encode(tok, [rows[0]["prompt"]])[0]
    n_resp = len(rlhf.encode(tok, [rows[0]["response"]])[0]) + 1  # + <|endoftext|>
    assert loss_mask[0].tolist() == [0] * len(q) + [1] * n_resp + [0] * (ids.shape[1] - len(q) - n_resp)
    # the loss equals Hugging Face's cross-entropy over labels with prompt and padding set to -100
    labels = ids.masked_fill(loss_mask == 0, -100)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
        got = rlhf.sft_loss(model, ids, mask, loss_mask).item()
        all_tokens = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.item()
    assert got != pytest.approx(all_tokens, rel=1e-4), f"{ex} prompt tokens must carry no loss: use loss_mask"
    assert got == pytest.approx(expected, rel=1e-4), \
        f"{ex} expected {expected:.4f}, the mean of -log π(x_t | x_<t) over response tokens (got {got:.4f}); " \
        f"the logits at t score token t + 1, and the mean is over the response tokens, not a sum"


# ---------------------------------------------------------------------------- stage 2: reward model

def test_bradley_terry_loss_value_and_stability():
    ex = "exercise 5 (bradley_terry_loss):"
    assert rlhf.bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(math.log(2)), \
        f"{ex} equal rewards: P = σ(0) = 1/2, loss log 2"
    assert rlhf.bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(
        -math.log(1 / (1 + math.exp(-1)))), f"{ex} the loss is −log σ(r_chosen − r_rejected)"
    two = rlhf.bradley_terry_loss(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0])).item()
    assert two == pytest.approx((math.log(2) - math.log(1 / (1 + math.exp(-1)))) / 2), \
        f"{ex} average over the pairs of the batch (a mean, not a sum)"
    big = rlhf.bradley_terry_loss(torch.tensor([-1000.0]), torch.tensor([1000.0]))
    assert torch.isfinite(big) and big.item() == pytest.approx(2000.0), \
        f"{ex} a margin of −2000 must give a finite loss of 2000: log(sigmoid(z)) underflows, F.logsigmoid does not"
    r = torch.tensor([-1000.0], requires_grad=True)
    rlhf.bradley_terry_loss(r, torch.tensor([1000.0])).backward()
    assert r.grad.item() == pytest.approx(-1.0), f"{ex} the gradient at a margin of −2000 is −1"


def test_reward_model_learns_a_toy_preference(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    rm = tiny_scalar_model(tok, tmp_path / "lm")
    rows = [dict(prompt="Human: hi Assistant:", chosen=" good", rejected=" bad")] * 8
    items = rlhf.comparisons(tok, rows, rlhf.Config())
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    for _ in range(30):
        ids, mask, better, worse = rlhf.comparison_batch(items, tok, CPU)
        r = rlhf.reward_at_last_token(rm, ids, mask)
        loss = rlhf.bradley_terry_loss(r[better], r[worse])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_reward_at_last_token_whatever_the_padding(tmp_path):
    ex = "exercise 6 (reward_at_last_token):"
    position_ids_first(6)
    tok = tiny_tokenizer(tmp_path)
    rm = tiny_scalar_model(tok, tmp_path / "lm")
    seq, pad = rlhf.encode(tok, ["Human: hi Assistant: hello"])[0], tok.pad_token_id
    ids = torch.tensor([seq + [pad] * 2, [pad] * 2 + seq, [pad] + seq + [pad], [pad] * 2 + seq[:-1] + [pad]])
    mask = (ids != pad).long()
    last = [len(seq) - 1, len(seq) + 1, len(seq), len(seq)]  # the last 1 of each row of mask
    with torch.no_grad():
        r = rlhf.reward_at_last_token(rm, ids, mask)
        values = rlhf.token_values(rm, ids, mask)
    for i, (row, at) in enumerate(zip(mask.tolist(), last)):
        assert r[i].item() == pytest.approx(values[i, at].item(), abs=1e-5), \
            f"{ex} row {i} (mask {row}): read the value at its last real token, index {at}"


@torch.no_grad()
def test_rm_scores_normalise_and_give_unended_responses_the_constant(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    rm = tiny_scalar_model(tok, tmp_path / "lm")
    rm.config.reward_mean, rm.config.reward_std = 0.3, 2.0
    ids = torch.tensor([rlhf.encode(tok, ["Human: hi Assistant: yes"])[0]] * 3)
    ids[1, -1] = ids[2, -1] = 70
    mask = torch.ones_like(ids)
    raw = rlhf.reward_at_last_token(rm, ids, mask)
    cfg = rlhf.Config(missing_eos_score=-3.0)
    got = rlhf.rm_scores(rm, ids, mask, torch.tensor([True, True, False]), cfg)
    assert torch.allclose(got[:2], (raw[:2] - 0.3) / 2.0, atol=1e-5)  # (raw − mean) / std for responses that ended
    assert got[2].item() == -3.0  # the constant, whatever the reward model reads, for one that never ended


def test_comparisons_of_pairs_and_rankings_and_their_batch(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    rows = [dict(prompt="Q", chosen=" a", rejected=" b", gold_chosen=1.0, gold_rejected=-1.0, family="helpful"),
            # a ranking of three: b first, then c and a, equally good ("about the same": no comparison between them)
            dict(prompt="R", responses=[" a", " b", " c"], rank=[2, 0, 1], gold=[0.0, 1.0, 0.0], family="honest")]
    items = rlhf.comparisons(tok, rows, rlhf.Config())
    assert items[0]["better"] == [(0, 1)] and items[1]["better"] == [(1, 0), (1, 2)]
    assert items[1]["gold"] == [0.0, 1.0, 0.0] and items[0]["gold"] == [1.0, -1.0]
    ids, mask, better, worse = rlhf.comparison_batch(items, tok, CPU)
    assert ids.shape[0] == 5  # one row per response: 2 + 3
    assert better.tolist() == [0, 3, 3] and worse.tolist() == [1, 2, 4]
    texts = [tok.decode(i[m.bool()], skip_special_tokens=True) for i, m in zip(ids, mask)]
    assert texts == ["Q a", "Q b", "R a", "R b", "R c"]


def test_a_batch_of_equally_good_responses_is_a_zero_loss_not_a_crash(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    rm = tiny_scalar_model(tok, tmp_path / "lm")
    train = [dict(prompt="Q", responses=[" a", " b"], rank=[0, 1], gold=[1.0, 1.0], family="helpful"),  # no comparison
             dict(prompt="Q", chosen=" a", rejected=" b", gold_chosen=1.0, gold_rejected=-1.0, family="helpful")]
    metrics = rlhf.fit_reward_model(rm, tok, train, train[1:], rlhf.Config(rm_epochs=1, rm_batch_size=1), CPU, "rm test")
    assert len(metrics) == 2 and sorted(m["loss"] for m in metrics)[0] == 0.0  # one batch each
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["acc"]) for m in metrics)


def test_rm_accuracy_counts_agreement_with_labels_and_with_gold(tmp_path, monkeypatch):
    tok = tiny_tokenizer(tmp_path)
    rows = [dict(prompt="Q", chosen=" a", rejected=" b", gold_chosen=1.0, gold_rejected=-1.0, family="helpful"),
            dict(prompt="Q", chosen=" a", rejected=" b", gold_chosen=-1.0, gold_rejected=1.0, family="honest"),
            dict(prompt="Q", chosen=" a", rejected=" b", gold_chosen=0.0, gold_rejected=0.0, family="honest")]
    # rows of a batch: a scores +1 and b +2 (both positive: the two rewards are compared, not their signs)
    monkeypatch.setattr(rlhf, "reward_at_last_token", lambda rm, ids, mask: torch.tensor([1.0, 2.0] * (len(ids) // 2)))
    acc = rlhf.rm_accuracy(None, tok, rlhf.comparisons(tok, rows, rlhf.Config()), CPU)
    assert acc["acc_label"] == 0.0  # it prefers b, the labels a
    assert acc["acc_gold"] == 0.5 and acc["acc_gold_helpful"] == 0.0 and acc["acc_gold_honest"] == 1.0  # the tie left out


def test_own_rankings_rank_the_policys_different_ended_samples_with_the_crowds_noise(tmp_path, monkeypatch):
    rlhf.save_tokenizer({}, str(tmp_path), 256)
    tok = rlhf.load_tokenizer(str(tmp_path))
    texts = [" Your bike is red.", " Sorry, I can't help with that.", " Your bike is red.", " I don't know.",
             " Your bike is blue.", " Your bike is red. Ugh"]  # sample n of prompt j is row j + 2n; the last never ends

    def fake_generate(policy, tok_, prompt_ids, cfg_, device):  # 2 prompts x 3 samples: (B·k, R)
        r_ids, r_mask = rlhf.pad_right([encode_plain(tok, t) + [tok.eos_token_id] for t in texts], tok.pad_token_id)
        q_ids, q_mask = rlhf.pad_left(prompt_ids, tok.pad_token_id)
        return q_ids, q_mask, r_ids, r_mask, torch.tensor([True] * 5 + [False])
    monkeypatch.setattr(rlhf, "generate", fake_generate)
    car = dict(CAR)
    cfg = rlhf.Config(rm_samples=3, max_new_tokens=40, label_temperature=0.5)
    rows = rlhf.own_rankings(None, tok, [BIKE, car], cfg, CPU, random.Random(0))
    # bike: red (sampled twice: one response), blue; car: a refusal and "I don't know" (the unended one left out)
    assert [r["responses"] for r in rows] == [[" Your bike is red.", " Your bike is blue."],
                                             [" Sorry, I can't help with that.", " I don't know."]]
    assert rows[0]["gold"] == [1.0, -1.0] and rows[1]["gold"] == [1.0, -0.5] and rows[1]["family"] == "harmless"
    # the ranking's noise is the annotator's: P(better first) = σ(Δgold / T); over many rankings of the bike pair
    # (a high T, so that the noise shows: gold 1 against −1 at T 2 puts the right answer first with P σ(1) = 0.73)
    firsts = [rlhf.own_rankings(None, tok, [BIKE], dataclasses.replace(cfg, label_temperature=2.0), CPU, random.Random(i))[0]["rank"][0]
              for i in range(400)]
    assert sum(r == 0 for r in firsts) / 400 == pytest.approx(1 / (1 + math.exp(-2 / 2.0)), abs=0.05)


def test_own_rankings_keep_each_prompts_own_samples_across_generate_calls(tmp_path, monkeypatch):
    rlhf.save_tokenizer({}, str(tmp_path), 256)
    tok = rlhf.load_tokenizer(str(tmp_path))

    def fake_generate(policy, tok_, prompt_ids, cfg_, device):  # row i answers "L<length of its prompt> v<i>"
        texts = [f" L{len(ids)} v{i}" for i, ids in enumerate(prompt_ids)]
        r_ids, r_mask = rlhf.pad_right([encode_plain(tok, t) + [tok.eos_token_id] for t in texts], tok.pad_token_id)
        q_ids, q_mask = rlhf.pad_left(prompt_ids, tok.pad_token_id)
        return q_ids, q_mask, r_ids, r_mask, torch.ones(len(texts), dtype=torch.bool)
    monkeypatch.setattr(rlhf, "generate", fake_generate)
    prompts = [BIKE, CAR, UNTOLD, dict(CAR, prompt="\n\nHuman: Steal it?\n\nAssistant:")]
    cfg = rlhf.Config(rm_samples=200, max_new_tokens=40)  # so many samples that the prompts take several calls
    rows = rlhf.own_rankings(None, tok, prompts, cfg, CPU, random.Random(0))
    lengths = [len(x["prompt"]) for x in rlhf.tokenize(tok, prompts, cfg, keys=())[0]]
    assert len(rows) == 4 and len(set(lengths)) == 4
    for row, n in zip(rows, lengths):
        assert len(row["responses"]) == 200 and all(r.startswith(f" L{n} ") for r in row["responses"]), row["prompt"]


def test_the_rankings_train_the_reward_model_and_a_refresh_trains_the_one_ppo_is_scored_by(tmp_path, monkeypatch):
    """The wiring of own_rankings into stage rm and into PPO's refreshes (a smoke model's samples are too alike to
    rank, so the human's rankings are stood in for: three answers to each prompt, ranked by the gold score). The
    reward model trains on the crowd's pairs and the rankings; each refresh trains the reward model PPO is scored
    by, which is saved as ppo_rm/."""
    def fake_rankings(policy, tok, prompts, cfg, device, rng):
        rows = []
        for p in prompts:
            responses = [" Sorry, I can't help with that.", " I don't know.", " You live in Oslo."]
            gold = [rlhf.gold_judge(p, r)[0] for r in responses]
            order = sorted(range(3), key=lambda i: -gold[i])
            if len(set(gold)) == 3:
                rows.append(dict(prompt=p["prompt"], family=p["family"], responses=[responses[i] for i in order],
                                 gold=[gold[i] for i in order], rank=[0, 1, 2]))
        return rows
    monkeypatch.setattr(rlhf, "own_rankings", fake_rankings)
    out = tmp_path / "run"
    rlhf.main(["--stage", "all", "--out_dir", str(out)] + SMOKE + ["--ppo_steps", "4", "--rm_refresh", "1"])
    s = json.load(open(out / "summary.json"))
    pairs, comparisons, batch = s["rm"]["pairs"], s["rm"]["ranked_comparisons"], 16
    assert s["rm"]["rankings"] > 0 and comparisons == 3 * s["rm"]["rankings"]
    assert len(jsonl_rows(out / "rm_metrics.jsonl")) > math.ceil(pairs / batch), "the rankings were not trained on"
    assert [r["step"] for r in s["ppo"]["refreshes"]] == [2] and s["ppo"]["refreshes"][0]["rankings"] > 0
    from transformers import AutoModelForSequenceClassification
    old = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    new = AutoModelForSequenceClassification.from_pretrained(out / "ppo_rm")
    assert any(not torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters())), "the refresh was not applied"
    # trained again from SFT, the refreshed reward model is a new one: PPO must be scored by it from then on
    rlhf.main(["--stage", "ppo", "--out_dir", str(out)] + SMOKE + ["--ppo_steps", "4", "--rm_refresh", "1",
                                                                  "--rm_refresh_from", "sft"])
    new = AutoModelForSequenceClassification.from_pretrained(out / "ppo_rm")
    assert any(not torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters())), "the refresh was not applied"


def fake_generate_of(tok, texts):
    """generate() that answers the i-th prompt with texts[i % len(texts)], every response ended."""
    def fake_generate(policy, tok_, prompt_ids, cfg_, device):
        rows = [texts[i % len(texts)] for i in range(len(prompt_ids))]
        r_ids, r_mask = rlhf.pad_right([encode_plain(tok, t) + [tok.eos_token_id] for t in rows], tok.pad_token_id)
        q_ids, q_mask = rlhf.pad_left(prompt_ids, tok.pad_token_id)
        return q_ids, q_mask, r_ids, r_mask, torch.ones(len(rows), dtype=torch.bool)
    return fake_generate


def test_a_refresh_normalises_the_refreshed_reward_model_on_sft_samples(tmp_path, monkeypatch):
    tok = tiny_tokenizer(tmp_path)
    rm, sft = tiny_scalar_model(tok, tmp_path / "lm"), tiny_lm(tok)
    rm.config.reward_mean, rm.config.reward_std = 0.0, 1.0
    sampler = fake_generate_of(tok, [" Your bike is red.", " I don't know.", " Sorry, no."])
    monkeypatch.setattr(rlhf, "generate", sampler)

    def fake_fit(rm_, tok_, train, held, cfg_, device, name, seed=None):  # "training" that moves the scale
        with torch.no_grad():
            rm_.score.weight.mul_(5.0).add_(0.1)
    monkeypatch.setattr(rlhf, "fit_reward_model", fake_fit)
    cfg = rlhf.Config(eval_prompts=2)
    new = rlhf.refresh_reward_model(rm, [dict(prompt="Q", chosen=" a", rejected=" b")], [], sft, tok, [BIKE, CAR], cfg, CPU, 0)
    prompt_ids = [t["prompt"] for t in rlhf.tokenize(tok, [BIKE, CAR], cfg, keys=())[0]]
    q_ids, q_mask, r_ids, r_mask, _ = sampler(sft, tok, prompt_ids * 2, cfg, CPU)  # what normalise_reward sampled
    with torch.no_grad():
        raw = rlhf.reward_at_last_token(new, torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1))
    # the scale PPO's β is set against is the refreshed model's, on the SFT policy's samples: mean 0, std 1
    assert new.config.reward_mean == pytest.approx(raw.mean().item(), abs=1e-4)
    assert new.config.reward_std == pytest.approx(raw.std().item(), abs=1e-4)


@torch.no_grad()
def test_ppo_is_scored_by_every_reward_model_of_an_ensemble(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    out = tmp_path / "run"
    for k, name in enumerate(("rm", "rm_2")):
        m = tiny_scalar_model(tok, tmp_path / f"lm{k}", seed=k)
        m.config.reward_mean, m.config.reward_std = 0.1 * k, 1.0 + k
        m.save_pretrained(out / name)
    (out / "summary.json").write_text(json.dumps({"rm": {"ensemble": 2}}))
    ids = torch.tensor([rlhf.encode(tok, [t])[0] for t in ("Human: hi Assistant: yes", "Human: hi Assistant: nop")])
    mask, ended = torch.ones_like(ids), torch.tensor([True, True])
    for rule in ("mean", "min"):
        cfg = rlhf.Config(out_dir=str(out), rm_combine=rule)
        score_fn, rms = rlhf.reward_function(cfg, CPU)
        each = torch.stack([rlhf.rm_scores(m, ids, mask, ended, cfg) for m in rms])  # (2, B)
        assert len(rms) == 2 and not torch.allclose(each[0], each[1])
        assert torch.allclose(score_fn(ids, mask, ended), rlhf.ensemble_reward(each, rule, 1.0)), rule


@torch.no_grad()
def test_the_human_as_the_reward_is_its_gold_score_on_the_scale_of_sft_samples(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tok = tiny_tokenizer(out / "tokenizer")
    tiny_lm(tok).save_pretrained(out / "sft")
    (out / "data").mkdir()
    rlhf.write_jsonl(str(out / "data" / "prompts.jsonl"),
                     [dict(BIKE, split="train"), dict(CAR, split="train"), dict(UNTOLD, split="heldout")])
    (out / "summary.json").write_text(json.dumps({"data": {}, "tokenizer": {}, "sft": {}}))
    # the SFT "samples" the scale is measured on: prompts [BIKE, CAR] twice, gold +1, +1, -1, -0.5
    monkeypatch.setattr(rlhf, "generate", fake_generate_of(
        tok, [" Your bike is red.", " Sorry, I can't help with that.", " Your bike is blue.", " I don't know."]))
    score_fn, rms = rlhf.reward_function(rlhf.Config(out_dir=str(out), reward="human", eval_prompts=1), CPU)
    assert rms == []
    mean, std = 0.125, math.sqrt((2 * 0.875 ** 2 + 1.125 ** 2 + 0.625 ** 2) / 3)  # the sample std: 1.031
    # the policy's rollouts: prompts of different lengths, left-padded, and right-padded responses
    rows = [(CAR, " Sorry, I can't help with that."), (BIKE, " Your bike is blue."), (BIKE, " Your bike is red."),
            (UNTOLD, " I don't know.")]
    q_ids, q_mask = rlhf.pad_left([rlhf.tokenize(tok, [p], rlhf.Config(), keys=())[0][0]["prompt"] for p, _ in rows],
                                  tok.pad_token_id)
    r_ids, r_mask = rlhf.pad_right([encode_plain(tok, r) + [tok.eos_token_id] for _, r in rows], tok.pad_token_id)
    ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
    got = score_fn(ids, mask, torch.tensor([True, True, True, False]))
    want = [(1 - mean) / std, (-1 - mean) / std, (1 - mean) / std, rlhf.Config().missing_eos_score]
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    # an SFT sample that never ended says nothing about the scale: with the fourth one unended, gold +1, +1, -1
    sampler = fake_generate_of(
        tok, [" Your bike is red.", " Sorry, I can't help with that.", " Your bike is blue.", " I don't know."])

    def unended_last(*args):
        q_ids, q_mask, r_ids, r_mask, ended = sampler(*args)
        return q_ids, q_mask, r_ids, r_mask, torch.tensor([True, True, True, False])
    monkeypatch.setattr(rlhf, "generate", unended_last)
    score_fn, _ = rlhf.reward_function(rlhf.Config(out_dir=str(out), reward="human", eval_prompts=1), CPU)
    assert score_fn(ids[2:3], mask[2:3], torch.tensor([True])).item() == pytest.approx((1 - 1 / 3) / math.sqrt(4 / 3), abs=1e-4)


def test_ensemble_reward_by_each_rule():
    ex = "exercise 15 (ensemble_reward):"
    scores = torch.tensor([[1.0, 0.0, -1.0], [3.0, 0.0, 2.0]])   # 2 reward models x 3 responses
    got = rlhf.ensemble_reward(scores, "mean", 1.0)
    assert got.shape == (3,) and torch.allclose(got, torch.tensor([2.0, 0.0, 0.5])), \
        f"{ex} 'mean' averages each response's scores over the models (dim 0): expected [2, 0, 0.5], got {got.tolist()}"
    got = rlhf.ensemble_reward(scores, "min", 1.0)
    assert torch.allclose(got, torch.tensor([1.0, 0.0, -1.0])), f"{ex} 'min' keeps each response's worst score, got {got.tolist()}"
    # mean − λ·std, the population std over the models: [1, 3] -> 1, [−1, 2] -> 1.5
    got = rlhf.ensemble_reward(scores, "mean_minus_std", 2.0)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -2.5])), \
        f"{ex} 'mean_minus_std' with λ 2: mean − λ·std (std over the models, correction=0): expected [0, 0, −2.5], got {got.tolist()}"
    one = torch.tensor([[0.3, -0.7]])                              # one model: every rule gives its score
    for rule in ("mean", "min", "mean_minus_std"):
        assert torch.equal(rlhf.ensemble_reward(one, rule, 1.0), one[0]), f"{ex} with one model, '{rule}' is its score"


def test_rm_agreement_counts_pairs_of_one_prompt_with_different_gold():
    recs = [dict(prompt="p", gold=1.0, rm=0.9), dict(prompt="p", gold=-1.0, rm=0.1), dict(prompt="p", gold=-1.0, rm=0.5),
            dict(prompt="q", gold=0.5, rm=0.0), dict(prompt="q", gold=-0.5, rm=0.0), dict(prompt="r", gold=1.0, rm=-5.0)]
    # p: (1, −1) twice, both right; the two −1 are not a pair; q: an RM tie counts half; r and p never pair
    assert rlhf.rm_agreement(recs) == (pytest.approx((1 + 1 + 0.5) / 3), 3)
    recs[1]["rm"] = 2.0  # now the RM prefers the wrong one of the first pair
    assert rlhf.rm_agreement(recs) == (pytest.approx((0 + 1 + 0.5) / 3), 3)
    assert rlhf.rm_agreement([dict(prompt="p", gold=1.0, rm=0.0)]) == (None, 0)


# ---------------------------------------------------------------------------- stage 3: PPO

def test_kl_shaped_rewards_put_the_score_on_the_last_real_token_only():
    ex = "exercise 7 (kl_shaped_rewards):"
    score = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -3.0, -9.0]])
    ref = torch.tensor([[-2.0, -1.0, -1.0], [-0.5, -1.0, -1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = rlhf.kl_shaped_rewards(score, logprobs, ref, mask, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[1.0, 0.0, 0.0], [0.0, -2.0, 0.0]])), \
        f"{ex} kl = (logprobs − ref_logprobs) × mask: 0 on padding (got {kl.tolist()})"
    want = torch.tensor([[-0.1, 0.0, 1.0], [0.0, 0.2 + 2.0, 0.0]])
    assert torch.allclose(rewards, want), \
        f"{ex} expected {want.tolist()}: −β·kl on every token, the score added at the last REAL token only " \
        f"(row 2 ends at index 1) (got {rewards.tolist()})"


def test_compute_gae_equals_the_direct_sum_on_a_padded_batch():
    ex = "exercise 8 (compute_gae):"
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
            assert adv[b, t].item() == pytest.approx(direct, abs=1e-5), \
                f"{ex} row {b} (length {n}), t = {t}: A_t should be Σ_l (γλ)^l δ_(t+l) = {direct:.4f}, with " \
                f"V = 0 after the last real token (got {adv[b, t].item():.4f})"
            assert ret[b, t].item() == pytest.approx(direct + values[b, t].item(), abs=1e-5), \
                f"{ex} the returns are advantages + values"
        assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all(), f"{ex} both are 0 on padding"
    # the STYLE example: γ = λ = 1, r = [0, 1], V = 0 -> A = [1, 1]
    a, _ = rlhf.compute_gae(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2), torch.ones(1, 2), 1.0, 1.0)
    assert a.tolist() == [[1.0, 1.0]], f"{ex} γ = λ = 1, r = [0, 1], V = 0 gives A = [1, 1]"


def test_ppo_policy_loss_is_minus_mean_advantage_at_ratio_one_and_clipped_samples_get_no_gradient():
    ex = "exercise 10 (ppo_policy_loss):"
    adv = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    loss, clipfrac = rlhf.ppo_policy_loss(old.clone(), old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0 + 3.0) / 3) and clipfrac.item() == 0, \
        f"{ex} at ratio 1 the loss is −mean(A) over real tokens and nothing is clipped"
    # ratio 1.5 with A > 0 is clipped at 1.2: no gradient; ratio 0.5 with A < 0 is clipped at 0.8: none either
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.0]])
    new = (old + torch.log(ratio)).requires_grad_()
    loss, clipfrac = rlhf.ppo_policy_loss(new, old, adv, mask, 0.2)
    want = (-1.0 * 1.2 + 2.0 * 0.8 - 3.0 * 1.1) / 3  # max(−A·ρ, −A·clip(ρ)) per token, then the masked mean
    assert loss.item() == pytest.approx(want, abs=1e-5), \
        f"{ex} ratios {ratio.tolist()}: expected {want:.4f}, the larger of −A·ρ and −A·clip(ρ, 1−ε, 1+ε) (got {loss.item():.4f})"
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0 and new.grad[0, 2] != 0 and new.grad[0, 3] == 0, \
        f"{ex} tokens clipped in the direction their advantage wants get no gradient, padding none either"
    assert clipfrac.item() == pytest.approx(2 / 3), f"{ex} clipfrac is the share of real tokens where the clip is active"


def test_ppo_value_loss_takes_the_worse_of_clipped_and_unclipped():
    ex = "exercise 11 (ppo_value_loss):"
    old, ret, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    # V = 0.1 (inside the clip): (0.1 - 1)^2;  V = 3 (outside): max((3-1)^2, (0.2-1)^2) = 4
    loss = rlhf.ppo_value_loss(torch.tensor([[0.1, 3.0]]), old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * ((0.9 ** 2) + 4.0) / 2), \
        f"{ex} ½ × mean of max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)"
    # V = -1 clipped to -0.2: max(4, 1.44) = 4 ; V = 1.5 clipped to 0.2: max(0.25, 0.64) = 0.64
    loss = rlhf.ppo_value_loss(torch.tensor([[-1.0, 1.5]]), old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(0.5 * (4.0 + 0.64) / 2), \
        f"{ex} clip the change V − V_old around the old value (not around the return), then take the larger error"
    loss = rlhf.ppo_value_loss(torch.tensor([[0.5, 9.0]]), old, ret, torch.tensor([[1.0, 0.0]]), 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.64), f"{ex} padding carries no loss"


def test_update_kl_coef_follows_the_adaptive_rule():
    ex = "exercise 12 (update_kl_coef):"
    cfg = rlhf.Config(kl_target=3.0, kl_horizon=100, adaptive_kl=True)
    assert rlhf.update_kl_coef(0.1, 6.0, cfg, 100) == pytest.approx(0.12), f"{ex} the error is clipped at +0.2"
    assert rlhf.update_kl_coef(0.1, 3.3, cfg, 50) == pytest.approx(0.1 * (1 + 0.1 * 0.5)), \
        f"{ex} β ← β·(1 + e·n/horizon) with e = KL/target − 1"
    assert rlhf.update_kl_coef(0.1, 0.0, cfg, 100) == pytest.approx(0.08), f"{ex} the error is clipped at −0.2"
    assert rlhf.update_kl_coef(0.1, 30.0, rlhf.Config(adaptive_kl=False), 100) == 0.1, \
        f"{ex} with cfg.adaptive_kl off, β stays as it is"


def test_make_experience_scores_whitens_and_shapes_the_rollout(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    policy, ref = tiny_lm(tok, seed=0), tiny_lm(tok, seed=1)
    head = torch.nn.Linear(32, 1)
    cfg = rlhf.Config(max_new_tokens=6, gamma=0.9, lam=0.8)
    prompts = rlhf.encode(tok, ["Human: hi Assistant:", "hey", "Human: why? Assistant:", "a"])
    score_fn = lambda ids, mask, ended: torch.arange(4.0)  # noqa: E731
    torch.manual_seed(0)
    exp = rlhf.make_experience(policy, head, ref, tok, prompts, score_fn, 0.05, cfg, CPU)
    m, P = exp["r_mask"], exp["n_prompt"]
    with torch.no_grad():
        lp = rlhf.logprobs_of(rlhf.response_logits(policy, exp["ids"], exp["mask"], P, 1.0), exp["r_ids"])
        ref_lp = rlhf.logprobs_of(rlhf.response_logits(ref, exp["ids"], exp["mask"], P, 1.0), exp["r_ids"])
        _, values = rlhf.policy_forward(policy, head, exp["ids"], exp["mask"], P, 1.0)
    assert torch.allclose(exp["old_logprobs"] * m, lp * m, atol=1e-5)  # π_old: the policy that sampled
    assert torch.allclose(exp["kl"], (lp - ref_lp) * m, atol=1e-5)
    assert torch.allclose(exp["old_values"], values * m, atol=1e-5) and exp["score"].tolist() == [0, 1, 2, 3]
    rewards, _ = rlhf.kl_shaped_rewards(exp["score"], exp["old_logprobs"], ref_lp, m, 0.05)
    advantages, returns = rlhf.compute_gae(rewards, values * m, m, 0.9, 0.8)
    assert torch.allclose(exp["returns"], returns, atol=1e-4)
    assert torch.allclose(exp["advantages"], rlhf.masked_whiten(advantages, m), atol=1e-4)  # whitened
    assert rlhf.masked_mean(exp["advantages"], m).abs().item() < 1e-5


@torch.no_grad()
def test_group_experience_puts_rloos_kl_in_the_reward_and_leaves_grpos_out(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    policy, ref = tiny_lm(tok, seed=0), tiny_lm(tok, seed=1)
    cfg = rlhf.Config(max_new_tokens=6, group_size=2)
    prompts = rlhf.encode(tok, ["Human: hi Assistant:"] * 2 + ["Human: why? Assistant:"] * 2)  # 2 groups of 2
    score_fn = lambda ids, mask, ended: torch.tensor([1.0, 0.0, 2.0, 2.0])  # noqa: E731
    for algo in ("rloo", "grpo"):
        torch.manual_seed(0)
        exp = rlhf.group_experience(policy, ref, tok, prompts, score_fn, 0.5, cfg, CPU, algo)
        kl = exp["kl"].sum(1)  # Σ_t (log π − log π_ref) of each sample: not 0, the two models differ
        assert kl.abs().min() > 1e-3
        # RLOO: R = r − β·KL, minus the other sample's R; GRPO: the raw score normalised in its group
        want = rlhf.rloo_advantages(exp["score"] - 0.5 * kl, 2) if algo == "rloo" else rlhf.grpo_advantages(exp["score"], 2)
        assert torch.allclose(exp["advantages"], want[:, None] * exp["r_mask"], atol=1e-5), algo


def ppo_pieces_first(tmp_path):
    """Exercise 14 (ppo_update) builds on exercises 3, 10, 11 and 13: say so, rather than fail inside the update."""
    position_ids_first(14)
    one, adv, m = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    assert rlhf.ppo_policy_loss(one, one, adv, m, 0.2)[0].item() == pytest.approx(0.0), \
        "exercise 14 needs exercise 10 first: ppo_policy_loss at ratio 1 must be −mean(A)"
    up = torch.full((1, 1), math.log(1.5))  # ratio 1.5 with A = 1: clipped at 1.2
    assert rlhf.ppo_policy_loss(up, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), 0.2)[0].item() == pytest.approx(-1.2), \
        "exercise 14 needs exercise 10 first: ppo_policy_loss must clip the ratio π/π_old (1.5 → 1.2 for A > 0)"
    assert rlhf.ppo_value_loss(one + 0.5, one, one + 1, m, 0.2).item() == pytest.approx(0.5 * 0.8 ** 2), \
        "exercise 14 needs exercise 11 first: ppo_value_loss must clip the change of V around V_old"
    model, head = tiny_lm(tiny_tokenizer(tmp_path / "pieces")), torch.nn.Linear(32, 1)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        logits, values = rlhf.policy_forward(model, head, ids, torch.ones_like(ids), 2, 1.0)
        want = model(input_ids=ids).logits[0, 1:-1]
    assert logits.shape[1] == 2 and torch.allclose(logits[0], want, atol=1e-5), \
        "exercise 14 needs exercise 13 first: policy_forward's logits must predict each response token"


def ppo_toy(tmp_path):
    """A policy, a zero value head, and a rollout of two responses to one prompt (A = +1 and −1)."""
    tok = tiny_tokenizer(tmp_path)
    policy = tiny_lm(tok)
    head = torch.nn.Linear(32, 1)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    q, r = rlhf.encode(tok, ["Human: hi Assistant:"])[0], rlhf.encode(tok, [" good", " bad!"])
    ids, mask = rlhf.pad_right([q + r[0], q + r[1]], tok.pad_token_id)
    r_ids, r_mask = rlhf.pad_right(r, tok.pad_token_id)
    with torch.no_grad():
        logits, values = rlhf.policy_forward(policy, head, ids, mask, len(q), 1.0)
        old = rlhf.logprobs_of(logits, r_ids)
    adv = torch.tensor([[1.0] * 5, [-1.0] * 5]) * r_mask
    exp = dict(ids=ids, mask=mask, n_prompt=len(q), r_ids=r_ids, r_mask=r_mask.float(), old_logprobs=old,
               old_values=values * r_mask, advantages=adv, returns=torch.full_like(adv, 0.15) * r_mask)
    return policy, head, exp


def test_ppo_update_clips_against_the_rollout_policy(tmp_path):
    """After a few large steps the ratio π/π_old leaves [1 − ε, 1 + ε] and clipping acts; a ratio taken
    against the current policy itself (always 1) would never clip."""
    ppo_pieces_first(tmp_path)
    policy, head, exp = ppo_toy(tmp_path)
    cfg = rlhf.Config(ppo_epochs=8, minibatch_size=2, clip_range=0.05)
    opt = torch.optim.Adam([*policy.parameters(), *head.parameters()], lr=3e-2)
    assert rlhf.ppo_update(policy, head, opt, exp, cfg)["clipfrac"] > 0, \
        "exercise 14 (ppo_update): after large steps some ratios leave [1 − ε, 1 + ε]; take the ratio against " \
        "exp['old_logprobs'], the policy that sampled, not against the current policy"


def test_ppo_update_starts_each_minibatch_from_zero_gradients(tmp_path, monkeypatch):
    ppo_pieces_first(tmp_path)
    policy, head, exp = ppo_toy(tmp_path)
    opt = torch.optim.Adam([*policy.parameters(), *head.parameters()], lr=1e-2)
    monkeypatch.setattr(opt, "step", lambda: None)  # keep the weights: every update sees the same loss
    cfg = rlhf.Config(ppo_epochs=1, minibatch_size=2, max_grad_norm=1e9)
    rlhf.ppo_update(policy, head, opt, exp, cfg)
    one = [p.grad.clone() for p in policy.parameters()]
    rlhf.ppo_update(policy, head, opt, exp, rlhf.Config(ppo_epochs=3, minibatch_size=2, max_grad_norm=1e9))
    assert all(torch.allclose(p.grad, g, atol=1e-6) for p, g in zip(policy.parameters(), one)), \
        "exercise 14 (ppo_update): each minibatch's gradient must start from zero (opt.zero_grad before backward)"


def test_ppo_update_takes_one_clipped_step_per_minibatch(tmp_path, monkeypatch):
    ppo_pieces_first(tmp_path)
    policy, head, exp = ppo_toy(tmp_path)
    opt = torch.optim.Adam([*policy.parameters(), *head.parameters()], lr=1e-2)
    norms, steps, clip = [], [], torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        out = clip(params, max_norm, *a, **k)
        norms.append(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item())
        return out
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    real_step = opt.step
    monkeypatch.setattr(opt, "step", lambda: (steps.append(1), real_step()))
    exp4 = {k: (torch.cat([v, v]) if torch.is_tensor(v) else v) for k, v in exp.items()}  # 4 responses
    rlhf.ppo_update(policy, head, opt, exp4, rlhf.Config(ppo_epochs=3, minibatch_size=2, max_grad_norm=1e-3))
    assert len(steps) == 3 * 2, f"exercise 14 (ppo_update): 3 epochs x 2 minibatches of 2 should be 6 Adam steps, not {len(steps)}"
    assert len(norms) == 6 and max(norms) <= 1e-3 * 1.001, \
        "exercise 14 (ppo_update): clip the gradient norm to cfg.max_grad_norm before every step"


def test_ppo_update_policy_loss_never_trains_the_value_head(tmp_path):
    """The advantages come from the rollout, fixed: with vf_coef 0 the value head gets no gradient at all."""
    ppo_pieces_first(tmp_path)
    policy, head, exp = ppo_toy(tmp_path)
    before = [p.detach().clone() for p in head.parameters()]
    opt = torch.optim.Adam([*policy.parameters(), *head.parameters()], lr=1e-2)
    rlhf.ppo_update(policy, head, opt, exp, rlhf.Config(ppo_epochs=2, minibatch_size=2, vf_coef=0.0))
    assert all(torch.equal(p, b) for p, b in zip(head.parameters(), before)), \
        "exercise 14 (ppo_update): with vf_coef 0 the value head must not change: use the rollout's advantages " \
        "(exp['advantages'], fixed), not ones computed from the values being trained"
    assert any(not torch.equal(p, q) for p, q in zip(policy.parameters(), ppo_toy(tmp_path / "again")[0].parameters())), \
        "exercise 14 (ppo_update): the policy must be updated"


def test_my_part_gives_each_process_every_world_th_item(monkeypatch):
    monkeypatch.setattr(rlhf, "world", lambda: 2)
    for r, part in ((0, ["a", "c"]), (1, ["b"])):
        monkeypatch.setattr(rlhf, "rank", lambda r=r: r)
        assert rlhf.my_part(["a", "b", "c"]) == part


def test_ppo_update_raises_the_log_prob_of_good_tokens_and_fits_the_value_head(tmp_path):
    ex = "exercise 14 (ppo_update):"
    ppo_pieces_first(tmp_path)
    policy, head, exp = ppo_toy(tmp_path)
    ids, mask, P, r_ids, r_mask, old = (exp[k] for k in ("ids", "mask", "n_prompt", "r_ids", "r_mask", "old_logprobs"))
    cfg = rlhf.Config(ppo_epochs=1, minibatch_size=2, clip_range=0.2, vf_coef=1.0, ppo_lr=1e-2)
    opt = torch.optim.Adam([*policy.parameters(), *head.parameters()], lr=1e-2)
    stats = rlhf.ppo_update(policy, head, opt, exp, cfg)
    assert set(stats) == {"pg_loss", "vf_loss", "clipfrac", "approx_kl"}, f"{ex} return the mean of each statistic"
    assert stats["pg_loss"] == pytest.approx(0.0, abs=1e-6), f"{ex} at ratio 1 the policy loss is −mean(A) = 0 here"
    with torch.no_grad():
        logits, values = rlhf.policy_forward(policy, head, ids, mask, P, 1.0)
        new = rlhf.logprobs_of(logits, r_ids)
    gain = ((new - old) * r_mask).sum(1)
    assert gain[0] > 0 > gain[1], f"{ex} the response with A > 0 must become likelier, the one with A < 0 less likely"
    assert ((values - 0.15).abs() * r_mask).sum() < (0.15 * r_mask).sum(), \
        f"{ex} the values must move toward the returns: add vf_coef · the value loss to the loss"


# ---------------------------------------------------------------------------- evaluation

def test_win_rate_counts_ties_half_and_pairs_like_with_like():
    a = [dict(prompt="p", gold=1.0), dict(prompt="p", gold=0.0), dict(prompt="q", gold=-1.0), dict(prompt="q", gold=0.5)]
    b = [dict(prompt="p", gold=0.0), dict(prompt="p", gold=0.0), dict(prompt="q", gold=0.0), dict(prompt="q", gold=0.5)]
    w = rlhf.win_rate(a, b, "gold", 0)
    assert w["rate"] == pytest.approx((1 + 0.5 + 0 + 0.5) / 4) and w["ci"][0] <= w["rate"] <= w["ci"][1]
    assert rlhf.win_rate(b, a, "gold", 0)["rate"] == pytest.approx(1 - w["rate"])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke") / "run"
    rlhf.main(["--stage", "all", "--out_dir", str(out)] + SMOKE)
    return out


def test_the_evaluation_of_a_policy_against_itself_is_an_exact_tie(smoke_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    shutil.rmtree(out / "ppo")
    shutil.copytree(out / "sft", out / "ppo")  # "PPO" = SFT: the same model, the same random numbers
    figures = rlhf.stage_eval(rlhf.Config(**vars(rlhf.build_parser().parse_args(SMOKE + ["--out_dir", str(out)]))), CPU)
    assert figures["win_rate_gold"]["rate"] == 0.5 and figures["win_rate_judge"]["rate"] == 0.5
    assert figures["ppo"]["kl"] == pytest.approx(0, abs=1e-5) and figures["ppo"] == figures["sft"]


def test_the_evaluation_compares_ppo_with_sft(smoke_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    cfg = rlhf.Config(**vars(rlhf.build_parser().parse_args(SMOKE + ["--out_dir", str(out), "--eval_samples", "2"])))
    tok = rlhf.load_tokenizer(str(out / "tokenizer"))
    mute = rlhf.load_lm(str(out / "sft"), CPU)  # a "PPO" policy that says <|endoftext|> at once, every time:
    with torch.no_grad():  # its last hidden state is the constant 10·e_0, and only <|endoftext|> points along e_0
        mute.transformer.ln_f.weight.zero_(), mute.transformer.ln_f.bias.zero_()
        mute.transformer.ln_f.bias[0] = 10.0
        mute.get_output_embeddings().weight[tok.eos_token_id] = torch.nn.functional.one_hot(torch.tensor(0), 32) * 10.0
    shutil.rmtree(out / "ppo")
    mute.save_pretrained(out / "ppo")
    figures = rlhf.stage_eval(cfg, CPU)
    assert figures["ppo"]["ended"] == 1.0 and figures["ppo"]["length"] == 1.0
    assert figures["sft"]["ended"] < 0.5  # the 8-step smoke SFT model rarely ends: the human prefers an empty answer
    assert figures["win_rate_gold"]["rate"] > 0.75 and figures["win_rate_judge"]["rate"] != 0.5
    assert figures["ppo"]["kl"] > 1.0 and figures["sft"]["kl"] == pytest.approx(0, abs=1e-5)


def test_the_ceiling_is_the_best_answer_every_time_against_the_sft_samples(smoke_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    cfg = rlhf.Config(**vars(rlhf.build_parser().parse_args(SMOKE + ["--out_dir", str(out)])))
    sft_path = str(out / "sft")

    def fake_evaluate(model, tok, prompts, cfg_, device, scorers, ref=None, seed=None):  # SFT right on half the prompts, PPO never
        is_sft = model.name_or_path == sft_path
        return [dict(prompt=p["prompt"], family=p["family"], sample=0, response="r", ended=True, length=1, rm=0.0,
                     judge=0.0, kl=0.0, gold=1.0 if is_sft and i % 2 == 0 else -1.0, success=is_sft and i % 2 == 0,
                     kind="right" if is_sft and i % 2 == 0 else "wrong value") for i, p in enumerate(prompts)]
    monkeypatch.setattr(rlhf, "evaluate_policy", fake_evaluate)
    figures = rlhf.stage_eval(cfg, CPU)
    # gold 1 against SFT's own samples: a tie where SFT was right (half), a win elsewhere -> 0.75, whatever PPO did
    assert figures["win_rate_ceiling"]["rate"] == pytest.approx(0.75, abs=0.03)
    assert figures["win_rate_gold"]["rate"] == pytest.approx(0.25, abs=0.03)


# ---------------------------------------------------------------------------- beyond PPO: best-of-n, DPO, RLOO, GRPO

def test_best_of_n_gold_is_the_mean_over_subsets_of_the_reward_models_pick():
    assert rlhf.best_of_n_gold([0, 1, 2], [5, 7, 9], 2) == pytest.approx((7 + 9 + 9) / 3)
    rng = random.Random(0)
    rewards, golds = [rng.random() for _ in range(7)], [rng.choice([-1, -0.5, 1]) for _ in range(7)]
    for n in (1, 3, 7):  # against the direct mean over every n-subset
        subsets = list(itertools.combinations(range(7), n))
        direct = sum(golds[max(c, key=lambda i: rewards[i])] for c in subsets) / len(subsets)
        assert rlhf.best_of_n_gold(rewards, golds, n) == pytest.approx(direct)
    assert rlhf.best_of_n_gold(rewards, golds, 1) == pytest.approx(sum(golds) / 7)  # n 1: a plain sample
    # tied rewards: either could be kept, so they count as their mean
    assert rlhf.best_of_n_gold([0, 1, 1], [0, 1, -1], 3) == pytest.approx(0.0)


def test_best_of_n_kl_formula_and_estimate():
    ex = "exercise 19 (best_of_n_kl):"
    formula, estimate = rlhf.best_of_n_kl([1.0, 1.0], 4)  # one response only: choosing changes nothing
    assert formula == pytest.approx(math.log(4) - 3 / 4), f"{ex} the formula is log n − (n−1)/n"
    assert estimate == 0.0, f"{ex} one response, sampled twice: best-of-4 is the same distribution, KL 0 (got {estimate})"
    # two responses, shares 1/2: best-of-2 keeps the better one with probability 3/4
    got = rlhf.best_of_n_kl([0.0, 1.0], 2)[1]
    assert got == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5)), \
        f"{ex} KL(best-of-n ‖ π) = Σ π_n log(π_n / p), with π_n = F^n − F_prev^n: expected 0.131 for [0, 1], n 2, got {got:.3f}"
    # shares 1/4 and 3/4: best-of-2 keeps the better (3/4) response with probability 1 − (1/4)², the other 1/16
    want = (1 / 16) * math.log((1 / 16) / (1 / 4)) + (15 / 16) * math.log((15 / 16) / (3 / 4))
    got = rlhf.best_of_n_kl([0.0, 1.0, 1.0, 1.0], 2)[1]
    assert got == pytest.approx(want), \
        f"{ex} rewards [0, 1, 1, 1], n 2: the higher reward is kept with probability 15/16: expected {want:.4f}, got {got:.4f}"
    assert rlhf.best_of_n_kl([0.0, 1.0], 1) == (0.0, 0.0), f"{ex} n 1 is a plain sample: KL 0"
    distinct = [i / 5000 for i in range(5000)]           # no two alike: the estimate meets the formula
    for n in (2, 8, 32):
        formula, estimate = rlhf.best_of_n_kl(distinct, n)
        assert estimate == pytest.approx(formula, abs=0.01) and estimate <= formula + 1e-9, \
            f"{ex} with no two responses alike the estimate is close to the formula and below it"


def test_dpo_loss_value_sign_and_implicit_rewards():
    ex = "exercise 16 (dpo_loss):"
    z = torch.zeros(3)
    loss, rc, rr = rlhf.dpo_loss(z, z, z, z, 0.1)
    assert loss.item() == pytest.approx(math.log(2)) and torch.equal(rc, z), \
        f"{ex} the policy equal to the reference: loss log 2, implicit rewards 0"
    # chosen up by 1 nat against the reference, rejected down by 1: margin β·2
    loss, rc, rr = rlhf.dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), 0.5)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5), \
        f"{ex} implicit rewards β·(log π − log π_ref): expected 0.5 and −0.5, got {rc.item():.3f} and {rr.item():.3f}"
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0)))), \
        f"{ex} loss −log σ(r_chosen − r_rejected) = −log σ(1) here, got {loss.item():.4f}"
    # the gradient raises the chosen log-prob and lowers the rejected one
    c, r = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    rlhf.dpo_loss(c, r, torch.tensor([-1.0]), torch.tensor([-1.0]), 0.1)[0].backward()
    assert c.grad.item() < 0 < r.grad.item(), f"{ex} minimising the loss must raise log π(chosen) and lower log π(rejected)"
    assert c.grad.item() == pytest.approx(-0.1 * 0.5), f"{ex} at margin 0 the gradient on log π(chosen) is −β·σ(0)"
    # a badly ranked pair with a huge margin: the loss is large, not infinite
    big = rlhf.dpo_loss(torch.tensor([-3000.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 1.0)[0]
    assert big.item() == pytest.approx(2999.0), f"{ex} a margin of −2999 must give a loss of 2999, not inf: use F.logsigmoid"
    two = rlhf.dpo_loss(torch.tensor([0.0, 1.0]), z[:2], z[:2], z[:2], 1.0)[0].item()
    assert two == pytest.approx((math.log(2) - math.log(1 / (1 + math.exp(-1)))) / 2), f"{ex} average over the pairs"


def test_rloo_advantages_leave_each_sample_out_of_its_own_baseline():
    ex = "exercise 17 (rloo_advantages):"
    got = rlhf.rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    want = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    assert torch.allclose(got, want), \
        f"{ex} k 3, two prompts [1, 2, 6] and [0, 0, 3]: R_i minus the mean of the other two; expected {want.tolist()}, got {got.tolist()}"
    got = rlhf.rloo_advantages(torch.tensor([1.0, 3.0]), 2)
    assert torch.allclose(got, torch.tensor([-2.0, 2.0])), f"{ex} k 2: each sample against the other one, got {got.tolist()}"
    assert rlhf.rloo_advantages(torch.tensor([5.0] * 4), 4).abs().max() == 0, f"{ex} equal rewards: no advantage"


def test_grpo_advantages_normalise_within_each_group():
    ex = "exercise 18 (grpo_advantages):"
    got = rlhf.grpo_advantages(torch.tensor([1.0, 3.0, 10.0, 10.0, 10.0, 40.0]), 3)
    g1, g2 = torch.tensor([1.0, 3.0, 10.0]), torch.tensor([10.0, 10.0, 40.0])
    want = torch.cat([(g1 - g1.mean()) / (g1.std() + 1e-4), (g2 - g2.mean()) / (g2.std() + 1e-4)])
    assert torch.allclose(got, want, atol=1e-4), \
        f"{ex} each group of k = 3 against its own mean, divided by its own std: expected {want.tolist()}, got {got.tolist()}"
    got = rlhf.grpo_advantages(torch.tensor([1.0, 3.0]), 2)
    assert torch.allclose(got, torch.tensor([-0.7071, 0.7071]), atol=1e-4), f"{ex} [1, 3]: ±1/√2 (std with Bessel's correction)"
    got = rlhf.grpo_advantages(torch.tensor([2.0, 2.0]), 2)
    assert torch.isfinite(got).all() and got.abs().max() == 0, f"{ex} a group with no spread has no advantage (add ε), got {got.tolist()}"


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert rlhf.k3_kl(lp, lp).abs().max() == 0
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    assert torch.allclose(rlhf.k3_kl(lp, ref), torch.tensor([[math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1, 0.0]]))


# ---------------------------------------------------------------------------- end to end

def test_all_stages_end_to_end(smoke_run):
    out = smoke_run
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    for name in ("sft", "ppo"):
        assert AutoModelForCausalLM.from_pretrained(out / name).config.n_embd == 32
    for name in ("rm", "judge"):
        rm = AutoModelForSequenceClassification.from_pretrained(out / name)
        assert rm.config.num_labels == 1 and hasattr(rm.config, "reward_mean")
    assert AutoTokenizer.from_pretrained(out / "tokenizer").pad_token == rlhf.PAD
    for f in ("sft_loss.png", "rm_curve.png", "judge_curve.png", "ppo_reward.png", "ppo_kl.png", "overview.png",
              "eval.md", "samples.md", "sft_metrics.jsonl", "rm_metrics.jsonl", "ppo_metrics.jsonl"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == list(rlhf.STAGES)
    assert {"acc_gold", "acc_gold_helpful", "acc_label"} <= set(summary["rm"]["heldout"])
    ev = summary["eval"]
    for key in ("win_rate_gold", "win_rate_judge"):
        assert ev[key]["ci"][0] <= ev[key]["rate"] <= ev[key]["ci"][1]
    assert ev["n_samples"] == ev["n_prompts"] == 24 and "[95% interval" in (out / "eval.md").read_text()
    row = json.loads((out / "ppo_metrics.jsonl").read_text().splitlines()[-1])
    for key in ("rm_score", "gold", "kl", "kl_coef", "entropy", "pg_loss", "vf_loss", "clipfrac", "approx_kl",
                "response_len", "value_ev"):
        assert math.isfinite(row[key]), key


@pytest.mark.skipif(not os.path.exists(os.path.join(HERE, "course.py")), reason="course.py is not in the student copy")
def test_course_runs_each_stage_of_a_copy_with_the_seed_of_its_run(tmp_path, monkeypatch):
    import course
    run = tmp_path / "seed_3_no_refresh"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"data": {"config": {"seed": 3}}}))
    calls = []
    monkeypatch.setattr(course.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or types.SimpleNamespace(returncode=0))
    course.run_stage(str(run), "ppo", ["--rm_refresh", "0"], str(tmp_path / "log"))
    course.run_stage(str(run), "eval", ["--seed", "5"], str(tmp_path / "log"))
    assert calls[0][-4:] == ["--seed", "3", "--rm_refresh", "0"] and calls[1].count("--seed") == 1 and calls[1][-1] == "5"


def test_refresh_steps_are_evenly_spaced_and_none_where_the_human_ranks_nothing():
    cfg = rlhf.Config(ppo_steps=60, rm_refresh=4)
    assert rlhf.refresh_steps(cfg, can_rank=True) == {12, 24, 36, 48}
    assert rlhf.refresh_steps(rlhf.Config(ppo_steps=10, rm_refresh=1), can_rank=True) == {5}
    # more refreshes than steps: 2 · i / 5 for i = 1..4 rounds to 0, 1, 1, 2; PPO's steps start at 1
    assert rlhf.refresh_steps(rlhf.Config(ppo_steps=2, rm_refresh=4), can_rank=True) == {1, 2}
    assert rlhf.refresh_steps(cfg, can_rank=False) == set()  # your own --data: no simulated human to ask
    assert rlhf.refresh_steps(dataclasses.replace(cfg, rm_samples=0), can_rank=True) == set()
    assert rlhf.refresh_steps(dataclasses.replace(cfg, rm_refresh=0), can_rank=True) == set()
    assert rlhf.refresh_steps(dataclasses.replace(cfg, reward="human"), can_rank=True) == set()  # no reward model


@pytest.mark.skipif(not os.path.exists(os.path.join(HERE, "course.py")), reason="course.py is not in the student copy")
def test_each_remedy_recipe_runs_what_its_name_says():
    """Chapter 12's one-command experiments: the flags each recipe passes to each stage must do what its name says
    (the crowd-pairs-only recipe once passed --rm_samples 0 to stage rm only, and its PPO refreshed the reward model
    on the policy's samples). A stage a recipe does not run is the default run's, which it copies."""
    import course
    recipes = {name: dict(steps) for name, steps in course.REMEDIES}

    def config(name, stage):
        flags = recipes[name].get(stage)
        if flags is None and name in course.REMEDY_SOURCE:  # copied from another recipe's run
            flags = recipes[course.REMEDY_SOURCE[name]].get(stage)
        return rlhf.Config(**vars(rlhf.build_parser().parse_args(["--stage", stage] + (flags or []))))

    # name: (the RM learns from the SFT policy's own samples, PPO refreshes it, β = 0, reward models, their rule,
    #        what PPO maximises)
    expected = {"crowd pairs only": (False, False, False, 1, "mean", "rm"),
                "no refresh": (True, False, False, 1, "mean", "rm"),
                "human as the reward": (True, False, False, 1, "mean", "human"),
                "hacking, one RM": (True, False, True, 1, "mean", "rm"),
                "hacking, refreshed RM": (True, True, True, 1, "mean", "rm"),
                "hacking, ensemble of 3": (True, False, True, 3, "mean", "rm"),
                "hacking, ensemble min": (True, False, True, 3, "min", "rm"),
                "hacking, ensemble mean − std": (True, False, True, 3, "mean_minus_std", "rm")}
    assert set(recipes) == set(expected), "a new recipe needs its row here"
    default = rlhf.Config()
    assert default.rm_samples > 0 and rlhf.refresh_steps(default, can_rank=True) and default.kl_coef > 0
    for name, (own, refresh, hacking, k, rule, reward) in expected.items():
        rm, ppo = config(name, "rm"), config(name, "ppo")
        got = (rm.rm_samples > 0, bool(rlhf.refresh_steps(ppo, can_rank=True)), ppo.kl_coef == 0 and not ppo.adaptive_kl,
               rm.rm_ensemble, ppo.rm_combine, ppo.reward)
        assert got == (own, refresh, hacking, k, rule, reward), name
        assert list(recipes[name])[-1] == "eval", name


@pytest.mark.skipif(not os.path.exists(os.path.join(HERE, "course.py")), reason="course.py is not in the student copy")
def test_course_tables_and_plots_read_a_finished_run(smoke_run, tmp_path, capsys):
    """The tutorial's figures come from these commands: each must read a real run's summary.json."""
    import course
    course.plot_sweep([str(smoke_run)], str(tmp_path / "sweep.png"))
    course.plot_costs(str(smoke_run), str(tmp_path / "cost.png"))
    s = json.load(open(smoke_run / "summary.json"))
    row = course.seed_row("smoke", s)
    course.plot_seeds([row], str(tmp_path / "seeds.png"))
    assert row["win"] == s["eval"]["win_rate_gold"]["rate"] and row["rm"] == s["rm"]["heldout"]["acc_gold"]
    assert f"{s['eval']['win_rate_gold']['rate']:.3f}" in course.seeds_table([row])
    assert row["wv_ppo"] == s["eval"]["ppo"]["kinds_helpful"]["wrong value"] and 0 <= row["ceiling"] <= 1
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("sweep.png", "cost.png", "seeds.png"))
    rows = course.probe_rm(str(smoke_run), n=4)
    assert [(r["family"], r["answer"]) for r in rows] == [(f, a) for f, answers in course.PROBE.items() for a in answers]
    assert json.load(open(smoke_run / "probe.json")) == rows


def jsonl_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_report_to_tensorboard_logs_every_metric_row_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    rlhf.main(["--stage", "all", "--out_dir", str(out), "--report_to", "tensorboard"] + SMOKE)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for stage in ("sft", "rm", "judge", "ppo"):
        rows = jsonl_rows(out / f"{stage}_metrics.jsonl")
        for key in {k for r in rows for k in r if k != "step"}:
            logged = events.Scalars(f"{stage}/{key}")
            assert [e.step for e in logged] == [r["step"] for r in rows if key in r], (stage, key)
            assert [e.value for e in logged] == pytest.approx([r[key] for r in rows if key in r], rel=1e-6)
    text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "sft_steps: 8" in text and "report_to: 'tensorboard'" in text
    assert "eval/win_rate_gold/rate" in events.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()


def wandb_records(folder):
    """The records of an offline W&B run, read with W&B's own protobuf classes from its .wandb file (LevelDB's
    log format: 32 KiB blocks of records with a 7-byte header: CRC, length, type)."""
    import struct
    from wandb.proto import wandb_internal_pb2
    path = next(folder.glob("wandb/offline-run-*/run-*.wandb"))
    raw, pos, out, part = path.read_bytes(), 7, [], b""
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        part, pos = part + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def test_report_to_wandb_offline_logs_every_metric_row_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline is the default: nothing leaves the machine
    out = tmp_path / "run"
    rlhf.main(["--stage", "all", "--out_dir", str(out), "--report_to", "wandb"] + SMOKE)
    for _ in range(100):  # W&B's service process may still be writing the file when finish() returns
        records = wandb_records(out)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        time.sleep(0.1)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
              for i in r.run.config.update}
    assert config["sft_steps"] == 8 and config["report_to"] == "wandb"
    for stage in ("sft", "rm", "judge", "ppo"):
        rows = jsonl_rows(out / f"{stage}_metrics.jsonl")
        logged = [h for h in history if f"{stage}/step" in h]
        assert [h[f"{stage}/step"] for h in logged] == [r["step"] for r in rows], stage
        assert all(h[f"{stage}/{k}"] == pytest.approx(v) for h, r in zip(logged, rows) for k, v in r.items() if k != "step")


def test_report_to_without_its_package_is_one_line_naming_the_install(tmp_path, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_trackers(name, *args, **kwargs):
        if name.startswith(("wandb", "torch.utils.tensorboard")):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_trackers)
    for tracker in ("tensorboard", "wandb"):
        with pytest.raises(SystemExit) as e:
            rlhf.main(["--stage", "data", "--out_dir", str(tmp_path / "run"), "--report_to", tracker])
        assert str(e.value.code) == f"rlhf.py: error: --report_to {tracker} needs its package: pip install {tracker}"


# Every numeric flag at the ends of the range check_config accepts, on the stage that reads it (and the stages
# after it where the flag changes what they get): the run finishes, or stops with one line before any stage runs.
BOUNDARIES = {
    "data, low": (["all"], ["--n_sft", "1", "--n_pref", "1", "--n_judge", "1", "--crowd_accuracy", "0", "--heldout_frac", "0",
                            "--label_temperature", "0.01", "--eval_prompts", "1", "--eval_samples", "1"]),
    "data, high": (["all"], ["--crowd_accuracy", "1", "--heldout_frac", "0.99", "--label_temperature", "1000",
                             "--eval_prompts", "100000"]),
    "tokenizer and model, low": (["tokenizer", "sft"], ["--vocab_size", "258", "--n_layer", "1", "--n_embd", "2",
                                                        "--n_head", "2", "--n_positions", "9"]),
    "sft, low": (["sft"], ["--sft_steps", "1", "--sft_batch_size", "1", "--sft_lr", "1e-9", "--warmup_frac", "0",
                           "--weight_decay", "0", "--max_grad_norm", "1e-9"]),
    "sft, high": (["sft"], ["--sft_batch_size", "100000", "--sft_lr", "0.05", "--warmup_frac", "1", "--weight_decay", "10",
                            "--max_grad_norm", "1e9"]),
    "learning rates, high": (["sft"], ["--sft_lr", "1e6"]),  # diverges: one line that names the step, as it should
    "rm, low": (["rm", "judge"], ["--rm_epochs", "1", "--rm_batch_size", "1", "--rm_lr", "1e-9", "--rm_samples", "2",
                                  "--rm_ensemble", "1"]),
    "rm, high": (["rm", "judge"], ["--rm_batch_size", "100000", "--rm_samples", "5", "--rm_ensemble", "2"]),
    "ppo, low": (["ppo", "eval"], ["--ppo_steps", "1", "--rollout_batch_size", "1", "--minibatch_size", "1", "--ppo_epochs", "1",
                                   "--ppo_lr", "1e-9", "--vf_coef", "0", "--clip_range", "0", "--value_clip_range", "0",
                                   "--gamma", "0", "--lam", "0", "--kl_coef", "0", "--temperature", "0.01", "--max_new_tokens", "1",
                                   "--rm_refresh", "1", "--rm_samples", "2", "--rm_combine_lambda", "0",
                                   "--missing_eos_score=-1e9"]),
    "ppo, high": (["ppo", "eval"], ["--ppo_steps", "3", "--rollout_batch_size", "8", "--minibatch_size", "8", "--vf_coef", "100",
                                    "--clip_range", "1", "--value_clip_range", "1", "--gamma", "1", "--lam", "1", "--kl_coef", "100",
                                    "--adaptive_kl", "--kl_target", "1e-9", "--kl_horizon", "8", "--temperature", "100",
                                    "--rm_refresh", "100", "--rm_samples", "2", "--rm_combine", "mean_minus_std",
                                    "--rm_combine_lambda", "1000"]),
    "beyond PPO, low": (["bon", "dpo", "rloo", "grpo"], ["--bon_samples", "1", "--dpo_beta", "1e-9", "--dpo_lr", "1e-9",
                                                         "--group_size", "2", "--rollout_batch_size", "2", "--minibatch_size", "1"]),
    "beyond PPO, high": (["bon", "dpo", "rloo", "grpo"], ["--bon_samples", "3", "--dpo_beta", "1000", "--group_size", "8"]),
}


@pytest.mark.parametrize("case", BOUNDARIES)
def test_every_numeric_flag_at_the_ends_of_its_range_runs(case, smoke_run, tmp_path):
    stages, flags = BOUNDARIES[case]
    out = tmp_path / "run"
    if case == "learning rates, high":  # no learning rate is too high to accept; a loss that diverges is one line
        shutil.copytree(smoke_run, out)
        with pytest.raises(SystemExit, match=r"^rlhf.py: error: SFT loss became nan at step \d+; stopped without overwriting"):
            rlhf.main(["--stage", "sft", "--out_dir", str(out)] + SMOKE + flags)
        return
    if stages == ["all"]:
        rlhf.main(["--stage", "all", "--out_dir", str(out)] + SMOKE + flags)
    else:
        shutil.copytree(smoke_run, out)
        for stage in stages:
            rlhf.main(["--stage", stage, "--out_dir", str(out)] + SMOKE + flags)
    summary = json.loads((out / "summary.json").read_text())
    assert all(stage in summary for stage in (rlhf.STAGES if stages == ["all"] else stages)), case


def test_ppo_keeps_beta_fixed_by_default_and_adapts_it_with_adaptive_kl(smoke_run, tmp_path):
    rows = rlhf.read_jsonl(str(smoke_run / "ppo_metrics.jsonl"))
    assert {r["kl_coef"] for r in rows} == {rlhf.Config().kl_coef}
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    rlhf.main(["--stage", "ppo", "--out_dir", str(out), "--adaptive_kl", "--kl_target", "100"] + SMOKE)
    betas = [r["kl_coef"] for r in rlhf.read_jsonl(str(out / "ppo_metrics.jsonl"))]
    assert betas[0] == rlhf.Config().kl_coef and all(b > a for b, a in zip(betas, betas[1:])), betas  # KL < target: β down


def test_ppo_on_the_human_as_the_reward_runs_with_no_reward_model_and_no_refresh(smoke_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    rlhf.main(["--stage", "ppo", "--out_dir", str(out), "--reward", "human", "--rm_refresh", "2"] + SMOKE)
    ppo = json.loads((out / "summary.json").read_text())["ppo"]
    assert ppo["reward_models"] == 0 and ppo["refreshes"] == []  # --rm_refresh 2 asked for, nothing to refresh
    rlhf.main(["--stage", "eval", "--out_dir", str(out)] + SMOKE)  # scored by the stage rm's reward model
    assert json.loads((out / "summary.json").read_text())["eval"]["reward"] == "human"
    assert "mean RM score (not what PPO maximised: --reward human)" in (out / "eval.md").read_text()


def test_a_stage_rerun_removes_what_was_built_from_it_and_keeps_its_own_flags(smoke_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    rlhf.main(["--stage", "ppo", "--out_dir", str(out), "--kl_coef", "0", "--no-adaptive_kl"] + SMOKE)
    assert "eval came from the previous ppo" in capsys.readouterr().out
    assert not (out / "eval.md").exists() and not (out / "samples.md").exists()
    assert "eval" not in json.loads((out / "summary.json").read_text())
    rlhf.main(["--stage", "eval", "--out_dir", str(out)] + SMOKE + ["--eval_samples", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["config"]["eval_samples"] == 2 and summary["ppo"]["config"]["kl_coef"] == 0
    assert summary["eval"]["n_samples"] == 2 * summary["eval"]["n_prompts"]
    rlhf.main(["--stage", "sft", "--out_dir", str(out)] + SMOKE)
    with pytest.raises(SystemExit) as e:  # the reward model was trained from the previous SFT model
        rlhf.main(["--stage", "ppo", "--out_dir", str(out)] + SMOKE)
    assert "rm is out of date" in str(e.value.code)


def test_ctrl_c_names_the_stage_to_rerun_and_keeps_the_finished_ones(smoke_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    before = (out / "rm" / "model.safetensors").read_bytes()

    def interrupted(cfg, device):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlhf, "stage_rm", interrupted)
    with pytest.raises(SystemExit) as e:
        rlhf.main(["--stage", "rm", "--out_dir", str(out)] + SMOKE)
    assert "interrupted in stage rm" in str(e.value.code) and "--stage rm" in str(e.value.code)
    assert "ppo, eval" in str(e.value.code) and (out / "rm" / "model.safetensors").read_bytes() == before


def test_a_cpu_run_repeats_exactly_with_the_same_seed(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        for stage in ("data", "tokenizer", "sft"):
            rlhf.main(["--stage", stage, "--out_dir", str(out)] + SMOKE)
        runs.append((out / "sft_metrics.jsonl").read_text())
    assert runs[0] == runs[1]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(smoke_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    before = (out / "sft" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as e:
        rlhf.main(["--stage", "sft", "--out_dir", str(out), "--sft_lr", "1e30", "--warmup_frac", "0"] + SMOKE)
    assert "loss became" in str(e.value.code) and "at step" in str(e.value.code)
    assert (out / "sft" / "model.safetensors").read_bytes() == before


def checkpoint(folder, model_type, merges, bos=False):
    """A small pretrained-style checkpoint of another family, built from a config (no download), with a
    GPT-2-format tokenizer that has no pad token (like gpt2's) and, if bos, starts texts with a token."""
    from transformers import AutoConfig, AutoModelForCausalLM
    rlhf.save_tokenizer(merges, str(folder), 256)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(config, add_bos_token=bos)))
    vocab = {k: v for k, v in json.loads((folder / "vocab.json").read_text()).items() if k != rlhf.PAD}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    sizes = dict(gpt2=dict(n_embd=32, n_layer=1, n_head=2, n_positions=256),
                 llama=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, max_position_embeddings=256),
                 gpt_neox=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               max_position_embeddings=256))[model_type]
    eos = len(vocab) - 1
    config = AutoConfig.for_model(model_type, vocab_size=len(vocab), bos_token_id=eos, eos_token_id=eos, **sizes)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return len(vocab)


@pytest.fixture(scope="module")
def small_merges():
    return rlhf.train_bpe([r["prompt"] + r["response"] for r in rlhf.make_dataset(
        rlhf.Config(n_sft=100, n_pref=1, n_judge=1))["sft_train"]], 600)


@pytest.mark.parametrize("model_type, bos", [("gpt2", False), ("llama", True), ("gpt_neox", False)])
def test_any_causal_lm_from_a_local_folder(model_type, bos, tmp_path, small_merges):
    """--model takes a Hugging Face folder of any causal LM family: a pad token is added and the embeddings
    resized; every stage runs; the checkpoints reload with plain transformers as that family's classes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    n_vocab = checkpoint(tmp_path / "model", model_type, small_merges, bos)
    out = tmp_path / "run"
    rlhf.main(["--stage", "all", "--out_dir", str(out), "--model", str(tmp_path / "model")] + SMOKE)
    sft, ppo = (AutoModelForCausalLM.from_pretrained(out / name) for name in ("sft", "ppo"))
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert sft.config.model_type == ppo.config.model_type == rm.config.model_type == model_type
    assert ppo.config.vocab_size >= n_vocab + 1 and ppo.config.pad_token_id == n_vocab  # the added <|pad|>
    assert any(not torch.equal(a, b) for a, b in zip(sft.state_dict().values(), ppo.state_dict().values()))
    tok = rlhf.load_tokenizer(str(out / "tokenizer"))
    first = rlhf.tokenize(tok, [dict(prompt="\n\nHuman: hi\n\nAssistant:")], rlhf.Config(), keys=())[0][0]["prompt"]
    assert (first[0] == tok.bos_token_id) == bos
    assert json.loads((out / "summary.json").read_text())["eval"]["n_prompts"] == 24


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_chat_model_reads_its_own_template_and_ends_a_response_with_its_end_of_turn_token(tmp_path, small_merges):
    """An instruction-tuned model's tokenizer carries a chat template: conversational rows are written with it
    (the generation prompt added) for every stage, and a response ends with the template's end-of-turn token."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    folder, out = tmp_path / "chat", tmp_path / "run"
    rlhf.save_tokenizer(small_merges, str(folder), 256)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=1, n_head=2)).save_pretrained(folder)
    rows = [{"prompt": [msg("system", "Be brief."), msg("user", f"What is the capital of country{i}?")],
             "chosen": [msg("assistant", f"City{i}.")], "rejected": [msg("assistant", "No idea.")]} for i in range(40)]
    rlhf.main(["--stage", "all", "--data", write_pairs(tmp_path / "conv.jsonl", rows), "--model", str(folder),
               "--out_dir", str(out)] + SMOKE)
    pairs = [json.loads(line) for line in (out / "data" / "prefs_train.jsonl").read_text().splitlines()]
    i = int(regex_number(pairs[0]["prompt"]))
    assert pairs[0]["prompt"] == tok.apply_chat_template(rows[i]["prompt"], tokenize=False, add_generation_prompt=True)
    assert pairs[0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert pairs[0]["chosen"] == f"City{i}." and pairs[0]["rejected"] == "No idea."
    run_tok = rlhf.load_tokenizer(str(out / "tokenizer"))
    assert run_tok.eos_token == "<|im_end|>" and run_tok.pad_token not in ("<|im_end|>", None)
    ex = rlhf.tokenize(run_tok, [dict(prompt=pairs[0]["prompt"], response="City7.")], rlhf.Config())[0][0]
    assert ex["response"][-1] == run_tok.convert_tokens_to_ids("<|im_end|>")  # a response ends with the end of turn
    assert "chat template" in " ".join(json.loads((out / "summary.json").read_text())["data"]["notes"])
    # the data was written for this model's format: another model must write it again first
    with pytest.raises(SystemExit, match="rerun `python rlhf.py --stage data"):
        rlhf.main(["--stage", "tokenizer", "--out_dir", str(out)] + SMOKE)


def regex_number(text):
    return re.search(r"country(\d+)", text).group(1)


def test_your_own_data_end_to_end_is_judged_by_the_judge(tmp_path):
    rows = []
    for i in range(300):
        turns = [("Hello", "Hi."), (f"Tell me a number near {i % 60}. Ça va? 🙂", None)][i % 2:]
        rows.append({"chosen": hh(turns, f" {i % 60} or so."), "rejected": hh(turns, " No.")})
    data = write_pairs(tmp_path / "pairs.jsonl.gz", rows)
    out = tmp_path / "run"
    rlhf.main(["--stage", "all", "--data", data, "--out_dir", str(out)] + SMOKE)
    summary = json.loads((out / "summary.json").read_text())
    assert "acc_gold" not in summary["rm"]["heldout"] and "acc_label" in summary["judge"]["heldout"]
    assert "gold" not in summary["eval"]["ppo"] and "win_rate_gold" not in summary["eval"]
    table = (out / "eval.md").read_text()
    assert "by the judge" in table and "gold" not in table
    assert summary["data"]["source"] == data and summary["eval"]["ppo"]["length"] > 0
    # no simulated human to rank PPO's samples: the reward model is never refreshed (--rm_refresh is the built-in task's)
    assert summary["ppo"]["refreshes"] == [] and not (out / "ppo_rankings.jsonl").exists()


def test_two_processes_with_torchrun_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2: each process takes half of every batch, DDP (gloo) averages the
    gradients; the SFT and RM losses equal a one-process run of the same global batches."""
    flags = ["--stage", "all"] + SMOKE
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "rlhf.py", "--out_dir", str(tmp_path / "one")] + flags, cwd=HERE, env=env,
                         capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "rlhf.py", "--out_dir", str(tmp_path / "two")] + flags, cwd=HERE, env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert "in each of 2 processes" in two.stdout and two.stdout.count("== stage sft ==") == 1  # rank 0 alone prints
    for name in ("sft_metrics", "rm_metrics", "judge_metrics"):
        a, b = ([json.loads(x)["loss"] for x in (tmp_path / run / f"{name}.jsonl").read_text().splitlines()]
                for run in ("one", "two"))
        assert a == pytest.approx(b, rel=1e-5), name
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / run / "sft" / "model.safetensors") for run in ("one", "two"))
    # Adam divides each step by √(running mean of g²): for a weight whose gradient is ~0, floating-point
    # differences in the summed gradient become steps of up to ±lr, so weights match to lr, not to 1e-7
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["ppo"]["processes"] == 2


def test_bench_runs_the_ppo_step_of_rlhf(capsys):
    import bench
    med = bench.main(["--steps", "2", "--warmup", "1", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
                      "--vocab", "64", "--batch", "8", "--minibatch", "4", "--response_len", "4", "--threads", "1"])
    assert set(med) == {"generate", "score", "train", "total"} and med["total"] >= med["train"] > 0
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "% of the" in out and "tokens/s" in out


# ---------------------------------------------------------------------------- the course: tutorial.md and course.py

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


STEPS = {"make_dataset": ["make_dataset"], "train_bpe": ["train_bpe"], "stage_sft": ["stage_sft"],
         "train_reward_model": ["train_reward_model"], "stage_ppo": ["make_experience", "ppo_update", "stage_ppo"],
         "stage_eval": ["compare_with_sft"]}


@pytest.mark.parametrize("section", STEPS)
def test_tutorial_lists_the_same_numbered_steps_as_the_code(section):
    import inspect
    code_steps = set()
    for func in STEPS[section]:
        code_steps |= set(re.findall(r"^\s*(?:# )?(\d+)\.(?:-\d+\.)? ", inspect.getsource(getattr(rlhf, func)), re.M))
    text = open(os.path.join(HERE, "tutorial.md"), encoding="utf-8").read()
    part = re.split(r"\*\*What you see|\n## ", text.split(f"**The steps of `{section}`")[1])[0]
    tutorial_steps = set(re.findall(r"^(?:\*\*)?(\d+)\. ", part, re.M))
    assert code_steps == tutorial_steps and len(code_steps) >= 3, (code_steps, tutorial_steps)


@pytest.mark.parametrize("doc, at_least", [("tutorial.md", 20), ("README.md", 5)])
def test_tutorial_commands_parse(doc, at_least):
    """Every `python rlhf.py`, `python course.py`, `python bench.py` and `pytest -k` command of the tutorial
    and the README (```bash blocks and inline) is valid as written: known flags and values, existing
    subcommands, tests that exist, and the error a line says it gives."""
    if HAS_COURSE:
        import course
    import bench
    test_names = [name for name in globals() if name.startswith("test_")]
    text = open(os.path.join(HERE, doc), encoding="utf-8").read()
    lines = [line for block in tutorial_blocks("bash", doc) for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(python [^`]+)`", text)  # inline commands, such as the grading ones
    n_commands = 0
    for line in lines:
        words = [re.sub(r"\$\w+", "0.1", w) for w in shlex.split(line, comments=True)]
        if words[:1] == ["torchrun"]:
            words = ["python"] + words[words.index("rlhf.py"):]
        if words[:2] == ["python", "rlhf.py"] and "--help" in words:
            with pytest.raises(SystemExit) as e:
                rlhf.build_parser().parse_args(words[2:])
            assert e.value.code == 0
        elif words[:2] == ["python", "rlhf.py"]:
            cfg = rlhf.Config(**vars(rlhf.build_parser().parse_args(words[2:])))
            cfg = dataclasses.replace(cfg, device="cpu", data="")  # a GPU line, or your own file, checked as if here
            if "# rlhf.py: error: " in line:  # a line that shows an error must give that error
                with pytest.raises(rlhf.UserError) as e:
                    rlhf.check_config(cfg)
                assert str(e.value) == line.split("# rlhf.py: error: ")[1].strip()
            else:
                rlhf.check_config(cfg)
        elif words[:2] == ["python", "course.py"] and HAS_COURSE:
            course.build_parser().parse_args(words[2:])
        elif words[:2] == ["python", "bench.py"]:
            bench.build_parser().parse_args(words[2:])
        elif words[:3] == ["python", "-m", "pytest"] and "-k" in words:
            for expression in words[words.index("-k") + 1].split(" or "):
                assert any(expression in name for name in test_names), f"no test matches -k {expression}"
        else:
            continue
        n_commands += 1
    assert n_commands >= at_least


@needs_course
@pytest.mark.parametrize("doc", ["README.md", "tutorial.md"])
def test_every_figure_of_the_docs_comes_from_its_stored_run(doc):
    """Every number in a span (<!--f RUN PATH FORMAT-->) and every table in a block (<!--table NAME-->) is what
    `python course.py docs` writes from assets/runs/: a figure edited by hand, or stated differently in two
    places, fails here."""
    import course
    text = open(os.path.join(HERE, doc), encoding="utf-8").read()
    assert course.SPAN.search(text) and course.BLOCK.search(text), f"{doc} has no figure spans or table blocks"
    for m in course.SPAN.finditer(text):
        assert m.group(2) == course.figure(m.group(1)), \
            f"{doc}: <!--f {m.group(1)}--> says {m.group(2)!r}, the stored run says {course.figure(m.group(1))!r}; run `python course.py docs`"
    for m in course.BLOCK.finditer(text):
        assert m.group(2).rstrip("\n") == course.table(m.group(1)), \
            f"{doc}: the table <!--table {m.group(1)}--> differs from its stored runs; run `python course.py docs`"


@needs_course
@pytest.mark.parametrize("doc", ["README.md", "tutorial.md"])
def test_no_measured_number_in_the_docs_stands_outside_a_span(doc):
    """A number with three decimals, or a range of decimals, is a measurement: it must come from a stored run.
    Code blocks, spans, table blocks and the appendix of history are left out of the search."""
    import course
    text = open(os.path.join(HERE, doc), encoding="utf-8").read()
    for pattern in (course.SPAN, course.BLOCK, re.compile(r"```.*?```", re.S),
                    re.compile(r"<!-- history -->.*?<!-- /history -->", re.S)):
        text = pattern.sub(" ", text)
    loose = re.findall(r"[−+-]?\b\d+\.\d{3}\b|\b\d+\.\d+\s*[–-]\s*\d+\.\d+\b", text)
    assert not loose, f"{doc}: measured-looking numbers outside a span: {loose[:10]}"


def test_a_doc_figure_edited_by_hand_fails_the_check(tmp_path):
    """The check above is not vacuous: change one digit of a span and it no longer matches its run."""
    course = pytest.importorskip("course")
    text = open(os.path.join(HERE, "tutorial.md"), encoding="utf-8").read()
    m = next(m for m in course.SPAN.finditer(text) if re.search(r"\d", m.group(2)))
    edited = text[:m.start(2)] + re.sub(r"\d", lambda d: str((int(d.group()) + 1) % 10), m.group(2), count=1) + text[m.end(2):]
    assert course.render_docs(edited) != edited and course.render_docs(text) == text


@needs_course
def test_tutorial_has_every_exercise_with_its_grading_command():
    import course
    text = open(os.path.join(HERE, "tutorial.md"), encoding="utf-8").read()
    for n, (func, _, _) in course.EXERCISES.items():
        section = text.split(f"### Exercise {n}:")[1].split("\n### ")[0]
        assert f"`{func}(" in section and course.grading_command(n) in section, n
        assert "Hint" in section, n


@needs_course
def test_student_copy_blanks_only_the_exercise_bodies_and_never_mentions_course_py(tmp_path):
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
    assert "Stage 3: PPO with a KL penalty" in student and student.count("\n") < source.count("\n")
    copy = course.make_student_copy(str(tmp_path / "lab"))
    for name in os.listdir(copy):
        if name.endswith(".md") or name == "rlhf.py":  # what students read (the tests skip course.py's checks)
            assert "course.py" not in open(os.path.join(copy, name), encoding="utf-8").read(), name


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


def test_every_classic_wrong_solution_is_a_change_to_its_function_as_it_is():
    """course.WRONG's edits still find their lines in rlhf.py (a refactor that moves them breaks this, in seconds,
    before CI's grader check), and each changes its own function, into valid Python, and nothing else."""
    course = pytest.importorskip("course")
    source = open(os.path.join(HERE, "rlhf.py"), encoding="utf-8").read()
    lines = source.splitlines(keepends=True)
    nodes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    for n, cases in course.WRONG.items():
        node = nodes[course.EXERCISES[n][0]]
        before, own, after = lines[:node.lineno - 1], lines[node.lineno - 1:node.end_lineno], lines[node.end_lineno:]
        for what, fix in cases:
            out = course.wrong_source(source, n, fix).splitlines(keepends=True)
            middle = out[len(before):len(out) - len(after)]
            assert out[:len(before)] == before and out[len(out) - len(after):] == after, (n, what)
            assert middle != own and ast.parse("".join(middle)).body[0].name == node.name, (n, what)
    with pytest.raises(SystemExit, match="exercise 3 edits 'no such line'"):
        course.wrong_source(source, 3, [("no such line", "")])


@needs_course
@pytest.mark.skipif(not os.environ.get("RLHF_CHECK_EXERCISES"), reason="about 4 minutes on 2 cores: CI runs it "
                    "(RLHF_CHECK_EXERCISES=1, or `python course.py check`)")
def test_each_exercise_grader_fails_without_its_code_and_on_classic_mistakes():
    """course.py check: on the full rlhf.py each grading command passes; on the student copy it fails;
    with only that exercise blank it fails with that exercise's own error; and each of the classic wrong
    solutions in course.WRONG fails that exercise's grader, with a message naming the exercise, and
    makes no other exercise's grader fail. It runs 148 small pytest sessions, so the default suite leaves
    it to CI (.ci/run sets RLHF_CHECK_EXERCISES=1 for a second pytest call)."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "course.py"), "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_readme_lists_every_flag_with_its_default():
    """The README's Options table has one row per Config field, with the default rlhf.py uses."""
    text = open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    rows = dict(re.findall(r"^\| `--(\w+)`(?: / `--no-\w+`)? \| `([^`]*)` \|", text, re.M))
    for f in dataclasses.fields(rlhf.Config):
        assert f.name in rows, f"README.md, Options: no row for --{f.name}"
        assert rows[f.name] == ("''" if f.default == "" else str(f.default)), (f.name, rows[f.name], f.default)
    assert set(rows) == {f.name for f in dataclasses.fields(rlhf.Config)}


@pytest.mark.parametrize("args, code, says", [(["--help"], 0, "usage: rlhf.py"),
                                              (["--stage", "all"], 1, "'torch' is not installed")])
def test_without_torch_help_works_and_a_run_says_what_to_install(args, code, says):
    script = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['rlhf.py'] + sys.argv[1:]; "
              f"runpy.run_path({rlhf.__file__!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, "-c", script] + args, capture_output=True, text=True)
    assert out.returncode == code and says in out.stdout + out.stderr and "Traceback" not in out.stderr
