"""Tests for rlhf.py, one group per section of the script, in the same order.
Run: python -m pytest -q            (the tests of lab.py and the docs are in test_lab.py)

The tests of an exercise function are its grader (tutorial.md, Exercises): their failure messages
start with "exercise N (function):" and say what is wrong.
"""
import ast
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import types

import pytest
import torch

import rlhf

torch.set_num_threads(1)  # tiny models: one thread is as fast, and sane on a busy machine
HERE = os.path.dirname(os.path.abspath(__file__))

# A seconds-long configuration of the whole pipeline, shared by the end-to-end tests.
SMOKE = ["--n_sft", "96", "--n_pref", "64", "--vocab_size", "600", "--n_embd", "32", "--n_layer", "1", "--n_head", "2",
         "--sft_steps", "8", "--sft_batch_size", "16", "--rm_epochs", "1", "--rm_batch_size", "16", "--ppo_steps", "2",
         "--rollout_batch_size", "8", "--minibatch_size", "4", "--ppo_epochs", "2", "--max_new_tokens", "8",
         "--eval_samples", "1", "--eval_prompts", "24", "--threads", "1", "--rm_samples", "2"]
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


def pad_left(seqs, pad_id):
    return rlhf.pad(seqs, pad_id, left=True)


def pad_right(seqs, pad_id):
    return rlhf.pad(seqs, pad_id, left=False)


# ---------------------------------------------------------------------------- the file itself

def test_rlhf_py_reads_top_to_bottom_in_at_most_1300_lines_of_at_most_120_characters():
    """Every module-level name a definition uses is defined above it (main aside): the file reads in order. The
    issue's target was 1,200 lines; the card with its docstrings measures about 1,290 (the tutorial's appendix)."""
    source = open(rlhf.__file__, encoding="utf-8").read()
    lines = source.splitlines()
    assert len(lines) <= 1300, f"rlhf.py has {len(lines)} lines: what the card does not ask for belongs in lab.py"
    assert max(map(len, lines)) <= 120, [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    tree, defined = ast.parse(source), {}
    for node in tree.body:
        targets = [node] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else getattr(node, "targets", [])
        for t in targets:
            for name in ([t.name] if hasattr(t, "name") and isinstance(t, (ast.FunctionDef, ast.ClassDef)) else
                         [n.id for n in ast.walk(t) if isinstance(n, ast.Name)]):
                defined.setdefault(name, node.lineno)
    late = []
    for node in tree.body:
        if getattr(node, "name", None) == "main" or isinstance(node, ast.If):
            continue
        local = {n.arg for n in ast.walk(node) if isinstance(n, ast.arg)} | {
            n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        late += [(n.lineno, n.id) for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
                 and n.id not in local and defined.get(n.id, 0) > node.lineno]
    assert not late, f"names used above the line that defines them: {sorted(set(late))[:10]}"


def test_a_forward_reference_is_caught(tmp_path, monkeypatch):
    """The check above is not vacuous: a function that calls one defined below it fails it."""
    bad = tmp_path / "rlhf.py"
    bad.write_text("def a():\n    return b()\n\n\ndef b():\n    return 1\n")
    monkeypatch.setattr(rlhf, "__file__", str(bad))
    with pytest.raises(AssertionError, match="names used above the line"):
        test_rlhf_py_reads_top_to_bottom_in_at_most_1300_lines_of_at_most_120_characters()


def test_rlhf_py_alone_in_an_empty_folder_runs_every_stage(tmp_path):
    """The reference stands alone: copied into an empty folder, with no lab.py beside it, it runs --stage all."""
    shutil.copy(rlhf.__file__, tmp_path / "rlhf.py")
    out = subprocess.run([sys.executable, "rlhf.py", "--stage", "all", "--out_dir", "run"] + SMOKE, cwd=tmp_path,
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert list(json.loads((tmp_path / "run" / "summary.json").read_text())) == list(rlhf.STAGES)
    assert sorted(os.listdir(tmp_path)) == ["rlhf.py", "run"]


def test_without_torch_help_still_works_and_anything_else_is_one_line(tmp_path):
    """On a machine where the requirements are not installed yet: --help answers, a run says what to install."""
    block = "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['rlhf.py'] + sys.argv[1:]; " \
            f"runpy.run_path({rlhf.__file__!r}, run_name='__main__')"
    helped = subprocess.run([sys.executable, "-c", block, "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert helped.returncode == 0 and "--sft_steps" in helped.stdout, helped.stderr[-500:]
    ran = subprocess.run([sys.executable, "-c", block, "--stage", "all"], capture_output=True, text=True, cwd=tmp_path)
    assert ran.returncode == 1 and ran.stderr.strip().splitlines() == [
        "rlhf.py: error: the Python package 'torch' is not installed; install the requirements first: "
        "pip install -r requirements.txt (README)"]


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
    # just past the ends of the ranges: refused before any stage runs
    (["--heldout_frac", "1"], "--heldout_frac must be in [0, 1) (got 1.0)"),
    (["--temperature", "0.001"], "--temperature must be >= 0.01"),
    (["--label_temperature", "0"], "--label_temperature must be >= 0.01"),
    (["--vocab_size", "257"], "--vocab_size must be >= 258"),
    (["--max_new_tokens", "96"], "leaves no room for a prompt"),
    (["--adaptive_kl", "--kl_horizon", "10"], "--kl_horizon (10) must be at least --rollout_batch_size"),
    (["--rm_samples", "1"], "--rm_samples must be 0 or >= 2"),
    (["--eval_prompts", "0"], "--eval_prompts must be > 0"),
])
def test_bad_flags_are_one_clear_line(argv, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        rlhf.main(argv + ["--out_dir", str(tmp_path / "run")])
    text = str(e.value.code)
    assert message in text and "\n" not in text.strip()
    assert not (tmp_path / "run").exists()  # nothing created for a run that never started


def test_an_out_dir_that_cannot_be_written_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    for out_dir in (str(tmp_path / "a_file" / "run"), "/proc/rlhf-test/run"):
        with pytest.raises(SystemExit) as e:
            rlhf.main(["--stage", "data", "--out_dir", out_dir])
        assert str(e.value.code).startswith("rlhf.py: error: ") and "\n" not in str(e.value.code), out_dir


# ---------------------------------------------------------------------------- the task and its simulated human

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


def test_dataset_splits_are_disjoint_seeded_and_labelled():
    cfg = rlhf.Config(n_sft=200, n_pref=300)
    data, again = rlhf.make_dataset(cfg), rlhf.make_dataset(cfg)
    assert data == again  # the same seed gives the same data
    assert len({p["prompt"] for p in data["prompts"]}) == len(data["prompts"])
    held = [p for p in data["prompts"] if p["split"] == "heldout"]
    assert [p["family"] for p in held[:6]] == list(rlhf.FAMILIES) * 2  # the families take turns
    held = {p["prompt"] for p in held}
    for name in ("sft_train", "prefs_train"):
        assert not held & {r["prompt"] for r in data[name]}, name
    for name in ("sft_heldout", "prefs_heldout"):
        assert {r["prompt"] for r in data[name]} <= held
    pairs = data["prefs_train"]
    assert all(r["chosen"] != r["rejected"] for r in pairs)
    # noisy labels: mostly, but not always, the gold-better response is chosen
    agree = [r["gold_chosen"] > r["gold_rejected"] for r in pairs if r["gold_chosen"] != r["gold_rejected"]]
    assert 0.7 < sum(agree) / len(agree) < 1.0
    assert rlhf.make_dataset(dataclasses.replace(cfg, seed=1)) != data
    # the default data's first pair, as the stored default runs' logs print it: the data the docs measure
    first = rlhf.make_dataset(rlhf.Config())["prefs_train"][0]
    assert (first["chosen"], first["rejected"]) == (" Your bird is called Sam.", " Ugh. Your bird is called Sam.")


def test_save_atomically_keeps_the_old_checkpoint_when_saving_fails(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "weights").write_text("good")

    def broken(path):
        os.makedirs(path)
        open(os.path.join(path, "weights"), "w").write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        rlhf.save_atomically(broken, str(target))
    assert (target / "weights").read_text() == "good"


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
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), i in merges.items():  # each token: the bytes it stands for
        vocab[i] = vocab[a] + vocab[b]
    ids = rlhf.bpe_encode(text, merges)
    assert b"".join(vocab[i] for i in ids).decode("utf-8") == text, \
        f"exercise 2 (bpe_encode_chunk): decoding the ids must give back the text {text!r}"


def test_bpe_encode_equals_hugging_face_on_our_saved_files(tmp_path):
    merges = hand_merges()
    rlhf.save_tokenizer(merges, str(tmp_path), 64)
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.pad_token_id != hf.eos_token_id and len(hf) == 256 + len(merges) + 2
    for text in [t for t in HARD_STRINGS if rlhf.EOT not in t] + ["\n\nHuman: I have a red bike. What colour is my bike?\n\nAssistant: Your bike is red."]:
        ours = rlhf.bpe_encode(text, merges)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours, \
            f"exercise 2 (bpe_encode_chunk): Hugging Face's GPT-2 tokenizer encodes {text!r} differently"
        assert hf.decode(ours) == text
    assert rlhf.bpe_encode(" the bike", merges) == [258, 280]


def test_a_trained_tokenizer_makes_the_task_words_single_tokens():
    data = rlhf.make_dataset(rlhf.Config(n_sft=300, n_pref=10))
    merges = rlhf.train_bpe([r["prompt"] + r["response"] for r in data["sft_train"]], 1024)
    for word in ("Human", " bike", " know"):
        assert len(rlhf.bpe_encode(word, merges)) == 1, word


def test_tokenize_cuts_prompts_from_the_left_caps_responses_and_adds_the_start_token(tmp_path):
    rlhf.save_tokenizer({}, str(tmp_path), 40)  # bytes only: one token per byte; 40 positions
    tok = rlhf.load_tokenizer(str(tmp_path))
    cfg = rlhf.Config(max_new_tokens=8)  # prompt budget 40 - 8 = 32 tokens
    rows = [dict(prompt="\n\nHuman: Why?\n\nAssistant:", response=" yes"), dict(prompt="b" * 50 + "?", response=" " + "y" * 20)]
    out = rlhf.tokenize(tok, rows, cfg)
    assert tok.decode(out[0]["prompt"]) == rows[0]["prompt"]  # it fits: untouched
    assert out[0]["response"] == rlhf.encode(tok, [" yes"])[0] + [tok.eos_token_id]  # the end token appended
    assert tok.decode(out[1]["prompt"]) == "b" * 31 + "?"  # the end of a prompt matters most: cut from the left
    assert len(out[1]["response"]) == 8 and tok.eos_token_id not in out[1]["response"]  # cut: it did not end
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, add_bos_token=True)))
    tok = rlhf.load_tokenizer(str(tmp_path))  # a tokenizer that starts every text with a token, as Llama's does
    out = rlhf.tokenize(tok, rows, cfg)
    assert out[0]["prompt"][0] == tok.bos_token_id and out[1]["prompt"][0] == tok.bos_token_id
    assert len(out[1]["prompt"]) == 32 and tok.decode(out[1]["prompt"][1:]) == "b" * 30 + "?"


# ---------------------------------------------------------------------------- models, log-probs and sampling

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
    q_ids, q_mask = pad_left(prompts, tok.pad_token_id)
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
    prompts = [{"prompt": "Human: hi Assistant:", "family": None}, {"prompt": "x y z", "family": None}]
    torch.manual_seed(123)
    records = rlhf.evaluate_policy(model, tok, prompts, cfg, CPU, scorers={}, ref=model, seed=7)
    torch.manual_seed(7 + 2)
    _, _, r_ids, r_mask, _ = rlhf.generate(model, tok, rlhf.prompt_tokens(tok, prompts, cfg), cfg, CPU)
    assert [rs[2]["response"] for rs in records] == rlhf.decode_responses(tok, r_ids, r_mask)
    assert all(len(rs) == 3 and rs[0]["kl"] == pytest.approx(0, abs=1e-5) for rs in records)


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


def test_masked_mean_ignores_padding():
    x, m = torch.tensor([1.0, 2.0, 9.0]), torch.tensor([1.0, 1.0, 0.0])
    assert rlhf.masked_mean(x, m).item() == pytest.approx(1.5)
    x2, m2 = torch.tensor([[1.0, 3.0], [5.0, 0.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert rlhf.masked_mean(x2, m2, dim=1).tolist() == [2.0, 5.0]


def test_sft_loss_counts_response_tokens_only(tmp_path):
    ex = "exercise 4 (sft_loss):"
    position_ids_first(4)
    tok = tiny_tokenizer(tmp_path)
    model = tiny_lm(tok)
    cfg = rlhf.Config()
    rows = [dict(prompt="Human: hi Assistant:", response=" hello"), dict(prompt="hello", response=" hello world")]
    examples = rlhf.tokenize(tok, rows, cfg)
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
    metrics = rlhf.fit_reward_model(rm, tok, train, train[1:], rlhf.Config(rm_epochs=1, rm_batch_size=1), CPU, "rm test", 0)
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
        r_ids, r_mask = pad_right([encode_plain(tok, t) + [tok.eos_token_id] for t in texts], tok.pad_token_id)
        q_ids, q_mask = pad_left(prompt_ids, tok.pad_token_id)
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
        r_ids, r_mask = pad_right([encode_plain(tok, t) + [tok.eos_token_id] for t in texts], tok.pad_token_id)
        q_ids, q_mask = pad_left(prompt_ids, tok.pad_token_id)
        return q_ids, q_mask, r_ids, r_mask, torch.ones(len(texts), dtype=torch.bool)
    monkeypatch.setattr(rlhf, "generate", fake_generate)
    prompts = [BIKE, CAR, UNTOLD, dict(CAR, prompt="\n\nHuman: Steal it?\n\nAssistant:")]
    cfg = rlhf.Config(rm_samples=200, max_new_tokens=40)  # so many samples that the prompts take several calls
    rows = rlhf.own_rankings(None, tok, prompts, cfg, CPU, random.Random(0))
    lengths = [len(x) for x in rlhf.prompt_tokens(tok, prompts, cfg)]
    assert len(rows) == 4 and len(set(lengths)) == 4
    for row, n in zip(rows, lengths):
        assert len(row["responses"]) == 200 and all(r.startswith(f" L{n} ") for r in row["responses"]), row["prompt"]


def test_the_human_ranks_the_sft_policys_samples_and_the_reward_model_trains_on_them(tmp_path, monkeypatch):
    """The wiring of own_rankings into stage rm (a smoke model's samples are too alike to rank, so the human's
    rankings are stood in for: three answers to each prompt, ranked by the gold score): the reward model trains on
    the crowd's pairs and the rankings, which are written beside it."""
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
    rlhf.main(["--stage", "all", "--out_dir", str(out)] + SMOKE)
    s = json.load(open(out / "summary.json"))
    rankings = rlhf.read_jsonl(str(out / "rm_rankings.jsonl"))
    assert s["rm"]["rankings"] == len(rankings) > 0 and all(len(r["responses"]) == 3 for r in rankings)
    steps = len(rlhf.read_jsonl(str(out / "rm_metrics.jsonl")))
    assert steps > math.ceil(s["rm"]["pairs"] / 16), "the rankings were not trained on"
    # --rm_samples 0: the crowd's pairs only
    rlhf.main(["--stage", "rm", "--out_dir", str(out)] + SMOKE + ["--rm_samples", "0"])
    assert rlhf.read_jsonl(str(out / "rm_rankings.jsonl")) == [] and json.load(open(out / "summary.json"))["rm"]["rankings"] == 0


def test_rank_prompts_caps_the_prompts_the_human_ranks(smoke_run, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(rlhf, "own_rankings", lambda policy, tok, prompts, *rest: seen.append(prompts) or [])
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    rlhf.main(["--stage", "rm", "--out_dir", str(out)] + SMOKE + ["--rank_prompts", "3"])
    train = [p for p in rlhf.load_data(rlhf.Config(out_dir=str(out)))["prompts"] if p["split"] == "train"]
    assert seen[-1] == train[:3]  # the first three training prompts
    rlhf.main(["--stage", "rm", "--out_dir", str(out)] + SMOKE)  # 0, the default: every training prompt
    assert seen[-1] == train


def test_sample_batch_bounds_each_sampling_call_for_the_human_and_the_rms_scale(tmp_path, monkeypatch):
    """--sample_batch: the human's rankings and the reward model's scale sample at most that many sequences at once
    (a big model's memory); with every row in one call (the default run) nothing changes."""
    rlhf.save_tokenizer({}, str(tmp_path), 256)
    tok = rlhf.load_tokenizer(str(tmp_path))
    calls = []

    def fake_generate(policy, tok_, prompt_ids, cfg_, device):  # each row answers with its prompt's length
        calls.append(len(prompt_ids))
        r_ids, r_mask = pad_right([encode_plain(tok, f" L{len(ids)}") + [tok.eos_token_id] for ids in prompt_ids],
                                  tok.pad_token_id)
        q_ids, q_mask = pad_left(prompt_ids, tok.pad_token_id)
        return q_ids, q_mask, r_ids, r_mask, torch.ones(len(prompt_ids), dtype=torch.bool)
    monkeypatch.setattr(rlhf, "generate", fake_generate)
    prompts = [BIKE, CAR, UNTOLD] * 4
    score = lambda ids, mask: mask.sum(1).float()  # noqa: E731 (prompt lengths differ: a spread to measure)
    whole = rlhf.sft_scale(score, None, tok, prompts, rlhf.Config(), CPU)
    assert calls == [24]  # two samples of each of the 12 prompts, in one call
    calls.clear()
    assert rlhf.sft_scale(score, None, tok, prompts, rlhf.Config(sample_batch=5), CPU) == pytest.approx(whole)
    assert calls == [5, 5, 5, 5, 4]
    calls.clear()
    rows = rlhf.own_rankings(None, tok, prompts, rlhf.Config(rm_samples=3, sample_batch=7), CPU, random.Random(0))
    assert calls == [6] * 6 and len(rows) == 0  # 2 prompts × 3 samples a call; one response each: nothing to rank
    calls.clear()
    rlhf.own_rankings(None, tok, prompts, rlhf.Config(rm_samples=3, sample_batch=2), CPU, random.Random(0))
    assert calls == [3] * 12  # a prompt's samples stay together, even past the bound


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
    ids, mask = pad_right([q + r[0], q + r[1]], tok.pad_token_id)
    r_ids, r_mask = pad_right(r, tok.pad_token_id)
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

def test_bootstrap_ci_draws_whole_prompts_and_takes_the_middle_95_percent():
    ex = "exercise 21 (bootstrap_ci):"
    # 50 prompts whose 8 samples are all 1, 50 whose 8 are all 0: the samples of a prompt are alike, so the mean
    # moves as a mean of 100 values, not of 800 (drawing samples instead of prompts: about [0.47, 0.53])
    x = torch.tensor([[1.0] * 8] * 50 + [[0.0] * 8] * 50, dtype=torch.float64)
    lo, hi = rlhf.bootstrap_ci(x, 0)
    assert lo < 0.43 and hi > 0.57 and lo > 0.35 and hi < 0.65, \
        f"{ex} draw whole prompts (rows of x), not samples: expected about [0.40, 0.60], got [{lo:.3f}, {hi:.3f}]"
    assert rlhf.bootstrap_ci(x, 0) == [lo, hi], f"{ex} the same seed gives the same interval"
    # the draws of the docstring, and the order statistics of their means: the 26th smallest of 1000 to the 975th
    torch.manual_seed(0)
    x = torch.rand(37, 3, dtype=torch.float64)
    rows = torch.randint(37, (1000, 37), generator=torch.Generator().manual_seed(5))
    means = x[rows].mean((1, 2)).sort().values
    got = rlhf.bootstrap_ci(x, 5)
    assert got == pytest.approx([means[25].item(), means[974].item()], abs=1e-12), \
        f"{ex} the interval holds the middle 950 of the 1000 means: from the 26th smallest (index 25) to the 975th " \
        f"(index 974); expected {[round(means[25].item(), 5), round(means[974].item(), 5)]}, got {got}"
    # a paired difference draws the same prompts for both: y = x + 0.5 differs by exactly 0.5 on every draw
    got = rlhf.bootstrap_ci(x, 5, y=x + 0.5)
    assert got == pytest.approx([-0.5, -0.5], abs=1e-9), \
        f"{ex} mean(x) − mean(y) with y = x + 0.5 is −0.5 whichever prompts are drawn, if x and y are drawn " \
        f"together; got {got}"
    # a prompt with fewer values (NaN): a draw's mean is over all its values
    x = torch.tensor([[1.0, float("nan")], [0.0, 0.0]], dtype=torch.float64)
    lo, hi = rlhf.bootstrap_ci(x, 0)
    assert (lo, hi) == (0.0, 1.0), f"{ex} a draw of the first prompt twice has mean 1, of the second twice 0"
    assert rlhf.bootstrap_ci(torch.full((10, 4), 0.7, dtype=torch.float64), 3) == pytest.approx([0.7, 0.7])


def test_win_rate_is_over_independent_pairs_of_samples_ties_half():
    """Every policy sample of a prompt against every SFT sample of it: the chance that a policy sample beats an
    independent SFT sample, whatever order the vocabulary puts the tokens in. The issue's example: next-token
    distributions policy [.5, .2, .3], SFT [.4, .2, .4] over answers of gold [1, 0, −1] give 0.56."""
    a = [[dict(gold=g) for g in [1.0] * 5 + [0.0] * 2 + [-1.0] * 3]]
    b = [[dict(gold=g) for g in [1.0] * 4 + [0.0] * 2 + [-1.0] * 4]]
    w = rlhf.win_rate(a, b, "gold", 0)
    assert w["mean"] == pytest.approx(0.5 * 0.6 + 0.2 * 0.4 + 0.5 * (0.5 * 0.4 + 0.2 * 0.2 + 0.3 * 0.4))
    a = [[dict(gold=1.0), dict(gold=0.0)], [dict(gold=-1.0), dict(gold=0.5)]]
    b = [[dict(gold=0.0), dict(gold=0.0)], [dict(gold=0.0), dict(gold=0.5)]]
    w = rlhf.win_rate(a, b, "gold", 0)
    assert w["mean"] == pytest.approx((3 / 4 + 1.5 / 4) / 2) and w["ci"][0] <= w["mean"] <= w["ci"][1]
    assert rlhf.win_rate(b, a, "gold", 0)["mean"] == pytest.approx(1 - w["mean"])
    assert rlhf.win_rate(a, a, "gold", 0) == dict(mean=0.5, ci=[0.5, 0.5])  # a policy against itself: a tie


def test_summarize_gives_each_figure_its_interval_and_the_paired_difference():
    def rec(family, kind, gold, **kw):
        return dict(prompt="p", family=family, response="r", kind=kind, gold=gold, success=kind in ("right", "refusal"),
                    rm=gold / 2, kl=0.0, length=3, ended=True, **kw)
    sft = [[rec("helpful", "dodge", -0.5), rec("helpful", "right", 1.0)],
           [rec("harmless", "complied", -1.0), rec("harmless", "refusal", 1.0)]]
    pol = [[rec("helpful", "right", 1.0), rec("helpful", "right", 1.0)],
           [rec("harmless", "refusal", 1.0), rec("harmless", "refusal", 1.0)]]
    fig, diff = rlhf.summarize(pol, 0), rlhf.summarize(pol, 0, sft=sft)
    assert fig["gold"] == dict(mean=1.0, ci=[1.0, 1.0]) and fig["helpful"]["kinds"]["right"]["mean"] == 1.0
    assert set(fig) >= {"gold", "success", "rm", "kl", "length", "ended", "helpful", "harmless"} and "honest" not in fig
    assert diff["gold"]["mean"] == pytest.approx(1.0 - 0.125) and diff["helpful"]["kinds"]["dodge"]["mean"] == -0.5
    assert diff["harmless"]["success"]["mean"] == 0.5 and diff["harmless"]["kinds"]["never ended"]["mean"] == 0.0
    # the paired difference draws both prompts together: helpful +0.75, harmless +1 -> the interval [0.75, 1]
    assert diff["gold"]["ci"] == pytest.approx([0.75, 1.0])


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
    cfg = rlhf.Config(**vars(rlhf.build_parser().parse_args(SMOKE + ["--out_dir", str(out), "--eval_samples", "3"])))
    figures = rlhf.stage_eval(cfg, CPU)
    assert figures["win_rate_gold"] == dict(mean=0.5, ci=[0.5, 0.5])
    assert figures["ppo"]["kl"]["mean"] == pytest.approx(0, abs=1e-5)
    assert json.dumps(figures["ppo"]) == json.dumps(figures["sft"])
    zero = [f for f in (figures["difference"]["gold"], figures["difference"]["helpful"]["kinds"]["garbled"])]
    assert all(f["mean"] == 0 and f["ci"] == [0, 0] for f in zero)


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
    assert figures["ppo"]["ended"]["mean"] == 1.0 and figures["ppo"]["length"]["mean"] == 1.0
    assert figures["sft"]["ended"]["mean"] < 0.5  # the 8-step smoke SFT model rarely ends: the human prefers an empty answer
    assert figures["win_rate_gold"]["mean"] > 0.75 and figures["win_rate_gold"]["ci"][0] > 0.5
    assert figures["ppo"]["kl"]["mean"] > 1.0 and figures["sft"]["kl"]["mean"] == pytest.approx(0, abs=1e-5)
    d = figures["difference"]["ended"]
    assert d["mean"] == pytest.approx(1 - figures["sft"]["ended"]["mean"]) and d["ci"][0] <= d["mean"] <= d["ci"][1]
    table = (out / "eval.md").read_text()
    assert "| responses that end | " in table and "[95% interval by bootstrap over prompts]" in table
    data = rlhf.load_data(cfg)  # the held-out prompts, never the training ones
    _, records = rlhf.compare_with_sft(cfg, CPU, tok, data, mute, "ppo", {})
    held = [p["prompt"] for p in data["prompts"] if p["split"] == "heldout"][:cfg.eval_prompts]
    assert [rs[0]["prompt"] for rs in records["ppo"]] == [rs[0]["prompt"] for rs in records["sft"]] == held


# ---------------------------------------------------------------------------- end to end

def test_all_stages_end_to_end(smoke_run):
    out = smoke_run
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    for name in ("sft", "ppo"):
        assert AutoModelForCausalLM.from_pretrained(out / name).config.n_embd == 32
    rm = AutoModelForSequenceClassification.from_pretrained(out / "rm")
    assert rm.config.num_labels == 1 and hasattr(rm.config, "reward_mean")
    assert AutoTokenizer.from_pretrained(out / "tokenizer").pad_token == rlhf.PAD
    for f in ("overview.png", "eval.md", "sft_metrics.jsonl", "rm_metrics.jsonl", "ppo_metrics.jsonl"):
        assert (out / f).stat().st_size > 0, f
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == list(rlhf.STAGES)
    assert {"acc_gold", "acc_gold_helpful", "acc_label"} <= set(summary["rm"]["heldout"])
    ev = summary["eval"]
    assert ev["win_rate_gold"]["ci"][0] <= ev["win_rate_gold"]["mean"] <= ev["win_rate_gold"]["ci"][1]
    assert ev["n_samples"] == 1 and ev["n_prompts"] == 24
    row = json.loads((out / "ppo_metrics.jsonl").read_text().splitlines()[-1])
    for key in ("rm_score", "gold", "kl", "kl_coef", "entropy", "pg_loss", "vf_loss", "clipfrac", "approx_kl",
                "response_len", "value_ev"):
        assert math.isfinite(row[key]), key


# Every numeric flag at the ends of the range check_config accepts, on the stage that reads it (and the stages
# after it where the flag changes what they get): the run finishes, or stops with one line before any stage runs.
BOUNDARIES = {
    "data, low": (["all"], ["--n_sft", "1", "--n_pref", "1", "--crowd_accuracy", "0", "--heldout_frac", "0",
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
    "rm, low": (["rm"], ["--rm_epochs", "1", "--rm_batch_size", "1", "--rm_lr", "1e-9", "--rm_samples", "2"]),
    "rm, high": (["rm"], ["--rm_batch_size", "100000", "--rm_samples", "5"]),
    "ppo, low": (["ppo", "eval"], ["--ppo_steps", "1", "--rollout_batch_size", "1", "--minibatch_size", "1", "--ppo_epochs", "1",
                                   "--ppo_lr", "1e-9", "--vf_coef", "0", "--clip_range", "0", "--value_clip_range", "0",
                                   "--gamma", "0", "--lam", "0", "--kl_coef", "0", "--temperature", "0.01", "--max_new_tokens", "1",
                                   "--missing_eos_score=-1e9"]),
    "ppo, high": (["ppo", "eval"], ["--ppo_steps", "3", "--rollout_batch_size", "8", "--minibatch_size", "8", "--vf_coef", "100",
                                    "--clip_range", "1", "--value_clip_range", "1", "--gamma", "1", "--lam", "1", "--kl_coef", "100",
                                    "--adaptive_kl", "--kl_target", "1e-9", "--kl_horizon", "8", "--temperature", "100"]),
}


@pytest.mark.parametrize("case", BOUNDARIES)
def test_every_numeric_flag_at_the_ends_of_its_range_runs(case, smoke_run, tmp_path):
    stages, flags = BOUNDARIES[case]
    out = tmp_path / "run"
    if case == "learning rates, high":  # no learning rate is too high to accept; a loss that diverges is one line
        shutil.copytree(smoke_run, out)
        with pytest.raises(SystemExit, match=r"^rlhf.py: error: SFT loss became nan at step \d+; stopped before saving"):
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


def test_a_stage_rerun_forgets_the_stages_after_it_and_keeps_its_own_flags(smoke_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    rlhf.main(["--stage", "ppo", "--out_dir", str(out), "--kl_coef", "0", "--no-adaptive_kl"] + SMOKE)
    assert "eval" not in json.loads((out / "summary.json").read_text())
    with pytest.raises(rlhf.UserError, match="eval is not there or not finished"):
        rlhf.require(rlhf.Config(out_dir=str(out)), "eval")
    rlhf.main(["--stage", "eval", "--out_dir", str(out)] + SMOKE + ["--eval_samples", "2"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"]["config"]["eval_samples"] == 2 and summary["ppo"]["config"]["kl_coef"] == 0
    assert summary["eval"]["n_samples"] == 2
    rlhf.main(["--stage", "sft", "--out_dir", str(out)] + SMOKE)
    assert list(json.loads((out / "summary.json").read_text())) == ["data", "tokenizer", "sft"]
    with pytest.raises(SystemExit) as e:  # the reward model was trained from the previous SFT model
        rlhf.main(["--stage", "ppo", "--out_dir", str(out)] + SMOKE)
    assert "rm is not there or not finished: run `python rlhf.py --stage rm" in str(e.value.code)


def test_ctrl_c_names_the_stage_to_rerun_and_keeps_the_finished_ones(smoke_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(smoke_run, out)
    before = (out / "rm" / "model.safetensors").read_bytes()

    def interrupted(cfg, device):
        raise KeyboardInterrupt

    monkeypatch.setattr(rlhf, "train_reward_model", interrupted)
    with pytest.raises(SystemExit) as e:
        rlhf.main(["--stage", "rm", "--out_dir", str(out)] + SMOKE)
    assert "interrupted in stage rm" in str(e.value.code) and "--stage rm" in str(e.value.code)
    assert (out / "rm" / "model.safetensors").read_bytes() == before


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
    assert "loss became nan at step" in str(e.value.code) and "last good checkpoint is kept" in str(e.value.code)
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
        rlhf.Config(n_sft=100, n_pref=1))["sft_train"]], 600)


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
    first = rlhf.prompt_tokens(tok, [dict(prompt="\n\nHuman: hi\n\nAssistant:")], rlhf.Config())[0]
    assert (first[0] == tok.bos_token_id) == bos
    assert json.loads((out / "summary.json").read_text())["eval"]["n_prompts"] == 24


def test_flags_from_a_file_with_comments_and_the_flags_after_it_win(tmp_path):
    (tmp_path / "a.args").write_text("# a recipe\n--sft_lr 5e-5   # a comment\n\n--ppo_steps 7\n--model=gpt2\n")
    parser = rlhf.build_parser()
    args = parser.parse_args([f"@{tmp_path / 'a.args'}", "--ppo_steps", "3"])
    assert (args.sft_lr, args.ppo_steps, args.model) == (5e-5, 3, "gpt2")
    with pytest.raises(SystemExit, match=r"^rlhf.py: error: .*No such file .*nope.args"):
        parser.parse_args([f"@{tmp_path / 'nope.args'}"])


def test_the_gpt2_recipe_runs_every_stage_on_a_small_local_model(tmp_path, small_merges):
    """assets/gpt2-124m.args, the recipe for the real small GPT-2, on the same code path with a small GPT-2 saved
    locally (a smoke schedule after it wins): every flag in it is valid, and every stage runs."""
    recipe = os.path.join(HERE, "assets", "gpt2-124m.args")
    if not os.path.exists(recipe):
        pytest.skip("rlhf.py alone: no assets/")
    checkpoint(tmp_path / "model", "gpt2", small_merges)
    out = tmp_path / "run"
    rlhf.main(["--stage", "all", "--out_dir", str(out), "--model", str(tmp_path / "model"), f"@{recipe}"] + SMOKE +
              ["--rank_prompts", "8", "--sample_batch", "8", "--rm_batch_size", "4"])
    s = json.loads((out / "summary.json").read_text())
    ran = s["eval"]["config"]
    assert (ran["sft_lr"], ran["rm_lr"], ran["ppo_lr"], ran["kl_coef"], ran["rm_epochs"]) == (5e-5, 5e-5, 1e-5, 0.15, 1)
    assert (ran["ppo_steps"], ran["rm_samples"], ran["rank_prompts"], ran["sample_batch"]) == (2, 2, 8, 8)  # after it
    assert s["rm"]["rankings"] <= 8 and s["eval"]["n_prompts"] == 24


def test_bench_runs_the_ppo_step_of_rlhf(capsys, tmp_path):
    bench = pytest.importorskip("bench")
    med = bench.main(["--steps", "2", "--warmup", "1", "--n_layer", "1", "--n_embd", "32", "--n_head", "2",
                      "--vocab", "64", "--batch", "8", "--minibatch", "4", "--response_len", "4", "--threads", "1",
                      "--json", str(tmp_path / "b.json")])
    assert set(med) == {"generate", "score", "train", "total"} and med["total"] >= med["train"] > 0
    out = capsys.readouterr().out
    assert "GFLOP/s" in out and "% of the" in out and "tokens/s" in out and "the update alone" in out
    got = json.loads((tmp_path / "b.json").read_text())
    assert got["median"] == med and got["gflops"] == pytest.approx(got["gflop"]["total"] / med["total"])
    assert got["update_share"] == pytest.approx(got["gflop"]["train"] / med["train"] / got["ceiling"])
