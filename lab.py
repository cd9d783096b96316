"""
lab.py -- RLHF by experiment, on top of rlhf.py: everything rlhf.py does, with the same flags, and more.

  1. the judge               a second reward model on pairs the first never saw: the stand-in for a human where there
                             is none (stage judge, part of --stage all here)
  2. your own data           --data: preference pairs in every common format, chat templates (tutorial, chapter 14)
  3. reward hacking and the article's remedies: a reward model refreshed during PPO (--rm_refresh), several reward
                             models (--rm_ensemble, --rm_combine), and PPO on the human's own score (--reward human)
  4. evaluation extras       the judge's verdict, the reward model where the policy goes, the ceiling, kinds.png
  5. beyond PPO              best-of-n, DPO, RLOO, GRPO: stages bon, dpo, rloo, grpo (not part of --stage all)
  6. trackers and processes  --report_to tensorboard|wandb; torchrun (DDP)

  python lab.py --stage all                                   # rlhf.py's stages and the judge
  python lab.py --stage ppo --rm_refresh 4 --out_dir runs/refresh   # a stage again, on a copy of a finished run
  python lab.py --stage dpo --out_dir runs/default            # an alternative to PPO, on a finished run
  python lab.py --stage all --data my_pairs.jsonl --out_dir runs/mine
  torchrun --standalone --nproc_per_node 2 lab.py --stage all --out_dir runs/ddp

lab.py imports rlhf.py and reuses its functions; where it needs a variant of one of rlhf.py's loops (PPO with
refreshes, SFT under DDP) it writes the variant here: rlhf.py has no hooks for the lab, and never imports it.

References: [Coste] Coste et al. 2024, Reward Model Ensembles Help Mitigate Overoptimization; [Gao] Gao et al. 2022,
Scaling Laws for Reward Model Overoptimization; [DPO] Rafailov et al. 2023; [RLOO] Ahmadian et al. 2024, Back to
Basics: Revisiting REINFORCE Style Optimization for RLHF; [GRPO] Shao et al. 2024, DeepSeekMath; [Beirami] Beirami
et al. 2024, Theoretical Guarantees on the Best-of-n Alignment Policy; [DAPO] Yu et al. 2025.
"""

import contextlib
import ctypes
import dataclasses
import gzip
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass

try:
    import regex
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from tqdm.auto import tqdm
except ModuleNotFoundError as e:  # one line, not a traceback
    sys.exit(f"lab.py: error: the Python package '{e.name}' is not installed; install the requirements first: "
             "pip install -r requirements.txt (README)")

import rlhf
from rlhf import FAMILIES, UserError, arg

STAGES = ("data", "tokenizer", "sft", "rm", "judge", "ppo", "eval")  # --stage all runs these, in this order
BEYOND = ("bon", "dpo", "rloo", "grpo")  # the alternatives to PPO (section 5), each a stage run on its own


@dataclass
class LabConfig(rlhf.Config):
    stage: str = arg("all", "which stage to run: all (" + ", ".join(STAGES) + ", in order), one of them, or one of "
                            + ", ".join(BEYOND), STAGES + ("all",) + BEYOND)
    threads: int = arg(0, "torch threads per process; 0: the cores not busy with other work (or OMP_NUM_THREADS)",
                       check=">= 0")
    # 1. the judge
    n_judge: int = arg(2000, "preference pairs for the judge, disjoint from the reward model's", check="> 0")
    # 2. your own data
    data: str = arg("", "a JSON Lines file of preference pairs (.jsonl or .jsonl.gz; HH-RLHF transcripts, prompt/"
                        "chosen/rejected rows, chat messages); empty: the built-in task")
    # 3. reward hacking and the remedies
    crowd_wrong_values: float = arg(0.0, "built-in task: share of the dodges among the crowd's candidates to a helpful "
                                         "prompt replaced by the answer with another value", check="between 0 and 1")
    rm_refresh: int = arg(0, "refresh the reward model this many times during PPO on the human's rankings of the "
                             "current policy's samples (the article's 定期更新奖励模型)", check=">= 0")
    rm_refresh_prompts: int = arg(256, "training prompts the policy samples --rm_samples responses to at a refresh",
                                  check="> 0")
    rm_refresh_from: str = arg("rm", "a refresh continues training the current reward model (rm), or trains one "
                                     "again from SFT on every comparison so far (sft)", ("rm", "sft"))
    rm_ensemble: int = arg(1, "independent reward models (other seeds); PPO is scored by their --rm_combine",
                           check="> 0")
    rm_combine: str = arg("mean", "how PPO combines an ensemble's scores (Coste et al.)",
                          ("mean", "min", "mean_minus_std"))
    rm_combine_lambda: float = arg(1.0, "λ of mean_minus_std: mean − λ·std over the ensemble", check=">= 0")
    reward: str = arg("rm", "what PPO, RLOO and GRPO maximise: the reward model (rm), or on the built-in task the "
                            "simulated human's own score (human): a perfect reward model", ("rm", "human"))
    # 5. beyond PPO
    group_size: int = arg(4, "RLOO and GRPO: samples per prompt (the group); --rollout_batch_size counts them all",
                          check="> 0")
    dpo_beta: float = arg(1.0, "DPO's β, the strength of its implicit KL penalty", check="> 0")
    dpo_lr: float = arg(2e-4, "DPO peak learning rate (AdamW; --rm_epochs passes over the comparisons)", check="> 0")
    bon_samples: int = arg(64, "best-of-n: responses per held-out prompt; n = 1, 2, 4, ... up to this", check="> 0")
    # 6. trackers and processes
    report_to: str = arg("", "also log every metric row and the config to tensorboard or wandb (W&B offline unless "
                             "WANDB_MODE says otherwise)", ("", "tensorboard", "wandb"))
    compile: bool = arg(False, "torch.compile the policy's forward in the PPO, RLOO and GRPO updates")


def check_lab_config(cfg):
    """rlhf.py's checks of every flag, and the lab's: one line each, before any work."""
    rlhf.check_config(cfg)
    if cfg.reward == "human" and cfg.data:
        raise UserError("--reward human needs the built-in task's simulated human; with --data, use --reward rm")
    if cfg.stage in ("rloo", "grpo") and (cfg.group_size < 2 or cfg.rollout_batch_size % cfg.group_size):
        raise UserError(f"--group_size must be >= 2 and divide --rollout_batch_size ({cfg.rollout_batch_size}); "
                        f"got {cfg.group_size}")
    if cfg.data and not os.path.isfile(cfg.data) and cfg.stage in ("all", "data"):
        raise UserError(f"--data {cfg.data}: no such file")
    check_model(cfg)


def check_model(cfg):
    """--model must name a causal LM we can load now: a local folder, or a hub name in the local cache or
    downloadable. Without a reachable hub, a name not in the cache fails here in seconds, not after retries."""
    if cfg.model == "tiny":
        return
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if os.path.isdir(cfg.model) and not os.path.exists(os.path.join(cfg.model, "config.json")):
        raise UserError(f"--model {cfg.model}: this folder has no config.json, so it is not a Hugging Face model; "
                        f"save one with model.save_pretrained(folder) and tokenizer.save_pretrained(folder)")
    if os.path.isfile(cfg.model):
        raise UserError(f"--model {cfg.model}: a file, not a model folder")
    try:  # a folder, or a hub name such as gpt2 already downloaded
        config = AutoConfig.from_pretrained(cfg.model, local_files_only=True)
    except (OSError, ValueError):
        if not hub_reachable():
            raise UserError(f"--model {cfg.model}: no such folder, and no such model in the Hugging Face cache "
                            f"(the hub cannot be reached to download it)") from None
        try:
            config = AutoConfig.from_pretrained(cfg.model)
        except (OSError, ValueError) as e:
            raise UserError(f"--model {cfg.model}: no such folder or hub model ({str(e).splitlines()[0]})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"--model {cfg.model}: a {config.model_type} model is not a causal language model "
                        f"(AutoModelForCausalLM cannot load it)")


def hub_reachable(timeout=3.0):
    import socket
    from urllib.parse import urlparse
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection((urlparse(constants.ENDPOINT).hostname, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# -----------------------------------------------------------------------------
# Processes and threads. `torchrun --nproc_per_node N lab.py ...` starts N copies of this script. Each takes 1/N of
# every batch and DDP averages the gradients after each backward (nanoGPT's convention: NCCL on GPUs, gloo on
# CPUs); rank 0 alone prints and writes files. With one process, every function here does nothing.

def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(x):
    """x (a float) summed over the processes."""
    if world() == 1:
        return x
    t = torch.tensor(float(x), dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def share(n_local):
    """This process's part of a global batch, times the number of processes: 1 with one process. DDP averages the
    gradients over processes; a loss that is a mean over this process's n_local items (tokens or comparisons),
    multiplied by share(n_local), makes that average the mean over all items.
    Example: 2 processes with 30 and 10 tokens -> 1.5 and 0.5"""
    if world() == 1:
        return 1.0
    total = all_sum(float(n_local))
    return world() * float(n_local) / total if total else 0.0


def ddp(model):
    """model wrapped in DistributedDataParallel under torchrun, else model itself."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model)


def my_part(items):
    """This process's part of a global batch: every world()-th item from rank(); where a batch has fewer items than
    there are processes, a process with none takes the first at weight 0 (DDP needs a backward from every process).
    Returns (part, weight). Example: 2 processes, [a, b, c] -> ([a, c], 1.0), ([b], 1.0)"""
    part = items[rank()::world()]
    return (part, 1.0) if part else (items[:1], 0.0)


def barrier():
    if world() > 1:
        dist.barrier()


def pick_threads(cfg):
    """Torch threads per process: --threads, else OMP_NUM_THREADS, else the cores that other work leaves free.
    subtle: a thread per core on a busy machine makes every parallel op wait for a descheduled thread: runs were
    4-5x slower than with one thread."""
    if cfg.threads:
        return cfg.threads
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores, round(cores - busy_cores())) // world())


def busy_cores(seconds=0.2):
    """Cores' worth of work done by other processes right now, from /proc/stat (Linux; elsewhere 0)."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait
    try:
        (a0, i0), _ = read(), time.sleep(seconds)
        a1, i1 = read()
    except OSError:
        return 0.0
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(1, a1 - a0))


def check_finite_all(loss, stage, step):
    """rlhf.check_finite over every process: one NaN anywhere stops them all."""
    rlhf.check_finite(torch.tensor(all_sum(loss.item())), stage, step)


# -----------------------------------------------------------------------------
# Files and stale results: what each stage is built from. rlhf.py's main() forgets the stages after the one it
# reruns; here the graph has the lab's stages too, and a stage whose input ran again since it finished is refused.

NEEDS = dict(tokenizer=["data"], sft=["tokenizer"], rm=["sft"], judge=["sft"], ppo=["rm"], eval=["ppo", "judge"],
             bon=["rm"], dpo=["rm"], rloo=["rm"], grpo=["rm"])
REPORTS = dict(  # what each stage writes beside its checkpoint
    rm=["rm_metrics.jsonl", "rm_rankings.jsonl"], judge=["judge_metrics.jsonl", "judge_rankings.jsonl"],
    ppo=["overview.png", "ppo_metrics.jsonl", "ppo_rankings.jsonl"], eval=["eval.md", "samples.md", "kinds.png"],
    bon=["bon.md"], **{a: [f"{a}_eval.md", f"{a}_samples.md", f"{a}_metrics.jsonl", f"{a}_overview.png",
                           f"{a}_kinds.png"] for a in ("dpo", "rloo", "grpo")})


def downstream(stage):
    """Every stage built, directly or not, from `stage`. Example: downstream('rm') -> ['ppo', 'eval', 'bon', ...]"""
    out = []
    for s in STAGES + BEYOND:
        if any(n == stage or n in out for n in NEEDS.get(s, [])):
            out.append(s)
    return out


def forget_downstream(cfg, stage):
    """After a stage ran: the reports built from its old outputs are removed, and summary.json stops listing the
    stages built from them, so that nothing stale is shown as current. Returns their names."""
    if rank() > 0:
        return []
    summary = rlhf.load_summary(cfg)
    stale = [s for s in downstream(stage) if s in summary]
    for s in downstream(stage):
        for name in REPORTS.get(s, []):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(cfg.out_dir, name))
    if stale:
        rlhf.save_summary(cfg, {k: v for k, v in summary.items() if k not in stale})
    return stale


def require(cfg, stage):
    """rlhf.require, and the stage is not out of date: none of the stages it was built from ran again after it
    (as rlhf.py's main() reruns a stage without knowing the lab's)."""
    path, summary = rlhf.require(cfg, stage), rlhf.load_summary(cfg)
    for before in NEEDS.get(stage, []):
        if before in summary and summary[before].get("finished", 0) > summary[stage].get("finished", 0):
            raise UserError(f"{path} is out of date: {before} ran again since; run `python lab.py --stage {stage} "
                            f"--out_dir {cfg.out_dir}` first (or --stage all)")
    return path


def write_jsonl(path, rows):
    if rank() == 0:
        rlhf.write_jsonl(path, rows)


def save_atomically(write, path):
    if rank() == 0:
        rlhf.save_atomically(write, path)


# -----------------------------------------------------------------------------
# Trackers: --report_to tensorboard or wandb, for the dashboards an engineer already watches runs with. After each
# stage, its metric rows (the *_metrics.jsonl files it wrote) go there, as stage/metric; at the end, summary.json.

TRACKER = {}  # the open tracker of this process: {"tensorboard": SummaryWriter} or {"wandb": run}


def open_tracker(cfg):
    """Start the --report_to tracker with the config; its package is imported only when asked for."""
    if not cfg.report_to or rank() > 0:
        return
    try:
        if cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
        else:
            import wandb
    except ImportError:
        raise UserError(f"--report_to {cfg.report_to} needs its package: pip install {cfg.report_to}") from None
    config = dataclasses.asdict(cfg)
    if cfg.report_to == "tensorboard":
        TRACKER["tensorboard"] = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"))
        TRACKER["tensorboard"].add_text("config", "\n".join(f"    {k}: {v!r}" for k, v in config.items()))
    else:  # offline (files under out_dir/wandb, `wandb sync` uploads them) unless WANDB_MODE says otherwise
        TRACKER["wandb"] = wandb.init(project="rlhf.py", name=f"{os.path.basename(os.path.abspath(cfg.out_dir))} "
                                      f"{cfg.stage}", dir=cfg.out_dir, config=config,
                                      mode=os.environ.get("WANDB_MODE", "offline"))


def track(cfg, stage):
    """The metric rows a stage wrote (stage_metrics.jsonl, and rm_2_metrics.jsonl, ... of an ensemble) to the
    tracker, as stage/metric at each row's step."""
    for name in sorted(os.listdir(cfg.out_dir)):
        if not (name.startswith(stage) and name.endswith("_metrics.jsonl")) or not TRACKER:
            continue
        prefix = name[:-len("_metrics.jsonl")]
        for row in rlhf.read_jsonl(os.path.join(cfg.out_dir, name)):
            values = {f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if "tensorboard" in TRACKER:
                for key, value in values.items():
                    TRACKER["tensorboard"].add_scalar(key, value, row["step"])
            if "wandb" in TRACKER:
                TRACKER["wandb"].define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
                TRACKER["wandb"].log({f"{prefix}/step": row["step"], **values})


def close_tracker(summary):
    """The run's summary.json figures to the tracker, then close it."""
    flat = {}

    def walk(prefix, v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k != "config":
                    walk(f"{prefix}/{k}" if prefix else k, x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            flat[prefix] = v
    walk("", summary)
    if "tensorboard" in TRACKER:
        TRACKER["tensorboard"].add_text("summary", "\n".join(f"    {k}: {v:.6g}" for k, v in flat.items()))
        TRACKER.pop("tensorboard").close()
    if "wandb" in TRACKER:
        TRACKER["wandb"].summary.update(flat)
        TRACKER.pop("wandb").finish()


# -----------------------------------------------------------------------------
# 1-2. The data: the built-in task with the judge's own pairs, or your own preference pairs (--data)
#
# One pair per JSON Lines row, in any of the shapes preference sets come in (TRL's names in brackets):
#   {"chosen": "\n\nHuman: ...\n\nAssistant: ...", "rejected": "..."}     Anthropic HH-RLHF: whole transcripts
#   {"prompt": "...", "chosen": "...", "rejected": "..."}                 [standard, explicit prompt]
#   {"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], ...}  [conversational, implicit prompt]
#   {"prompt": [messages], "chosen": [assistant message], ...}            [conversational, explicit prompt]
#   {"prompt": "...", "chosen": [user, assistant], ..., "messages": ...}  UltraFeedback-binarized (the user turn
#                                                                        repeated in chosen; extra keys ignored)
# Each becomes a prompt (the earlier turns, a system turn included) and two responses (the final assistant turn
# alone). The prompt is written as HH text ("\n\nHuman: ...\n\nAssistant:"), or with the chat template of a
# --model whose tokenizer has one; a text prompt in no chat format is kept as it is. A row that cannot be a
# pair is dropped and counted; a file where most rows cannot is refused with one line. The file feeds every
# stage: SFT on the chosen responses (common practice when a set has no demonstrations), the reward model and
# the judge on disjoint parts of the pairs, PPO on the prompts; a held-out share of the prompts is kept out of all.

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
HH_ROLES = {"Human": "user", "Assistant": "assistant", "System": "system"}


class BadRow(Exception):
    """Why a row of a preference file cannot be a pair; the loader drops the row and counts the reason."""


def hh_turns(text):
    """An HH-RLHF transcript as chat messages; an empty last "Assistant:" (a prompt's end) is left out.
    Example: '\\n\\nHuman: Hi\\n\\nAssistant: Hello' -> [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}]"""
    parts = regex.split(r"\n\n(Human|Assistant|System):", "\n\n" + text.lstrip("\n") if text.startswith(("\n", "Human:", "System:")) else text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRow("a text with no \\n\\nHuman: / \\n\\nAssistant: turns where a whole transcript was expected")
    turns = [dict(role=HH_ROLES[r], content=c.strip()) for r, c in zip(parts[1::2], parts[2::2])]
    return turns[:-1] if turns[-1]["role"] == "assistant" and not turns[-1]["content"] else turns


def checked_messages(value, key):
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        raise BadRow(f"{key} must hold {{'role', 'content'}} messages")
    roles = {"human": "user", "gpt": "assistant", "bot": "assistant"}
    return [dict(role=roles.get(m["role"], m["role"]), content=m["content"].strip()) for m in value]


def parse_pair(row):
    """One row of a preference file as dict(messages, text, chosen, rejected): `messages` the prompt as chat
    messages (every turn before the final assistant turn, a system turn included), `text` the prompt as it was
    written when it is a plain text in no chat format (else None), chosen and rejected the final assistant turn
    alone. Raises BadRow for a row that cannot be a pair.
    Example: {'chosen': '\\n\\nHuman: Hi\\n\\nAssistant: Hello', 'rejected': '\\n\\nHuman: Hi\\n\\nAssistant: Go'}
          -> {'messages': [{'role': 'user', 'content': 'Hi'}], 'text': None, 'chosen': 'Hello', 'rejected': 'Go'}"""
    if not isinstance(row, dict) or not {"chosen", "rejected"} <= row.keys():
        found = sorted(row) if isinstance(row, dict) else type(row).__name__
        raise BadRow(f"a row needs the keys chosen and rejected (and prompt, unless they are whole conversations); "
                     f"found {found}")
    prompt, sides, text = row.get("prompt"), [row["chosen"], row["rejected"]], None
    if not all(isinstance(v, (str, list)) for v in sides) or not isinstance(prompt, (str, list, type(None))):
        raise BadRow("prompt, chosen and rejected must be texts or lists of chat messages")
    if isinstance(prompt, str) and all(isinstance(v, str) for v in sides) and not regex.match(r"\s*(Human|System):", prompt):
        # a text prompt in the user's own format: kept as written; a response that repeats it loses it
        text = prompt
        sides = [v[len(prompt):] if prompt and v.startswith(prompt) else v for v in sides]
        sides = [[dict(role="assistant", content=v)] for v in sides]
        prompt = [dict(role="user", content=prompt.strip())]
    else:
        hh = lambda v: bool(regex.match(r"\s*(Human|Assistant|System):", v))  # noqa: E731
        if isinstance(prompt, str):
            prompt = hh_turns(prompt) if hh(prompt) else [dict(role="user", content=prompt.strip())]
        elif isinstance(prompt, list):
            prompt = checked_messages(prompt, "prompt")
        sides = [checked_messages(v, k) if isinstance(v, list) else hh_turns(v) if prompt is None or hh(v)
                 else [dict(role="assistant", content=v.strip())] for k, v in zip(("chosen", "rejected"), sides)]
    for v in sides:
        if not v or v[-1]["role"] != "assistant":
            raise BadRow("chosen and rejected must end with the assistant's turn")
    (*before_c, chosen), (*before_r, rejected) = sides
    if before_c != before_r:
        raise BadRow("chosen and rejected differ before the last assistant turn")
    if prompt is None or prompt == before_c[:len(prompt)]:
        prompt = before_c                       # an implicit prompt, or the prompt repeated in chosen (UltraFeedback)
    elif before_c and before_c[-1] == prompt[-1]:
        prompt = before_c                       # its last user turn repeated
    else:
        prompt = prompt + before_c
    if not prompt:
        raise BadRow("no prompt: chosen and rejected are assistant turns alone, and there is no prompt key")
    if not chosen["content"].strip() or not rejected["content"].strip():
        raise BadRow("an empty response")
    if chosen["content"] == rejected["content"]:
        raise BadRow("chosen equal to rejected")
    return dict(messages=prompt, text=text, chosen=chosen["content"], rejected=rejected["content"])


def render(pair, chat_tok):
    """A parsed pair as the prompt and response texts every stage reads: with the chat template of chat_tok
    (the generation prompt added; a response is its content), or as HH-RLHF text (a response starts with a
    space); a plain text prompt is kept as it was written."""
    if chat_tok is not None:
        prompt = chat_tok.apply_chat_template(pair["messages"], tokenize=False, add_generation_prompt=True)
        if chat_tok.bos_token and prompt.startswith(chat_tok.bos_token):  # tokenize() adds the start token itself
            prompt = prompt[len(chat_tok.bos_token):]
        return dict(prompt=prompt, chosen=pair["chosen"], rejected=pair["rejected"])
    if pair["text"] is not None:  # the user's own format, as written
        return dict(prompt=pair["text"], chosen=pair["chosen"], rejected=pair["rejected"])
    names = {v: k for k, v in HH_ROLES.items()}
    prompt = "".join(f"\n\n{names.get(m['role'], 'Human')}: {m['content']}" for m in pair["messages"]) + ASSISTANT
    return dict(prompt=prompt, chosen=" " + pair["chosen"], rejected=" " + pair["rejected"])


def end_of_turn(tok):
    """The token a chat template ends an assistant turn with (<|im_end|>, <|eot_id|>, <end_of_turn>, ...): the
    special token that follows an assistant message's text; the tokenizer's end token if none does."""
    mark = "RLHF_PY_MARK"
    text = tok.apply_chat_template([dict(role="user", content="Hi"), dict(role="assistant", content=mark)], tokenize=False)
    after = text[text.rindex(mark) + len(mark):].lstrip()
    found = [t for t in tok.all_special_tokens + list(tok.get_added_vocab()) if t and after.startswith(t)]
    return max(found, key=len) if found else tok.eos_token


def chat_tokenizer(cfg):
    """The tokenizer of --model when it has a chat template (an instruction-tuned model), else None."""
    if cfg.model == "tiny":
        return None
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(cfg.model)
    return tok if getattr(tok, "chat_template", None) else None


def read_preference_file(path, chat_tok=None):
    """Every pair in the file, rendered (`render`), and {reason: (count, first line)} for the rows dropped;
    a one-line UserError when the file cannot be read or most of its rows cannot be pairs."""
    pairs, dropped, n = [], {}, 0
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise BadRow(f"not valid JSON ({e.msg} at column {e.colno}); each line must be one JSON object")
                    pairs.append(render(parse_pair(row), chat_tok))
                except BadRow as e:
                    count, first = dropped.get(str(e), (0, n))
                    dropped[str(e)] = (count + 1, first)
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise UserError(f"--data {path}: cannot be read ({e}); it must be UTF-8 JSON Lines, or gzip of it (.gz)") from None
    bad = sum(c for c, _ in dropped.values())
    if not pairs and not bad:
        raise UserError(f"--data {path}: the file has no rows; it needs one JSON object per line")
    if len(pairs) < bad:  # most rows cannot be pairs: the file is not what it should be
        reason, (_, line) = max(dropped.items(), key=lambda kv: kv[1][0])
        raise UserError(f"--data {path}, line {line}: {reason} ({bad} of {bad + len(pairs)} rows cannot be pairs)")
    return pairs, dropped


def dataset_from_file(cfg):
    """The file's pairs in the shape make_dataset gives, and the judge's: held-out prompts first, then the training
    pairs split between the reward model and the judge. Returns (data, notes on what was dropped, chat template)."""
    rng, chat_tok = random.Random(cfg.seed), chat_tokenizer(cfg)
    pairs, dropped = read_preference_file(cfg.data, chat_tok)
    # 1. split the distinct prompts: a held-out share is kept out of every stage
    distinct = sorted({r["prompt"] for r in pairs})
    rng.shuffle(distinct)
    held = set(distinct[:max(1, round(cfg.heldout_frac * len(distinct)))])
    if len(held) == len(distinct):
        raise UserError(f"--data {cfg.data}: {len(distinct)} distinct prompt(s) are too few to hold some out; "
                        f"lower --heldout_frac or add pairs")
    prompts = [dict(prompt=p, family=None, split="heldout" if p in held else "train") for p in distinct]
    train, heldout = [r for r in pairs if r["prompt"] not in held], [r for r in pairs if r["prompt"] in held]
    rng.shuffle(train)
    # 2. the reward model's pairs and the judge's: disjoint, in the ratio n_pref : n_judge if the file is short
    n_rm = min(cfg.n_pref, max(1, round(len(train) * cfg.n_pref / (cfg.n_pref + cfg.n_judge))))
    rm_pairs, judge_pairs = train[:n_rm], train[n_rm:n_rm + cfg.n_judge]
    if not judge_pairs:
        raise UserError(f"--data {cfg.data}: {len(train)} training pair(s) are too few to train a judge as well; "
                        f"add pairs")
    # 3. SFT demonstrations: the chosen responses of the reward model's pairs
    sft = lambda rows, n: [dict(prompt=r["prompt"], response=r["chosen"]) for r in rows][:n]  # noqa: E731
    data = dict(prompts=prompts, sft_train=sft(rm_pairs, cfg.n_sft), sft_heldout=sft(heldout, max(1, cfg.n_sft // 4)),
                prefs_train=rm_pairs, prefs_judge=judge_pairs, prefs_heldout=heldout[:max(1, cfg.n_pref // 4)])
    notes = [f"{count} row(s) dropped: {reason} (first: line {line})" for reason, (count, line) in dropped.items()]
    notes.append(f"prompts written with the chat template of {cfg.model}" if chat_tok else
                 "prompts written as HH-RLHF text (a plain text prompt as it was)")
    if len(train) > n_rm + len(judge_pairs):
        notes.append(f"{len(train) - n_rm - len(judge_pairs)} training pair(s) left unused (--n_pref {cfg.n_pref}, "
                     f"--n_judge {cfg.n_judge})")
    return data, notes, chat_tok is not None


def with_wrong_values(pairs, prompts, share, rng, cfg):
    """--crowd_wrong_values: that share of the dodges among the crowd's candidates to a helpful prompt becomes the
    answer's form with another value of its slot ("Your bike is teal." to "I have a red bike"), the policy's likeliest
    mistake, and the pair is labelled again by the annotator. The SFT demonstrations stay as they were."""
    by_prompt, out = {p["prompt"]: p for p in prompts}, []
    for pair in pairs:
        p = by_prompt[pair["prompt"]]
        a, b = pair["chosen"], pair["rejected"]
        if p["family"] == "helpful":
            _, _, answer, _, values = rlhf.SLOTS[p["slot"]]
            swap = [rlhf.answer_kind(p, r) == "dodge" and rng.random() < share for r in (a, b)]
            if any(swap):  # two different wrong values, should both candidates change
                wrong = iter(rng.sample([v for v in values if v != p["answer"]], 2))
                a, b = (" " + answer.format(x=p["subject"], v=next(wrong)) if s else r for r, s in zip((a, b), swap))
        out.append(rlhf.annotate(p, a, b, rng, cfg) if (a, b) != (pair["chosen"], pair["rejected"]) else pair)
    return out


def judge_pairs(prompts, rng, cfg):
    """The judge's n_judge crowd pairs: other comparisons of the training prompts, drawn as rlhf.make_dataset's."""
    train = {f: [p for p in prompts if p["split"] == "train" and p["family"] == f] for f in FAMILIES}
    return [rlhf.label_pair(rng.choice(train[rng.choice(FAMILIES)]), rng, cfg) for _ in range(cfg.n_judge)]


def stage_data(cfg, device):
    """rlhf.py's data, and the judge's pairs: other comparisons of the training prompts, never shown to the reward
    model; or your own file (--data)."""
    notes, chat = [], False
    if cfg.data:
        data, notes, chat = dataset_from_file(cfg)
    else:
        data, rng = rlhf.make_dataset(cfg), random.Random(f"{cfg.seed} judge")
        data["prefs_judge"] = judge_pairs(data["prompts"], rng, cfg)
        if cfg.crowd_wrong_values:
            for name in ("prefs_train", "prefs_heldout", "prefs_judge"):
                data[name] = with_wrong_values(data[name], data["prompts"], cfg.crowd_wrong_values, rng, cfg)

    def write(folder):
        os.makedirs(folder)
        for name, rows in data.items():
            rlhf.write_jsonl(os.path.join(folder, f"{name}.jsonl"), rows)
    save_atomically(write, os.path.join(cfg.out_dir, "data"))
    ex = data["prefs_train"][0]
    gold = lambda k: f" (gold {ex['gold_' + k]:+.2f})" if "gold_" + k in ex else ""  # noqa: E731
    print(f"data: { {name: len(rows) for name, rows in data.items()} }" + "".join(f"\n  {n}" for n in notes) +
          f"\nexample pair: {ex['prompt'][-300:]!r}\n  chosen   {ex['chosen'][:200]!r}{gold('chosen')}"
          f"\n  rejected {ex['rejected'][:200]!r}{gold('rejected')}")
    return dict(counts={name: len(rows) for name, rows in data.items()}, notes=notes, model=cfg.model,
                source=cfg.data or "built-in task", chat_template=chat)


def stage_tokenizer(cfg, device):
    """rlhf.py's tokenizer; for a chat model's data (--data with a chat template), its end-of-turn token ends a
    response; and a prompt of several turns too long for the model loses its oldest turns, whole, first."""
    written = rlhf.load_summary(cfg)["data"]
    if written.get("model", cfg.model) != cfg.model and (written.get("chat_template") or chat_tokenizer(cfg)):
        raise UserError(f"the data was written for --model {written['model']} (its prompt format); rerun "
                        f"`python lab.py --stage data --model {cfg.model} --out_dir {cfg.out_dir}` first")
    figures, folder = rlhf.stage_tokenizer(cfg, device), os.path.join(cfg.out_dir, "tokenizer")
    tok = rlhf.load_tokenizer(folder)
    if written.get("chat_template"):  # a response ends with the template's end-of-turn token
        tok.eos_token = end_of_turn(tok)
        if tok.pad_token_id == tok.eos_token_id:
            tok.add_special_tokens({"pad_token": rlhf.PAD})
        rlhf.save_atomically(tok.save_pretrained, folder)
        figures["eos_token"] = tok.eos_token
    if cfg.data:
        figures["turns_dropped"] = drop_old_turns(cfg, tok)
    return figures


def drop_old_turns(cfg, tok):
    """Rewrite the data's prompts that do not fit the model without their oldest turns (the last turns matter
    most); rlhf.tokenize cuts what is still too long from the left. Returns how many prompts lost turns."""
    budget = tok.model_max_length - cfg.max_new_tokens - len(tok("")["input_ids"])
    folder, dropped = os.path.join(cfg.out_dir, "data"), 0
    for name in os.listdir(folder):
        rows = rlhf.read_jsonl(os.path.join(folder, name))
        for row in rows:
            text = row["prompt"]
            while len(rlhf.encode(tok, [text])[0]) > budget and text.find(HUMAN, 1) > 0:  # drop the oldest turn
                text = text[text.find(HUMAN, 1):]
            dropped += text != row["prompt"]
            row["prompt"] = text
        rlhf.write_jsonl(os.path.join(folder, name), rows)
    if dropped:
        print(f"  {dropped} prompt(s) too long for the model lost their oldest turns")
    return dropped


# -----------------------------------------------------------------------------
# SFT, the reward models and the judge: rlhf.py's stages, and their variants under torchrun

def stage_sft(cfg, device):
    """rlhf.stage_sft; under torchrun its variant: each process takes its part of every batch, DDP averages the
    gradients, and the loss is weighted so that the average is the mean over every response token of the batch."""
    if world() == 1:
        return rlhf.stage_sft(cfg, device)
    data, tok = rlhf.load_data(cfg), rlhf.load_tokenizer(require(cfg, "tokenizer"))
    model = rlhf.new_policy(cfg, tok).to(device)
    train, held = rlhf.tokenize(tok, data["sft_train"], cfg), rlhf.tokenize(tok, data["sft_heldout"], cfg)
    lengths = [len(e["prompt"]) + len(e["response"]) for e in train]
    opt, sched = rlhf.adamw_with_schedule(model, cfg.sft_lr, cfg.weight_decay, cfg.sft_steps, cfg.warmup_frac)
    net, rng, batches, metrics, t0 = ddp(model), random.Random(cfg.seed), [], [], time.time()
    for step in tqdm(range(1, cfg.sft_steps + 1), desc="sft", dynamic_ncols=True, disable=rank() > 0):
        batches = batches or rlhf.length_grouped_batches(lengths, cfg.sft_batch_size, rng)
        part, _ = my_part([train[j] for j in batches.pop()])
        ids, mask, loss_mask = rlhf.sft_batch(part, tok, device)
        with rlhf.autocast(device):
            loss = rlhf.sft_loss(net, ids, mask, loss_mask) * share(loss_mask[:, 1:].sum())
        check_finite_all(loss / world(), "SFT", step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics.append(dict(step=step, loss=all_sum(loss.item()) / world(), lr=sched.get_last_lr()[0]))
        if rank() == 0 and (step % max(1, cfg.sft_steps // 5) == 0 or step == cfg.sft_steps):
            with torch.no_grad(), rlhf.autocast(device):
                losses = [rlhf.sft_loss(model, *rlhf.sft_batch(held[i:i + 64], tok, device))
                          for i in range(0, len(held), 64)]
            metrics[-1]["heldout_loss"] = torch.stack(losses).mean().item()
    save_atomically(model.save_pretrained, os.path.join(cfg.out_dir, "sft"))
    if rank() == 0:
        tok.save_pretrained(os.path.join(cfg.out_dir, "sft"))
    write_jsonl(os.path.join(cfg.out_dir, "sft_metrics.jsonl"), metrics)
    held = [m["heldout_loss"] for m in metrics if "heldout_loss" in m]
    return dict(wall_s=round(time.time() - t0, 1), final_loss=metrics[-1]["loss"], heldout_loss=held[-1] if held else None)


def fit_reward_model(rm, tok, train, held, cfg, device, name, seed):
    """rlhf.fit_reward_model; under torchrun its variant: each process takes its part of every batch's comparisons,
    weighted so that DDP's average is the mean over all of them."""
    if world() == 1:
        return rlhf.fit_reward_model(rm, tok, train, held, cfg, device, name, seed)
    train_items, held_items = rlhf.comparisons(tok, train, cfg), rlhf.comparisons(tok, held, cfg)
    rng, metrics = random.Random(seed), []
    lengths = [len(it["prompt"]) + max(map(len, it["responses"])) for it in train_items]
    batches = [b for _ in range(cfg.rm_epochs) for b in rlhf.length_grouped_batches(
        lengths, 2 * cfg.rm_batch_size, rng, [len(it["responses"]) for it in train_items])]
    opt, sched = rlhf.adamw_with_schedule(rm, cfg.rm_lr, cfg.weight_decay, len(batches), cfg.warmup_frac)
    net = ddp(rm)
    for step, batch in enumerate(tqdm(batches, desc=name, dynamic_ncols=True, disable=rank() > 0), 1):
        part, weight = my_part([train_items[j] for j in batch])
        ids, mask, better, worse = rlhf.comparison_batch(part, tok, device)
        with rlhf.autocast(device):
            r = rlhf.reward_at_last_token(net, ids, mask)
        n = weight * len(better)
        loss = (rlhf.bradley_terry_loss(r[better], r[worse]) if len(better) else r.sum() * 0.0) * share(n)
        check_finite_all(loss / world(), name, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics.append(dict(step=step, loss=all_sum(loss.item()) / world(),
                            acc=all_sum(weight * (r[better] > r[worse]).float().sum().item()) / max(1.0, all_sum(n))))
        if rank() == 0 and (step % max(1, len(batches) // 4) == 0 or step == len(batches)):
            part = held_items if step == len(batches) else held_items[:256]
            metrics[-1].update({f"heldout_{k}": v for k, v in rlhf.rm_accuracy(rm, tok, part, device).items()})
    return metrics


def normalise(rm, sft, tok, train_prompts, cfg, device):
    """rlhf.train_reward_model's step 3: the SFT policy's samples of the first 240 training prompts score mean 0,
    std 1 [Ziegler]; under torchrun each process sampled its own, and the scale is the mean of theirs."""
    mean, std = rlhf.sft_scale(lambda ids, mask: rlhf.reward_at_last_token(rm, ids, mask), sft, tok,
                               train_prompts[:240], cfg, device)
    rm.config.reward_mean, rm.config.reward_std = all_sum(mean) / world(), all_sum(std) / world()


def train_reward_model(cfg, device, name="rm", pairs="prefs_train", own=True, seed=None):
    """rlhf.train_reward_model; under torchrun its variant: rank 0 samples and the human ranks, every process
    trains on the same comparisons (fit_reward_model above), and the scale is the mean of the processes' own."""
    if world() == 1:
        return rlhf.train_reward_model(cfg, device, name, pairs, own, seed)
    data, tok = rlhf.load_data(cfg), rlhf.load_tokenizer(require(cfg, "tokenizer"))
    t0, seed = time.time(), cfg.seed if seed is None else seed
    rm = rlhf.load_scalar_model(require(cfg, "sft"), device)
    rm.config.pad_token_id = tok.pad_token_id
    sft = rlhf.load_lm(require(cfg, "sft"), device)
    train_prompts = [p for p in data["prompts"] if p["split"] == "train"]
    path = os.path.join(cfg.out_dir, f"{name}_rankings.jsonl")
    if rank() == 0:  # one process samples and the human ranks; every process reads the same rankings
        rankings = rlhf.own_rankings(sft, tok, train_prompts, cfg, device, random.Random(f"{seed} {name}")) \
            if own and cfg.rm_samples and train_prompts[0]["family"] else []
        rlhf.write_jsonl(path, rankings)
    barrier()
    rankings = rlhf.read_jsonl(path)
    metrics = fit_reward_model(rm, tok, data[pairs] + rankings, data["prefs_heldout"], cfg, device, name, seed)
    normalise(rm, sft, tok, train_prompts, cfg, device)
    save_atomically(rm.save_pretrained, os.path.join(cfg.out_dir, name))
    if rank() > 0:
        return {}
    tok.save_pretrained(os.path.join(cfg.out_dir, name))
    rlhf.write_jsonl(os.path.join(cfg.out_dir, f"{name}_metrics.jsonl"), metrics)
    final = {k[len("heldout_"):]: v for k, v in metrics[-1].items() if k.startswith("heldout_")}
    print(f"{name} held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in final.items()))
    return dict(wall_s=round(time.time() - t0, 1), final_loss=metrics[-1]["loss"], heldout=final,
                pairs=len(data[pairs]), rankings=len(rankings), reward_mean=rm.config.reward_mean,
                reward_std=rm.config.reward_std)


def stage_rm(cfg, device):
    """rlhf.py's reward model and, with --rm_ensemble K, K − 1 more, independent but for the data: other seeds of
    the head, the batch order and the human's rankings of fresh SFT samples [Coste]; PPO combines them."""
    figures = train_reward_model(cfg, device)
    for k in range(2, cfg.rm_ensemble + 1):
        figures[f"rm_{k}"] = train_reward_model(cfg, device, f"rm_{k}", seed=f"{cfg.seed} rm_{k}")
    return dict(figures, ensemble=cfg.rm_ensemble)


def stage_judge(cfg, device):
    """A second reward model on pairs the first never saw, and no rankings (it stands for a held-back set of human
    labels): the stand-in for a human in the evaluation when there is none, as Gao et al. measure
    over-optimisation with a held-back "gold" reward model. PPO never reads it."""
    path = os.path.join(cfg.out_dir, "data", "prefs_judge.jsonl")
    if not os.path.exists(path):  # a run made by rlhf.py: draw the pairs its stage_data would have drawn here
        if cfg.data:
            sys.exit(f"error: {path} is missing: run `python lab.py --stage data --data {cfg.data}` first")
        prompts = rlhf.load_data(cfg)["prompts"]
        save_atomically(lambda p: rlhf.write_jsonl(p, judge_pairs(prompts, random.Random(f"{cfg.seed} judge"), cfg)),
                        path)
    return train_reward_model(cfg, device, "judge", "prefs_judge", own=False)


# -----------------------------------------------------------------------------
# 3. Reward hacking and the article's remedies: several reward models, a refreshed reward model, the human's own
# score, and the PPO loop that uses them (rlhf.stage_ppo's variant)

def ensemble_reward(scores, rule, lam):
    """One reward from K reward models' normalised scores [Coste]. scores (K, B) -> (B,)
      mean             (1/K)·Σ_k r_k
      min              min_k r_k                 worst-case optimisation: a response is as good as its worst score
      mean_minus_std   mean − λ·std_k r_k         uncertainty-weighted: where the models disagree, trust less
    (Coste et al. subtract λ·variance; the standard deviation keeps λ on the scale of the scores.)
    Example: scores [[1., 0.], [3., 0.]] -> mean [2., 0.], min [1., 0.], mean_minus_std with λ 1: [1., 0.]
    """
    if rule == "min":
        return scores.min(0).values
    if rule == "mean_minus_std":
        return scores.mean(0) - lam * scores.std(0, correction=0)
    return scores.mean(0)


def reward_function(cfg, device):
    """What PPO (and RLOO, GRPO) maximise: score_fn(ids, mask, ended) -> (B,), the reward model's normalised score,
    or the --rm_combine of an ensemble's (stage rm with --rm_ensemble); and the list of reward models it reads (a
    refresh replaces them in place). With --reward human: the simulated human's own score, and no reward model."""
    if cfg.reward == "human":
        return human_reward(cfg, device), []
    k = rlhf.load_summary(cfg)["rm"].get("ensemble", 1)
    rms = [rlhf.load_scalar_model(require(cfg, "rm"), device)] + [
        rlhf.load_scalar_model(os.path.join(cfg.out_dir, f"rm_{i}"), device) for i in range(2, k + 1)]
    for m in rms:
        m.requires_grad_(False)

    def score_fn(ids, mask, ended):
        if len(rms) == 1:
            return rlhf.rm_scores(rms[0], ids, mask, ended, cfg)
        return ensemble_reward(torch.stack([rlhf.rm_scores(m, ids, mask, ended, cfg) for m in rms]), cfg.rm_combine,
                               cfg.rm_combine_lambda)
    return score_fn, rms


@torch.no_grad()
def human_reward(cfg, device):
    """--reward human: PPO on the simulated human's gold score instead of a reward model's, the "gold reward" Gao et
    al. measure their proxies against: what a perfect reward model would give with the same PPO. Normalised like a
    reward model's score, so that β means the same; a response that never ended gets --missing_eos_score:
      r(x, y) = (gold(x, y) − μ_SFT) / σ_SFT        μ, σ over SFT samples (rlhf.sft_scale) [Ziegler]
    score_fn(ids, mask, ended) -> (B,); ids, mask (B, T): left-padded prompt + right-padded response."""
    data, tok = rlhf.load_data(cfg), rlhf.load_tokenizer(require(cfg, "tokenizer"))
    tokens = rlhf.prompt_tokens(tok, data["prompts"], cfg)
    by_ids = {tuple(t): p for t, p in zip(tokens, data["prompts"])}  # which prompt a sequence starts with
    lengths = sorted({len(t) for t in tokens})

    def gold(ids, mask):  # (B, T) -> (B,): the human reads each prompt's response
        scores = []
        for seq in (i[m.bool()].tolist() for i, m in zip(ids, mask)):
            n = next(n for n in lengths if tuple(seq[:n]) in by_ids)  # (a built-in prompt has one "Assistant:")
            scores.append(rlhf.gold_judge(by_ids[tuple(seq[:n])], tok.decode(seq[n:], skip_special_tokens=True))[0])
        return torch.tensor(scores, device=ids.device)

    train_prompts = [p for p in data["prompts"] if p["split"] == "train"][:240]  # as rlhf.train_reward_model's
    mean, std = rlhf.sft_scale(gold, rlhf.load_lm(require(cfg, "sft"), device), tok, train_prompts, cfg, device)
    mean, std = all_sum(mean) / world(), all_sum(std) / world()

    def score_fn(ids, mask, ended):
        never_ended = torch.full(ended.shape, cfg.missing_eos_score, device=ids.device)
        return torch.where(ended, (gold(ids, mask) - mean) / std, never_ended)
    return score_fn


def refresh_steps(cfg, can_rank):
    """The PPO steps after which the reward model is refreshed: --rm_refresh of them, evenly spaced; none where the
    human cannot rank the policy's samples (can_rank False: your own --data), ranks none (--rm_samples 0), or PPO
    maximises the human's own score (--reward human: no reward model to refresh).
    s_i = round(ppo_steps · i / (N + 1)), i = 1..N = --rm_refresh      Example: 60 steps, N 4 -> {12, 24, 36, 48}
    With N near ppo_steps some s_i round to the same step (one refresh) or to 0 (no step 0: dropped)."""
    if not can_rank or cfg.rm_samples == 0 or cfg.reward == "human":
        return set()
    return {round(cfg.ppo_steps * i / (cfg.rm_refresh + 1)) for i in range(1, cfg.rm_refresh + 1)} - {0}


def refresh_reward_model(rm, new, rows_so_far, sft, tok, train_prompts, cfg, device, seed):
    """The article's first remedy for reward hacking, 定期更新奖励模型 (refresh the reward model periodically), as
    Anthropic's "online" HH-RLHF and Llama 2 do it: the reward model learns from `new`, the human's rankings of the
    current policy's samples: continued from where it is, with as many earlier rows (pairs or rankings) replayed so
    that it does not forget them (--rm_refresh_from rm), or trained again from SFT on every one so far (sft). Then
    normalised again on SFT samples, so that β keeps its meaning."""
    if cfg.rm_refresh_from == "sft":
        rm = rlhf.load_scalar_model(os.path.join(cfg.out_dir, "sft"), device)
        rm.config.pad_token_id = tok.pad_token_id
        train = rows_so_far + new
    else:
        train = new + random.Random(seed).sample(rows_so_far, min(len(new), len(rows_so_far)))
    rm.requires_grad_(True)
    fit_reward_model(rm, tok, train, new[:16], cfg, device, "rm refresh", seed=seed)
    rm.requires_grad_(False)
    normalise(rm, sft, tok, train_prompts, cfg, device)
    return rm


def stage_ppo(cfg, device):
    """rlhf.stage_ppo; with the remedies (--rm_refresh, --rm_ensemble, --reward human), --compile or under torchrun,
    its variant: the same steps 1-6 (rlhf.make_experience and rlhf.ppo_update), each process on its part of the
    prompts, and after the steps of refresh_steps the human ranks the current policy's samples and every reward
    model learns from them."""
    data = rlhf.load_data(cfg)
    train_prompts = [p for p in data["prompts"] if p["split"] == "train"]
    refresh_at = refresh_steps(cfg, can_rank=bool(train_prompts[0]["family"])) if cfg.rm_refresh else set()
    ensemble = rlhf.load_summary(cfg)["rm"].get("ensemble", 1)
    if not refresh_at and ensemble == 1 and cfg.reward == "rm" and world() == 1 and not cfg.compile:
        return dict(rlhf.stage_ppo(cfg, device), reward_models=1, refreshes=[], reward=cfg.reward)
    tok = rlhf.load_tokenizer(require(cfg, "tokenizer"))
    policy, ref = rlhf.load_lm(require(cfg, "sft"), device), rlhf.load_lm(require(cfg, "sft"), device)
    ref.requires_grad_(False)
    score_fn, rms = reward_function(cfg, device)
    value_head = torch.nn.Linear(policy.get_input_embeddings().embedding_dim, 1).to(device)  # as in rlhf.stage_ppo
    torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    opt = torch.optim.Adam([*policy.parameters(), *value_head.parameters()], lr=cfg.ppo_lr, eps=1e-5, fused=True)
    net, head = ddp(policy), ddp(value_head)
    if cfg.compile:  # the updates' forward and backward, fused; sampling keeps the plain model (a token at a time)
        net = torch.compile(net, dynamic=True)
    prompt_ids = rlhf.prompt_tokens(tok, train_prompts, cfg)
    own = os.path.join(cfg.out_dir, "rm_rankings.jsonl")
    rows_so_far = data["prefs_train"] + (rlhf.read_jsonl(own) if refresh_at and os.path.exists(own) else [])
    refreshes, all_new, path = [], [], os.path.join(cfg.out_dir, "ppo_rankings.jsonl")
    rng, kl_coef, metrics, times, t_start = random.Random(cfg.seed + rank()), cfg.kl_coef, [], Counter(), time.time()
    mb_cfg = dataclasses.replace(cfg, minibatch_size=cfg.minibatch_size // world())  # each process: its part
    for step in (bar := tqdm(range(1, cfg.ppo_steps + 1), desc="ppo", dynamic_ncols=True, disable=rank() > 0)):
        # 1.-4. sample, score, rewards, advantages (under torchrun: this process's part of the prompts)
        batch = [rng.randrange(len(train_prompts)) for _ in range(cfg.rollout_batch_size // world())]
        exp = rlhf.make_experience(policy, value_head, ref, tok, [prompt_ids[i] for i in batch], score_fn, kl_coef,
                                   cfg, device)
        # 5. PPO epochs over shuffled minibatches; under DDP each loss is weighted by this process's share of tokens
        t0 = time.time()
        stats = ppo_update_ddp(net, head, opt, exp, mb_cfg)
        times.update(exp["seconds"], train=time.time() - t0)
        # 6. adapt β (with --adaptive_kl) to the KL of all processes; log
        texts = rlhf.decode_responses(tok, exp["r_ids"], exp["r_mask"].long())
        mine = dict(rm_score=exp["score"].mean().item(), kl=exp["kl"].sum(1).mean().item(), entropy=exp["entropy"].item(),
                    response_len=exp["r_mask"].sum(1).mean().item(), ended=exp["ended"].float().mean().item(),
                    value_ev=rlhf.explained_variance(exp["old_values"], exp["returns"], exp["r_mask"]), **stats)
        if train_prompts[0]["family"]:
            mine["gold"] = sum(rlhf.gold_judge(train_prompts[i], t, bool(e))[0]
                               for i, t, e in zip(batch, texts, exp["ended"])) / len(batch)
        row = dict(step=step, kl_coef=kl_coef, **{k: all_sum(v) / world() for k, v in mine.items()})
        kl_coef = rlhf.update_kl_coef(kl_coef, row["kl"], cfg, cfg.rollout_batch_size)
        metrics.append(row)
        bar.set_postfix(rm=f"{row['rm_score']:+.2f}", kl=f"{row['kl']:.2f}",
                        **({"gold": f"{row['gold']:+.2f}"} if "gold" in row else {}))
        if step in refresh_at:  # the human ranks the current policy's samples; every reward model learns from them
            t0 = time.time()
            if rank() == 0:  # a random share of the training prompts, each --rm_samples times
                rng_h = random.Random(f"{cfg.seed} refresh {step}")
                some = rng_h.sample(train_prompts, min(cfg.rm_refresh_prompts, len(train_prompts)))
                new = rlhf.own_rankings(policy, tok, some, cfg, device, rng_h)
                rlhf.write_jsonl(path, all_new + [dict(r, step=step) for r in new])
            barrier()
            new = [r for r in rlhf.read_jsonl(path) if r["step"] == step]
            if not new:  # (no two different samples of one prompt: nothing for the human to rank)
                continue
            # how right the reward model was where the policy has gone, before it learns from it
            before = rlhf.rm_accuracy(rms[0], tok, rlhf.comparisons(tok, new, cfg), device)
            rms[:] = [refresh_reward_model(m, new, rows_so_far, ref, tok, train_prompts, cfg, device,
                                           f"{cfg.seed} {step} {k}") for k, m in enumerate(rms)]  # score_fn reads rms
            rows_so_far, all_new = rows_so_far + new, all_new + new
            refreshes.append(dict(step=step, rankings=len(new), seconds=round(time.time() - t0, 1),
                                  **{k: v for k, v in before.items() if k.startswith("acc_gold")}))
            times.update(refresh=time.time() - t0)
            if rank() == 0:
                tqdm.write(f"step {step}: the reward model agreed with the human on {before.get('acc_gold', 0):.3f} "
                           f"of the comparisons of the policy's samples; refreshed on {len(new)} rankings")
    save_atomically(policy.save_pretrained, os.path.join(cfg.out_dir, "ppo"))
    if refreshes:  # the reward model PPO ended with
        save_atomically(rms[0].save_pretrained, os.path.join(cfg.out_dir, "ppo_rm"))
    if rank() > 0:
        return {}
    tok.save_pretrained(os.path.join(cfg.out_dir, "ppo"))
    rlhf.write_jsonl(os.path.join(cfg.out_dir, "ppo_metrics.jsonl"), metrics)
    fig = rlhf.plot_ppo(os.path.join(cfg.out_dir, "overview.png"), "PPO on the training prompts" +
                        (" (the human's own score)" if cfg.reward == "human" else ""), metrics)
    if refreshes:  # a dashed line at each refresh, on every panel
        for ax in fig.axes:
            for r in refreshes:
                ax.axvline(r["step"], color="gray", linestyle="--", linewidth=0.8)
                ax.annotate("RM refreshed", (r["step"], 0.99), xycoords=("data", "axes fraction"), fontsize=7,
                            ha="right", va="top", rotation=90)
        fig.savefig(os.path.join(cfg.out_dir, "overview.png"), dpi=100)
    last = metrics[-max(1, len(metrics) // 10):]
    return dict(wall_s=round(time.time() - t_start, 1), time_s={k: round(v, 1) for k, v in times.items()},
                final={k: sum(m[k] for m in last) / len(last) for k in last[0] if k != "step"},
                reward_models=len(rms), refreshes=refreshes, reward=cfg.reward)


def ppo_update_ddp(policy, value_head, opt, exp, cfg):
    """rlhf.ppo_update; under torchrun its variant, whose loss is weighted by this process's share of the tokens
    (share) so that DDP's average is the mean over every token of the global minibatch."""
    if world() == 1:
        return rlhf.ppo_update(policy, value_head, opt, exp, cfg)
    stats, n_updates = Counter(), 0
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(exp["ids"])).split(cfg.minibatch_size):
            ids, mask, r_ids, m = exp["ids"][mb], exp["mask"][mb], exp["r_ids"][mb], exp["r_mask"][mb]
            with rlhf.autocast(ids.device):
                logits, values = rlhf.policy_forward(policy, value_head, ids, mask, exp["n_prompt"], cfg.temperature)
                new_logprobs = rlhf.logprobs_of(logits, r_ids)
                pg_loss, clipfrac = rlhf.ppo_policy_loss(new_logprobs, exp["old_logprobs"][mb], exp["advantages"][mb],
                                                         m, cfg.clip_range)
                vf_loss = rlhf.ppo_value_loss(values, exp["old_values"][mb], exp["returns"][mb], m,
                                              cfg.value_clip_range)
                loss = (pg_loss + cfg.vf_coef * vf_loss) * share(m.sum())
            check_finite_all(loss, "PPO", n_updates + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.max_grad_norm)
            opt.step()
            stats.update(pg_loss=pg_loss.item(), vf_loss=vf_loss.item(), clipfrac=clipfrac.item())
            n_updates += 1
    return {k: v / n_updates for k, v in stats.items()}



# -----------------------------------------------------------------------------
# 4. The evaluation, with more than rlhf.py's: the judge, the reward model where each policy goes, the ceiling

def agreement(records, key, seed, family=None, other=None):
    """How often the scorer `key` orders two responses to one prompt as the human does (a tie in `key` counts half):
    over every pair of a policy's own samples whose gold scores differ or, with `other` (another policy's records
    of the same prompts), over every pair of one sample of each. With its 95% interval over prompts: the pairs of
    one prompt are far from independent. -> {'mean', 'ci', 'pairs'}, or None where no pair differs.
    Example: gold [1, -1], rm [0.3, 0.5] for one prompt -> mean 0.0 over 1 pair"""
    rows = []
    for i, rs in enumerate(records):
        if family not in (None, rs[0]["family"]):
            continue
        pairs = [(a, b) for j, a in enumerate(rs) for b in (rs[j + 1:] if other is None else other[i])]
        d = [(a[key] - b[key]) * (a["gold"] - b["gold"]) for a, b in pairs if a["gold"] != b["gold"]]
        if d:
            rows.append([1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in d])
    if not rows:
        return None
    x = torch.tensor([r + [math.nan] * (max(map(len, rows)) - len(r)) for r in rows], dtype=torch.float64)
    return dict(mean=x.nanmean().item(), ci=rlhf.bootstrap_ci(x, seed), pairs=sum(map(len, rows)))


def lab_figures(figures, records, seed):
    """The figures the lab adds to rlhf.compare_with_sft's: the win rate by the judge and how often the judge picks
    the human's better response of a pair; the reward model's agreement with the human on each policy's own pairs,
    per family; the share of distinct responses; the ceiling (the human's best answer every time, against the same
    SFT samples: where SFT already answered perfectly, even a perfect policy only ties)."""
    name = figures["policy"]
    if "judge" in records[name][0][0]:
        figures["win_rate_judge"] = rlhf.win_rate(records[name], records["sft"], "judge", seed)
        if "gold" in records[name][0][0]:
            figures["judge_agrees_with_gold"] = agreement(records[name], "judge", seed, other=records["sft"])
    for who, recs in records.items():
        distinct = torch.tensor([[len({r["response"] for r in rs}) / len(rs)] for rs in recs], dtype=torch.float64)
        figures[who]["distinct"] = dict(mean=distinct.mean().item(), ci=rlhf.bootstrap_ci(distinct, seed))
        for fam in [f for f in FAMILIES if f in figures[who]]:
            figures[who][fam]["rm_own"] = agreement(recs, "rm", seed, family=fam)
    if "gold" in records[name][0][0]:
        best = [[dict(r, gold=1.0) for r in rs] for rs in records["sft"]]
        figures["ceiling"] = rlhf.win_rate(best, records["sft"], "gold", seed)
    return figures


def lab_table(fig):
    """rlhf.eval_table, and the lab's rows."""
    pol, cell = fig["policy"], lambda f: "–" if f is None else f"{f['mean']:.3f} [{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]"
    lines = [f"| distinct responses per prompt | {cell(fig['sft']['distinct'])} | {cell(fig[pol]['distinct'])} | |"]
    if "ceiling" in fig:
        lines.append(f"| the ceiling: the best answer every time, over SFT (ties half) | | "
                     f"{cell(fig['ceiling'])} | |")
    if fig.get("judge_agrees_with_gold"):
        lines.append(f"| judge picks the gold-better response of a pair ({fig['judge_agrees_with_gold']['pairs']} "
                     f"pairs) | | {cell(fig['judge_agrees_with_gold'])} | |")
    for fam in [f for f in FAMILIES if f in fig[pol]]:
        own = [fig[who][fam]["rm_own"] for who in ("sft", pol)]
        lines.append(f"| RM agrees with gold on the policy's own {fam} pairs ("
                     f"{' / '.join(str(o['pairs']) if o else '0' for o in own)} pairs) | {cell(own[0])} | "
                     f"{cell(own[1])} | |")
    table = rlhf.eval_table(fig)
    head, tail = table.split("\n\n", 1)
    maximised = "not what it maximised: --reward human" if fig.get("reward") == "human" else None
    if maximised:
        head = head.replace(f"what {pol.upper()} maximised", maximised)
    return head + "\n" + "\n".join(lines) + "\n\n" + tail


def plot_kinds(path, figures):
    """What the answers are: for each family, the share of each kind of answer, SFT above the policy, one stacked bar
    each: the family's own kind first, in green; a dodge orange; a wrong or made-up value or a compliance red."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colour = {"right": "tab:green", "refusal": "tab:green", "admits": "tab:green", "dodge": "tab:orange",
              "evasive": "tab:orange", "needless refusal": "tab:orange", "wrong value": "tab:red", "complied": "tab:red",
              "made up": "tab:red", "other answer": "tab:purple", "garbled": "tab:gray", "never ended": "black"}
    name = figures["policy"]
    fams = [f for f in FAMILIES if f in figures[name]]
    fig, axes = plt.subplots(len(fams), 1, figsize=(8, 1.4 + 1.3 * len(fams)), sharex=True, squeeze=False)
    for ax, fam in zip(axes[:, 0], fams):
        for row, who in enumerate(("sft", name)):
            left = 0.0
            for kind, f in figures[who][fam]["kinds"].items():
                ax.barh(row, f["mean"], left=left, color=colour[kind], label=kind if row == 0 else None)
                if f["mean"] >= 0.06:
                    ax.text(left + f["mean"] / 2, row, f"{f['mean']:.2f}", ha="center", va="center", fontsize=7,
                            color="white")
                left += f["mean"]
        ax.set_yticks([0, 1], ["SFT", name.upper()])
        ax.invert_yaxis()
        ax.set_title(fam, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axes[-1, 0].set(xlim=(0, 1), xlabel="share of the held-out samples")
    fig.suptitle("What the answers are, by the simulated human's reading", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_against_sft(cfg, device, tok, data, policy, name, report):
    """rlhf.compare_with_sft with the judge (if stage judge ran) among the scorers, and the lab's figures; writes
    {report}.md, its samples (SFT and the policy side by side) and its kinds plot."""
    rm = "ppo_rm" if name == "ppo" and rlhf.load_summary(cfg)["ppo"].get("refreshes") else "rm"  # the RM PPO ended with
    require(cfg, "rm")
    scorers = {"rm": rlhf.load_scalar_model(os.path.join(cfg.out_dir, rm), device)}
    if "judge" in rlhf.load_summary(cfg):
        scorers["judge"] = rlhf.load_scalar_model(require(cfg, "judge"), device)
    figures, records = rlhf.compare_with_sft(cfg, device, tok, data, policy, name, scorers)
    ran = rlhf.load_summary(cfg).get("ppo", {}).get("config", {}) if name == "ppo" else dataclasses.asdict(cfg)
    if name != "dpo" and ran.get("reward") == "human":  # the policy never saw a reward model
        figures["reward"] = "human"
    figures = lab_figures(figures, records, cfg.seed)
    table = lab_table(figures)
    print(table)
    samples = "samples.md" if report == "eval" else f"{report[:-len('_eval')]}_samples.md"
    with open(os.path.join(cfg.out_dir, f"{report}.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    if "gold" in records[name][0][0]:
        plot_kinds(os.path.join(cfg.out_dir, "kinds.png" if report == "eval" else f"{report[:-5]}_kinds.png"),
                   figures)
    cell = lambda r: (f"{r['response']!r} (" + (f"{r['kind']}, gold {r['gold']:+.1f}, " if "gold" in r else "")  # noqa
                      + ", ".join(f"{k} {r[k]:+.2f}" for k in scorers) + ")").replace("|", "\\|")
    with open(os.path.join(cfg.out_dir, samples), "w", encoding="utf-8") as f:
        f.write(f"# SFT and {name.upper()} on held-out prompts (the first sample of each)\n\nBoth policies sample with "
                f"the same random numbers, so where they agree on a prompt they often give the same response.\n\n"
                f"| prompt | SFT | {name.upper()} |\n|---|---|---|\n")
        for a, b in zip(records["sft"], records[name]):
            prompt = a[0]["prompt"][-300:].strip().replace("\n", " ").replace("|", "&#124;")
            f.write(f"| {prompt} | {cell(a[0])} | {cell(b[0])} |\n")
    return figures


def stage_eval(cfg, device):
    data, tok = rlhf.load_data(cfg), rlhf.load_tokenizer(require(cfg, "tokenizer"))
    return evaluate_against_sft(cfg, device, tok, data, rlhf.load_lm(require(cfg, "ppo"), device), "ppo", "eval")


# -----------------------------------------------------------------------------
# 5. Beyond PPO: best-of-n, DPO, RLOO and GRPO, on the same task, human and reward model. Each is a pure function with
# its equation, and a stage of its own (not part of --stage all) that ends with the evaluation of section 4.

def best_of_n_gold(rewards, golds, n):
    """The expected gold score of best-of-n [Nakano et al. 2021; Gao et al. 2022]: sample n responses, keep the
    one the reward model scores highest. From N >= n samples of one prompt, exactly and without bias: every
    n-subset of the N is equally likely, and the i-th lowest reward (i = 1..N) is the best of a subset with
    probability C(i−1, n−1) / C(N, n):
        E[gold] = Σ_i C(i−1, n−1) / C(N, n) · gold_(i)        (samples with equal rewards share their mean gold)
    rewards, golds: lists of N numbers -> float.
    Example: rewards [0, 1, 2], golds [5, 7, 9], n 2 -> (1·7 + 2·9) / 3 = 8.33
    """
    N = len(rewards)
    order = sorted(range(N), key=lambda i: rewards[i])
    gold_sorted = [golds[i] for i in order]
    for i in range(N):  # a tie in reward: any of the tied samples could be kept, so each counts as their mean
        tied = [golds[j] for j in order if rewards[j] == rewards[order[i]]]
        gold_sorted[i] = sum(tied) / len(tied)
    return sum(math.comb(i, n - 1) * g for i, g in enumerate(gold_sorted)) / math.comb(N, n)


def best_of_n_kl(rewards, n):
    """KL(best-of-n ‖ π) for one prompt, two ways: (formula, estimate).
    The formula log n − (n−1)/n [Stiennon et al. 2020; Gao et al. 2022] is exact only when no two responses are
    alike, and otherwise an upper bound [Beirami et al. 2024]: a policy that repeats itself gains little by
    choosing. The estimate applies best-of-n to the N samples themselves: the distinct responses y, sorted by
    reward, with shares p_y and cumulative shares F_y, are kept with probability π_n(y) = F_y^n − F_{y−1}^n, so
        KL = Σ_y π_n(y) · log(π_n(y) / p_y)
    rewards: N numbers (equal rewards are taken for one response) -> (formula, estimate).
    Example: rewards [1., 1.] (one response, twice), n 4 -> (log 4 − 3/4 = 0.636, 0.0)
    """
    shares = sorted(Counter(rewards).items())  # (reward, count), lowest first
    N, F, kl = len(rewards), 0.0, 0.0
    for _, count in shares:
        p = count / N
        pi_n = (F + p) ** n - F ** n
        kl += pi_n * math.log(pi_n / p) if pi_n > 0 else 0.0
        F += p
    return math.log(n) - (n - 1) / n, kl


def dpo_loss(logp_chosen, logp_rejected, ref_chosen, ref_rejected, beta):
    """Direct preference optimisation [Rafailov et al. 2023]. The KL-regularised objective of chapter 0 is
    maximised by π*(y|x) ∝ π_ref(y|x)·exp(r(x, y)/β), so r(x, y) = β·log π*(y|x)/π_ref(y|x) + β·log Z(x); put
    into Bradley-Terry, Z(x) cancels and the policy is its own reward model:
        L = −log σ(β·[(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])
    Sequence log-probs (B,) each -> loss, and the implicit rewards β·log π/π_ref of chosen and rejected (B,).
    Example: equal log-probs everywhere -> loss log 2 = 0.693, implicit rewards 0
    """
    r_chosen, r_rejected = beta * (logp_chosen - ref_chosen), beta * (logp_rejected - ref_rejected)
    return -F.logsigmoid(r_chosen - r_rejected).mean(), r_chosen.detach(), r_rejected.detach()


def rloo_advantages(rewards, k):
    """REINFORCE with a leave-one-out baseline [Kool et al. 2019; Ahmadian et al. 2024]: k samples of each
    prompt; each sample's baseline is the mean reward of the other k − 1, so no value network is needed:
        A_i = R_i − (1/(k−1)) · Σ_{j≠i} R_j
    rewards (B·k,), each prompt's k samples consecutive -> (B·k,).  Example: k 2, rewards [1., 3.] -> [-2., 2.]
    """
    R = rewards.view(-1, k)                                   # (B, k)
    return (R - (R.sum(1, keepdim=True) - R) / (k - 1)).view(-1)


def grpo_advantages(scores, k, eps=1e-4):
    """Group-relative advantages [Shao et al. 2024, DeepSeekMath]: each sample's score against its group's,
    in units of the group's spread:   A_i = (r_i − mean_j r_j) / (std_j r_j + ε)
    scores (B·k,), each prompt's k samples consecutive -> (B·k,).  Example: k 2, scores [1., 3.] -> [-0.707, 0.707]
    """
    R = scores.view(-1, k)                                    # (B, k)
    return ((R - R.mean(1, keepdim=True)) / (R.std(1, keepdim=True) + eps)).view(-1)


def k3_kl(logprobs, ref_logprobs):
    """Per-token KL(π ‖ π_ref) by Schulman's k3 estimator, the term GRPO adds to its loss [Shao et al. 2024]:
        k3 = π_ref/π − log(π_ref/π) − 1   (>= 0, unbiased, lower variance than log π − log π_ref)
    (B, T) -> (B, T).  Example: equal log-probs -> 0
    """
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


@torch.no_grad()
def group_experience(policy, ref, tok, prompt_ids, score_fn, kl_coef, cfg, device, algo):
    """Steps 1-3 of an RLOO or GRPO iteration: --group_size samples of each prompt (consecutive in the batch), their
    log-probs under the policy and the reference, their scores, and each sample's advantage from its group: no
    value head and no GAE. Returns the rollout, as rlhf.make_experience does."""
    # 1. rollout (as PPO's)
    t0 = time.time()
    q_ids, q_mask, r_ids, r_mask, ended = rlhf.generate(policy, tok, prompt_ids, cfg, device)
    ids, mask, P, r_maskf = torch.cat([q_ids, r_ids], 1), torch.cat([q_mask, r_mask], 1), q_ids.shape[1], r_mask.float()
    t1 = time.time()
    # 2. score
    with rlhf.autocast(device):
        old_logprobs = rlhf.logprobs_of(rlhf.response_logits(policy, ids, mask, P, cfg.temperature), r_ids)  # (B, R)
        ref_logprobs = rlhf.logprobs_of(rlhf.response_logits(ref, ids, mask, P, cfg.temperature), r_ids)     # (B, R)
        score = score_fn(ids, mask, ended).float()                                                            # (B,)
    kl = (old_logprobs - ref_logprobs) * r_maskf                                                              # k1
    # 3. advantages, one per sample, the same on each of its tokens
    if algo == "rloo":
        # RLOO puts the KL penalty in the reward, once per sequence: R = r − β·Σ_t KL_t [RLOO]
        advantages = rloo_advantages(score - kl_coef * kl.sum(1), cfg.group_size)
    else:
        # GRPO scores the raw reward against the group; its KL term goes into the loss (group_update)
        advantages = grpo_advantages(score, cfg.group_size)
    return dict(ids=ids, mask=mask, n_prompt=P, r_ids=r_ids, r_mask=r_maskf, ended=ended, score=score, kl=kl,
                old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages[:, None] * r_maskf,
                seconds=dict(generate=t1 - t0, score=time.time() - t1))


def group_update(policy, opt, exp, kl_coef, cfg, algo):
    """Step 4 of RLOO and GRPO: --ppo_epochs passes in shuffled minibatches, each one Adam step on PPO's clipped
    surrogate with the group advantages (at the first step, ρ = 1: plain REINFORCE), and for GRPO
        + β · mean_t k3(π_θ, π_ref)                    [GRPO, eq. 3]
    subtle: the loss is a mean over every token of the minibatch (DAPO's choice; TRL's "bnpo"), not GRPO's eq. 3,
    which averages each response's tokens first and then the responses: there a long response's tokens weigh less
    than a short one's. Here responses are one short sentence, and the two differ little (tutorial, chapter 13).
    Returns the mean of each statistic."""
    stats, n_updates = Counter(), 0
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(exp["ids"])).split(cfg.minibatch_size // world()):
            ids, mask, r_ids, m = exp["ids"][mb], exp["mask"][mb], exp["r_ids"][mb], exp["r_mask"][mb]
            with rlhf.autocast(ids.device):
                new_logprobs = rlhf.logprobs_of(rlhf.response_logits(policy, ids, mask, exp["n_prompt"],
                                                                     cfg.temperature), r_ids)
                pg_loss, clipfrac = rlhf.ppo_policy_loss(new_logprobs, exp["old_logprobs"][mb], exp["advantages"][mb],
                                                         m, cfg.clip_range)
                kl_loss = rlhf.masked_mean(k3_kl(new_logprobs, exp["ref_logprobs"][mb]), m)
                loss = (pg_loss + (kl_coef * kl_loss if algo == "grpo" else 0.0)) * share(m.sum())
            check_finite_all(loss, algo.upper(), n_updates + 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], cfg.max_grad_norm)
            opt.step()
            stats.update(pg_loss=pg_loss.item(), clipfrac=clipfrac.item(), k3_kl=kl_loss.item())
            n_updates += 1
    return {k: v / n_updates for k, v in stats.items()}


def stage_group(cfg, device, algo):
    """RLOO or GRPO from SFT on the reward model, as rlhf.stage_ppo does PPO: --rollout_batch_size samples per step,
    --group_size of each prompt; then the evaluation against SFT."""
    data, tok = rlhf.load_data(cfg), rlhf.load_tokenizer(require(cfg, "tokenizer"))
    policy, ref = rlhf.load_lm(require(cfg, "sft"), device), rlhf.load_lm(require(cfg, "sft"), device)
    ref.requires_grad_(False)
    score_fn, _ = reward_function(cfg, device)
    opt = torch.optim.Adam(policy.parameters(), lr=cfg.ppo_lr, eps=1e-5, fused=True)
    net = torch.compile(ddp(policy), dynamic=True) if cfg.compile else ddp(policy)
    train_prompts = [p for p in data["prompts"] if p["split"] == "train"]
    prompt_ids = rlhf.prompt_tokens(tok, train_prompts, cfg)
    rng, metrics, times, t_start, k = random.Random(cfg.seed + rank()), [], Counter(), time.time(), cfg.group_size
    for step in (bar := tqdm(range(1, cfg.ppo_steps + 1), desc=algo, dynamic_ncols=True, disable=rank() > 0)):
        batch = [i for i in (rng.randrange(len(train_prompts)) for _ in range(cfg.rollout_batch_size // k // world()))
                 for _ in range(k)]  # each prompt k times, consecutive
        exp = group_experience(policy, ref, tok, [prompt_ids[i] for i in batch], score_fn, cfg.kl_coef, cfg, device,
                               algo)
        t0 = time.time()
        stats = group_update(net, opt, exp, cfg.kl_coef, cfg, algo)
        times.update(exp["seconds"], train=time.time() - t0)
        texts = rlhf.decode_responses(tok, exp["r_ids"], exp["r_mask"].long())
        mine = dict(rm_score=exp["score"].mean().item(), kl=exp["kl"].sum(1).mean().item(),
                    response_len=exp["r_mask"].sum(1).mean().item(), ended=exp["ended"].float().mean().item(), **stats)
        if train_prompts[0]["family"]:
            mine["gold"] = sum(rlhf.gold_judge(train_prompts[i], t, bool(e))[0]
                               for i, t, e in zip(batch, texts, exp["ended"])) / len(batch)
        metrics.append(dict(step=step, kl_coef=cfg.kl_coef, **{key: all_sum(v) / world() for key, v in mine.items()}))
        bar.set_postfix(rm=f"{metrics[-1]['rm_score']:+.2f}", gold=f"{metrics[-1].get('gold', math.nan):+.2f}",
                        kl=f"{metrics[-1]['kl']:.2f}")
    save_atomically(policy.save_pretrained, os.path.join(cfg.out_dir, algo))
    if rank() > 0:
        return {}
    tok.save_pretrained(os.path.join(cfg.out_dir, algo))
    rlhf.write_jsonl(os.path.join(cfg.out_dir, f"{algo}_metrics.jsonl"), metrics)
    rlhf.plot_ppo(os.path.join(cfg.out_dir, f"{algo}_overview.png"), f"{algo.upper()} on the training prompts" +
                  (" (the human's own score)" if cfg.reward == "human" else ""), metrics)
    train_s = time.time() - t_start
    figures = evaluate_against_sft(cfg, device, tok, data, policy, algo, report=f"{algo}_eval")
    return dict(figures, train_s=round(train_s, 1), time_s={key: round(v, 1) for key, v in times.items()})


def stage_rloo(cfg, device):
    return stage_group(cfg, device, "rloo")


def stage_grpo(cfg, device):
    return stage_group(cfg, device, "grpo")


def response_logps(model, batch, tok, cfg, device):
    """Σ_t log π(y_t | x, y_<t) over the response tokens (the prompt and the padding left out) of every response of
    the comparisons `batch` (N,), and who beat whom (C,), (C,)."""
    ex = [dict(prompt=it["prompt"], response=r) for it in batch for r in it["responses"]]
    ids, mask, loss_mask = rlhf.sft_batch(ex, tok, device)
    _, _, better, worse = rlhf.comparison_batch(batch, tok, device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=rlhf.position_ids(mask)).logits
    lp = rlhf.logprobs_of(logits[:, :-1].float() / cfg.temperature, ids[:, 1:])
    return (lp * loss_mask[:, 1:]).sum(1), better, worse


def stage_dpo(cfg, device):
    """DPO from SFT on the reward model's own comparisons (the crowd's pairs, and the human's rankings of SFT samples
    when stage rm made them), at --dpo_beta: no reward model, no sampling. Then the evaluation against SFT.
    Like the reward model (rlhf.fit_reward_model), it weighs every comparison of a batch the same, so a ranking of
    K responses counts up to C(K, 2) times."""
    data, tok = rlhf.load_data(cfg), rlhf.load_tokenizer(require(cfg, "tokenizer"))
    require(cfg, "rm")  # the same comparisons as the reward model's
    own = os.path.join(cfg.out_dir, "rm_rankings.jsonl")
    rows = data["prefs_train"] + (rlhf.read_jsonl(own) if os.path.exists(own) else [])
    policy, ref = rlhf.load_lm(require(cfg, "sft"), device), rlhf.load_lm(require(cfg, "sft"), device)
    ref.requires_grad_(False)
    t_start = time.time()
    # (a ranking whose responses the human found all equally good has no comparison for DPO to learn)
    items = [it for it in rlhf.comparisons(tok, rows, cfg) if it["better"]]
    held = rlhf.comparisons(tok, data["prefs_heldout"], cfg)

    logps = lambda model, batch: response_logps(model, batch, tok, cfg, device)  # noqa: E731
    rng, metrics = random.Random(cfg.seed), []
    lengths = [len(it["prompt"]) + max(map(len, it["responses"])) for it in items]
    batches = [b for _ in range(cfg.rm_epochs) for b in rlhf.length_grouped_batches(
        lengths, 2 * cfg.rm_batch_size, rng, [len(it["responses"]) for it in items])]
    opt, sched = rlhf.adamw_with_schedule(policy, cfg.dpo_lr, cfg.weight_decay, len(batches), cfg.warmup_frac)
    net = ddp(policy)
    for step, batch in enumerate(tqdm(batches, desc="dpo", dynamic_ncols=True, disable=rank() > 0), 1):
        mine, weight = my_part([items[j] for j in batch])
        with torch.no_grad(), rlhf.autocast(device):
            ref_lp, better, worse = logps(ref, mine)
        with rlhf.autocast(device):
            lp, _, _ = logps(net, mine)
            loss, r_c, r_r = dpo_loss(lp[better], lp[worse], ref_lp[better], ref_lp[worse], cfg.dpo_beta)
        loss = loss * share(weight * len(better))
        check_finite_all(loss / world(), "DPO", step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        metrics.append(dict(step=step, loss=all_sum(loss.item()) / world(), margin=(r_c - r_r).mean().item(),
                            acc=(r_c > r_r).float().mean().item()))
    save_atomically(policy.save_pretrained, os.path.join(cfg.out_dir, "dpo"))
    if rank() > 0:
        return {}
    tok.save_pretrained(os.path.join(cfg.out_dir, "dpo"))
    rlhf.write_jsonl(os.path.join(cfg.out_dir, "dpo_metrics.jsonl"), metrics)
    # the implicit reward β·log π/π_ref as a reward model: how often does it order held-out pairs as the human?
    agree, hits = [], []
    with torch.no_grad(), rlhf.autocast(device):
        for k in range(0, len(held), 32):
            lp, better, worse = logps(policy, held[k:k + 32])
            ref_lp, _, _ = logps(ref, held[k:k + 32])
            wins = iter((((lp - ref_lp)[better] - (lp - ref_lp)[worse]) > 0).tolist())
            for it in held[k:k + 32]:
                for i, j in it["better"]:
                    hits.append(next(wins))
                    if it["gold"] and it["gold"][i] != it["gold"][j]:
                        agree.append(hits[-1] == (it["gold"][i] > it["gold"][j]))
    implicit = dict(acc_label=sum(hits) / max(1, len(hits)), **({"acc_gold": sum(agree) / len(agree)} if agree else {}))
    print("dpo implicit reward, held-out pairs: " + ", ".join(f"{k} {v:.3f}" for k, v in implicit.items()))
    train_s = time.time() - t_start
    figures = evaluate_against_sft(cfg, device, tok, data, policy, "dpo", report="dpo_eval")
    return dict(figures, train_s=round(train_s, 1), comparisons=sum(len(it["better"]) for it in items),
                implicit_reward=implicit, final_loss=metrics[-1]["loss"])


@torch.no_grad()
def stage_bon(cfg, device):
    """Best-of-n from SFT, no training: --bon_samples responses per held-out prompt, scored by the reward model and
    the human; for n = 1, 2, 4, ... up to --bon_samples, the expected gold score, success and win rate over SFT of
    keeping the reward model's best of n (best_of_n_gold), and its KL to SFT (best_of_n_kl)."""
    data, tok = rlhf.load_data(cfg), rlhf.load_tokenizer(require(cfg, "tokenizer"))
    sft, rm = rlhf.load_lm(require(cfg, "sft"), device), rlhf.load_scalar_model(require(cfg, "rm"), device)
    prompts = [p for p in data["prompts"] if p["split"] == "heldout"][:cfg.eval_prompts]
    t0 = time.time()
    many = dataclasses.replace(cfg, eval_samples=cfg.bon_samples)
    by_prompt = rlhf.evaluate_policy(sft, tok, prompts, many, device, {"rm": rm}, ref=sft, seed=1000 * (cfg.seed + 1))
    gold, rows = "gold" in by_prompt[0][0], []

    def figure(values):  # one value per prompt -> {'mean', 'ci'}, the interval over prompts
        x = torch.tensor(values, dtype=torch.float64)[:, None]
        return dict(mean=x.mean().item(), ci=rlhf.bootstrap_ci(x, cfg.seed))

    for n in [2 ** i for i in range(int(math.log2(cfg.bon_samples)) + 1)]:
        def per_prompt(value, rows=by_prompt):  # value(record, its prompt's records) -> best-of-n's, per prompt
            return [best_of_n_gold([r["rm"] for r in rs], [value(r, rs) for r in rs], n) for rs in rows]
        row = dict(n=n, kl_formula=math.log(n) - (n - 1) / n,
                   kl=figure([best_of_n_kl([r["rm"] for r in rs], n)[1] for rs in by_prompt]),
                   rm=figure(per_prompt(lambda r, rs: r["rm"])))
        if gold:
            row["gold"] = figure(per_prompt(lambda r, rs: r["gold"]))
            def beats(r, rs):  # how often r beats one of the SFT samples rs, ties half
                return sum((r["gold"] > o["gold"]) + 0.5 * (r["gold"] == o["gold"]) for o in rs) / len(rs)
            row["win_rate_gold"] = figure(per_prompt(beats))
            for fam in FAMILIES:
                fam_rows = [rs for rs in by_prompt if rs[0]["family"] == fam]
                if fam_rows:
                    row[f"success_{fam}"] = figure(per_prompt(lambda r, rs: float(r["success"]), fam_rows))
        rows.append(row)
    with open(os.path.join(cfg.out_dir, "bon.md"), "w", encoding="utf-8") as f:
        f.write(bon_table(rows) + "\n")
    print(bon_table(rows))
    return dict(rows=rows, n_prompts=len(prompts), samples=cfg.bon_samples, wall_s=round(time.time() - t0, 1))


def bon_table(rows):
    """bon.md: for each n, the KL to SFT (the formula and the estimate), the reward model's and the human's score of
    the reward model's best of n, and its win rate over SFT, each with its 95% interval over prompts."""
    cell = lambda f, spec: f"{f['mean']:{spec}} [{f['ci'][0]:{spec}}, {f['ci'][1]:{spec}}]"  # noqa: E731
    keys = [k for k in ("kl", "rm", "gold", "win_rate_gold") if k in rows[0]]
    head = "| n | KL formula log n − (n−1)/n | KL estimated | RM score |" + (
        " gold score | win rate over SFT |" if "gold" in rows[0] else "")
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        cells = [cell(r[k], "+.2f" if k in ("rm", "gold") else ".2f") for k in keys]
        lines.append(f"| {r['n']} | {r['kl_formula']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 6. Memory: what each stage holds, planned from the config before it runs, and the peak measured after it
#
# A model of P parameters in fp32 holds 4P bytes of weights; training adds 4P of gradients and 8P of Adam's two
# moments: 16P in all [ZeRO, Rajbhandari et al. 2020, §3.1, there in mixed precision]. Activations kept for the
# backward pass: per token and block, GPT-2 saves about 20 numbers of the width d (the block's input, two LayerNorm
# outputs, q k v and their copies for attention, its output before and after merging the heads, the MLP's 4d input
# and 4d GELU) [after Korthikanti et al. 2022, §4.1, there in 16 bits and without fused attention]; and the
# (tokens × vocabulary) logits a few times over: the logits, their log-softmax, and in the backward pass the
# gradients of both. Sampling keeps K and V of every block for every token: the KV cache. Measured against these
# figures: tutorial chapter 14.

FP32 = 4

def model_sizes(cfg, tok):
    """(parameters of the policy, of the reward model, blocks, width, vocabulary, whether the output layer is the
    input embedding) from the config alone: the models are built on the meta device, which allocates nothing."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config
    config = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head) if cfg.model == "tiny" else AutoConfig.from_pretrained(cfg.model)
    config.vocab_size = max(config.vocab_size, len(tok))  # (rlhf.new_policy makes room for <|pad|>)
    config.num_labels, config.pad_token_id = 1, tok.pad_token_id
    with torch.device("meta"):
        lm, rm = AutoModelForCausalLM.from_config(config), AutoModelForSequenceClassification.from_config(config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (tied weights once)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    return count(lm), count(rm), config.num_hidden_layers, config.hidden_size, config.vocab_size, tied

def memory_plan(cfg, stage):
    """What `stage` holds at its largest moment, [(what, bytes)], from the config and the lengths of the data:
        bytes ≈ 16·P_trained + 4·P_frozen + 4·tokens·(20·d·L + c·V)    (c: copies of the logits, 0 for a reward model)
    with P parameters, L blocks of width d, a vocabulary of V, and the tokens of the largest batch."""
    if stage not in ("sft", "rm", "judge", "ppo", "eval"):
        return []
    tok, data = rlhf.load_tokenizer(require(cfg, "tokenizer")), rlhf.load_data(cfg)
    P, P_rm, L, d, V, tied = model_sizes(cfg, tok)
    sft = rlhf.tokenize(tok, data["sft_train"] + data["sft_heldout"], cfg)
    longest = max(len(e["prompt"]) + len(e["response"]) for e in sft)  # a demonstration, prompt and response
    prompt = max(len(e["prompt"]) for e in sft)
    rollout = prompt + cfg.max_new_tokens  # a sampled sequence, at its longest
    train = lambda tokens, logits: FP32 * tokens * (20 * d * L + logits * V)  # noqa: E731 activations, backward
    kv = lambda rows: FP32 * rows * rollout * L * 2 * d  # noqa: E731 the KV cache of `rows` samples
    # a tied embedding's gradient comes from its two uses, each a (V, d) tensor, before they are summed
    tied_grad = [("the tied embedding's gradient, from its two uses before they are summed", 2 * FP32 * V * d)] * tied
    if stage == "sft":
        B = cfg.sft_batch_size
        return [("policy: weights, gradients, AdamW (16 bytes a parameter)", 16 * P),
                (f"the larger of: activations of {B} sequences × {longest} tokens with 4 × logits, and 3 × logits of "
                 f"the held-out loss's 64 sequences (no gradients)", max(train(B * longest, 4),
                                                                        FP32 * 64 * longest * 3 * V))] + tied_grad
    if stage in ("rm", "judge"):
        n, T = 2 * cfg.rm_batch_size, max(longest, rollout if stage == "rm" and cfg.rm_samples else 0)
        return [("reward model: weights, gradients, AdamW", 16 * P_rm), ("SFT policy (it samples): weights", 4 * P),
                (f"the larger of: activations of {n} responses × {T} tokens, and the KV cache of "
                 f"{cfg.sample_batch} samples", max(train(n * T, 0), kv(cfg.sample_batch)))]
    if stage == "ppo":
        B, mb, R = cfg.rollout_batch_size, cfg.minibatch_size, cfg.max_new_tokens
        k = rlhf.load_summary(cfg).get("rm", {}).get("ensemble", 1)
        return [("policy: weights, gradients, Adam; value head", 16 * (P + d + 1)),
                (f"reference policy and {k} reward model(s): weights", 4 * (P + k * P_rm)),
                (f"the larger of: 4 × the rollout's logits ({B} × {R} tokens), its KV cache, and a minibatch's "
                 f"activations ({mb} × {rollout} tokens, 4 × logits)",
                 max(FP32 * B * R * V * 4, kv(B), train(mb * rollout, 0) + FP32 * mb * R * V * 4))] + tied_grad
    if stage == "eval":
        n = min(cfg.eval_prompts, sum(p["split"] == "heldout" for p in data["prompts"]))
        k = 1 + ("judge" in rlhf.load_summary(cfg))
        return [(f"SFT and PPO policies, {k} reward model(s): weights", 4 * (2 * P + k * P_rm)),
                (f"3 × logits of {n} prompts × {cfg.max_new_tokens} tokens", FP32 * 3 * n * cfg.max_new_tokens * V)]

def gib(n):
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"

PROC_STATUS = "/proc/self/status"  # Linux; elsewhere the CPU's plan is printed and nothing is measured

def resident(device, peak=False):
    """Bytes in use now (or the peak since reset_peak): the tensors CUDA allocated (nvidia-smi shows more: the CUDA
    context and the allocator's cache), or this process's resident set; None where it cannot be read."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device)
    if not os.path.exists(PROC_STATUS):
        return None
    with open(PROC_STATUS) as f:  # VmHWM: the resident set's high-water mark
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmHWM" if peak else "VmRSS"].split()[0]) * 1024

def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:  # "5": reset the high-water mark
        f.write("5")  # (Linux 4.0 and later; where it cannot, the peak is the process's since it started)

def planned_stage(cfg, stage, device, run):
    """run(): the stage, between its memory plan and its measured peak (printed, and kept in its figures)."""
    plan = memory_plan(cfg, stage) if rank() == 0 else []
    if not plan:
        return run()
    with contextlib.suppress(OSError, AttributeError, TypeError):  # glibc keeps memory the last stage freed: return it
        ctypes.CDLL(None).malloc_trim(0)
    base = resident(device)
    plan += [("in use before the stage (the process and its data)", base)] if base is not None else []
    total = sum(n for _, n in plan)
    print(f"memory plan: about {gib(total)} on {device.type}\n" + "\n".join(f"  {gib(n):>10}  {w}" for w, n in plan))
    reset_peak(device)
    figures = run()
    peak = resident(device, peak=True)
    if peak is None:
        return figures
    print(f"memory: measured peak {gib(peak)}, planned {gib(total)} ({peak / total - 1:+.0%})")
    return dict(figures, memory=dict(plan_bytes=total, peak_bytes=peak, device=device.type))



# -----------------------------------------------------------------------------
# main: rlhf.py's stages and the lab's, in order, each one's figures into summary.json

def main(argv=None):
    cfg = LabConfig(**vars(rlhf.build_parser(LabConfig, "lab.py", "RLHF by experiment, on top of rlhf.py")
                           .parse_args(argv)))
    stage, stages = None, STAGES if cfg.stage == "all" else (cfg.stage,)
    run = dict(data=stage_data, tokenizer=stage_tokenizer, sft=stage_sft, rm=stage_rm, judge=stage_judge,
               ppo=stage_ppo, eval=stage_eval, bon=stage_bon, dpo=stage_dpo, rloo=stage_rloo, grpo=stage_grpo)
    try:
        check_lab_config(cfg)
        use_cuda = cfg.device == "cuda" or cfg.device == "auto" and torch.cuda.is_available()
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
        if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():  # started by torchrun
            dist.init_process_group("nccl" if use_cuda else "gloo")
            if use_cuda:
                torch.cuda.set_device(device)
            if cfg.rollout_batch_size % world() or cfg.minibatch_size % world():
                raise UserError(f"--rollout_batch_size and --minibatch_size must be multiples of the {world()} "
                                f"processes")
        if rank() > 0:
            sys.stdout = open(os.devnull, "w")  # rank 0 alone prints
        torch.set_num_threads(pick_threads(cfg))
        os.makedirs(cfg.out_dir, exist_ok=True)
        from transformers.utils import logging
        logging.set_verbosity_error()  # "newly initialized score head" is expected here
        logging.disable_progress_bar()
        print(f"{device}, {torch.get_num_threads()} torch thread(s)" + (f" in each of {world()} processes"
                                                                         if world() > 1 else ""))
        open_tracker(cfg)
        t0 = time.time()
        for stage in stages:
            print(f"== stage {stage} ==")
            random.seed(cfg.seed + rank())  # each stage repeats on its own, whether run alone or in `all`
            torch.manual_seed(cfg.seed + rank())
            training = stage in ("sft", "rm", "judge", "ppo", "dpo", "rloo", "grpo")  # every process; else rank 0
            figures = planned_stage(cfg, stage, device, lambda: run[stage](cfg, device)) if training or rank() == 0 \
                else {}
            barrier()
            if rank() == 0:
                summary = rlhf.load_summary(cfg)
                summary[stage] = dict(figures, config=dataclasses.asdict(cfg), threads=torch.get_num_threads(),
                                      processes=world(), finished=time.time())
                rlhf.save_summary(cfg, summary)
                track(cfg, stage)
            stale = forget_downstream(cfg, stage)
            if stale and cfg.stage != "all":
                print(f"note: {', '.join(stale)} came from the previous {stage}: their results are removed; rerun "
                      f"them with --stage (in order), or --stage all")
            barrier()
        print(f"done in {time.time() - t0:.0f}s; outputs in {cfg.out_dir}/ (summary.json, *.md, *.png)")
    except (UserError, NotImplementedError, OSError) as e:  # NotImplementedError: an exercise of a student copy
        sys.exit(f"lab.py: error: {e}")
    except KeyboardInterrupt:
        later = f" and the ones after it ({', '.join(downstream(stage))})" if stage and downstream(stage) else ""
        sys.exit(f"\ninterrupted in stage {stage}: the stages before it are saved in {cfg.out_dir}/; rerun it with "
                 f"`python lab.py --stage {stage} --out_dir {cfg.out_dir}`{later}, or use --stage all")
    finally:
        if TRACKER:
            close_tracker(rlhf.load_summary(cfg))
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
