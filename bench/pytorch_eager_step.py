#!/usr/bin/env python3
"""Training-step time of the eager PyTorch reference model (tests/reference/yuan2_reference.py),
to set beside our C++ trainer on the same model, batch and thread count.

One step is what our trainer does: global_batch_size / micro_batch_size micro-batches of random
tokens, each forward + cross-entropy (scaled by 1 / micro-batches) + backward, then global
grad-norm clipping (train.grad_clip; 0 = off), one AdamW step and zero_grad. fp32 weights and
AdamW state on --device (cpu or cuda); with train.precision = bf16 the forward and loss run under
bf16 autocast, as the trainer's do.
Differences from the trainer, none of which moves the time much: no router aux / z loss (the
reference has none), constant lr (no warm-up schedule), random tokens instead of the dataset.
Weight decay applies to matrices only, as in the trainer (src/train/optimizer.cpp).

The reference is eval-only code written for clarity (a Python loop over top-k slots x experts,
the attention router's [T, E, E] softmax, full S x S attention), so this measures what a plain
eager implementation costs, not an optimised PyTorch one.

usage: python3 bench/pytorch_eager_step.py --config configs/tiny-m32.json
       [--seq-length N] [--micro-batch-size N] [--global-batch-size N] [--steps 5] [--warmup 1]
       [--threads N] [--seed 1234] [--device cpu|cuda] [--json OUT.json]
"""

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import yuan2_reference  # noqa: E402


def fail(msg):
    print("pytorch_eager_step: " + msg, file=sys.stderr)
    sys.exit(2)


def hf_config(run):
    """Our run config -> the HF config.json dict the reference reads; keys absent from our config
    are left out so that the reference's own defaults apply."""
    model, moe = run.get("model", {}), run.get("moe", {})
    router = moe.get("router", "attention")
    if router not in ("attention", "linear"):
        fail("moe.router = %r: the reference has only the attention and linear routers" % router)
    if not model.get("lfa", True):
        fail("model.lfa = false: the reference always applies LFA")
    if moe.get("moe_layer_freq", 1) != 1:
        fail("moe.moe_layer_freq = %r: the reference has no dense layers" % moe["moe_layer_freq"])
    cfg = {
        "hidden_size": model["hidden_size"],
        "num_hidden_layers": model["num_layers"],
        "num_attention_heads": model["num_attention_heads"],
        "vocab_size": model["vocab_size"],
        "router_type": router,
        "moe_config": {"moe_num_experts": moe["num_experts"], "moe_top_k": moe["top_k"],
                       "ffn_hidden_size": moe["ffn_hidden_size"], "norm_topk_prob": True,
                       "gated_linear_unit": True},
    }
    if "head_dim" in model:
        cfg["attention_projection_size"] = model["num_attention_heads"] * model["head_dim"]
    for ours, theirs in (("rms_norm_eps", "rms_norm_eps"), ("rotary_dim", "rotary_dim"),
                         ("rope_base", "rotary_base"), ("tie_embeddings", "tie_word_embeddings")):
        if ours in model:
            cfg[theirs] = model[ours]
    return cfg


def random_state_dict(c, gen, device):
    """Every tensor YuanReference.__init__ get()s, as fp32 leaves on `device`, drawn there from
    `gen` (a generator of that device: a 5B-parameter model takes seconds on a GPU, a minute on the
    CPU; the values then differ from a CPU draw, the distribution does not). Its get() does
    t.to(fp32), which returns the same tensor, so gradients land on these leaves."""
    H, P, E, Fw, V = c.hidden, c.proj, c.experts, c.ffn, c.vocab
    shapes = {"model.embed_tokens.weight": [V, H], "model.norm.weight": [H]}
    if not c.tie:
        shapes["lm_head.weight"] = [V, H]
    for l in range(c.layers):
        p = "model.layers.%d." % l
        a, g, m = p + "self_attn.", p + "self_attn.lf_gate.", p + "mlp."
        shapes.update({
            p + "input_layernorm.weight": [H], p + "post_attention_layernorm.weight": [H],
            a + "q_proj.weight": [P, H], a + "k_proj.weight": [P, H],
            a + "v_proj.weight": [P, H], a + "o_proj.weight": [H, P],
            g + "conv1.weight": [H // 2, H, 2, 1], g + "conv1.bias": [H // 2],
            g + "conv2.weight": [H, H // 2, 2, 1], g + "conv2.bias": [H],
            g + "output_layernorm.weight": [H],
        })
        if c.router_type == "attention":
            for w in ("query", "key", "value"):
                shapes[m + "gate.%s.weight" % w] = [E, H]
        else:
            shapes[m + "gate.weight"] = [E, H]
        for e in range(E):
            shapes[m + "experts.%d.w1.weight" % e] = [2 * Fw, H]
            shapes[m + "experts.%d.w2.weight" % e] = [H, Fw]
    # RMSNorm gains start at 1 as in our trainer's init: N(0, 0.02) gains would shrink every
    # layer's signal ~50x, leaving the routers and LFA convs with vanishing gradients.
    sd = {}
    for name, s in shapes.items():
        if name.endswith("norm.weight"):
            t = torch.ones(s, device=device)
        else:
            t = torch.empty(s, device=device).normal_(0.0, 0.02, generator=gen)
        sd[name] = t.requires_grad_()
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--seq-length", type=int)
    ap.add_argument("--micro-batch-size", type=int)
    ap.add_argument("--global-batch-size", type=int)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (cuda:0)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()

    with open(args.config) as f:
        run = json.load(f)
    train = run.get("train", {})
    S = args.seq_length or train["seq_length"]
    mbs = args.micro_batch_size or train.get("micro_batch_size", 1)
    gbs = args.global_batch_size or train.get("global_batch_size", 1)
    if gbs % mbs:
        fail("global_batch_size %d is not a multiple of micro_batch_size %d" % (gbs, mbs))
    micro_batches = gbs // mbs

    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    cfg = yuan2_reference.Config(hf_config(run))
    device = torch.device(args.device)
    bf16 = train.get("precision", "fp32") == "bf16"
    sd = random_state_dict(cfg, torch.Generator(device=device).manual_seed(args.seed), device)
    model = yuan2_reference.YuanReference(cfg, sd, dtype=torch.float32)
    # forward is wrapped in torch.no_grad(); functools.wraps keeps the plain function here.
    forward = yuan2_reference.YuanReference.forward.__wrapped__
    params = list(sd.values())
    grad_clip = train.get("grad_clip", 1.0)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": train.get("weight_decay", 0.1)},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=train.get("lr", 3e-4),
                            betas=(train.get("adam_beta1", 0.9), train.get("adam_beta2", 0.95)),
                            eps=train.get("adam_eps", 1e-8))

    V = cfg.vocab
    step_seconds, losses = [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        total = 0.0
        for _ in range(micro_batches):
            tokens = torch.randint(0, V, (mbs, S + 1), generator=gen).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = forward(model, tokens[:, :S])
                loss = F.cross_entropy(logits.view(-1, V).float(), tokens[:, 1:].reshape(-1)) / micro_batches
            loss.backward()
            total += loss.item()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(total)
        timed = step >= args.warmup
        if timed:
            step_seconds.append(dt)
        print("step %d%s: loss %.4f  %.3f s  %.0f tokens/s" % (
            step + 1, "" if timed else " (warm-up)", total, dt, gbs * S / dt), file=sys.stderr)

    median = statistics.median(step_seconds) if step_seconds else float("nan")
    result = {
        "implementation": "pytorch-eager-reference",
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "seq_length": S,
        "micro_batch_size": mbs,
        "global_batch_size": gbs,
        "tokens_per_step": gbs * S,
        "step_seconds": step_seconds,
        "median_step_seconds": median,
        "tokens_per_s": gbs * S / median if step_seconds else None,
        "losses": losses,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        "device": str(device),
        "precision": "bf16" if bf16 else "fp32",
    }
    if device.type == "cuda":
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated(device)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if not all(math.isfinite(x) for x in losses):
        print("pytorch_eager_step: non-finite loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
