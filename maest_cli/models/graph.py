"""EmbeddingGraph: MAEST from log-mel frames to one block's embedding (and logits) as one module,
the forward that inference engines compile and `maest export` writes.

Its input is the unnormalised log-mel [batch, frames, 96] exactly as the Essentia frontend
computes it; the model's input scaling, the patchout and the token stacking are inside, so a
compiled or exported graph needs nothing from this package to be used correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from maest_cli.audio.frontend import InputNorm
from maest_cli.models.maest import MAEST, TOKENS, Patchout


class EmbeddingGraph(nn.Module):
    """mel [B, frames, 96] -> embedding [B, len(tokens) * width] (and logits [B, n_classes] with
    `scores`: raw, before the sigmoid). `frames` may be anything from one patch to the model's
    segment length."""

    def __init__(self, model: MAEST, block: int, tokens: Sequence[str] = TOKENS, patchout: Patchout | None = None,
                 scores: bool = False, input_norm: InputNorm | None = None):
        super().__init__()
        self.model = model.eval()
        self.block, self.tokens, self.scores = int(block), tuple(tokens), bool(scores)
        self.patchout = None if patchout is None or patchout.is_identity else patchout
        self.input_norm = input_norm or InputNorm()

    def forward(self, mel: torch.Tensor):
        out = self.model(self.input_norm.apply(mel), blocks=[self.block], logits=self.scores, patchout=self.patchout)
        emb = out.embedding(self.block, self.tokens)
        return (emb, out.logits) if self.scores else emb
