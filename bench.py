"""
bench.py -- how fast is one PPO step of rlhf.py? The work is fixed so that other implementations
can run the same (../shared/bench/trl/ does it for Hugging Face TRL's classic PPOTrainer):

  a GPT-2 of 4 layers x 128 (vocab 1024, random weights, seed 0) and its frozen copy as reference;
  64 prompts of 8 random token ids per step; exactly 24 sampled tokens each (the full distribution,
  temperature 1, rlhf.py's generate() with the KV cache; no token ends a response); reward = the share of even
  token ids; policy and reference scoring; KL-penalised rewards and GAE; 4 epochs x 4 minibatches
  of 16, Adam (lr 1.41e-5), value head (vf_coef 0.1), adaptive KL (0.1, target 6, horizon 10000).

It calls rlhf.py's own make_experience and ppo_update, the two halves of a stage_ppo iteration (and lab.py's
group_experience and group_update for RLOO and GRPO), and
prints seconds per step by phase (median over the steps after the warm-up), tokens/s, the achieved
GFLOP/s and its share of the fp32 matmul ceiling measured on the spot.

  python bench.py                        # CPU, torch's default threads
  python bench.py --threads 1            # one thread (on a busy machine, often faster: see README)
  python bench.py --device cuda --n_layer 12 --n_embd 768 --n_head 12 --vocab 50257   # GPT-2-124M shape, bf16
"""

import argparse
import json
import statistics
import time
import types

import torch

import rlhf


def ppo_flops(a):
    """Matmul FLOPs of one PPO step, counted as ../shared/bench/trl/cpu_ceiling.py counts them for TRL
    (full-vocabulary logits at every position, backward = 2 x forward), so both programs' GFLOP/s are
    the same work divided by their time. Attention score and value products included."""
    d, L, V, P, R = a.n_embd, a.n_layer, a.vocab, a.prompt_len, a.response_len
    T = P + R

    def forward(rows, q_len, kv_len, value_head):
        dense = rows * q_len * (12 * L * d * d + d * V + (d if value_head else 0))  # 12d² per layer: QKV, out, MLP
        attention = 2 * rows * q_len * kv_len * d  # Q·Kᵀ and P·V, all heads together
        return 2 * dense + 2 * L * attention

    generate = forward(a.batch, P, P, False) + sum(forward(a.batch, 1, P + k, False) for k in range(1, R))
    score = 2 * forward(a.batch, T, T, True)
    train = 3 * a.ppo_epochs * forward(a.batch, T, T, True)
    return dict(generate=generate, score=score, train=train, total=generate + score + train)


def matmul_ceiling(device, seconds=0.5):
    """fp32 (bf16 on a GPU) GFLOP/s of a large square matmul: what this machine can do at best right now."""
    n = 1024 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        sync()
        best = max(best, 4 * 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def build_parser():
    p = argparse.ArgumentParser(description="Seconds per PPO step of rlhf.py on a fixed piece of work.")
    p.add_argument("--steps", type=int, default=10, help="PPO steps, the warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the statistics")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=64, help="prompts per step")
    p.add_argument("--minibatch", type=int, default=16)
    p.add_argument("--ppo_epochs", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=8)
    p.add_argument("--response_len", type=int, default=24)
    p.add_argument("--gelu", default="gelu_pytorch_tanh", choices=("gelu_pytorch_tanh", "gelu_new"),
                   help="GPT-2's GELU in one fused kernel (rlhf.py's tiny model) or as five element-wise ones (gelu_new)")
    p.add_argument("--adam", default="fused", choices=("fused", "foreach", "for-loop"), help="Adam's implementation")
    p.add_argument("--compile", action="store_true", help="torch.compile the policy's forward in the update, as rlhf.py --compile")
    p.add_argument("--json", help="also write the figures (the median step, GFLOP/s, the ceiling) to this file")
    p.add_argument("--algo", default="ppo", choices=("ppo", "rloo", "grpo"),
                   help="ppo: make_experience + ppo_update; rloo, grpo: group_experience + group_update, 4 samples per prompt")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: --device cuda but torch sees no CUDA GPU")
    device = torch.device(a.device)
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    lab = __import__("lab") if a.algo != "ppo" else None  # RLOO and GRPO live in lab.py
    cfg = (lab.LabConfig if lab else rlhf.Config)(n_layer=a.n_layer, n_embd=a.n_embd, n_head=a.n_head, rollout_batch_size=a.batch,
                      minibatch_size=a.minibatch, ppo_epochs=a.ppo_epochs, ppo_lr=1.41e-5, vf_coef=0.1,
                      kl_coef=0.1, kl_target=6.0, kl_horizon=10000, max_new_tokens=a.response_len)
    # no end-of-text id in the vocabulary: every response is exactly response_len tokens; id 0 pads (never needed)
    tok = types.SimpleNamespace(eos_token_id=a.vocab, pad_token_id=0)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=a.vocab, n_positions=a.prompt_len + a.response_len + 8, n_embd=a.n_embd,
                        n_layer=a.n_layer, n_head=a.n_head, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function=a.gelu)
    policy = GPT2LMHeadModel(config).to(device).eval()
    ref = GPT2LMHeadModel(config).to(device).eval().requires_grad_(False)
    ref.load_state_dict(policy.state_dict())
    value_head = torch.nn.Linear(a.n_embd, 1).to(device)
    torch.nn.init.zeros_(value_head.weight), torch.nn.init.zeros_(value_head.bias)
    kind = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for-loop": dict(foreach=False)}[a.adam]
    opt = torch.optim.Adam([*policy.parameters(), *value_head.parameters()], lr=cfg.ppo_lr, eps=1e-5, **kind)
    net = torch.compile(policy, dynamic=True) if a.compile else policy  # the update's forward; sampling stays plain
    score_fn = lambda ids, mask, ended: (ids[:, -a.response_len:] % 2 == 0).float().mean(1)  # noqa: E731
    g = torch.Generator().manual_seed(1)
    kl_coef, rows = cfg.kl_coef, []
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{a.algo.upper()} step; torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s); GPT-2 {a.n_layer} x {a.n_embd}, "
          f"vocab {a.vocab}, {sum(x.numel() for x in policy.parameters()) / 1e6:.2f}M parameters; "
          f"{a.batch} prompts x ({a.prompt_len} + {a.response_len}) tokens, {a.ppo_epochs} epochs x "
          f"{a.batch // a.minibatch} minibatches of {a.minibatch}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    k = getattr(cfg, "group_size", 1)
    for step in range(a.steps):
        if a.algo == "ppo":
            prompts = torch.randint(0, a.vocab, (a.batch, a.prompt_len), generator=g).tolist()
        else:  # the same 64 samples per step: 16 prompts, each 4 times (consecutive)
            prompts = [p for p in torch.randint(0, a.vocab, (a.batch // k, a.prompt_len), generator=g).tolist() for _ in range(k)]
        sync()
        t0 = time.perf_counter()
        if a.algo == "ppo":
            exp = rlhf.make_experience(policy, value_head, ref, tok, prompts, score_fn, kl_coef, cfg, device)
        else:
            exp = lab.group_experience(policy, ref, tok, prompts, score_fn, kl_coef, cfg, device, a.algo)
        sync()
        t1 = time.perf_counter()
        if a.algo == "ppo":
            rlhf.ppo_update(net, value_head, opt, exp, cfg)
        else:
            lab.group_update(net, opt, exp, kl_coef, cfg, a.algo)
        sync()
        t2 = time.perf_counter()
        kl_coef = rlhf.update_kl_coef(kl_coef, exp["kl"].sum(1).mean().item(), cfg, a.batch)
        assert exp["r_mask"].sum().item() == a.batch * a.response_len  # the same work every step
        rows.append(dict(generate=exp["seconds"]["generate"], score=t1 - t0 - exp["seconds"]["generate"],
                         train=t2 - t1, total=t2 - t0))
        print(f"step {step}{' (warm-up)' if step < a.warmup else ''}: " + ", ".join(f"{k} {v:.3f}s" for k, v in rows[-1].items()))
    measured = rows[a.warmup:]
    med = {k: statistics.median(r[k] for r in measured) for k in rows[0]}
    flops = ppo_flops(a)
    ceiling = matmul_ceiling(device)
    achieved = flops["total"] / med["total"] / 1e9
    print(f"\nmedian of {len(measured)} steps: " + ", ".join(f"{k} {v:.3f}s" for k, v in med.items()))
    print(f"tokens/s: {a.batch * a.response_len / med['total']:,.0f} sampled tokens per second of PPO "
          f"({a.batch * a.response_len / med['generate']:,.0f} in generation alone)")
    print(f"work: {flops['total'] / 1e9:.1f} GFLOP per step (generate {flops['generate'] / 1e9:.2f}, score "
          f"{flops['score'] / 1e9:.2f}, train {flops['train'] / 1e9:.2f}) => {achieved:.1f} GFLOP/s, "
          f"{100 * achieved / ceiling:.0f}% of the {ceiling:.0f} GFLOP/s matmul ceiling measured now")
    update = flops["train"] / med["train"] / 1e9  # the update alone: forward and backward of every minibatch, Adam
    print(f"the update alone: {update:.1f} GFLOP/s, {100 * update / ceiling:.0f}% of the ceiling")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(args=vars(a), threads=torch.get_num_threads(), torch=torch.__version__, steps=rows,
                           median=med, gflop={k: v / 1e9 for k, v in flops.items()}, ceiling=ceiling, gflops=achieved,
                           share=achieved / ceiling, update_gflops=update, update_share=update / ceiling), f, indent=1)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB")
    return med


if __name__ == "__main__":
    main()
