"""The one batch contract: a step's samples as tensors, with the same field names on every actor.

Layout: each row is `[left-padded prompt | right-padded response]`; `prompt_len` = P is the same
for every row, responses have length R. Samples of one prompt are adjacent and share `group_ids`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (b, P + R) long
    attention_mask: torch.Tensor  # (b, P + R) long
    response_mask: torch.Tensor  # (b, R) float, 1 on response tokens up to and including EOS
    group_ids: torch.Tensor  # (b,) long, index of the prompt within the step
    prompt_len: int
    logprobs: torch.Tensor | None = None  # (b, R) behaviour policy's sampling log-probs
    ref_logprobs: torch.Tensor | None = None  # (b, R)
    values: torch.Tensor | None = None  # (b, R) critic values before the update
    scores: torch.Tensor | None = None  # (b,) summed weighted reward
    token_rewards: torch.Tensor | None = None  # (b, R)
    advantages: torch.Tensor | None = None  # (b, R)
    returns: torch.Tensor | None = None  # (b, R)
    # One dict per prompt (not per sample): the data row's extra columns, for reward functions.
    extras: list[dict[str, Any]] = field(default_factory=list)

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_len :]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def replace(self, **fields: Any) -> "Batch":
        return dataclasses.replace(self, **fields)

    def _tensor_fields(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                yield f.name, value

    def select(self, index: torch.Tensor | slice) -> "Batch":
        """Rows `index` of every tensor field; extras keep only the prompts still present."""
        out = {name: t[index] for name, t in self._tensor_fields()}
        groups = out["group_ids"].unique().tolist()
        extras = [self.extras[g] for g in groups] if self.extras else []
        remap = {g: i for i, g in enumerate(groups)}
        out["group_ids"] = torch.tensor([remap[g] for g in out["group_ids"].tolist()], dtype=torch.long)
        return self.replace(**out, extras=extras)

    def split(self, parts: int) -> list["Batch"]:
        size = len(self) // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def to(self, device: torch.device | str) -> "Batch":
        return self.replace(**{name: t.to(device) for name, t in self._tensor_fields()})
