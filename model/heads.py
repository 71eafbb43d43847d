"""Building blocks shared by the DETR family: layer stacks, adding position embeddings, prediction heads
(MLP) and the auxiliary outputs of every decoder layer."""

import copy

import torch.nn.functional as F
from torch import nn


def get_clones(module, n):
    """``n`` independent copies of ``module`` (a layer stack, or one head per decoder layer)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


def with_pos_embed(tensor, pos):
    return tensor if pos is None else tensor + pos


class MLP(nn.Module):
    """A multi-layer perceptron with ReLU between layers (the box head: 3 layers, 4 outputs)."""

    def __init__(self, input_dim, hidden_dim, output_dim, num_layers):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + h, h + [output_dim]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


def aux_outputs(outputs_class, outputs_coord):
    """Per-decoder-layer outputs except the last (layers x N x Q x ...) -> list of dicts."""
    return [{"pred_logits": a, "pred_boxes": b} for a, b in zip(outputs_class[:-1], outputs_coord[:-1])]
