"""Tests for lab.py, one group per section of it, then the course: tutorial.md, README.md and course.py.
Run: python -m pytest -q            (with test_rlhf.py, the tests of rlhf.py)

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

import pytest
import torch

import lab
import rlhf
from test_rlhf import (BIKE, CAR, CPU, SMOKE, UNTOLD, checkpoint, encode_plain, pad_left, pad_right, small_merges,
                       tiny_lm, tiny_scalar_model, tiny_tokenizer)

torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))
LAB_SMOKE = SMOKE + ["--n_judge", "32", "--rm_refresh_prompts", "8", "--bon_samples", "4"]
assert small_merges  # (a fixture of test_rlhf.py, used here too)


def lab_config(*flags):
    return lab.LabConfig(**vars(rlhf.build_parser(lab.LabConfig, "lab.py").parse_args(list(flags))))


# ---------------------------------------------------------------------------- config, processes, files

def test_every_lab_flag_is_a_flag_with_help_and_rlhf_pys_flags_are_there_too():
    parser = rlhf.build_parser(lab.LabConfig, "lab.py")
    flags = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(lab.LabConfig):
        assert f.name in flags and flags[f.name].help, f.name
    assert {f.name for f in dataclasses.fields(rlhf.Config)} < {f.name for f in dataclasses.fields(lab.LabConfig)}
    assert parser.parse_args(["--rm-refresh", "3"]).rm_refresh == 3 and parser.parse_args(["--compile"]).compile
    assert lab.LabConfig().rm_refresh == 0  # lab.py --stage all is rlhf.py --stage all and the judge


@pytest.mark.parametrize("argv, message", [
    (["--stage", "nope"], "invalid choice"),
    (["--sft_lr", "-1"], "--sft_lr must be > 0"),  # rlhf.py's checks, here too
    (["--data", "no/such/file.jsonl"], "--data no/such/file.jsonl: no such file"),
    (["--stage", "rloo", "--group_size", "1"], "--group_size must be >= 2"),
    (["--stage", "grpo", "--group_size", "5"], "divide --rollout_batch_size"),
    (["--rm_ensemble", "0"], "--rm_ensemble must be > 0"),
    (["--bon_samples", "0"], "--bon_samples must be > 0"),
    (["--crowd_wrong_values", "2"], "--crowd_wrong_values must be between 0 and 1"),
    (["--rm_combine", "max"], "invalid choice"),
    (["--reward", "gold"], "invalid choice"),
    (["--reward", "human", "--data", "pairs.jsonl"], "--reward human needs the built-in task"),
    (["--report_to", "mlflow"], "invalid choice"),
])
def test_bad_lab_flags_are_one_clear_line(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        lab.main(argv + ["--out_dir", str(tmp_path / "run")])
    text = str(e.value.code)
    assert message in text and "\n" not in text.strip() and text.startswith("lab.py: error: ")
    assert not (tmp_path / "run").exists()


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
            lab.main(["--stage", "data", "--model", model, "--out_dir", str(tmp_path / "run")])
        assert message in str(e.value.code) and "\n" not in str(e.value.code), (model, e.value.code)


def test_pick_threads_respects_the_flag_and_leaves_busy_cores_alone(monkeypatch):
    assert lab.pick_threads(lab.LabConfig(threads=3)) == 3
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(lab, "busy_cores", lambda: 0.0)
    assert lab.pick_threads(lab.LabConfig()) == 2
    monkeypatch.setattr(lab, "busy_cores", lambda: 1.0)  # another program keeps one core busy
    assert lab.pick_threads(lab.LabConfig()) == 1
    monkeypatch.setattr(lab, "busy_cores", lambda: 5.0)
    assert lab.pick_threads(lab.LabConfig()) == 1


def test_share_and_my_part_in_one_process_and_in_two(monkeypatch):
    assert lab.share(17) == 1.0 and lab.world() == 1 and lab.my_part([1, 2, 3]) == ([1, 2, 3], 1.0)
    monkeypatch.setattr(lab, "world", lambda: 2)
    for r, part in ((0, (["a", "c"], 1.0)), (1, (["b"], 1.0))):
        monkeypatch.setattr(lab, "rank", lambda r=r: r)
        assert lab.my_part(["a", "b", "c"]) == part
    assert lab.my_part(["a"]) == (["a"], 0.0)  # rank 1 of a one-item batch: the item at weight 0
    monkeypatch.setattr(lab, "all_sum", lambda x: 40.0)  # 2 processes with 30 and 10 tokens
    assert lab.share(30) == 1.5 and lab.share(10) == 0.5


def test_downstream_and_a_rerun_forget_what_was_built_from_the_old_outputs(tmp_path):
    assert lab.downstream("rm") == ["ppo", "eval", "bon", "dpo", "rloo", "grpo"]
    assert lab.downstream("sft") == ["rm", "judge", "ppo", "eval", "bon", "dpo", "rloo", "grpo"]
    assert lab.downstream("ppo") == ["eval"] and lab.downstream("dpo") == []
    cfg = lab.LabConfig(out_dir=str(tmp_path))
    rlhf.save_summary(cfg, {stage: {"finished": i} for i, stage in enumerate(lab.STAGES)})
    for stage in lab.STAGES:
        (tmp_path / stage).mkdir()
    (tmp_path / "eval.md").write_text("| an old table |")
    assert lab.require(cfg, "ppo") == str(tmp_path / "ppo")
    assert lab.forget_downstream(cfg, "ppo") == ["eval"] and not (tmp_path / "eval.md").exists()
    assert list(rlhf.load_summary(cfg)) == [s for s in lab.STAGES if s != "eval"]  # no longer listed as current
    # rlhf.py reruns sft, which knows nothing of the judge: the judge is out of date, and says so
    summary = rlhf.load_summary(cfg)
    summary["sft"]["finished"] = 100
    rlhf.save_summary(cfg, summary)
    with pytest.raises(rlhf.UserError, match="judge is out of date: sft ran again since"):
        lab.require(cfg, "judge")


# ---------------------------------------------------------------------------- 1-2. the data, the judge, your own data

def test_the_judge_learns_from_pairs_of_the_training_prompts_the_reward_model_never_saw(tmp_path):
    cfg = lab.LabConfig(out_dir=str(tmp_path), n_sft=50, n_pref=300, n_judge=200)
    figures = lab.stage_data(cfg, CPU)
    data = {n[:-6]: rlhf.read_jsonl(str(tmp_path / "data" / n)) for n in os.listdir(tmp_path / "data")}
    assert figures["counts"]["prefs_judge"] == 200 and len(data["prefs_judge"]) == 200
    held = {p["prompt"] for p in data["prompts"] if p["split"] == "heldout"}
    assert not held & {r["prompt"] for r in data["prefs_judge"]}
    pairs = lambda rows: {(r["prompt"], r["chosen"], r["rejected"]) for r in rows}  # noqa: E731
    assert len(pairs(data["prefs_judge"]) & pairs(data["prefs_train"])) < 20  # other comparisons (some repeat by chance)
    assert data["prefs_train"] == rlhf.make_dataset(cfg)["prefs_train"]  # rlhf.py's data, the same draws


def test_crowd_wrong_values_turn_dodges_into_the_answer_with_another_value():
    cfg = lab.LabConfig(n_sft=10, n_pref=2000)
    data = rlhf.make_dataset(cfg)
    prompts = {p["prompt"]: p for p in data["prompts"]}
    new = lab.with_wrong_values(data["prefs_train"], data["prompts"], 1.0, random.Random(0), cfg)
    kinds = lambda rows: [{rlhf.answer_kind(prompts[r["prompt"]], r[k]) for k in ("chosen", "rejected")}  # noqa: E731
                          for r in rows]
    old_kinds, new_kinds = kinds(data["prefs_train"]), kinds(new)
    assert not any("wrong value" in k for k in old_kinds)
    assert not any("dodge" in k for k, r in zip(new_kinds, new) if prompts[r["prompt"]]["family"] == "helpful")
    told_vs_wrong = sum(k == {"right", "wrong value"} for k in new_kinds)
    assert told_vs_wrong > 100, told_vs_wrong
    for r in new:  # a wrong value is the asked subject's answer with another value, labelled again by the annotator
        p = prompts[r["prompt"]]
        for k in ("chosen", "rejected"):
            if rlhf.answer_kind(p, r[k]) == "wrong value":
                assert p["answer"].lower() not in rlhf.words_of(r[k]) and r[f"gold_{k}"] == rlhf.gold_judge(p, r[k])[0]
    other = [(a, b) for a, b in zip(data["prefs_train"], new) if prompts[a["prompt"]]["family"] != "helpful"]
    assert all(a == b for a, b in other)  # the other families' pairs are untouched
    assert lab.with_wrong_values(data["prefs_train"], data["prompts"], 0.0, random.Random(0), cfg) == data["prefs_train"]


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
        pairs, dropped = lab.read_preference_file(write_pairs(tmp_path / name, [row, ""]))  # a blank line is skipped
        assert pairs == [dict(prompt=prompt, chosen=chosen, rejected=rejected)] and dropped == {}, shape


def test_a_few_rows_that_cannot_be_pairs_are_dropped_and_counted(tmp_path):
    """As in Anthropic's own HH-RLHF files, where a few pairs differ before the last turn (an earlier turn edited)."""
    good = [{"chosen": hh([("Hi", "Hey"), (f"question {i}?", None)], f" answer {i}"),
             "rejected": hh([("Hi", "Hey"), (f"question {i}?", None)], " no")} for i in range(60)]
    edited = [{"chosen": hh([("Hi", "Hey"), ("x?", None)], " a"), "rejected": hh([("Hi", "Yo"), ("x?", None)], " b")}] * 3
    odd = ['{"chosen": "a", ', {"prompt": "p", "good": "a", "bad": "b"}, {"prompt": "p", "chosen": " same", "rejected": " same"},
           {"prompt": "p", "chosen": " ", "rejected": " b"}]
    path = write_pairs(tmp_path / "hh.jsonl", good[:10] + edited + good[10:] + odd)
    pairs, dropped = lab.read_preference_file(path)
    assert len(pairs) == 60
    assert dropped["chosen and rejected differ before the last assistant turn"] == (3, 11)
    assert dropped["chosen equal to rejected"][0] == 1 and dropped["an empty response"][0] == 1
    assert any(reason.startswith("not valid JSON") for reason in dropped)
    assert any("found ['bad', 'good', 'prompt']" in reason for reason in dropped)
    lab.main(["--stage", "data", "--data", path, "--out_dir", str(tmp_path / "run")])
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
        lab.main(["--stage", "data", "--data", str(path), "--out_dir", str(tmp_path / "run")])
    text = str(e.value.code)
    assert message in text and "\n" not in text.strip(), text
    assert content is None or str(path) in text


def test_dataset_from_file_keeps_held_out_prompts_out_and_the_judge_apart(tmp_path):
    rows = [{"prompt": f"\n\nHuman: question {i % 50}?\n\nAssistant:", "chosen": f" answer {i}", "rejected": " no"}
            for i in range(200)] + [{"prompt": "tie", "chosen": " same", "rejected": " same"}]
    cfg = lab.LabConfig(data=write_pairs(tmp_path / "p.jsonl", rows), n_pref=100, n_judge=60, n_sft=80)
    data, notes, chat = lab.dataset_from_file(cfg)
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


def test_a_prompt_too_long_for_the_model_loses_its_oldest_turns_first(tmp_path):
    rlhf.save_tokenizer({}, str(tmp_path / "tokenizer"), 40)  # bytes only: one token per byte; 40 positions
    tok = rlhf.load_tokenizer(str(tmp_path / "tokenizer"))
    cfg = lab.LabConfig(out_dir=str(tmp_path), max_new_tokens=8)  # prompt budget 40 - 8 = 32 tokens
    last = "\n\nHuman: Why?\n\nAssistant:"  # 26 bytes
    (tmp_path / "data").mkdir()
    rows = [dict(prompt="\n\nHuman: " + "a" * 30 + "\n\nAssistant: ok" + last, chosen=" yes", rejected=" no"),
            dict(prompt="b" * 50 + "?", chosen=" y", rejected=" n")]
    rlhf.write_jsonl(str(tmp_path / "data" / "prefs_train.jsonl"), rows)
    assert lab.drop_old_turns(cfg, tok) == 1
    got = rlhf.read_jsonl(str(tmp_path / "data" / "prefs_train.jsonl"))
    assert got[0]["prompt"] == last and got[1]["prompt"] == rows[1]["prompt"]  # no turn to drop: rlhf.tokenize cuts it
    assert tok.decode(rlhf.tokenize(tok, got, cfg, keys=())[1]["prompt"]) == "b" * 31 + "?"


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
    lab.main(["--stage", "all", "--data", write_pairs(tmp_path / "conv.jsonl", rows), "--model", str(folder),
               "--out_dir", str(out)] + LAB_SMOKE)
    pairs = [json.loads(line) for line in (out / "data" / "prefs_train.jsonl").read_text().splitlines()]
    i = int(regex_number(pairs[0]["prompt"]))
    assert pairs[0]["prompt"] == tok.apply_chat_template(rows[i]["prompt"], tokenize=False, add_generation_prompt=True)
    assert pairs[0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert pairs[0]["chosen"] == f"City{i}." and pairs[0]["rejected"] == "No idea."
    run_tok = rlhf.load_tokenizer(str(out / "tokenizer"))
    assert run_tok.eos_token == "<|im_end|>" and run_tok.pad_token not in ("<|im_end|>", None)
    ex = rlhf.tokenize(run_tok, [dict(prompt=pairs[0]["prompt"], response="City7.")], rlhf.Config())[0]
    assert ex["response"][-1] == run_tok.convert_tokens_to_ids("<|im_end|>")  # a response ends with the end of turn
    assert "chat template" in " ".join(json.loads((out / "summary.json").read_text())["data"]["notes"])
    # the data was written for this model's format: another model must write it again first
    with pytest.raises(SystemExit, match="rerun `python lab.py --stage data"):
        lab.main(["--stage", "tokenizer", "--out_dir", str(out)] + LAB_SMOKE)


def regex_number(text):
    return re.search(r"country(\d+)", text).group(1)


def test_your_own_data_end_to_end_is_judged_by_the_judge(tmp_path):
    rows = []
    for i in range(300):
        turns = [("Hello", "Hi."), (f"Tell me a number near {i % 60}. Ça va? 🙂", None)][i % 2:]
        rows.append({"chosen": hh(turns, f" {i % 60} or so."), "rejected": hh(turns, " No.")})
    data = write_pairs(tmp_path / "pairs.jsonl.gz", rows)
    out = tmp_path / "run"
    lab.main(["--stage", "all", "--data", data, "--out_dir", str(out)] + LAB_SMOKE + ["--rm_refresh", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert "acc_gold" not in summary["rm"]["heldout"] and "acc_label" in summary["judge"]["heldout"]
    assert "gold" not in summary["eval"]["ppo"] and "win_rate_gold" not in summary["eval"] and "win_rate_judge" in summary["eval"]
    table = (out / "eval.md").read_text()
    assert "by the judge" in table and "gold" not in table
    assert summary["data"]["source"] == data and summary["eval"]["ppo"]["length"]["mean"] > 0
    # no simulated human to rank PPO's samples: the reward model is never refreshed (--rm_refresh is the built-in task's)
    assert summary["ppo"]["refreshes"] == [] and not (out / "ppo_rankings.jsonl").exists()


# ---------------------------------------------------------------------------- 3. reward hacking and the remedies

def test_refresh_steps_are_evenly_spaced_and_none_where_the_human_ranks_nothing():
    cfg = lab.LabConfig(ppo_steps=60, rm_refresh=4)
    assert lab.refresh_steps(cfg, can_rank=True) == {12, 24, 36, 48}
    assert lab.refresh_steps(lab.LabConfig(ppo_steps=10, rm_refresh=1), can_rank=True) == {5}
    # more refreshes than steps: 2 · i / 5 for i = 1..4 rounds to 0, 1, 1, 2; PPO's steps start at 1
    assert lab.refresh_steps(lab.LabConfig(ppo_steps=2, rm_refresh=4), can_rank=True) == {1, 2}
    assert lab.refresh_steps(cfg, can_rank=False) == set()  # your own --data: no simulated human to ask
    assert lab.refresh_steps(dataclasses.replace(cfg, rm_samples=0), can_rank=True) == set()
    assert lab.refresh_steps(dataclasses.replace(cfg, rm_refresh=0), can_rank=True) == set()
    assert lab.refresh_steps(dataclasses.replace(cfg, reward="human"), can_rank=True) == set()  # no reward model


def test_a_refresh_trains_the_reward_model_ppo_is_scored_by(tmp_path, monkeypatch):
    """The wiring of own_rankings into PPO's refreshes (a smoke model's samples are too alike to rank, so the human's
    rankings are stood in for: three answers to each prompt, ranked by the gold score): each refresh trains the
    reward model PPO is scored by, which is saved as ppo_rm/ and scores the evaluation."""
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
    lab.main(["--stage", "all", "--out_dir", str(out)] + LAB_SMOKE + ["--ppo_steps", "4", "--rm_refresh", "1"])
    s = json.load(open(out / "summary.json"))
    assert [r["step"] for r in s["ppo"]["refreshes"]] == [2] and s["ppo"]["refreshes"][0]["rankings"] > 0
    from transformers import AutoModelForSequenceClassification
    old = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    new = AutoModelForSequenceClassification.from_pretrained(out / "ppo_rm")
    assert any(not torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters())), "the refresh was not applied"
    # trained again from SFT, the refreshed reward model is a new one: PPO must be scored by it from then on
    lab.main(["--stage", "ppo", "--out_dir", str(out)] + LAB_SMOKE + ["--ppo_steps", "4", "--rm_refresh", "1",
                                                                     "--rm_refresh_from", "sft"])
    new = AutoModelForSequenceClassification.from_pretrained(out / "ppo_rm")
    assert any(not torch.equal(a, b) for a, b in zip(old.parameters(), new.parameters())), "the refresh was not applied"


def fake_generate_of(tok, texts):
    """generate() that answers the i-th prompt with texts[i % len(texts)], every response ended."""
    def fake_generate(policy, tok_, prompt_ids, cfg_, device):
        rows = [texts[i % len(texts)] for i in range(len(prompt_ids))]
        r_ids, r_mask = pad_right([encode_plain(tok, t) + [tok.eos_token_id] for t in rows], tok.pad_token_id)
        q_ids, q_mask = pad_left(prompt_ids, tok.pad_token_id)
        return q_ids, q_mask, r_ids, r_mask, torch.ones(len(rows), dtype=torch.bool)
    return fake_generate


def test_a_refresh_learns_the_new_rankings_and_replays_as_many_earlier_rows(monkeypatch):
    """--rm_refresh_from rm: the new rows and as many earlier ones, drawn from all so far, so that the reward model
    does not forget them; --rm_refresh_from sft: every row so far and the new ones."""
    seen = []
    monkeypatch.setattr(lab, "fit_reward_model", lambda rm, tok, train, *a, **k: seen.append(train))
    monkeypatch.setattr(lab, "normalise", lambda *a, **k: None)
    def fresh_rm(*a, **k):  # a stand-in reward model (load_scalar_model's): its training is faked
        rm = torch.nn.Linear(1, 1)
        rm.config = types.SimpleNamespace()
        return rm
    monkeypatch.setattr(rlhf, "load_scalar_model", fresh_rm)
    old, new = [dict(id=i) for i in range(10)], [dict(id=100 + i) for i in range(3)]
    for earlier, frm in ((old, "rm"), (old[:2], "rm"), (old, "sft")):
        lab.refresh_reward_model(torch.nn.Linear(1, 1), new, earlier, None, types.SimpleNamespace(pad_token_id=0),
                                 [], lab.LabConfig(rm_refresh_from=frm), CPU, 0)
    assert seen[0][:3] == new and len(seen[0]) == 6 and all(r in old for r in seen[0][3:])
    assert len({r["id"] for r in seen[0][3:]}) == 3  # drawn without replacement
    assert sorted(r["id"] for r in seen[1]) == [0, 1, 100, 101, 102]  # fewer earlier rows than new: all of them
    assert seen[2] == old + new


def test_a_refresh_normalises_the_refreshed_reward_model_on_sft_samples(tmp_path, monkeypatch):
    tok = tiny_tokenizer(tmp_path)
    rm, sft = tiny_scalar_model(tok, tmp_path / "lm"), tiny_lm(tok)
    rm.config.reward_mean, rm.config.reward_std = 0.0, 1.0
    sampler = fake_generate_of(tok, [" Your bike is red.", " I don't know.", " Sorry, no."])
    monkeypatch.setattr(rlhf, "generate", sampler)

    def fake_fit(rm_, tok_, train, held, cfg_, device, name, seed=None):  # "training" that moves the scale
        with torch.no_grad():
            rm_.score.weight.mul_(5.0).add_(0.1)
    monkeypatch.setattr(lab, "fit_reward_model", fake_fit)
    cfg = lab.LabConfig()
    new = lab.refresh_reward_model(rm, [dict(prompt="Q", chosen=" a", rejected=" b")], [], sft, tok, [BIKE, CAR], cfg,
                                   CPU, 0)
    q_ids, q_mask, r_ids, r_mask, _ = sampler(sft, tok, rlhf.prompt_tokens(tok, [BIKE, CAR], cfg) * 2, cfg, CPU)
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
    (out / "rm" / "model.safetensors").exists()
    ids = torch.tensor([rlhf.encode(tok, [t])[0] for t in ("Human: hi Assistant: yes", "Human: hi Assistant: nop")])
    mask, ended = torch.ones_like(ids), torch.tensor([True, True])
    for rule in ("mean", "min"):
        cfg = lab.LabConfig(out_dir=str(out), rm_combine=rule)
        score_fn, rms = lab.reward_function(cfg, CPU)
        each = torch.stack([rlhf.rm_scores(m, ids, mask, ended, cfg) for m in rms])  # (2, B)
        assert len(rms) == 2 and not torch.allclose(each[0], each[1])
        assert torch.allclose(score_fn(ids, mask, ended), lab.ensemble_reward(each, rule, 1.0)), rule


@torch.no_grad()
def test_the_human_as_the_reward_is_its_gold_score_on_the_scale_of_sft_samples(tmp_path, monkeypatch):
    out = tmp_path / "run"
    tok = tiny_tokenizer(out / "tokenizer")
    tiny_lm(tok).save_pretrained(out / "sft")
    (out / "data").mkdir()
    rlhf.write_jsonl(str(out / "data" / "prompts.jsonl"),
                     [dict(BIKE, split="train"), dict(CAR, split="train"), dict(UNTOLD, split="heldout")])
    (out / "summary.json").write_text(json.dumps({"data": {}, "tokenizer": {}, "sft": {}}))
    # the SFT "samples" the scale is measured on: the first 240 training prompts (here [BIKE, CAR]) twice, gold +1, +1, -1, -0.5
    monkeypatch.setattr(rlhf, "generate", fake_generate_of(
        tok, [" Your bike is red.", " Sorry, I can't help with that.", " Your bike is blue.", " I don't know."]))
    score_fn, rms = lab.reward_function(lab.LabConfig(out_dir=str(out), reward="human"), CPU)
    assert rms == []
    mean, std = 0.125, math.sqrt((2 * 0.875 ** 2 + 1.125 ** 2 + 0.625 ** 2) / 3)  # the sample std: 1.031
    # the policy's rollouts: prompts of different lengths, left-padded, and right-padded responses
    rows = [(CAR, " Sorry, I can't help with that."), (BIKE, " Your bike is blue."), (BIKE, " Your bike is red."),
            (UNTOLD, " I don't know.")]
    q_ids, q_mask = pad_left([rlhf.prompt_tokens(tok, [p], rlhf.Config())[0] for p, _ in rows], tok.pad_token_id)
    r_ids, r_mask = pad_right([encode_plain(tok, r) + [tok.eos_token_id] for _, r in rows], tok.pad_token_id)
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
    score_fn, _ = lab.reward_function(lab.LabConfig(out_dir=str(out), reward="human"), CPU)
    assert score_fn(ids[2:3], mask[2:3], torch.tensor([True])).item() == pytest.approx((1 - 1 / 3) / math.sqrt(4 / 3), abs=1e-4)


def test_ensemble_reward_by_each_rule():
    ex = "exercise 15 (ensemble_reward):"
    scores = torch.tensor([[1.0, 0.0, -1.0], [3.0, 0.0, 2.0]])   # 2 reward models x 3 responses
    got = lab.ensemble_reward(scores, "mean", 1.0)
    assert got.shape == (3,) and torch.allclose(got, torch.tensor([2.0, 0.0, 0.5])), \
        f"{ex} 'mean' averages each response's scores over the models (dim 0): expected [2, 0, 0.5], got {got.tolist()}"
    got = lab.ensemble_reward(scores, "min", 1.0)
    assert torch.allclose(got, torch.tensor([1.0, 0.0, -1.0])), f"{ex} 'min' keeps each response's worst score, got {got.tolist()}"
    # mean − λ·std, the population std over the models: [1, 3] -> 1, [−1, 2] -> 1.5
    got = lab.ensemble_reward(scores, "mean_minus_std", 2.0)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -2.5])), \
        f"{ex} 'mean_minus_std' with λ 2: mean − λ·std (std over the models, correction=0): expected [0, 0, −2.5], got {got.tolist()}"
    one = torch.tensor([[0.3, -0.7]])                              # one model: every rule gives its score
    for rule in ("mean", "min", "mean_minus_std"):
        assert torch.equal(lab.ensemble_reward(one, rule, 1.0), one[0]), f"{ex} with one model, '{rule}' is its score"


@pytest.fixture(scope="module")
def lab_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lab") / "run"
    lab.main(["--stage", "all", "--out_dir", str(out)] + LAB_SMOKE)
    return out


def test_the_lab_variant_of_ppo_repeats_rlhf_pys_ppo_exactly(lab_run, tmp_path, monkeypatch):
    """lab.stage_ppo writes its own loop for the remedies and DDP; with none of them at work it must compute what
    rlhf.stage_ppo does, step for step (a drift between the two would make every lab comparison unfair)."""
    out = tmp_path / "run"
    shutil.copytree(lab_run, out)
    cfg = lab_config("--out_dir", str(out), *LAB_SMOKE, "--ppo_steps", "3")
    rlhf.stage_ppo(cfg, CPU) if (torch.manual_seed(cfg.seed), random.seed(cfg.seed)) else None
    core = rlhf.read_jsonl(str(out / "ppo_metrics.jsonl"))
    monkeypatch.setattr(lab, "refresh_steps", lambda cfg, can_rank: {10 ** 6})  # the variant, with no refresh reached
    torch.manual_seed(cfg.seed), random.seed(cfg.seed)
    lab.stage_ppo(dataclasses.replace(cfg, rm_refresh=1), CPU)
    variant = rlhf.read_jsonl(str(out / "ppo_metrics.jsonl"))
    assert len(core) == len(variant) == 3
    for a, b in zip(core, variant):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (a["step"], k)


def test_memory_plan_counts_each_model_and_each_stage_keeps_its_measured_peak(lab_run):
    """The plan by hand: 16 bytes a trained parameter (weights, gradients, Adam's two moments), 4 a frozen one,
    activations of 20 numbers of the width per token and block plus a few copies of the logits; every planned stage
    keeps its plan and its measured peak in summary.json."""
    cfg = lab_config("--out_dir", str(lab_run), *LAB_SMOKE)
    tok, data = rlhf.load_tokenizer(str(lab_run / "tokenizer")), rlhf.load_data(cfg)
    P = sum(p.numel() for p in rlhf.load_lm(str(lab_run / "sft"), CPU).parameters())
    P_rm = sum(p.numel() for p in rlhf.load_scalar_model(str(lab_run / "rm"), CPU).parameters())
    V, d, L = len(tok), cfg.n_embd, cfg.n_layer
    sft = rlhf.tokenize(tok, data["sft_train"] + data["sft_heldout"], cfg)
    longest, rollout = max(len(e["prompt"] + e["response"]) for e in sft), max(len(e["prompt"]) for e in sft) + 8
    plan = {stage: [n for _, n in lab.memory_plan(cfg, stage)] for stage in ("sft", "rm", "judge", "ppo", "eval")}
    tied = [2 * 4 * V * d]  # GPT-2's output layer is its input embedding: two (V, d) gradients before their sum
    assert plan["sft"] == [16 * P, max(4 * 16 * longest * (20 * d * L + 4 * V), 4 * 64 * longest * 3 * V)] + tied
    assert plan["rm"] == [16 * P_rm, 4 * P, max(4 * 32 * rollout * 20 * d * L, 4 * 512 * rollout * L * 2 * d)]
    assert plan["judge"][2] == max(4 * 32 * longest * 20 * d * L, 4 * 512 * rollout * L * 2 * d)
    assert plan["ppo"] == [16 * (P + d + 1), 4 * (P + P_rm),
                           max(4 * 8 * 8 * V * 4, 4 * 8 * rollout * L * 2 * d,
                               4 * 4 * rollout * 20 * d * L + 4 * 4 * 8 * V * 4)] + tied
    assert plan["eval"] == [4 * (2 * P + 2 * P_rm), 4 * 3 * 24 * 8 * V]  # the judge's weights too
    assert lab.memory_plan(cfg, "data") == []
    summary = json.loads((lab_run / "summary.json").read_text())
    for stage in plan:
        m = summary[stage]["memory"]
        assert m["device"] == "cpu" and m["plan_bytes"] > sum(plan[stage]) and m["peak_bytes"] > 0, stage


def test_without_proc_the_plan_is_printed_and_nothing_is_measured(lab_run, tmp_path, monkeypatch, capsys):
    """macOS and Windows have no /proc: the plan still prints (without the process's own memory), the stage runs,
    and no measured peak is claimed."""
    monkeypatch.setattr(lab, "PROC_STATUS", str(tmp_path / "no-proc"))
    cfg = lab_config("--out_dir", str(lab_run), *LAB_SMOKE)
    figures = lab.planned_stage(cfg, "sft", CPU, lambda: {"ran": True})
    out = capsys.readouterr().out
    assert figures == {"ran": True} and "memory plan:" in out and "measured" not in out and "in use before" not in out


def test_ppo_on_the_human_as_the_reward_runs_with_no_reward_model_and_no_refresh(lab_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(lab_run, out)
    lab.main(["--stage", "ppo", "--out_dir", str(out), "--reward", "human", "--rm_refresh", "2"] + LAB_SMOKE)
    ppo = json.loads((out / "summary.json").read_text())["ppo"]
    assert ppo["reward_models"] == 0 and ppo["refreshes"] == []  # --rm_refresh 2 asked for, nothing to refresh
    lab.main(["--stage", "eval", "--out_dir", str(out)] + LAB_SMOKE)  # scored by the stage rm's reward model
    assert json.loads((out / "summary.json").read_text())["eval"]["reward"] == "human"
    assert "mean RM score (not what it maximised: --reward human)" in (out / "eval.md").read_text()


# ---------------------------------------------------------------------------- 4. the evaluation's extras

def test_agreement_counts_pairs_of_one_prompt_with_different_gold_and_gives_an_interval():
    recs = [[dict(gold=1.0, rm=0.9), dict(gold=-1.0, rm=0.1), dict(gold=-1.0, rm=0.5)],
            [dict(gold=0.5, rm=0.0), dict(gold=-0.5, rm=0.0)], [dict(gold=1.0, rm=-5.0)]]
    for rs in recs:
        for r in rs:
            r["family"] = "helpful"
    # the first prompt: (1, −1) twice, both right; the two −1 are not a pair; the second: an RM tie counts half
    got = lab.agreement(recs, "rm", 0)
    assert got["mean"] == pytest.approx((1 + 1 + 0.5) / 3) and got["pairs"] == 3
    assert got["ci"][0] <= got["mean"] <= got["ci"][1] and got["ci"] == pytest.approx([0.5, 1.0])
    recs[0][1]["rm"] = 2.0  # now the RM prefers the wrong one of the first pair
    assert lab.agreement(recs, "rm", 0)["mean"] == pytest.approx((0 + 1 + 0.5) / 3)
    assert lab.agreement([[dict(gold=1.0, rm=0.0, family="helpful")]], "rm", 0) is None
    assert lab.agreement(recs, "rm", 0, family="honest") is None
    # across two policies: each sample of one against each of the other, where the gold scores differ
    # prompt 0: gold 1 (rm 0.9) against −1 (rm 0): agrees; prompt 1: −0.5 (rm 0) against 0.5 (rm −1): the RM
    # prefers the worse one; the pairs of equal gold and prompt 2 (gold 1 against 1) do not count
    other = [[dict(gold=-1.0, rm=0.0)], [dict(gold=0.5, rm=-1.0)], [dict(gold=1.0, rm=0.0)]]
    got = lab.agreement(recs, "rm", 0, other=other)
    assert got["pairs"] == 1 + 1 and got["mean"] == pytest.approx((1.0 + 0.0) / 2)


def test_the_ceiling_is_the_best_answer_every_time_against_the_sft_samples(lab_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(lab_run, out)
    cfg = lab_config(*LAB_SMOKE, "--out_dir", str(out))
    sft_path = str(out / "sft")

    def fake_evaluate(model, tok, prompts, cfg_, device, scorers, ref, seed):  # SFT right on half the prompts, PPO never
        right = lambda i: model.name_or_path == sft_path and i % 2 == 0  # noqa: E731
        return [[dict(prompt=p["prompt"], family=p["family"], response="r", ended=True, length=1, rm=0.0,
                      judge=0.5 if right(i) else 0.0, kl=0.0, gold=1.0 if right(i) else -1.0, success=right(i), kind="right" if right(i) else "wrong value")]
                for i, p in enumerate(prompts)]
    monkeypatch.setattr(rlhf, "evaluate_policy", fake_evaluate)
    figures = lab.stage_eval(cfg, CPU)
    # gold 1 against SFT's own samples: a tie where SFT was right (half), a win elsewhere -> 0.75, whatever PPO did
    assert figures["ceiling"]["mean"] == pytest.approx(0.75, abs=0.03)
    assert figures["win_rate_gold"]["mean"] == pytest.approx(0.25, abs=0.03)
    assert figures["win_rate_judge"]["mean"] == figures["win_rate_gold"]["mean"]  # a judge that orders as gold does


def test_the_lab_evaluation_adds_the_judge_and_the_reward_model_where_each_policy_goes(lab_run):
    ev = json.loads((lab_run / "summary.json").read_text())["eval"]
    assert {"win_rate_gold", "win_rate_judge", "ceiling"} <= set(ev) and "judge" in ev["difference"]
    for who in ("sft", "ppo"):
        assert 0 < ev[who]["distinct"]["mean"] <= 1 and "rm_own" in ev[who]["helpful"]
    table = (lab_run / "eval.md").read_text()
    assert "by the judge" in table and "the ceiling" in table and "RM agrees with gold on the policy's own helpful" in table
    for f in ("samples.md", "kinds.png"):
        assert (lab_run / f).stat().st_size > 100, f


# ---------------------------------------------------------------------------- 5. beyond PPO

def test_best_of_n_gold_is_the_mean_over_subsets_of_the_reward_models_pick():
    assert lab.best_of_n_gold([0, 1, 2], [5, 7, 9], 2) == pytest.approx((7 + 9 + 9) / 3)
    rng = random.Random(0)
    rewards, golds = [rng.random() for _ in range(7)], [rng.choice([-1, -0.5, 1]) for _ in range(7)]
    for n in (1, 3, 7):  # against the direct mean over every n-subset
        subsets = list(itertools.combinations(range(7), n))
        direct = sum(golds[max(c, key=lambda i: rewards[i])] for c in subsets) / len(subsets)
        assert lab.best_of_n_gold(rewards, golds, n) == pytest.approx(direct)
    assert lab.best_of_n_gold(rewards, golds, 1) == pytest.approx(sum(golds) / 7)  # n 1: a plain sample
    # tied rewards: either could be kept, so they count as their mean
    assert lab.best_of_n_gold([0, 1, 1], [0, 1, -1], 3) == pytest.approx(0.0)


def test_best_of_n_kl_formula_and_estimate():
    ex = "exercise 19 (best_of_n_kl):"
    formula, estimate = lab.best_of_n_kl([1.0, 1.0], 4)  # one response only: choosing changes nothing
    assert formula == pytest.approx(math.log(4) - 3 / 4), f"{ex} the formula is log n − (n−1)/n"
    assert estimate == 0.0, f"{ex} one response, sampled twice: best-of-4 is the same distribution, KL 0 (got {estimate})"
    # two responses, shares 1/2: best-of-2 keeps the better one with probability 3/4
    got = lab.best_of_n_kl([0.0, 1.0], 2)[1]
    assert got == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5)), \
        f"{ex} KL(best-of-n ‖ π) = Σ π_n log(π_n / p), with π_n = F^n − F_prev^n: expected 0.131 for [0, 1], n 2, got {got:.3f}"
    # shares 1/4 and 3/4: best-of-2 keeps the better (3/4) response with probability 1 − (1/4)², the other 1/16
    want = (1 / 16) * math.log((1 / 16) / (1 / 4)) + (15 / 16) * math.log((15 / 16) / (3 / 4))
    got = lab.best_of_n_kl([0.0, 1.0, 1.0, 1.0], 2)[1]
    assert got == pytest.approx(want), \
        f"{ex} rewards [0, 1, 1, 1], n 2: the higher reward is kept with probability 15/16: expected {want:.4f}, got {got:.4f}"
    assert lab.best_of_n_kl([0.0, 1.0], 1) == (0.0, 0.0), f"{ex} n 1 is a plain sample: KL 0"
    distinct = [i / 5000 for i in range(5000)]           # no two alike: the estimate meets the formula
    for n in (2, 8, 32):
        formula, estimate = lab.best_of_n_kl(distinct, n)
        assert estimate == pytest.approx(formula, abs=0.01) and estimate <= formula + 1e-9, \
            f"{ex} with no two responses alike the estimate is close to the formula and below it"


@torch.no_grad()
def test_dpos_log_probs_sum_the_response_tokens_only(tmp_path):
    """log π(y|x) of each response: its tokens' log-probs (its end token included), not the prompt's nor the
    padding's, whatever the other rows' lengths. Checked against one unpadded forward per response."""
    tok, cfg = tiny_tokenizer(tmp_path), lab.LabConfig()
    model = tiny_lm(tok, seed=0)
    rows = [dict(prompt=BIKE["prompt"], chosen=" Your bike is red.", rejected=" I don't know, sorry, I really do not."),
            dict(prompt="\n\nHuman: Hi?\n\nAssistant:", chosen=" Hi.", rejected=" Ugh.")]
    items = rlhf.comparisons(tok, rows, cfg)
    got, better, worse = lab.response_logps(model, items, tok, cfg, CPU)
    want = []
    for it in items:
        for r in it["responses"]:
            ids = torch.tensor([it["prompt"] + r])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            want.append(sum(lp[len(it["prompt"]) - 1 + t, tok_id] for t, tok_id in enumerate(r)).item())
    assert got.tolist() == pytest.approx(want, abs=1e-4)
    assert better.tolist() == [0, 2] and worse.tolist() == [1, 3]


def test_dpo_loss_value_sign_and_implicit_rewards():
    ex = "exercise 16 (dpo_loss):"
    z = torch.zeros(3)
    loss, rc, rr = lab.dpo_loss(z, z, z, z, 0.1)
    assert loss.item() == pytest.approx(math.log(2)) and torch.equal(rc, z), \
        f"{ex} the policy equal to the reference: loss log 2, implicit rewards 0"
    # chosen up by 1 nat against the reference, rejected down by 1: margin β·2
    loss, rc, rr = lab.dpo_loss(torch.tensor([-1.0]), torch.tensor([-4.0]), torch.tensor([-2.0]), torch.tensor([-3.0]), 0.5)
    assert rc.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5), \
        f"{ex} implicit rewards β·(log π − log π_ref): expected 0.5 and −0.5, got {rc.item():.3f} and {rr.item():.3f}"
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.0)))), \
        f"{ex} loss −log σ(r_chosen − r_rejected) = −log σ(1) here, got {loss.item():.4f}"
    # the gradient raises the chosen log-prob and lowers the rejected one
    c, r = torch.tensor([-1.0], requires_grad=True), torch.tensor([-1.0], requires_grad=True)
    lab.dpo_loss(c, r, torch.tensor([-1.0]), torch.tensor([-1.0]), 0.1)[0].backward()
    assert c.grad.item() < 0 < r.grad.item(), f"{ex} minimising the loss must raise log π(chosen) and lower log π(rejected)"
    assert c.grad.item() == pytest.approx(-0.1 * 0.5), f"{ex} at margin 0 the gradient on log π(chosen) is −β·σ(0)"
    # a badly ranked pair with a huge margin: the loss is large, not infinite
    big = lab.dpo_loss(torch.tensor([-3000.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), 1.0)[0]
    assert big.item() == pytest.approx(2999.0), f"{ex} a margin of −2999 must give a loss of 2999, not inf: use F.logsigmoid"
    two = lab.dpo_loss(torch.tensor([0.0, 1.0]), z[:2], z[:2], z[:2], 1.0)[0].item()
    assert two == pytest.approx((math.log(2) - math.log(1 / (1 + math.exp(-1)))) / 2), f"{ex} average over the pairs"


def test_rloo_advantages_leave_each_sample_out_of_its_own_baseline():
    ex = "exercise 17 (rloo_advantages):"
    got = lab.rloo_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    want = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, 0 - 1.5, 0 - 1.5, 3 - 0.0])
    assert torch.allclose(got, want), \
        f"{ex} k 3, two prompts [1, 2, 6] and [0, 0, 3]: R_i minus the mean of the other two; expected {want.tolist()}, got {got.tolist()}"
    got = lab.rloo_advantages(torch.tensor([1.0, 3.0]), 2)
    assert torch.allclose(got, torch.tensor([-2.0, 2.0])), f"{ex} k 2: each sample against the other one, got {got.tolist()}"
    assert lab.rloo_advantages(torch.tensor([5.0] * 4), 4).abs().max() == 0, f"{ex} equal rewards: no advantage"


def test_grpo_advantages_normalise_within_each_group():
    ex = "exercise 18 (grpo_advantages):"
    got = lab.grpo_advantages(torch.tensor([1.0, 3.0, 10.0, 10.0, 10.0, 40.0]), 3)
    g1, g2 = torch.tensor([1.0, 3.0, 10.0]), torch.tensor([10.0, 10.0, 40.0])
    want = torch.cat([(g1 - g1.mean()) / (g1.std() + 1e-4), (g2 - g2.mean()) / (g2.std() + 1e-4)])
    assert torch.allclose(got, want, atol=1e-4), \
        f"{ex} each group of k = 3 against its own mean, divided by its own std: expected {want.tolist()}, got {got.tolist()}"
    got = lab.grpo_advantages(torch.tensor([1.0, 3.0]), 2)
    assert torch.allclose(got, torch.tensor([-0.7071, 0.7071]), atol=1e-4), f"{ex} [1, 3]: ±1/√2 (std with Bessel's correction)"
    got = lab.grpo_advantages(torch.tensor([2.0, 2.0]), 2)
    assert torch.isfinite(got).all() and got.abs().max() == 0, f"{ex} a group with no spread has no advantage (add ε), got {got.tolist()}"


def test_k3_kl_is_zero_at_the_reference_and_positive_elsewhere():
    lp = torch.tensor([[-1.0, -2.0, -0.5]])
    assert lab.k3_kl(lp, lp).abs().max() == 0
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    assert torch.allclose(lab.k3_kl(lp, ref), torch.tensor([[math.exp(-1) + 1 - 1, math.exp(1) - 1 - 1, 0.0]]))


@torch.no_grad()
def test_group_experience_puts_rloos_kl_in_the_reward_and_leaves_grpos_out(tmp_path):
    tok = tiny_tokenizer(tmp_path)
    policy, ref = tiny_lm(tok, seed=0), tiny_lm(tok, seed=1)
    cfg = lab.LabConfig(max_new_tokens=6, group_size=2)
    prompts = rlhf.encode(tok, ["Human: hi Assistant:"] * 2 + ["Human: why? Assistant:"] * 2)  # 2 groups of 2
    score_fn = lambda ids, mask, ended: torch.tensor([1.0, 0.0, 2.0, 2.0])  # noqa: E731
    for algo in ("rloo", "grpo"):
        torch.manual_seed(0)
        exp = lab.group_experience(policy, ref, tok, prompts, score_fn, 0.5, cfg, CPU, algo)
        kl = exp["kl"].sum(1)  # Σ_t (log π − log π_ref) of each sample: not 0, the two models differ
        assert kl.abs().min() > 1e-3
        # RLOO: R = r − β·KL, minus the other sample's R; GRPO: the raw score normalised in its group
        want = lab.rloo_advantages(exp["score"] - 0.5 * kl, 2) if algo == "rloo" else lab.grpo_advantages(exp["score"], 2)
        assert torch.allclose(exp["advantages"], want[:, None] * exp["r_mask"], atol=1e-5), algo


def test_grpos_kl_term_pulls_the_policy_even_where_every_advantage_is_zero(tmp_path):
    """With all advantages 0 the clipped surrogate has no gradient: GRPO's β·k3 term alone moves the policy toward
    the reference (RLOO, whose KL is in the reward, does not move)."""
    tok = tiny_tokenizer(tmp_path)
    cfg = lab.LabConfig(max_new_tokens=6, group_size=2, ppo_epochs=1, minibatch_size=4, ppo_lr=1e-2)
    prompts = rlhf.encode(tok, ["Human: hi Assistant:"] * 4)
    moved = {}
    for algo in ("rloo", "grpo"):
        policy, ref = tiny_lm(tok, seed=0), tiny_lm(tok, seed=1)
        torch.manual_seed(0)
        exp = lab.group_experience(policy, ref, tok, prompts, lambda ids, mask, ended: torch.ones(4), 0.0, cfg, CPU,
                                   algo)  # (β 0 here: RLOO's KL in the reward would make advantages)
        assert exp["advantages"].abs().max() == 0  # every sample of a group scores the same
        before = [p.detach().clone() for p in policy.parameters()]
        opt = torch.optim.Adam(policy.parameters(), lr=cfg.ppo_lr)
        lab.group_update(policy, opt, exp, 0.5, cfg, algo)
        moved[algo] = max((p.detach() - b).abs().max().item() for p, b in zip(policy.parameters(), before))
    assert moved["rloo"] == 0 and moved["grpo"] > 1e-4, moved


@pytest.mark.parametrize("stage", ["bon", "dpo", "rloo", "grpo"])
def test_each_alternative_to_ppo_runs_and_is_evaluated_against_sft(stage, lab_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(lab_run, out)
    lab.main(["--stage", stage, "--out_dir", str(out)] + LAB_SMOKE)
    s = json.loads((out / "summary.json").read_text())[stage]
    if stage == "bon":
        assert [r["n"] for r in s["rows"]] == [1, 2, 4] and (out / "bon.md").exists()
        assert s["rows"][0]["kl"]["mean"] == 0 and s["rows"][0]["win_rate_gold"]["mean"] == pytest.approx(0.5)
        for k in ("kl", "rm", "gold", "success_helpful"):  # every figure with its interval over prompts
            assert s["rows"][-1][k]["ci"][0] <= s["rows"][-1][k]["mean"] <= s["rows"][-1][k]["ci"][1], k
    else:
        assert s["policy"] == stage and "win_rate_gold" in s and "win_rate_judge" in s
        assert (out / f"{stage}_eval.md").exists() and (out / f"{stage}_samples.md").exists()


BOUNDARIES = {
    "rm, ensemble": (["rm", "judge", "ppo"], ["--rm_ensemble", "2", "--rm_combine", "mean_minus_std",
                                             "--rm_combine_lambda", "1000"]),
    "ppo, refreshes": (["ppo", "eval"], ["--ppo_steps", "3", "--rm_refresh", "100", "--rm_samples", "2",
                                         "--rm_refresh_prompts", "1", "--rm_refresh_from", "sft"]),
    "ppo, lambda 0": (["ppo"], ["--rm_refresh", "1", "--rm_combine_lambda", "0", "--ppo_steps", "1"]),
    "beyond PPO, low": (["bon", "dpo", "rloo", "grpo"], ["--bon_samples", "1", "--dpo_beta", "1e-9", "--dpo_lr", "1e-9",
                                                         "--group_size", "2", "--rollout_batch_size", "2", "--minibatch_size", "1"]),
    "beyond PPO, high": (["bon", "dpo", "rloo", "grpo"], ["--bon_samples", "3", "--dpo_beta", "1000", "--group_size", "8"]),
    "data, wrong values": (["data", "tokenizer", "sft", "rm"], ["--crowd_wrong_values", "1", "--n_judge", "1"]),
}


@pytest.mark.parametrize("case", BOUNDARIES)
def test_every_lab_flag_at_the_ends_of_its_range_runs(case, lab_run, tmp_path):
    stages, flags = BOUNDARIES[case]
    out = tmp_path / "run"
    shutil.copytree(lab_run, out)
    for stage in stages:
        lab.main(["--stage", stage, "--out_dir", str(out)] + LAB_SMOKE + flags)
    summary = json.loads((out / "summary.json").read_text())
    assert all(stage in summary for stage in stages), case


# ---------------------------------------------------------------------------- 6. trackers and processes

def jsonl_rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_report_to_tensorboard_logs_every_metric_row_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    lab.main(["--stage", "all", "--out_dir", str(out), "--report_to", "tensorboard"] + LAB_SMOKE)
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
    assert "eval/win_rate_gold/mean" in events.Tensors("summary/text_summary")[0].tensor_proto.string_val[0].decode()


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
    lab.main(["--stage", "all", "--out_dir", str(out), "--report_to", "wandb"] + LAB_SMOKE)
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
            lab.main(["--stage", "data", "--out_dir", str(tmp_path / "run"), "--report_to", tracker])
        assert str(e.value.code) == f"lab.py: error: --report_to {tracker} needs its package: pip install {tracker}"


def test_two_processes_with_torchrun_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2: each process takes half of every batch, DDP (gloo) averages the gradients; the SFT
    and RM losses of lab.py's variants equal rlhf.py's loops on one process with the same global batches."""
    flags = ["--stage", "all"] + LAB_SMOKE
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "lab.py", "--out_dir", str(tmp_path / "one")] + flags, cwd=HERE, env=env,
                         capture_output=True, text=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "lab.py", "--out_dir", str(tmp_path / "two")] + flags, cwd=HERE, env=env,
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
    # the variant's loss trains the value head too: zero at first (explained variance exactly 0), not after a step
    ppo = [json.loads(x) for x in (tmp_path / "two" / "ppo_metrics.jsonl").read_text().splitlines()]
    assert ppo[0]["value_ev"] == 0 and ppo[-1]["value_ev"] != 0


# ---------------------------------------------------------------------------- end to end

def test_the_lab_runs_rlhf_pys_stages_and_the_judge(lab_run):
    summary = json.loads((lab_run / "summary.json").read_text())
    assert list(summary) == list(lab.STAGES)
    assert {"acc_gold", "acc_label"} <= set(summary["judge"]["heldout"]) and summary["judge"]["rankings"] == 0
    assert rlhf.read_jsonl(str(lab_run / "judge_rankings.jsonl")) == []  # the judge learns from the crowd's pairs only


def test_the_judge_stage_takes_a_run_made_by_rlhf_py_and_draws_the_same_pairs(lab_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(lab_run, out)
    (out / "data" / "prefs_judge.jsonl").unlink()  # as rlhf.py's stage_data leaves it
    lab.main(["--stage", "judge", "--out_dir", str(out)] + LAB_SMOKE)
    assert (out / "data" / "prefs_judge.jsonl").read_text() == (lab_run / "data" / "prefs_judge.jsonl").read_text()
    assert not [n for n in os.listdir(out / "data") if n.endswith((".tmp", ".old"))]


def test_ctrl_c_in_the_lab_names_the_stages_to_rerun(lab_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(lab_run, out)

    def interrupted(cfg, device):
        raise KeyboardInterrupt

    monkeypatch.setattr(lab, "stage_rm", interrupted)
    with pytest.raises(SystemExit) as e:
        lab.main(["--stage", "rm", "--out_dir", str(out)] + LAB_SMOKE)
    assert "interrupted in stage rm" in str(e.value.code) and "ppo, eval, bon, dpo, rloo, grpo" in str(e.value.code)


# ---------------------------------------------------------------------------- the course: tutorial.md, README.md, course.py

HAS_COURSE = os.path.exists(os.path.join(HERE, "course.py"))  # the student copy leaves course.py out
needs_course = pytest.mark.skipif(not HAS_COURSE, reason="course.py is not in the student copy")


def doc_text(doc):
    return open(os.path.join(HERE, doc), encoding="utf-8").read()


def tutorial_blocks(lang, doc="tutorial.md"):
    return re.findall(rf"```{lang}\n(.*?)```", doc_text(doc), re.S)


def test_tutorial_code_quotes_are_lines_of_rlhf_py_or_lab_py():
    """Every ```python block of the tutorial quotes rlhf.py or lab.py: its lines appear there, in order ('...' marks a
    gap), so the tutorial cannot drift from the code."""
    files = [[line.strip() for line in open(m.__file__, encoding="utf-8").read().splitlines()] for m in (rlhf, lab)]
    blocks = tutorial_blocks("python")
    assert len(blocks) >= 5
    for block in blocks:
        wanted = [x.strip() for x in block.splitlines() if x.strip() and x.strip() != "..."]

        def in_order(code):
            at = 0
            for line in wanted:
                if line not in code[at:]:
                    return False
                at = code.index(line, at) + 1
            return True
        assert any(in_order(code) for code in files), f"tutorial.md quotes lines rlhf.py and lab.py do not have: {wanted}"


STEPS = {"make_dataset": ["make_dataset"], "train_bpe": ["train_bpe"], "stage_sft": ["stage_sft"],
         "train_reward_model": ["train_reward_model"], "stage_ppo": ["make_experience", "ppo_update", "stage_ppo"],
         "stage_eval": ["compare_with_sft"]}


@pytest.mark.parametrize("section", STEPS)
def test_tutorial_lists_the_same_numbered_steps_as_the_code(section):
    import inspect
    code_steps = set()
    for func in STEPS[section]:
        code_steps |= set(re.findall(r"^\s*(?:# )?(\d+)\.(?:-\d+\.)? ", inspect.getsource(getattr(rlhf, func)), re.M))
    part = re.split(r"\*\*What you see|\n## ", doc_text("tutorial.md").split(f"**The steps of `{section}`")[1])[0]
    tutorial_steps = set(re.findall(r"^(?:\*\*)?(\d+)\. ", part, re.M))
    assert code_steps <= tutorial_steps and len(code_steps) >= 3, (code_steps, tutorial_steps)


@pytest.mark.parametrize("doc, at_least", [("tutorial.md", 20), ("README.md", 5)])
def test_tutorial_commands_parse(doc, at_least):
    """Every `python rlhf.py`, `python lab.py`, `python course.py`, `python bench.py` and `pytest -k` command of the
    tutorial and the README (```bash blocks and inline, each part of a `&&` chain) is valid as written: known flags
    and values, existing subcommands, tests that exist, and the error a line says it gives."""
    if HAS_COURSE:
        import course
    import bench
    import test_rlhf
    test_names = [n for m in (test_rlhf, sys.modules[__name__]) for n in dir(m) if n.startswith("test_")]
    text = doc_text(doc)
    lines = [line for block in tutorial_blocks("bash", doc) for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`(python [^`]+)`", text)  # inline commands, such as the grading ones
    n_commands = 0
    for command in (part.strip() for line in lines for part in line.split("&&")):
        words = [re.sub(r"\$\w+", "0.1", w) for w in shlex.split(command, comments=True)]
        if words[:1] == ["torchrun"]:
            words = ["python"] + words[words.index("lab.py"):]
        if words[:2] in (["python", "rlhf.py"], ["python", "lab.py"]):
            module, config = (rlhf, rlhf.Config) if words[1] == "rlhf.py" else (lab, lab.LabConfig)
            parser = rlhf.build_parser(config, words[1])
            if "--help" in words:
                with pytest.raises(SystemExit) as e:
                    parser.parse_args(words[2:])
                assert e.value.code == 0
            else:
                cfg = dataclasses.replace(config(**vars(parser.parse_args(words[2:]))), device="cpu")
                if "error: " in command:  # a line that shows an error must give that error
                    with pytest.raises(rlhf.UserError) as e:
                        rlhf.check_config(cfg)
                    assert str(e.value) == command.split("error: ")[1].strip()
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
def test_every_figure_and_direction_of_the_docs_comes_from_its_stored_run(doc):
    """Every number in a span (<!--f RUN PATH FORMAT-->), every direction (<!--d ...-->: higher or lower only where the
    intervals of every run named exclude zero) and every table (<!--table NAME-->) is what `python course.py docs`
    writes from assets/runs/: a figure or a direction edited by hand, or stated differently in two places, fails."""
    import course
    text = doc_text(doc)
    assert course.SPAN.search(text) and course.BLOCK.search(text), f"{doc} has no figure spans or table blocks"
    for m in course.SPAN.finditer(text):
        assert m.group(3) == course.figure(m.group(1), m.group(2)), \
            f"{doc}: <!--{m.group(1)} {m.group(2)}--> says {m.group(3)!r}, the stored runs say " \
            f"{course.figure(m.group(1), m.group(2))!r}; run `python course.py docs`"
    for m in course.BLOCK.finditer(text):
        assert m.group(2).rstrip("\n") == course.table(m.group(1)), \
            f"{doc}: the table <!--table {m.group(1)}--> differs from its stored runs; run `python course.py docs`"


@needs_course
@pytest.mark.parametrize("doc", ["README.md", "tutorial.md"])
def test_no_measured_number_in_the_docs_stands_outside_a_span(doc):
    """A number with three decimals, or a range of decimals, is a measurement: it must come from a stored run.
    Code blocks, spans, table blocks and the appendix of history are left out of the search."""
    import course
    text = doc_text(doc)
    for pattern in (course.SPAN, course.BLOCK, re.compile(r"```.*?```", re.S),
                    re.compile(r"<!-- history -->.*?<!-- /history -->", re.S)):
        text = pattern.sub(" ", text)
    loose = re.findall(r"[−+-]?\b\d+\.\d{3}\b|\b\d+\.\d+\s*[–-]\s*\d+\.\d+\b", text)
    assert not loose, f"{doc}: measured-looking numbers outside a span: {loose[:10]}"


@needs_course
def test_a_doc_figure_or_direction_edited_by_hand_fails_the_check():
    """The check above is not vacuous: change one digit of a figure, or turn a direction around, and the docs no
    longer match their runs."""
    import course
    text = doc_text("tutorial.md")
    m = next(m for m in course.SPAN.finditer(text) if m.group(1) == "f" and re.search(r"\d", m.group(3)))
    edited = text[:m.start(3)] + re.sub(r"\d", lambda d: str((int(d.group()) + 1) % 10), m.group(3), count=1) + \
        text[m.end(3):]
    assert course.render_docs(edited) != edited and course.render_docs(text) == text
    m = next(m for m in course.SPAN.finditer(text) if m.group(1) == "d")
    words = " ".join(m.group(2).split()[2:]).split("|")
    other = next(w for w in words if w != m.group(3))
    edited = text[:m.start(3)] + other + text[m.end(3):]
    assert course.render_docs(edited) != edited


@needs_course
def test_a_direction_is_stated_only_where_every_interval_excludes_zero(tmp_path, monkeypatch):
    import course
    runs = {"a": {"eval": {"d": {"mean": 0.1, "ci": [0.05, 0.15]}}}, "b": {"eval": {"d": {"mean": 0.1, "ci": [-0.01, 0.2]}}},
            "c": {"eval": {"d": {"mean": -0.1, "ci": [-0.2, -0.05]}}}}
    monkeypatch.setattr(course, "stored", lambda name: runs[name])
    monkeypatch.setitem(course.GROUPS, "ab", ["a", "b"])
    monkeypatch.setitem(course.GROUPS, "ac", ["a", "c"])
    assert course.figure("d", "a eval.d up|down|tie") == "up" and course.figure("d", "c eval.d up|down|tie") == "down"
    assert course.figure("d", "ab eval.d up|down|tie") == "tie" and course.figure("d", "ac eval.d up|down|tie") == "tie"
    assert course.figure("n", "ab eval.d above") == "1" and course.figure("n", "ac eval.d below") == "1"
    assert course.figure("f", "b eval.d .2f ci") == "0.10 [−0.01, 0.20]".replace("−", "-")


@needs_course
def test_readme_is_a_front_page():
    """At most 150 lines; a picture and the three commands (install, run, test) in its first 60."""
    lines = doc_text("README.md").splitlines()
    head = "\n".join(lines[:60])
    assert len(lines) <= 150, len(lines)
    assert "![" in head and "pip install -r requirements.txt" in head and "python rlhf.py --stage all" in head
    assert "python -m pytest" in head


@needs_course
def test_tutorial_has_every_exercise_with_its_grading_command():
    import course
    text = doc_text("tutorial.md")
    for n, (func, _, _) in course.EXERCISES.items():
        section = text.split(f"### Exercise {n}:")[1].split("\n### ")[0]
        assert f"`{func}(" in section and course.grading_command(n) in section, n
        assert "Hint" in section, n


@needs_course
def test_student_copy_blanks_only_the_exercise_bodies_and_never_mentions_course_py(tmp_path):
    import course
    names = {func: n for n, (func, _, _) in course.EXERCISES.items()}
    for module in (rlhf, lab):
        source = open(module.__file__, encoding="utf-8").read()
        student = course.blank_functions(source, list(course.EXERCISES))
        full_nodes, student_nodes = ast.parse(source).body, ast.parse(student).body
        assert len(full_nodes) == len(student_nodes)
        blanked = 0
        for a, b in zip(full_nodes, student_nodes):
            if isinstance(a, ast.FunctionDef) and a.name in names:
                assert ast.dump(a.args) == ast.dump(b.args) and ast.get_docstring(a) == ast.get_docstring(b)
                assert [type(x) for x in b.body] == [ast.Expr, ast.Raise]
                assert f"exercise {names[a.name]}:" in ast.unparse(b.body[1])
                blanked += 1
            else:
                assert ast.dump(a) == ast.dump(b)  # everything else is untouched
        assert blanked == sum(course.file_of(n) == os.path.basename(module.__file__) for n in course.EXERCISES)
    copy = course.make_student_copy(str(tmp_path / "lab"))
    for name in os.listdir(copy):
        if name.endswith(".md") or name in ("rlhf.py", "lab.py"):  # what students read (the tests skip course's)
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


@needs_course
def test_every_classic_wrong_solution_is_a_change_to_its_function_as_it_is():
    """course.WRONG's edits still find their lines in rlhf.py and lab.py (a refactor that moves them breaks this, in
    seconds, before CI's grader check), and each changes its own function, into valid Python, and nothing else."""
    import course
    for n, cases in course.WRONG.items():
        source = open(os.path.join(HERE, course.file_of(n)), encoding="utf-8").read()
        lines = source.splitlines(keepends=True)
        nodes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
        node = nodes[course.EXERCISES[n][0]]
        before, own, after = lines[:node.lineno - 1], lines[node.lineno - 1:node.end_lineno], lines[node.end_lineno:]
        for what, fix in cases:
            out = course.wrong_source(source, n, fix).splitlines(keepends=True)
            middle = out[len(before):len(out) - len(after)]
            assert out[:len(before)] == before and out[len(out) - len(after):] == after, (n, what)
            assert middle != own and ast.parse("".join(middle)).body[0].name == node.name, (n, what)
    with pytest.raises(SystemExit, match="exercise 3 edits 'no such line'"):
        course.wrong_source(open(rlhf.__file__).read(), 3, [("no such line", "")])


@needs_course
@pytest.mark.skipif(not os.environ.get("RLHF_CHECK_EXERCISES"), reason="minutes on 2 cores: CI runs it "
                    "(RLHF_CHECK_EXERCISES=1, or `python course.py check`)")
def test_each_exercise_grader_fails_without_its_code_and_on_classic_mistakes():
    """course.py check: on the full rlhf.py and lab.py each grading command passes; on the student copy it fails; with
    only that exercise blank it fails with that exercise's own error; and each of the classic wrong solutions in
    course.WRONG fails that exercise's grader, with a message naming the exercise, and makes no other exercise's
    grader fail. It runs many small pytest sessions, so the default suite leaves it to CI (.ci/run sets
    RLHF_CHECK_EXERCISES=1 for a second pytest call)."""
    out = subprocess.run([sys.executable, os.path.join(HERE, "course.py"), "check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


@needs_course
def test_course_runs_each_stage_of_a_copy_with_the_seed_of_its_run(tmp_path, monkeypatch):
    import course
    run = tmp_path / "seed_3_refresh"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"data": {"config": {"seed": 3}}}))
    calls = []
    monkeypatch.setattr(course.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or types.SimpleNamespace(returncode=0))
    course.run_stage(str(run), "ppo", ["--rm_refresh", "4"], str(tmp_path / "log"))
    course.run_stage(str(run), "eval", ["--seed", "5"], str(tmp_path / "log"))
    assert calls[0][1].endswith("lab.py") and calls[0][-4:] == ["--seed", "3", "--rm_refresh", "4"]
    assert calls[1].count("--seed") == 1 and calls[1][-1] == "5"


@needs_course
def test_course_bench_runs_the_two_programs_in_turn_in_the_same_environment(tmp_path, monkeypatch):
    import course
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    calls = []

    def fake_run(cmd, env=None, **kw):
        if cmd[0] == "lscpu":
            return types.SimpleNamespace(stdout="a CPU")
        calls.append((cmd, env or {}))
        ours = dict(median={"total": 1.0}, gflops=1.0, share=0.5, update_share=0.6, ceiling=2.0)
        with open(cmd[cmd.index("--json") + 1], "w") as f:
            json.dump(dict(summary={"total": {"median": 2.0}}) if cmd[0] == "trl-python" else ours, f)

    monkeypatch.setattr(course.subprocess, "run", fake_run)
    for huge_pages in (False, True):
        calls.clear()
        out = tmp_path / str(huge_pages)
        course.run_bench(str(out), "trl-python", "trl_ppo_bench.py", 2, 2, huge_pages)
        who = ["trl" if cmd[0] == "trl-python" else "rlhf" for cmd, _ in calls]
        assert who == ["rlhf", "trl"] * 2 * len(course.BENCH_SHAPES)  # one after the other, never at once
        assert all((env.get("THP_MEM_ALLOC_ENABLE") == "1") == huge_pages for _, env in calls)  # both, or neither
        got = json.loads((out / "summary.json").read_text())["bench"]
        assert got["huge_pages"] == huge_pages and got["tiny"]["ratio"] == [2.0, 2.0]


@needs_course
def test_each_remedy_recipe_runs_what_its_name_says():
    """Chapter 12's one-command experiments: the flags each recipe passes to each stage must do what its name says.
    A stage a recipe does not run is the lab run's, which it copies (no refresh, one reward model, β 0.3)."""
    import course
    recipes = {name: dict(steps) for name, _, steps in course.REMEDIES}

    def config(name, stage):
        flags = recipes[name].get(stage)
        if flags is None and name in course.REMEDY_SOURCE:  # copied from another recipe's run
            flags = recipes[course.REMEDY_SOURCE[name]].get(stage)
        return lab_config("--stage", stage, *(flags or []))

    # name: (the RM learns from the SFT policy's own samples, PPO refreshes it, β = 0, reward models, their rule, reward)
    expected = {"refresh": (True, True, False, 1, "mean", "rm"),
                "human as the reward": (True, False, False, 1, "mean", "human"),
                "crowd pairs only": (False, False, False, 1, "mean", "rm"),
                "hacking, one RM": (True, False, True, 1, "mean", "rm"),
                "hacking, refreshed RM": (True, True, True, 1, "mean", "rm"),
                "hacking, ensemble of 3": (True, False, True, 3, "mean", "rm"),
                "hacking, ensemble min": (True, False, True, 3, "min", "rm"),
                "hacking, ensemble mean − std": (True, False, True, 3, "mean_minus_std", "rm")}
    assert set(recipes) == set(expected), "a new recipe needs its row here"
    for name, want in expected.items():
        rm, ppo = config(name, "rm"), config(name, "ppo")
        got = (rm.rm_samples > 0, bool(ppo.rm_refresh and lab.refresh_steps(ppo, can_rank=True)),
               ppo.kl_coef == 0 and not ppo.adaptive_kl, rm.rm_ensemble, ppo.rm_combine, ppo.reward)
        assert got == want, name
        assert list(recipes[name])[-1] == "eval", name


@needs_course
def test_run_remedies_copies_each_recipe_from_its_source(tmp_path, monkeypatch):
    """An ensemble's PPO variants start from the copy whose stage rm trained the ensemble; every other recipe from
    the seed's lab run."""
    import course
    copies = []
    monkeypatch.setattr(course, "run_seeds", lambda *a, **k: None)
    monkeypatch.setattr(course, "copy_run", lambda src, dest, steps, flags: copies.append((src, dest)))
    out, base = str(tmp_path / "rem"), str(tmp_path / "seeds")
    course.run_remedies([0, 1], out, base, [], 1)
    got = {os.path.basename(d): s for s, d in copies}
    assert got["seed_0_hacking_ensemble_min"] == os.path.join(out, "seed_0_hacking_ensemble_of_3")
    assert got["seed_0_hacking_ensemble_mean_std"] == os.path.join(out, "seed_0_hacking_ensemble_of_3")
    assert got["seed_1_refresh"] == os.path.join(base, "lab_seed_1") and "seed_1_crowd_pairs_only" not in got
    order = [os.path.basename(d) for _, d in copies]
    assert order.index("seed_0_hacking_ensemble_of_3") < order.index("seed_0_hacking_ensemble_min")


@needs_course
def test_course_tables_and_plots_read_a_finished_run(lab_run, tmp_path, monkeypatch):
    """The tutorial's figures come from these functions: each must read a real run's summary.json."""
    import course
    monkeypatch.setattr(course, "RUNS", str(lab_run.parent))
    name = lab_run.name
    monkeypatch.setitem(course.GROUPS, "one", [name])
    for t in (f"seeds one", f"front one", f"eval {name}", f"cost {name}", f"ppo_steps {name} 1 2", f"ppo_blocks one 1",
              f"versus {name} {name}", f"sweep {name}"):
        assert "|" in course.table(t), t
    row = course.seed_row(name, course.stored(name))
    course.plot_seeds([row], str(tmp_path / "seeds.png"))
    course.plot_costs(str(lab_run), str(tmp_path / "cost.png"))
    course.plot_sweep([name], str(tmp_path / "sweep.png"))
    assert all((tmp_path / f).stat().st_size > 1000 for f in ("seeds.png", "cost.png", "sweep.png"))
    rows = course.probe_rm(str(lab_run), n=4)
    assert [(r["family"], r["answer"]) for r in rows] == [(f, a) for f, answers in course.PROBE.items() for a in answers]
    assert json.load(open(lab_run / "probe.json")) == rows
