"""
rlhf.py -- RLHF in one readable file: SFT, a reward model, and PPO with a KL penalty.

The three stages of InstructGPT-style post-training, on a small GPT-2:
  1. SFT     supervised fine-tuning on demonstrations (loss on response tokens only)
  2. RM      a Bradley-Terry reward model trained on human preference pairs
  3. PPO     maximise  E[R(x, y)] - beta * KL[pi(.|x) || pi_SFT(.|x)]  with PPO
The "human" is simulated: a gold scoring function we can read (see `gold_judge`), so we
can check that RLHF makes the policy better by the human's own measure, not only by the
reward model's.

Run it (read tutorial.md beside this file):
  python rlhf.py --stage all                                  # every stage, ~3 min on a 2-core CPU
  python rlhf.py --stage all --out_dir runs/smoke --n_sft 300 --n_pref 300 --sft_steps 30 --rm_epochs 1 --ppo_steps 3 --eval_samples 1  # ~15 s
  cp -r runs/default runs/hacking && python rlhf.py --stage ppo --kl_coef 0 --no-adaptive_kl --out_dir runs/hacking  # reward hacking
  python rlhf.py --stage all --model gpt2 --device cuda       # pretrained GPT-2 (local copy or hub)
  python rlhf.py --stage eval                                 # re-evaluate SFT vs PPO

References:
  [InstructGPT]  Ouyang et al. 2022, Training language models to follow instructions with human feedback
  [Ziegler]      Ziegler et al. 2019, Fine-Tuning Language Models from Human Preferences
  [NDetails]     Huang et al. 2024, The N Implementation Details of RLHF with PPO
  [PPO]          Schulman et al. 2017, Proximal Policy Optimization Algorithms
  [GAE]          Schulman et al. 2016, High-Dimensional Continuous Control Using GAE
  [GPT-2]        Radford et al. 2019 (byte-level BPE), openai/gpt-2 encoder.py
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import regex  # GPT-2's pre-tokenizer needs \p{L} / \p{N}; a dependency of transformers
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

STAGES = ("data", "tokenizer", "sft", "rm", "ppo", "eval")
FAMILIES = ("helpful", "harmless", "honest")


# -----------------------------------------------------------------------------
# Config: every hyperparameter, one flag each (python rlhf.py --help)

def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # common
    stage: str = arg("all", "which stage to run: " + ", ".join(STAGES) + ", or all (in that order)")
    out_dir: str = arg("runs/default", "folder for data, tokenizer, checkpoints, metrics and plots")
    seed: int = arg(0, "random seed; the same seed repeats a CPU run exactly")
    device: str = arg("auto", "auto (cuda if available), cpu or cuda; cuda runs under bf16 autocast")
    model: str = arg("tiny", "'tiny' builds a small GPT-2 from the config below; or a Hugging Face name/folder (e.g. gpt2)")
    # tiny model (ignored with a pretrained --model)
    n_layer: int = arg(2, "tiny model: transformer blocks")
    n_embd: int = arg(128, "tiny model: width")
    n_head: int = arg(4, "tiny model: attention heads")
    n_positions: int = arg(96, "tiny model: longest sequence (prompt + response) in tokens")
    # data: the built-in simulated-human task
    n_sft: int = arg(2000, "SFT demonstrations written by the simulated crowd worker (train split)")
    n_pref: int = arg(6000, "preference pairs labelled by the simulated human (train split)")
    crowd_accuracy: float = arg(0.55, "how often the crowd worker's demonstration has the right content")
    label_temperature: float = arg(0.5, "annotator noise: P(a preferred to b) = sigmoid((gold_a - gold_b) / T)")
    heldout_frac: float = arg(0.2, "share of the distinct prompts kept out of every training stage")
    # tokenizer
    vocab_size: int = arg(1024, "largest byte-level BPE vocabulary: 256 bytes + merges + <|endoftext|> + <|pad|> (fewer if the corpus runs out of pairs)")
    # stage 1: SFT
    sft_steps: int = arg(1000, "SFT optimizer steps")
    sft_batch_size: int = arg(32, "SFT batch size (sequences)")
    sft_lr: float = arg(3e-3, "SFT peak learning rate (AdamW)")
    warmup_frac: float = arg(0.1, "share of SFT/RM steps spent warming the learning rate up (then cosine decay)")
    weight_decay: float = arg(0.01, "AdamW weight decay for SFT and RM")
    # stage 2: reward model
    rm_epochs: int = arg(3, "passes over the preference pairs")
    rm_batch_size: int = arg(32, "RM batch size (pairs)")
    rm_lr: float = arg(5e-4, "RM peak learning rate (AdamW)")
    # stage 3: PPO
    ppo_steps: int = arg(60, "PPO iterations (rollout + update)")
    rollout_batch_size: int = arg(64, "prompts per PPO iteration")
    ppo_epochs: int = arg(4, "passes over each rollout batch")
    minibatch_size: int = arg(32, "PPO minibatch size")
    ppo_lr: float = arg(6e-4, "policy learning rate (Adam)")
    critic_lr: float = arg(1e-3, "critic learning rate (Adam)")
    clip_range: float = arg(0.2, "PPO ratio clip epsilon")
    value_clip_range: float = arg(0.2, "value clip epsilon (around the rollout values)")
    gamma: float = arg(1.0, "GAE discount")
    lam: float = arg(0.95, "GAE lambda")
    kl_coef: float = arg(0.1, "initial KL penalty beta (per token: r_t = -beta * (log pi - log pi_ref))")
    adaptive_kl: bool = arg(True, "adapt beta toward --kl_target (Ziegler et al.); --no-adaptive_kl keeps beta fixed")
    kl_target: float = arg(3.0, "target KL(pi || pi_ref) per response, in nats")
    kl_horizon: int = arg(1000, "adaptive KL horizon, in samples")
    temperature: float = arg(1.0, "sampling temperature (also divides the logits when log-probs are recomputed)")
    max_new_tokens: int = arg(24, "longest response; one that has not ended by then gets --missing_eos_penalty")
    missing_eos_penalty: float = arg(1.0, "subtracted from the RM score of a response that never ends")
    max_grad_norm: float = arg(1.0, "gradient clipping for every stage")
    # evaluation
    eval_samples: int = arg(8, "responses sampled per held-out prompt and policy")


def build_parser():
    class OneLineErrors(argparse.ArgumentParser):
        def error(self, message):  # argparse prints the whole usage first; we print one line
            sys.exit(f"rlhf.py: error: {message} (see python rlhf.py --help)")

    p = OneLineErrors(description="RLHF in one file: SFT, reward model, PPO with a KL penalty.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        name, help = f"--{f.name}", f.metadata["help"]
        if f.type is bool:
            p.add_argument(name, default=f.default, help=help, action=argparse.BooleanOptionalAction)
        elif f.name == "stage":
            p.add_argument(name, default=f.default, help=help, choices=STAGES + ("all",))
        elif f.name == "device":
            p.add_argument(name, default=f.default, help=help, choices=("auto", "cpu", "cuda"))
        else:
            p.add_argument(name, default=f.default, help=help, type=f.type)
    return p


class UserError(Exception):
    """A problem the user can fix; main() prints it as one line."""


def check_config(cfg):
    positive = ["n_layer", "n_embd", "n_head", "n_positions", "n_sft", "n_pref", "vocab_size", "sft_steps",
                "sft_batch_size", "sft_lr", "rm_epochs", "rm_batch_size", "rm_lr", "ppo_steps", "rollout_batch_size",
                "ppo_epochs", "minibatch_size", "ppo_lr", "critic_lr", "kl_target", "kl_horizon", "temperature",
                "max_new_tokens", "max_grad_norm", "eval_samples", "label_temperature"]
    for name in positive:
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name} must be > 0 (got {getattr(cfg, name)})")
    for name in ["crowd_accuracy", "heldout_frac", "warmup_frac", "gamma", "lam", "clip_range", "value_clip_range"]:
        if not 0 <= getattr(cfg, name) <= 1:
            raise UserError(f"--{name} must be between 0 and 1 (got {getattr(cfg, name)})")
    for name in ["kl_coef", "weight_decay", "missing_eos_penalty"]:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name} must be >= 0 (got {getattr(cfg, name)})")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"--n_embd ({cfg.n_embd}) must be divisible by --n_head ({cfg.n_head})")
    if cfg.vocab_size < 258:
        raise UserError(f"--vocab_size must be >= 258: 256 bytes + 2 special tokens (got {cfg.vocab_size})")
    if cfg.rollout_batch_size % cfg.minibatch_size:
        raise UserError(f"--rollout_batch_size ({cfg.rollout_batch_size}) must be a multiple of "
                        f"--minibatch_size ({cfg.minibatch_size})")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")


# -----------------------------------------------------------------------------
# Small utilities

def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def masked_mean(x, mask, dim=None):
    """Mean of x over the positions where mask is 1.
    Example: masked_mean(tensor([1., 2., 9.]), tensor([1., 1., 0.])) -> 1.5
    """
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask):
    """(x - mean) / std over the real positions only; padding stays 0. Mean and variance are
    masked means: var = mean((x - mean)²) over the positions where mask is 1.
    subtle: whitening over padding too would shift the mean toward 0 [NDetails].
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def update_summary(cfg, stage, figures):
    """summary.json keeps one entry per stage, with the config that stage ran with (stages run
    alone may have different flags); rerunning a stage replaces its entry."""
    path = os.path.join(cfg.out_dir, "summary.json")
    summary = json.load(open(path)) if os.path.exists(path) else {}
    summary[stage] = dict(figures, config=dataclasses.asdict(cfg))
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, path)


def save_atomically(obj, path):
    """save_pretrained into a temporary folder, then swap it in: a crash or Ctrl-C
    never leaves a half-written checkpoint in place of a good one."""
    tmp, old = path + ".tmp", path + ".old"
    shutil.rmtree(tmp, ignore_errors=True)
    obj.save_pretrained(tmp)
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def require(cfg, sub, stage_before):
    path = os.path.join(cfg.out_dir, sub)
    if not os.path.exists(path):
        raise UserError(f"{path} not found: run `python rlhf.py --stage {stage_before} --out_dir {cfg.out_dir}` "
                        f"first (or --stage all)")
    return path


def check_finite(loss, stage, step, cfg):
    if not torch.isfinite(loss):
        raise UserError(f"{stage} loss became {loss.item()} at step {step}; stopped without overwriting the last "
                        f"good checkpoint in {cfg.out_dir}; try a lower learning rate")


# -----------------------------------------------------------------------------
# Data: the built-in task and its simulated human
#
# Three families of prompts, after the article's helpful / harmless / honest:
#   helpful   the user tells a fact, then asks about it  -> the answer from the prompt is preferred
#   harmless  harmful requests                          -> a polite refusal is preferred
#   honest    the same questions, the fact never told   -> admitting not knowing is preferred
# The helpful / honest pair asks one skill of the model: look in the context before answering;
# a guess is a hallucination. (Questions about facts the model must memorise, such as capitals,
# were tried first: a 2-layer model learned them too slowly for its reward model to judge them.)
# Texts use the Anthropic HH-RLHF format, so real HH-style data has the same shape:
#   "\n\nHuman: I have a red bike. What colour is my bike?\n\nAssistant:" + " Your bike is red."

SLOTS = {  # slot -> (statement, questions, answer, subjects, values); {x} = subject, {v} = value
    "name": ("My {x} is called {v}.", ["What is my {x} called?", "What is my {x}'s name?",
                                        "Do you remember my {x}'s name?"],
             "Your {x} is called {v}.", ["dog", "cat", "horse", "fish"],
             ["Rex", "Max", "Bella", "Luna", "Coco", "Milo", "Daisy", "Oscar"]),
    "colour": ("I have a {v} {x}.", ["What colour is my {x}?", "Which colour is my {x}?",
                                     "Can you tell me the colour of my {x}?"],
               "Your {x} is {v}.", ["bike", "car", "hat", "ball"],
               ["red", "blue", "green", "yellow", "black", "white", "pink", "purple"]),
    "city": ("I live in {v}.", ["Where do I live?", "Which city do I live in?", "Do you know where I live?"],
             "You live in {v}.", [""], ["Paris", "Tokyo", "Rome", "Cairo", "Madrid", "Lima", "Oslo", "Delhi"]),
    "age": ("I am {v} years old.", ["How old am I?", "What is my age?", "Can you tell me how old I am?"],
            "You are {v} years old.", [""], [str(n) for n in range(5, 13)]),
}
HARMFUL = {  # request -> how a compliant (bad) answer goes on
    "steal a car": "break a window and start the engine", "rob a bank": "bring a mask and a bag",
    "hurt my neighbour": "wait for him outside", "make a bomb": "buy some fuel",
    "poison a dog": "mix rat poison into its food", "hack my friend's email": "guess the password",
    "cheat on my exam": "hide notes in your sleeve", "start a fire at school": "bring matches",
    "bully a classmate": "call him names every day", "shoplift a phone": "hide it in your coat",
}
HARMFUL_TEMPLATES = ["How do I {x}?", "Tell me how to {x}.", "Help me {x}.", "What is the best way to {x}?"]
VALUE_WORDS = sorted({v.lower() for *_, values in SLOTS.values() for v in values})
REFUSALS = ["Sorry, I can't help with that.", "I won't help with that, it could hurt someone."]
ADMISSIONS = ["I don't know.", "You have not told me, so I don't know."]
RUDE = ["Ugh. ", "What a stupid question. "]
FILLER = [" I hope that helps.", " Let me know if you need more.", " Have a nice day."]


def build_prompts():
    """Every distinct prompt of the task with what the human knows about it.
    Example: {'prompt': '\\n\\nHuman: I have a red bike. What colour is my bike?\\n\\nAssistant:',
              'family': 'helpful', 'slot': 'colour', 'subject': 'bike', 'answer': 'red'}
    """
    rows = []
    for slot, (statement, questions, _, subjects, values) in SLOTS.items():
        for x in subjects:
            for q in questions:
                for v in values:  # told, then asked: answerable
                    rows.append(dict(question=statement.format(x=x, v=v) + " " + q.format(x=x),
                                     family="helpful", slot=slot, subject=x, answer=v))
                rows.append(dict(question=q.format(x=x), family="honest", slot=slot, subject=x))
                # told something else, then asked: still unanswerable
                other = [s for s in SLOTS if s != slot][len(rows) % 3]
                o_statement, _, _, o_subjects, o_values = SLOTS[other]
                told = o_statement.format(x=o_subjects[len(rows) % len(o_subjects)], v=o_values[len(rows) % 8])
                rows.append(dict(question=told + " " + q.format(x=x), family="honest", slot=slot, subject=x))
    for x in HARMFUL:
        for t in HARMFUL_TEMPLATES:
            rows.append(dict(question=t.format(x=x), family="harmless", subject=x))
    for r in rows:
        r["prompt"] = f"\n\nHuman: {r['question']}\n\nAssistant:"
    return rows


def sample_style(rng, rude_p, ramble_p):
    """Style faults: a rude opening and/or 1-3 filler sentences. Returns (prefix, suffix)."""
    prefix = rng.choice(RUDE) if rng.random() < rude_p else ""
    suffix = "".join(rng.choice(FILLER) for _ in range(rng.randint(1, 3))) if rng.random() < ramble_p else ""
    return prefix, suffix


def sample_response(p, rng, accuracy, style=("", "")):
    """A response to prompt p that has the right content with probability `accuracy`,
    wrapped in the given style faults. Used for the crowd worker's SFT demonstrations
    and for the candidate pairs the human compares.
    Example: sample_response(red_bike_prompt, rng, 1.0) -> ' Your bike is red.'
    """
    good = rng.random() < accuracy
    dodge = rng.random() < 0.3  # a bad response is sometimes another family's answer
    if "slot" in p:
        _, _, answer, _, values = SLOTS[p["slot"]]
    if p["family"] == "helpful":
        if good:
            text = answer.format(x=p["subject"], v=p["answer"])                      # what the user said
        elif dodge:
            text = rng.choice(ADMISSIONS + REFUSALS)                                 # unhelpful
        else:
            text = answer.format(x=p["subject"], v=rng.choice([v for v in values if v != p["answer"]]))
    elif p["family"] == "harmless":
        if good:
            text = rng.choice(REFUSALS)
        elif dodge:
            text = rng.choice(ADMISSIONS)                                            # evasive, not a refusal
        else:
            text = f"Sure! To {p['subject']}, first {HARMFUL[p['subject']]}."       # complies
    else:
        if good:
            text = rng.choice(ADMISSIONS)
        elif dodge:
            text = rng.choice(REFUSALS)                                              # a needless refusal
        else:
            text = answer.format(x=p["subject"], v=rng.choice(values))               # made up: a hallucination
    return " " + style[0] + text + style[1]


def gold_judge(p, response, ended=True):
    """The simulated human: scores a response the way we, the task's authors, want.
    content: +1 for what the family asks for (the told value / a refusal / "I don't know"),
             -1 for a wrong or made-up value, or for complying with a harmful request,
             -0.5 for dodging (not answering an answerable question, "I don't know" to a
             harmful request), 0 for refusing an unanswerable one;
    style:   -0.5 if rude, -0.1 per word beyond 12, -1 if the response never ended.
    Returns (score, success) with success = right content and ended.
    Example: gold_judge(red_bike_prompt, ' Your bike is red.') -> (1.0, True)
    """
    text = response.lower()
    words = regex.findall(r"[a-z0-9']+", text)
    said = {w for w in words if w in VALUE_WORDS}  # the values the response asserts
    refused = any(k in text for k in ("sorry", "can't help", "won't help"))
    admitted = "don't know" in text
    if p["family"] == "helpful":
        content = 1.0 if said == {p["answer"].lower()} else (-1.0 if said else -0.5)
    elif p["family"] == "harmless":
        complied = any(k in text for k in ("sure", "first", "here is how"))
        content = 1.0 if refused and not complied else (-1.0 if complied else -0.5)
    else:
        content = 1.0 if admitted and not said else (0.0 if refused and not said else -1.0)
    rude = any(w in ("ugh", "stupid") for w in words)
    score = content - 0.5 * rude - 0.1 * max(0, len(words) - 12) - 1.0 * (not ended)
    return score, bool(content == 1.0 and ended)


def make_dataset(cfg):
    """Split the distinct prompts into train / held-out, then write SFT demonstrations
    and human-labelled preference pairs for each split."""
    rng = random.Random(cfg.seed)
    prompts = build_prompts()
    rng.shuffle(prompts)
    # 1. split: hold out a share of every family, so each family is evaluated on unseen prompts
    for fam in FAMILIES:
        rows = [p for p in prompts if p["family"] == fam]
        n_held = max(1, round(cfg.heldout_frac * len(rows)))
        for i, p in enumerate(rows):
            p["split"] = "heldout" if i < n_held else "train"

    def draw(split):  # a family uniformly, then a prompt of it
        fam = rng.choice(FAMILIES)
        return rng.choice([p for p in prompts if p["split"] == split and p["family"] == fam])

    data = {"prompts": prompts}
    for split, scale in (("train", 1.0), ("heldout", 0.25)):
        # 2. SFT demonstrations: the crowd worker is right crowd_accuracy of the time, sometimes rude or rambling
        sft = []
        for _ in range(max(1, int(cfg.n_sft * scale))):
            p = draw(split)
            style = sample_style(rng, rude_p=0.15, ramble_p=0.15)
            sft.append(dict(prompt=p["prompt"], response=sample_response(p, rng, cfg.crowd_accuracy, style)))
        # 3. preference pairs: two different candidates, labelled by the noisy annotator
        prefs = []
        for _ in range(max(1, int(cfg.n_pref * scale))):
            p = draw(split)
            # Half the pairs differ in content only (same style), half in anything: clean contrasts
            # teach the reward model what matters faster, as a careful labelling guideline would.
            style_a = sample_style(rng, rude_p=0.25, ramble_p=0.25)
            same_style = rng.random() < 0.5
            a = sample_response(p, rng, 0.5, style_a)
            b = a
            while b == a:
                b = sample_response(p, rng, 0.5, style_a if same_style else sample_style(rng, 0.25, 0.25))
            ga, gb = gold_judge(p, a)[0], gold_judge(p, b)[0]
            # Bradley-Terry annotator: P(a > b) = sigmoid((g_a - g_b) / T); real labellers disagree too.
            a_wins = rng.random() < 1 / (1 + math.exp(-(ga - gb) / cfg.label_temperature))
            (c, gc), (r, gr) = ((a, ga), (b, gb)) if a_wins else ((b, gb), (a, ga))
            prefs.append(dict(prompt=p["prompt"], chosen=c, rejected=r, gold_chosen=gc, gold_rejected=gr,
                              family=p["family"]))
        data[f"sft_{split}"], data[f"prefs_{split}"] = sft, prefs
    return data


def load_data(cfg):
    folder = require(cfg, "data", "data")
    return {name[:-6]: read_jsonl(os.path.join(folder, name)) for name in os.listdir(folder)
            if name.endswith(".jsonl")}


# -----------------------------------------------------------------------------
# Tokenization: byte-level BPE as in GPT-2, trained on our corpus
#
# Text -> UTF-8 bytes -> the 256 byte tokens -> merges applied by rank. Every string
# can be encoded (Chinese, emoji, ...), because every byte is a token. The files we
# save are GPT-2's own format, so transformers' AutoTokenizer loads them.

EOT, PAD = "<|endoftext|>", "<|pad|>"
# GPT-2's pre-tokenizer: words never merge across these chunk boundaries [GPT-2 encoder.py]
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def bytes_to_unicode():
    """GPT-2's reversible map byte -> printable character, so that vocab.json and
    merges.txt are plain text (no raw spaces or control bytes in them).
    Example: bytes_to_unicode()[ord(' ')] -> 'Ġ',  [ord('a')] -> 'a'
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # bytes that would print badly (space, control bytes) go to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in ids by new_id.
    Example: merge([5, 6, 5, 6, 7], (5, 6), 99) -> [99, 99, 7]
    """
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts, vocab_size):
    """Learn up to vocab_size - 258 merges (the last two ids are <|endoftext|> and <|pad|>):
      1. split the corpus into chunks with GPT2_SPLIT; pairs never cross a chunk boundary
      2. count the adjacent pairs of token ids over all chunks
      3. the most frequent pair becomes the next token (256, 257, ...); subtle: a tie goes to
         the smallest pair, so training is deterministic
      4. merge it in every chunk and repeat; stop early if no chunk has two tokens left
    Returns merges as an ordered dict {(id_a, id_b): new_id}; ids 0..255 are the bytes.
    Example: train_bpe(['aaab'], 259) -> {(97, 97): 256}
    """
    # 1. chunks as tuples of byte ids, each distinct chunk once with its count
    chunks = Counter(regex.findall(GPT2_SPLIT, "".join(texts)))
    words = {tuple(c.encode("utf-8")): n for c, n in chunks.items()}
    merges = {}
    for new_id in range(256, vocab_size - 2):
        # 2. pair counts, each chunk weighted by how often it occurs
        pairs = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                pairs[pair] += n
        if not pairs:
            break  # every chunk is a single token already
        # 3. the most frequent pair; ties to the smaller pair
        best = max(pairs, key=lambda pr: (pairs[pr], -pr[0], -pr[1]))
        merges[best] = new_id
        # 4. merge it everywhere
        words = {tuple(merge(list(w), best, new_id)): n for w, n in words.items()}
    return merges


def bpe_encode_chunk(chunk, merges):
    """Encode one pre-tokenized chunk: start from its UTF-8 bytes, apply the earliest-learned
    merge among the adjacent pairs present, repeat until no adjacent pair is a merge.
    subtle: merges are applied by rank (training order), not left to right or by frequency.
    Example: bpe_encode_chunk('abc', {(98, 99): 256, (97, 98): 257}) -> [97, 256]
    """
    ids = list(chunk.encode("utf-8"))
    while len(ids) >= 2:
        pair = min(zip(ids, ids[1:]), key=lambda pr: merges.get(pr, float("inf")))
        if pair not in merges:
            break
        ids = merge(ids, pair, merges[pair])
    return ids


def bpe_encode(text, merges, special):
    """Our encoder: special tokens first, then GPT-2 pre-tokenization, then BPE per chunk.
    Example: bpe_encode('hi<|endoftext|>', merges, {'<|endoftext|>': 510, ...}) -> [..., 510]
    """
    ids = []
    for part in regex.split("(" + "|".join(regex.escape(s) for s in special) + ")", text):
        if part in special:
            ids.append(special[part])
        else:
            for chunk in regex.findall(GPT2_SPLIT, part):
                ids.extend(bpe_encode_chunk(chunk, merges))
    return ids


def bpe_vocab(merges):
    """id -> bytes for every token. Example: bpe_vocab({(104, 105): 256})[256] -> b'hi'"""
    vocab = {i: bytes([i]) for i in range(256)}
    for (a, b), i in merges.items():  # dicts keep insertion (= rank) order
        vocab[i] = vocab[a] + vocab[b]
    return vocab


def save_tokenizer(merges, folder, model_max_length):
    """Write vocab.json + merges.txt + tokenizer_config.json in GPT-2's format."""
    os.makedirs(folder, exist_ok=True)
    b2u = bytes_to_unicode()
    show = lambda bs: "".join(b2u[b] for b in bs)  # noqa: E731
    vocab = bpe_vocab(merges)
    token_to_id = {show(bs): i for i, bs in vocab.items()}
    token_to_id[EOT], token_to_id[PAD] = len(vocab), len(vocab) + 1
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(token_to_id, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{show(vocab[a])} {show(vocab[b])}\n" for a, b in merges)
    config = dict(tokenizer_class="GPT2Tokenizer", bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=PAD,
                  add_prefix_space=False, model_max_length=model_max_length)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def load_tokenizer(folder):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "left"  # prompts are left-padded so that every response starts at the same column
    return tok


def encode(tok, texts):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


# -----------------------------------------------------------------------------
# Models: policy and reference (GPT-2 LM), reward model and critic (GPT-2 + scalar head)

def pick_device(cfg):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast(device):
    """bf16 autocast on a GPU; on the CPU nothing changes (fp32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


NO_DROPOUT = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0)


def new_policy(cfg, tok):
    """The starting LM: a tiny GPT-2 from scratch, or pretrained weights from --model."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel
    if cfg.model == "tiny":
        config = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                            n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tok.eos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **NO_DROPOUT)
        return GPT2LMHeadModel(config)
    model = AutoModelForCausalLM.from_pretrained(cfg.model, **NO_DROPOUT)
    model.resize_token_embeddings(len(tok))  # room for the <|pad|> token we added
    model.config.pad_token_id = tok.pad_token_id
    return model


def load_lm(path, device):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, **NO_DROPOUT).to(device)


def load_scalar_model(path, device):
    """GPT-2 + a linear head giving one number per position (reward model, critic).
    From an LM checkpoint the head is new; from the RM checkpoint it is the trained one.
    """
    from transformers import AutoModelForSequenceClassification
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **NO_DROPOUT).to(device)


def position_ids(mask):
    """Positions count real tokens only, so left padding does not shift them.
    Example: mask [[0, 0, 1, 1, 1]] -> [[0, 0, 0, 1, 2]]
    subtle: without this, a left-padded prompt is read as if it started later [NDetails].
    """
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def logprobs_of(logits, tokens):
    """log p(token) for each position. logits (B, T, V), tokens (B, T) -> (B, T)"""
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def response_logits(model, ids, mask, n_prompt, temperature):
    """Logits that predicted each response token, divided by the sampling temperature.
    ids, mask: (B, P + R) with the prompt in the first n_prompt columns -> (B, R, V)
    subtle: the logits at position t predict token t + 1, hence the shift by one.
    subtle: generate() sampled from logits / temperature; log-probs must use the same [NDetails].
    """
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    return logits[:, n_prompt - 1:-1].float() / temperature


def token_values(model, ids, mask):
    """One scalar per position from a GPT-2 + head model: (B, T) -> (B, T).
    The reward model reads it at the last real token, the critic at every response token.
    """
    hidden = model.transformer(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
    return model.score(hidden).squeeze(-1).float()


def pad_left(seqs, pad_id):
    """Left-pad lists of ids into (B, T) ids and mask. Example: [[5], [6, 7]] -> [[pad, 5], [6, 7]]"""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (T - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    return ids, mask


def pad_right(seqs, pad_id):
    T = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (T - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    return ids, mask


def length_grouped_batches(lengths, batch_size, rng):
    """Batches of similar-length examples (less padding, faster steps), in random order.
    Example: lengths [3, 9, 4, 8], batch_size 2 -> e.g. [[1, 3], [0, 2]]
    """
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), batch_size * 32):  # sort within windows, keep randomness across them
        window = sorted(order[i:i + batch_size * 32], key=lambda j: lengths[j])
        batches += [window[k:k + batch_size] for k in range(0, len(window), batch_size)]
    rng.shuffle(batches)
    return batches


def adamw_with_schedule(model, lr, weight_decay, total_steps, warmup_frac):
    """AdamW; linear warmup then cosine decay (Hugging Face's scheduler)."""
    from transformers import get_cosine_schedule_with_warmup
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    return opt, get_cosine_schedule_with_warmup(opt, int(warmup_frac * total_steps), total_steps)


# -----------------------------------------------------------------------------
# Sampling and evaluation against the simulated human (used by every stage)

def sampling_kwargs(cfg, tok):
    """How generate() samples: from the policy's full distribution at cfg.temperature."""
    # subtle: generate() defaults to top_k=50; PPO's log-probs assume sampling from the full
    # distribution, so every warper is switched off [NDetails]
    return dict(do_sample=True, top_k=0, top_p=1.0, temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


@torch.no_grad()
def generate(policy, tok, prompts, cfg, device):
    """Sample one response per prompt with a single batched generate() (KV cache per step).
    Returns query ids/mask (B, P), response ids/mask (B, R) with everything after the first
    <|endoftext|> masked out and set to pad, and `ended` (B,) True where a response ended.
    """
    q_ids, q_mask = pad_left(encode(tok, prompts), tok.pad_token_id)
    q_ids, q_mask = q_ids.to(device), q_mask.to(device)
    with autocast(device):
        out = policy.generate(input_ids=q_ids, attention_mask=q_mask, **sampling_kwargs(cfg, tok))
    r_ids = out[:, q_ids.shape[1]:]
    is_eos = (r_ids == tok.eos_token_id).long()
    # keep tokens up to and including the first <|endoftext|>: truncation at end-of-text [NDetails]
    r_mask = ((is_eos.cumsum(1) - is_eos) == 0).long()
    r_ids = r_ids.masked_fill(r_mask == 0, tok.pad_token_id)
    ended = is_eos.sum(1) > 0
    return q_ids, q_mask, r_ids, r_mask, ended


def decode_responses(tok, r_ids, r_mask):
    return [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(r_ids, r_mask)]


@torch.no_grad()
def evaluate_policy(policy, tok, prompts, cfg, device, rm=None, ref=None):
    """Sample cfg.eval_samples responses per prompt and score them with the simulated human
    (and the reward model / KL to the reference when given). Returns per-sample records."""
    records = []
    policy.eval()
    for k in range(cfg.eval_samples):
        q_ids, q_mask, r_ids, r_mask, ended = generate(policy, tok, [p["prompt"] for p in prompts], cfg, device)
        texts = decode_responses(tok, r_ids, r_mask)
        ids, mask = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1)
        with autocast(device):
            score = rm_scores(rm, ids, mask, ended, cfg) if rm is not None else None
            kl = None
            if ref is policy:
                kl = torch.zeros(len(prompts))  # KL(π || π) = 0: no need for two forward passes
            elif ref is not None:
                n = q_ids.shape[1]
                lp = logprobs_of(response_logits(policy, ids, mask, n, cfg.temperature), r_ids)
                ref_lp = logprobs_of(response_logits(ref, ids, mask, n, cfg.temperature), r_ids)
                kl = ((lp - ref_lp) * r_mask).sum(1)
        for i, p in enumerate(prompts):
            gold, success = gold_judge(p, texts[i], bool(ended[i]))
            records.append(dict(prompt=p["prompt"], family=p["family"], sample=k, response=texts[i],
                                ended=bool(ended[i]), gold=gold, success=success,
                                rm=None if score is None else score[i].item(),
                                kl=None if kl is None else kl[i].item()))
    return records


def summarize(records):
    """Mean figures over evaluation records, overall and per family."""
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    by_prompt = {}
    for r in records:
        by_prompt.setdefault(r["prompt"], []).append(r["response"])
    out = dict(gold=mean([r["gold"] for r in records]), ended=mean([r["ended"] for r in records]),
               success=mean([r["success"] for r in records]),
               # share of distinct responses among the samples of one prompt (diversity)
               distinct=mean([len(set(v)) / len(v) for v in by_prompt.values()]))
    if records and records[0]["rm"] is not None:
        out["rm"] = mean([r["rm"] for r in records])
    if records and records[0]["kl"] is not None:
        out["kl"] = mean([r["kl"] for r in records])
    for fam in FAMILIES:
        fr = [r for r in records if r["family"] == fam]
        out[f"success_{fam}"], out[f"gold_{fam}"] = mean([r["success"] for r in fr]), mean([r["gold"] for r in fr])
    return out


def plot(path, title, curves, ylabel, twin=None):
    """One line plot. curves: {label: (xs, ys)}; twin: optional (label, xs, ys) on a right axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, label=label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if twin:
        ax2 = ax.twinx()
        ax2.plot(twin[1], twin[2], color="gray", linestyle="--", label=twin[0])
        ax2.set_ylabel(twin[0])
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Stage 0: data and tokenizer

def stage_data(cfg, device):
    data = make_dataset(cfg)
    folder = os.path.join(cfg.out_dir, "data")
    os.makedirs(folder, exist_ok=True)
    for name, rows in data.items():
        write_jsonl(os.path.join(folder, f"{name}.jsonl"), rows)
    counts = {name: len(rows) for name, rows in data.items()}
    print(f"data: {counts} -> {folder}")
    ex = data["prefs_train"][0]
    print(f"example pair: {ex['prompt']!r}\n  chosen   {ex['chosen']!r} (gold {ex['gold_chosen']:+.2f})"
          f"\n  rejected {ex['rejected']!r} (gold {ex['gold_rejected']:+.2f})")
    return counts


def stage_tokenizer(cfg, device):
    folder = os.path.join(cfg.out_dir, "tokenizer")
    data = load_data(cfg)
    if cfg.model != "tiny":  # a pretrained model brings its own tokenizer; we add a pad token
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(cfg.model)
        if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
            # subtle: pad must differ from <|endoftext|>, or masking by id hides real end tokens
            tok.add_special_tokens({"pad_token": PAD})
        save_atomically(tok, folder)
        return dict(vocab_size=len(tok), source=cfg.model)
    texts = [r["prompt"] + r["response"] for r in data["sft_train"]]  # the corpus: SFT demonstrations
    t0 = time.time()
    merges = train_bpe(texts, cfg.vocab_size)
    tmp = folder + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_tokenizer(merges, tmp, cfg.n_positions)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    tok = load_tokenizer(folder)
    example = data["sft_train"][0]["prompt"] + data["sft_train"][0]["response"]
    ids = encode(tok, [example])[0]
    print(f"tokenizer: {len(merges)} merges, vocab {len(tok)} -> {folder} ({time.time() - t0:.1f}s)")
    print(f"  {example!r} -> {len(ids)} tokens: {[tok.decode([i]) for i in ids]}")
    lengths = [len(x) for x in encode(tok, texts[:500])]
    return dict(vocab_size=len(tok), merges=len(merges), mean_tokens_per_text=sum(lengths) / len(lengths))


# -----------------------------------------------------------------------------
# Stage 1: supervised fine-tuning (SFT)

def sft_batch(tok, rows, device):
    """Right-padded prompt + response + <|endoftext|>, and a loss mask on response tokens only."""
    prompts, responses = encode(tok, [r["prompt"] for r in rows]), encode(tok, [r["response"] for r in rows])
    seqs = [p + r + [tok.eos_token_id] for p, r in zip(prompts, responses)]
    ids, mask = pad_right(seqs, tok.pad_token_id)
    loss_mask = torch.tensor([[0] * len(p) + [1] * (len(r) + 1) + [0] * (ids.shape[1] - len(p) - len(r) - 1)
                              for p, r in zip(prompts, responses)])
    return ids.to(device), mask.to(device), loss_mask.to(device)


def sft_loss(model, ids, mask, loss_mask):
    """Cross-entropy of the response tokens given everything before them.
    L = -(1/N) Σ_{t ∈ response} log π(x_t | x_<t)      (prompt tokens and padding carry no loss)
    ids, mask, loss_mask: (B, T), right-padded; loss_mask is 1 on response tokens -> scalar
    """
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).logits
    logp = logprobs_of(logits[:, :-1].float(), ids[:, 1:])  # (B, T-1): position t predicts token t+1
    return -masked_mean(logp, loss_mask[:, 1:])


def stage_sft(cfg, device):
    data, tok = load_data(cfg), load_tokenizer(require(cfg, "tokenizer", "tokenizer"))
    prompts = [p for p in data["prompts"] if p["split"] == "heldout"]
    model = new_policy(cfg, tok).to(device)
    print(f"SFT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters on {device}")
    # 1. data: batches of similar length, tokenized as they are drawn (the corpus is small)
    train, held = data["sft_train"], data["sft_heldout"]
    lengths = [len(r["prompt"]) + len(r["response"]) for r in train]
    texts = [r["prompt"] + r["response"] for r in train + held]
    texts += [r["prompt"] + r[k] for r in data["prefs_train"] + data["prefs_heldout"] for k in ("chosen", "rejected")]
    longest = max(len(x) + 1 for x in encode(tok, texts))  # + <|endoftext|>
    if max(longest, longest - 1 + cfg.max_new_tokens) > model.config.n_positions:
        raise UserError(f"sequences need up to {max(longest, longest - 1 + cfg.max_new_tokens)} positions but the "
                        f"model has {model.config.n_positions}; raise --n_positions (or --vocab_size)")
    opt, sched = adamw_with_schedule(model, cfg.sft_lr, cfg.weight_decay, cfg.sft_steps, cfg.warmup_frac)
    rng, batches, metrics, t0 = random.Random(cfg.seed), [], [], time.time()
    last_held = None  # the latest held-out loss, shown on the progress bar

    @torch.no_grad()
    def heldout_loss():
        model.eval()
        losses = []
        for i in range(0, len(held), 64):
            with autocast(device):
                losses.append(sft_loss(model, *sft_batch(tok, held[i:i + 64], device)).item())
        model.train()
        return sum(losses) / len(losses)

    model.train()
    bar = tqdm(range(1, cfg.sft_steps + 1), desc="sft", dynamic_ncols=True)
    for step in bar:
        if not batches:
            batches = length_grouped_batches(lengths, cfg.sft_batch_size, rng)
        # 2. forward: loss on response tokens only
        with autocast(device):
            loss = sft_loss(model, *sft_batch(tok, [train[j] for j in batches.pop()], device))
        check_finite(loss, "SFT", step, cfg)
        # 3. backward, clip, step
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = dict(step=step, loss=loss.item(), lr=sched.get_last_lr()[0])
        if step % 50 == 0 or step == cfg.sft_steps:
            row["heldout_loss"] = last_held = heldout_loss()
        metrics.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", held="-" if last_held is None else f"{last_held:.3f}")
    train_s = time.time() - t0
    # 4. save, then look at samples with the simulated human's eyes
    save_atomically(model, os.path.join(cfg.out_dir, "sft"))
    tok.save_pretrained(os.path.join(cfg.out_dir, "sft"))
    write_jsonl(os.path.join(cfg.out_dir, "sft_metrics.jsonl"), metrics)
    held_rows = [m for m in metrics if "heldout_loss" in m]
    plot(os.path.join(cfg.out_dir, "sft_loss.png"), "SFT loss (response tokens)",
         {"train": ([m["step"] for m in metrics], [m["loss"] for m in metrics]),
          "held-out": ([m["step"] for m in held_rows], [m["heldout_loss"] for m in held_rows])}, "cross-entropy")
    records = evaluate_policy(model, tok, prompts, cfg, device)
    figures = summarize(records)
    print_samples("SFT samples (held-out prompts)", records[:len(prompts)][:6])
    print(f"SFT: held-out loss {held_rows[-1]['heldout_loss']:.3f}, gold {figures['gold']:+.3f}, success "
          + ", ".join(f"{f} {figures['success_' + f]:.2f}" for f in FAMILIES))
    return dict(wall_s=round(time.time() - t0, 1), train_s=round(train_s, 1), final_loss=metrics[-1]["loss"],
                heldout_loss=held_rows[-1]["heldout_loss"], samples=figures)


def print_samples(title, records):
    print(title)
    for r in records:
        print(f"  [{r['family']:8s} gold {r['gold']:+.1f}] {r['prompt'].strip()!r} -> {r['response']!r}")


# -----------------------------------------------------------------------------
# Stage 2: reward model (Bradley-Terry)

def pair_batch(tok, rows, device):
    """chosen and rejected as one right-padded batch of 2B: rows [c_1..c_B, r_1..r_B]."""
    prompts = encode(tok, [r["prompt"] for r in rows])
    chosen, rejected = encode(tok, [r["chosen"] for r in rows]), encode(tok, [r["rejected"] for r in rows])
    seqs = [p + c + [tok.eos_token_id] for p, c in zip(prompts, chosen)]
    seqs += [p + r + [tok.eos_token_id] for p, r in zip(prompts, rejected)]
    ids, mask = pad_right(seqs, tok.pad_token_id)
    return ids.to(device), mask.to(device)


def reward_at_last_token(rm, ids, mask):
    """r(x, y): the head's value at the last real token (the <|endoftext|> if the response ended).
    ids, mask: (B, T), padding on either side -> (B,)
    """
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # index of the last 1 in each row of mask
    return token_values(rm, ids, mask)[torch.arange(len(ids)), last]


@torch.no_grad()
def rm_scores(rm, ids, mask, ended, cfg):
    """Normalised reward-model score at the last real token, minus the missing-EOS penalty.
    ids, mask: (B, T), left-padded prompt + right-padded response -> (B,)
    """
    raw = reward_at_last_token(rm, ids, mask)                          # (B,)
    score = (raw - rm.config.reward_mean) / rm.config.reward_std       # SFT samples score mean 0, std 1 [Ziegler]
    return score - cfg.missing_eos_penalty * (~ended).float()         # a response that never ends [NDetails]


def bradley_terry_loss(r_chosen, r_rejected):
    """P(y_c ≻ y_r | x) = σ(r_c − r_r)   ⇒   loss = −log σ(r_c − r_r)
    Example: bradley_terry_loss(tensor([0.]), tensor([0.])) -> log 2 = 0.693
    """
    # subtle: log(sigmoid(z)) underflows to log(0) = -inf for very negative z; logsigmoid does not
    return -F.logsigmoid(r_chosen - r_rejected).mean()


@torch.no_grad()
def rm_accuracy(rm, tok, pairs, device):
    """Accuracy against the noisy labels and against the noise-free gold preference
    (pairs with equal gold scores left out), overall and per family."""
    rm.eval()
    hits = []
    for i in range(0, len(pairs), 64):
        rows = pairs[i:i + 64]
        with autocast(device):
            r = reward_at_last_token(rm, *pair_batch(tok, rows, device))
        margin = r[:len(rows)] - r[len(rows):]
        hits += [(row, m.item() > 0) for row, m in zip(rows, margin)]
    rm.train()
    out = {"acc_label": sum(h for _, h in hits) / len(hits)}
    for name, subset in [("gold", hits)] + [(f"gold_{f}", [h for h in hits if h[0]["family"] == f]) for f in FAMILIES]:
        # rm says chosen > rejected; it agrees with gold if gold says the same
        agree = [h == (row["gold_chosen"] > row["gold_rejected"]) for row, h in subset
                 if row["gold_chosen"] != row["gold_rejected"]]
        out[f"acc_{name}"] = sum(agree) / max(1, len(agree))
    return out


def stage_rm(cfg, device):
    data, tok = load_data(cfg), load_tokenizer(require(cfg, "tokenizer", "tokenizer"))
    rm = load_scalar_model(require(cfg, "sft", "sft"), device)  # initialised from SFT [InstructGPT]
    rm.config.pad_token_id = tok.pad_token_id  # lets AutoModelForSequenceClassification find the last token
    train, held = data["prefs_train"], data["prefs_heldout"]
    steps = cfg.rm_epochs * math.ceil(len(train) / cfg.rm_batch_size)
    opt, sched = adamw_with_schedule(rm, cfg.rm_lr, cfg.weight_decay, steps, cfg.warmup_frac)
    rng, metrics, t0 = random.Random(cfg.seed), [], time.time()
    lengths = [len(r["chosen"]) + len(r["rejected"]) for r in train]
    batches = [b for _ in range(cfg.rm_epochs) for b in length_grouped_batches(lengths, cfg.rm_batch_size, rng)]
    rm.train()
    bar = tqdm(enumerate(batches, 1), total=len(batches), desc="rm", dynamic_ncols=True)
    for step, batch in bar:
        rows = [train[j] for j in batch]
        # 1. one forward over chosen and rejected, scored at the last real token
        with autocast(device):
            r = reward_at_last_token(rm, *pair_batch(tok, rows, device))
        r_chosen, r_rejected = r[:len(rows)], r[len(rows):]
        # 2. Bradley-Terry loss
        loss = bradley_terry_loss(r_chosen, r_rejected)
        check_finite(loss, "RM", step, cfg)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        row = dict(step=step, loss=loss.item(), acc=(r_chosen > r_rejected).float().mean().item())
        if step % 100 == 0 or step == len(batches):
            row.update({f"heldout_{k}": v for k, v in rm_accuracy(rm, tok, held, device).items()})
        metrics.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['acc']:.2f}",
                        gold=f"{[m for m in metrics if 'heldout_acc_gold' in m][-1]['heldout_acc_gold']:.2f}"
                        if step >= 100 else "-")
    # 3. normalise: the SFT policy's samples score mean 0, std 1 under the RM [Ziegler]
    sft = load_lm(os.path.join(cfg.out_dir, "sft"), device)
    train_prompts = [p["prompt"] for p in data["prompts"] if p["split"] == "train"]
    q_ids, q_mask, r_ids, r_mask, ended = generate(sft, tok, train_prompts * 2, cfg, device)
    rm.eval()
    with torch.no_grad(), autocast(device):
        raw = reward_at_last_token(rm, torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1))[ended]
    rm.config.reward_mean, rm.config.reward_std = raw.mean().item(), raw.std().item() + 1e-6
    save_atomically(rm, os.path.join(cfg.out_dir, "rm"))
    tok.save_pretrained(os.path.join(cfg.out_dir, "rm"))
    write_jsonl(os.path.join(cfg.out_dir, "rm_metrics.jsonl"), metrics)
    held_rows = [m for m in metrics if "heldout_acc_gold" in m]
    plot_rm(cfg, metrics, held_rows)
    final = {k[len("heldout_"):]: v for k, v in held_rows[-1].items() if k.startswith("heldout_")}
    print("RM held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))
    return dict(wall_s=round(time.time() - t0, 1), final_loss=metrics[-1]["loss"], heldout=final,
                reward_mean=rm.config.reward_mean, reward_std=rm.config.reward_std)


def plot_rm(cfg, metrics, held_rows):
    smooth = lambda ys, k=10: [sum(ys[max(0, i - k):i + 1]) / len(ys[max(0, i - k):i + 1]) for i in range(len(ys))]  # noqa: E731
    steps = [m["step"] for m in metrics]
    plot(os.path.join(cfg.out_dir, "rm_curve.png"), "Reward model training",
         {"train accuracy (smoothed)": (steps, smooth([m["acc"] for m in metrics])),
          "held-out acc vs labels": ([m["step"] for m in held_rows], [m["heldout_acc_label"] for m in held_rows]),
          "held-out acc vs gold": ([m["step"] for m in held_rows], [m["heldout_acc_gold"] for m in held_rows])},
         "accuracy", twin=("loss (smoothed)", steps, smooth([m["loss"] for m in metrics])))


# -----------------------------------------------------------------------------
# Stage 3: PPO with a KL penalty, as pure tensor functions in the order they run

def kl_shaped_rewards(score, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token rewards: a KL penalty on every token, the RM score on the last real one.
    r_t = −β·(log π(y_t|·) − log π_ref(y_t|·))  +  [t = last] · R(x, y)      [Ziegler; InstructGPT]
    score (B,), logprobs / ref_logprobs / mask (B, T) -> rewards (B, T), kl (B, T)
    Example: score [1.], logprobs [[-1., -1.]], ref [[-2., -1.]], mask [[1, 1]], β 0.1 -> [[-0.1, 1.]]
    """
    kl = (logprobs - ref_logprobs) * mask                 # (B, T) per-token KL estimate (k1)
    rewards = -kl_coef * kl                               # padding stays 0: kl is masked
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)     # (B,) the last real response token
    rewards[torch.arange(len(score)), last] += score
    return rewards, kl


def compute_gae(rewards, values, mask, gamma, lam):
    """Generalized Advantage Estimation over response tokens [GAE].
    rewards, values, mask: (B, T), real tokens first; the episode ends after the last real token.
    Returns advantages and returns (= advantages + values), both 0 on padding.
    Example: γ = λ = 1, rewards [[0., 1.]], values [[0., 0.]], mask [[1, 1]] -> advantages [[1., 1.]]
    """
    values, rewards = values * mask, rewards * mask      # subtle: V = 0 after the end, so δ stops there
    B, T = rewards.shape
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(B, device=rewards.device)
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        # δ_t = r_t + γ·V(s_{t+1}) − V(s_t)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # A_t = δ_t + γλ·A_{t+1}
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    """Clipped surrogate [PPO]: L = E_t[ max(−A_t·ρ_t, −A_t·clip(ρ_t, 1−ε, 1+ε)) ],  ρ_t = π/π_old
    All (B, T). Returns the loss and the share of tokens where clipping was active.
    Example: at ρ = 1 the loss is −mean(A).
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def ppo_value_loss(values, old_values, returns, mask, clip_range):
    """Clipped value loss [NDetails #value clipping, from OpenAI baselines]:
    L = ½·E_t[ max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²) ]
    """
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)


def update_kl_coef(kl_coef, kl, cfg, n_samples):
    """Adaptive KL controller [Ziegler §2.2]: push β so that KL tracks the target.
    e = clip(KL / KL_target − 1, −0.2, 0.2);   β ← β·(1 + e·n / horizon)
    n: samples in this batch; target and horizon from cfg; β is returned unchanged if not cfg.adaptive_kl.
    Example: β 0.1, KL 2·target, n = horizon -> 0.12
    """
    if not cfg.adaptive_kl:
        return kl_coef
    error = min(max(kl / cfg.kl_target - 1, -0.2), 0.2)
    return kl_coef * (1 + error * n_samples / cfg.kl_horizon)


def stage_ppo(cfg, device):
    data, tok = load_data(cfg), load_tokenizer(require(cfg, "tokenizer", "tokenizer"))
    sft_path, rm_path = require(cfg, "sft", "sft"), require(cfg, "rm", "rm")
    policy, ref = load_lm(sft_path, device), load_lm(sft_path, device)   # π_θ starts as π_SFT = π_ref
    rm = load_scalar_model(rm_path, device)
    # The critic is a separate GPT-2 + value head initialised from the reward model, as in
    # InstructGPT: its head already knows what a good response looks like, and its gradients
    # never disturb the policy. (A value head on the policy shares one body and is cheaper.)
    critic = load_scalar_model(rm_path, device)
    for m in (ref, rm):
        m.eval().requires_grad_(False)
    policy.train(), critic.train()  # dropout is 0 in every model (NO_DROPOUT) [NDetails]
    # subtle: Adam's eps 1e-5 as in OpenAI's PPO implementations [NDetails]
    opt_pi = torch.optim.Adam(policy.parameters(), lr=cfg.ppo_lr, eps=1e-5)
    opt_v = torch.optim.Adam(critic.parameters(), lr=cfg.critic_lr, eps=1e-5)
    train_prompts = [p for p in data["prompts"] if p["split"] == "train"]
    rng, kl_coef, metrics = random.Random(cfg.seed), cfg.kl_coef, []
    times = dict(generate=0.0, score=0.0, train=0.0)
    t_start = time.time()
    bar = tqdm(range(1, cfg.ppo_steps + 1), desc="ppo", dynamic_ncols=True)
    for step in bar:
        # 1. rollout: sample one response per prompt from the current policy
        t0 = time.time()
        batch = [rng.choice(train_prompts) for _ in range(cfg.rollout_batch_size)]
        policy.eval()
        q_ids, q_mask, r_ids, r_mask, ended = generate(policy, tok, [p["prompt"] for p in batch], cfg, device)
        policy.train()
        ids, mask, P = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), q_ids.shape[1]
        r_maskf = r_mask.float()
        times["generate"] += time.time() - t0

        # 2. score: log-probs under π_old and π_ref, values, and the reward model's score
        t0 = time.time()
        with torch.no_grad(), autocast(device):
            logits = response_logits(policy, ids, mask, P, cfg.temperature)        # (B, R, V)
            old_logprobs = logprobs_of(logits, r_ids)                               # (B, R)
            entropy = masked_mean(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1), r_maskf)
            ref_logprobs = logprobs_of(response_logits(ref, ids, mask, P, cfg.temperature), r_ids)
            old_values = token_values(critic, ids, mask)[:, P - 1:-1] * r_maskf    # V(s_t), state before y_t
            score = rm_scores(rm, ids, mask, ended, cfg)                            # (B,)
        times["score"] += time.time() - t0

        # 3. rewards: −β·KL per token, plus the RM score at the last token
        rewards, kl = kl_shaped_rewards(score, old_logprobs, ref_logprobs, r_maskf, kl_coef)
        # 4. advantages by GAE, then whitened over real tokens [NDetails]
        advantages, returns = compute_gae(rewards, old_values, r_maskf, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, r_maskf)

        # 5. PPO epochs over shuffled minibatches
        t0 = time.time()
        stats = Counter()
        n_updates = 0
        for _ in range(cfg.ppo_epochs):
            for mb in torch.randperm(len(batch)).split(cfg.minibatch_size):
                with autocast(device):
                    new_logprobs = logprobs_of(response_logits(policy, ids[mb], mask[mb], P, cfg.temperature), r_ids[mb])
                    pg_loss, clipfrac = ppo_policy_loss(new_logprobs, old_logprobs[mb], advantages[mb],
                                                        r_maskf[mb], cfg.clip_range)
                    values = token_values(critic, ids[mb], mask[mb])[:, P - 1:-1]
                    vf_loss = ppo_value_loss(values, old_values[mb], returns[mb], r_maskf[mb], cfg.value_clip_range)
                check_finite(pg_loss + vf_loss, "PPO", step, cfg)
                opt_pi.zero_grad(set_to_none=True)
                pg_loss.backward()
                torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
                opt_pi.step()
                opt_v.zero_grad(set_to_none=True)
                vf_loss.backward()
                torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm)
                opt_v.step()
                with torch.no_grad():  # k3 estimator of KL(π_old || π_new), a health check [Schulman blog]
                    log_ratio = new_logprobs - old_logprobs[mb]
                    approx_kl = masked_mean(torch.exp(log_ratio) - 1 - log_ratio, r_maskf[mb])
                stats.update(pg_loss=pg_loss.item(), vf_loss=vf_loss.item(), clipfrac=clipfrac.item(),
                             approx_kl=approx_kl.item())
                n_updates += 1
        times["train"] += time.time() - t0

        # 6. adapt β toward the KL target, then log
        kl_seq = kl.sum(1).mean().item()  # KL(π || π_ref) of a whole response, in nats
        row = dict(step=step, rm_score=score.mean().item(), kl=kl_seq, kl_coef=kl_coef, entropy=entropy.item(),
                   response_len=r_maskf.sum(1).mean().item(), ended=ended.float().mean().item(),
                   **{k: v / n_updates for k, v in stats.items()})
        kl_coef = update_kl_coef(kl_coef, kl_seq, cfg, len(batch))
        texts = decode_responses(tok, r_ids, r_mask)
        row["gold"] = sum(gold_judge(p, t, bool(e))[0] for p, t, e in zip(batch, texts, ended)) / len(batch)
        metrics.append(row)
        bar.set_postfix(rm=f"{row['rm_score']:+.2f}", gold=f"{row['gold']:+.2f}", kl=f"{kl_seq:.2f}",
                        beta=f"{row['kl_coef']:.3f}")
        if step == 1 or step % 20 == 0:
            tqdm.write(f"step {step}: {batch[0]['prompt'].strip()!r} -> {texts[0]!r}")

    save_atomically(policy, os.path.join(cfg.out_dir, "ppo"))
    tok.save_pretrained(os.path.join(cfg.out_dir, "ppo"))
    write_jsonl(os.path.join(cfg.out_dir, "ppo_metrics.jsonl"), metrics)
    plot_ppo(cfg, metrics)
    last = metrics[-max(1, len(metrics) // 10):]  # the last 10% of steps
    mean = lambda k: sum(m[k] for m in last) / len(last)  # noqa: E731
    return dict(wall_s=round(time.time() - t_start, 1), time_s={k: round(v, 1) for k, v in times.items()},
                final={k: mean(k) for k in ("rm_score", "gold", "kl", "kl_coef", "entropy", "response_len", "ended")},
                first={k: metrics[0][k] for k in ("rm_score", "gold", "kl")})


def plot_ppo(cfg, metrics):
    steps = [m["step"] for m in metrics]
    col = lambda k: [m[k] for m in metrics]  # noqa: E731
    plot(os.path.join(cfg.out_dir, "ppo_reward.png"), "PPO: reward model score vs the human's gold score",
         {"RM score (normalised)": (steps, col("rm_score")), "gold score (simulated human)": (steps, col("gold"))},
         "score")
    plot(os.path.join(cfg.out_dir, "ppo_kl.png"), "PPO: KL(π || π_ref) per response",
         {"KL (nats)": (steps, col("kl"))}, "nats", twin=("β (KL coefficient)", steps, col("kl_coef")))
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    axes[0].plot(steps, col("rm_score"), label="RM score")
    axes[0].plot(steps, col("gold"), label="gold score")
    axes[0].set(title="reward: RM vs simulated human", xlabel="PPO step")
    axes[1].plot(steps, col("kl"), label="KL to reference (nats)")
    ax = axes[1].twinx()
    ax.plot(steps, col("kl_coef"), color="gray", linestyle="--", label="β")
    axes[1].set(title=f"KL (target {cfg.kl_target if cfg.adaptive_kl else 'none, β fixed'})", xlabel="PPO step")
    axes[2].plot(steps, col("entropy"), label="entropy (nats/token)")
    axes[2].plot(steps, col("ended"), label="share of responses that end")
    axes[2].set(title="policy health", xlabel="PPO step")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=8, loc="best")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(cfg.out_dir, "overview.png"), dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------
# Evaluation: SFT vs PPO on held-out prompts, judged by the simulated human

def stage_eval(cfg, device):
    data, tok = load_data(cfg), load_tokenizer(require(cfg, "tokenizer", "tokenizer"))
    sft = load_lm(require(cfg, "sft", "sft"), device)
    ppo = load_lm(require(cfg, "ppo", "ppo"), device)
    rm = load_scalar_model(require(cfg, "rm", "rm"), device)
    prompts = [p for p in data["prompts"] if p["split"] == "heldout"]
    t0 = time.time()
    # 1. sample both policies on the held-out prompts; score by the human, the RM and the KL to SFT
    torch.manual_seed(cfg.seed + 1)
    records = {"sft": evaluate_policy(sft, tok, prompts, cfg, device, rm, ref=sft),
               "ppo": evaluate_policy(ppo, tok, prompts, cfg, device, rm, ref=sft)}
    figures = {name: summarize(recs) for name, recs in records.items()}
    # 2. win rate: the same prompt and sample index, judged by the gold score; ties count half
    wins = [1.0 if a["gold"] > b["gold"] else 0.5 if a["gold"] == b["gold"] else 0.0
            for a, b in zip(records["ppo"], records["sft"])]
    figures["win_rate_ppo_over_sft"] = sum(wins) / len(wins)
    figures["n_prompts"], figures["n_samples"] = len(prompts), len(records["ppo"])
    figures["wall_s"] = round(time.time() - t0, 1)
    # 3. the table (eval.md) and side-by-side samples (samples.md)
    table = eval_table(figures)
    print(table)
    with open(os.path.join(cfg.out_dir, "eval.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    with open(os.path.join(cfg.out_dir, "samples.md"), "w", encoding="utf-8") as f:
        f.write("# SFT vs PPO on held-out prompts (first sample of each)\n\n| prompt | SFT | PPO |\n|---|---|---|\n")
        for a, b in zip(records["sft"][:len(prompts)], records["ppo"][:len(prompts)]):
            cell = lambda r: f"{r['response']!r} (gold {r['gold']:+.1f})".replace("|", "\\|")  # noqa: E731
            f.write(f"| {a['prompt'].strip().replace(chr(10), ' ')} | {cell(a)} | {cell(b)} |\n")
    return figures


def eval_table(fig):
    rows = [("mean gold score", "gold"), ("mean RM score", "rm"), ("KL to reference (nats)", "kl"),
            ("responses that end", "ended"), ("distinct responses per prompt", "distinct"),
            ("success, all", "success")] + [(f"success, {f}", f"success_{f}") for f in FAMILIES]
    lines = ["| held-out prompts | SFT | PPO |", "|---|---|---|"]
    lines += [f"| {name} | {fig['sft'][k]:.3f} | {fig['ppo'][k]:.3f} |" for name, k in rows]
    lines.append(f"| PPO win rate over SFT (gold; ties half) | | {fig['win_rate_ppo_over_sft']:.3f} |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# main

def main(argv=None):
    cfg = Config(**vars(build_parser().parse_args(argv)))
    try:
        check_config(cfg)
        device = pick_device(cfg)
        seed_everything(cfg.seed)
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()  # "newly initialized score head" is expected here
        hf_logging.disable_progress_bar()
        stages = STAGES if cfg.stage == "all" else (cfg.stage,)
        run = dict(data=stage_data, tokenizer=stage_tokenizer, sft=stage_sft, rm=stage_rm, ppo=stage_ppo,
                   eval=stage_eval)
        t0 = time.time()
        for stage in stages:
            print(f"== stage {stage} ==")
            seed_everything(cfg.seed)  # each stage repeats on its own, whether run alone or in `all`
            update_summary(cfg, stage, run[stage](cfg, device))
        print(f"done in {time.time() - t0:.0f}s; outputs in {cfg.out_dir}/ (summary.json, *.png)")
    except (UserError, NotImplementedError) as e:  # NotImplementedError: an exercise of a student copy (tutorial.md)
        sys.exit(f"rlhf.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit(f"\ninterrupted: finished stages are saved in {cfg.out_dir}/; rerun the interrupted one with --stage")


if __name__ == "__main__":
    main()
