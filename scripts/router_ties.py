#!/usr/bin/env python3
"""Why an attention router ties: per MoE layer of an exported checkpoint, on the batch that
`yuanmoe eval --dump-logits` wrote, the tokens whose k-th and (k+1)-th routing weights are
exactly equal, and for those the state of the per-token E x E attention over experts
(docs/routers.md, "Ties").

The router's logit for expert i is r_i = sum_j softmax_j(q_i k_j) v_j. When |q_i| is large the
row softmax is one-hot in fp32 on argmax_j k_j (q_i > 0) or argmin_j k_j (q_i < 0), so every
r_i is one of two values: the experts on one side tie exactly, and top-k picks among them by
index. The report says how many exactly tied tokens have that cause: the two tied experts'
attention rows one-hot (in fp32) on the same expert j, and both logits then exactly v_j.

It runs the independent reference model (tests/reference/yuan2_reference.py, fp32, plain causal
attention) on the dump's tokens and positions.

usage: scripts/router_ties.py HF_DIR DUMP.safetensors
       (HF_DIR from `yuanmoe export-hf --checkpoint RUN --output HF_DIR`,
        DUMP from `yuanmoe eval --checkpoint RUN --steps 1 --dump-logits DUMP`)
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import yuan2_reference as ref  # noqa: E402


def layer_report(model, layer, m_TD):
    L = model.layers[layer]
    k = model.cfg.top_k
    q_TE, k_TE, v_TE = m_TD @ L["router_q"].t(), m_TD @ L["router_k"].t(), m_TD @ L["router_v"].t()
    attention_TEE = torch.softmax(q_TE.unsqueeze(2) * k_TE.unsqueeze(1), dim=-1)
    logits_TE = (attention_TEE * v_TE.unsqueeze(1)).sum(-1)
    p_TE = torch.softmax(logits_TE, dim=-1)
    largest, experts = p_TE.topk(k + 1, dim=-1)
    tied_T = largest[:, k - 1] == largest[:, k]
    # A row whose largest weight rounds to exactly 1: the others are under half an ulp of 1, so
    # r_i rounds to v_j of that row's argmax j.
    top_TE, argmax_TE = attention_TEE.max(-1)
    one_hot_TE = top_TE == 1.0
    rows = torch.arange(p_TE.size(0))
    first, second = experts[:, k - 1], experts[:, k]
    one_hot_pair_T = (one_hot_TE[rows, first] & one_hot_TE[rows, second] &
                      (argmax_TE[rows, first] == argmax_TE[rows, second]))
    # ...and then both logits are exactly that v_j.
    v_of_first_T = v_TE[rows, argmax_TE[rows, first]]
    logit_is_v_T = (logits_TE[rows, first] == v_of_first_T) & (logits_TE[rows, second] == v_of_first_T)
    tied = int(tied_T.sum())
    # How many experts share the k-th weight on a tied token (7 experts at exactly 1/7, say).
    at_kth_T = (p_TE == largest[:, k - 1:k]).sum(-1)
    distinct_T = torch.tensor([len(torch.unique(row)) for row in logits_TE])
    return {
        "tokens": p_TE.size(0),
        "exact_ties": tied / p_TE.size(0),
        "one_hot_rows": float(one_hot_TE.float().mean()),
        "tied_with_cause": float(one_hot_pair_T[tied_T].float().mean()) if tied else float("nan"),
        "tied_logit_is_v": float((one_hot_pair_T & logit_is_v_T)[tied_T].float().mean()) if tied else float("nan"),
        "experts_at_kth": float(at_kth_T[tied_T].float().median()) if tied else float("nan"),
        "distinct_logits": float(distinct_T.float().median()),
    }


def main(argv):
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    hf_dir, dump_path = argv
    model = ref.load_model(hf_dir)
    if model.cfg.router_type != "attention":
        print("router_ties: %s/config.json: router_type is %r; this diagnosis is of the attention router" %
              (hf_dir, model.cfg.router_type), file=sys.stderr)
        return 2
    dump = ref.load_safetensors(dump_path)
    inputs_TD = {}
    scores = model.router_logits

    def capture(layer, m_TD):
        inputs_TD[layer] = m_TD.clone()
        return scores(layer, m_TD)

    model.router_logits = capture
    model.forward(dump["tokens"].long(), dump["position_ids"].long() if "position_ids" in dump else None)
    print("| layer | tokens | exactly tied | one-hot attention rows | tied: both experts' rows one-hot "
          "on the same j | tied: both logits exactly v_j | experts sharing the k-th weight (median, tied) | "
          "distinct logits per token (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in sorted(inputs_TD):
        r = layer_report(model, layer, inputs_TD[layer])
        print("| %d | %d | %.3f | %.3f | %.3f | %.3f | %.0f | %.0f |" % (
            layer, r["tokens"], r["exact_ties"], r["one_hot_rows"], r["tied_with_cause"], r["tied_logit_is_v"],
            r["experts_at_kth"], r["distinct_logits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
