"""PyTorch re-implementation of the text_fusion Rechead equations (reference for parity tests/benchmarks)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _mlp(d, h, out):
    return nn.Sequential(nn.LayerNorm(d), nn.Linear(d, h), nn.LeakyReLU(), nn.LayerNorm(h), nn.Linear(h, h),
                         nn.LeakyReLU(), nn.LayerNorm(h), nn.Linear(h, out))


class TorchTextFusion(nn.Module):
    """u = s + g * o_3 with s = (1-f) MLP_p(E1 x) + f E3 a, o = Enc([h_x, h_c, s]) (post-LN encoder)."""

    def __init__(self, vocab, d, hidden, layers, heads, ffn, gate_scale=0.1, dropout=0.1):
        super().__init__()
        self.towers = nn.ModuleList([nn.Embedding(vocab, d) for _ in range(3)])
        self.mlp_p, self.mlp_c = _mlp(d, hidden, d), _mlp(d, hidden, d)
        layer = nn.TransformerEncoderLayer(d, heads, ffn, dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.gate = nn.Sequential(nn.Linear(2 * d, d), nn.LeakyReLU(), nn.Linear(d, 1))
        self.gate_scale = gate_scale

    @staticmethod
    def _mean(table, ids, mask):
        m = mask.float()
        return (table(ids) * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1.0)

    def forward(self, b):
        h_x = self.mlp_p(self._mean(self.towers[0], b["prompt_ids"], b["prompt_mask"]))
        h_c = self.mlp_c(self._mean(self.towers[1], b["cot_ids"], b["cot_mask"]))
        a = self._mean(self.towers[2], b["answer_ids"], b["answer_mask"])
        f = b["format"].float()[:, None]
        s = (1 - f) * h_x + f * a
        o3 = self.encoder(torch.stack([h_x, h_c, s], 1))[:, 2]
        g = self.gate_scale * torch.sigmoid(self.gate(torch.cat([s, o3], -1)))
        return s + g * o3


def _t(x):
    return torch.as_tensor(np.array(x, np.float32))


def load_flax_params(model: TorchTextFusion, p: dict) -> TorchTextFusion:
    """Copies our text_fusion params (unboxed 'user' tree) into the torch module; returns it."""
    sd = {}
    for i, name in enumerate(("tower_prompt", "tower_cot", "tower_answer")):
        sd[f"towers.{i}.weight"] = _t(p[name]["embedding"])

    def mlp(prefix, q):
        for j, (ln, fc) in enumerate([("ln0", "fc0"), ("ln1", "fc1"), ("ln2", "fc2")]):
            sd[f"{prefix}.{3 * j}.weight"], sd[f"{prefix}.{3 * j}.bias"] = _t(q[ln]["scale"]), _t(q[ln]["bias"])
            sd[f"{prefix}.{3 * j + 1}.weight"] = _t(q[fc]["kernel"]).T
            sd[f"{prefix}.{3 * j + 1}.bias"] = _t(q[fc]["bias"])

    mlp("mlp_p", p["mlp_p"])
    mlp("mlp_c", p["mlp_c"])
    layer = 0
    while f"encoder_{layer}" in p:
        q, pre = p[f"encoder_{layer}"], f"encoder.layers.{layer}"
        d = q["attn"]["query"]["kernel"].shape[0]
        sd[f"{pre}.self_attn.in_proj_weight"] = torch.cat(
            [_t(q["attn"][n]["kernel"]).reshape(d, d).T for n in ("query", "key", "value")])
        sd[f"{pre}.self_attn.in_proj_bias"] = torch.cat([_t(q["attn"][n]["bias"]).reshape(d)
                                                         for n in ("query", "key", "value")])
        sd[f"{pre}.self_attn.out_proj.weight"] = _t(q["attn"]["out"]["kernel"]).reshape(d, d).T
        sd[f"{pre}.self_attn.out_proj.bias"] = _t(q["attn"]["out"]["bias"])
        for fc, name in (("fc1", "linear1"), ("fc2", "linear2")):
            sd[f"{pre}.{name}.weight"], sd[f"{pre}.{name}.bias"] = _t(q[fc]["kernel"]).T, _t(q[fc]["bias"])
        for ln, name in (("ln1", "norm1"), ("ln2", "norm2")):
            sd[f"{pre}.{name}.weight"], sd[f"{pre}.{name}.bias"] = _t(q[ln]["scale"]), _t(q[ln]["bias"])
        layer += 1
    sd["gate.0.weight"], sd["gate.0.bias"] = _t(p["gate_fc0"]["kernel"]).T, _t(p["gate_fc0"]["bias"])
    sd["gate.2.weight"], sd["gate.2.bias"] = _t(p["gate_fc1"]["kernel"]).T, _t(p["gate_fc1"]["bias"])
    model.load_state_dict(sd, strict=True)
    return model
