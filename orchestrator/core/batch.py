"""The one batch contract: a step's samples as tensors, with the same field names on every actor.

Layout: each row is `[left-padded prompt | right-padded response]`; `prompt_len` = P is the same
for every row, responses have length R. Samples of one prompt are adjacent and share `group_ids`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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

    def __reduce__(self):
        """Pickled (as Ray sends it between actors) with its CPU tensors as numpy arrays, which pickle
        protocol 5 carries as raw buffers; a tensor would go through torch.save, ~0.25 ms apiece."""
        return (_from_wire, ({f.name: _to_wire(getattr(self, f.name)) for f in dataclasses.fields(self)},))

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
        """`parts` consecutive shards whose sizes differ by at most one; every row is in exactly one."""
        return [self.select(slice(a, b)) for a, b in even_bounds(len(self), parts)]

    def to(self, device: torch.device | str) -> "Batch":
        return self.replace(**{name: t.to(device) for name, t in self._tensor_fields()})

    def trim(self) -> "Batch":
        """The same rows without the padding columns no row uses: prompt columns left of the longest
        prompt, response columns right of the longest response. Log-probs, losses and gradients are
        unchanged (positions skip padding); compute falls with the width."""
        prompt_used = self.attention_mask[:, : self.prompt_len].any(0).nonzero()
        lead = int(prompt_used[0]) if len(prompt_used) else self.prompt_len - 1
        lead = min(lead, self.prompt_len - 1)  # keep the prompt's last column: its logit predicts the first response token
        response_used = (self.attention_mask[:, self.prompt_len :].bool() | (self.response_mask > 0)).any(0).nonzero()
        keep = int(response_used[-1]) + 1 if len(response_used) else 1
        width = self.response_mask.shape[1]
        if lead == 0 and keep == width:
            return self
        out = {}
        for name, t in self._tensor_fields():
            if name in ("input_ids", "attention_mask"):
                out[name] = t[:, lead : self.prompt_len + keep]
            elif t.dim() == 2 and t.shape[1] == width:  # (b, R) per-token fields
                out[name] = t[:, :keep]
        return self.replace(**out, prompt_len=self.prompt_len - lead)


_NUMPY_DTYPES = {torch.float64, torch.float32, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}


def _to_wire(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.dtype in _NUMPY_DTYPES:
        return np.ascontiguousarray(value.detach().numpy())  # (a view's own rows only, not its whole storage)
    return value


def _from_wire(state: dict[str, Any]) -> Batch:
    return Batch(**tensors_from_wire(state))


def tensors_to_wire(values: dict[str, Any]) -> dict[str, Any]:
    """A dict's CPU tensors as numpy arrays, for a Ray call to return (as `Batch` pickles itself)."""
    return {k: _to_wire(v) for k, v in values.items()}


def tensors_from_wire(values: dict[str, Any]) -> dict[str, Any]:
    """`tensors_to_wire` undone. Arrays Ray hands back may be read-only views of its object store:
    those are copied, to stay writable."""
    return {k: torch.from_numpy(v if v.flags.writeable else v.copy()) if isinstance(v, np.ndarray) else v for k, v in values.items()}


def even_bounds(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` consecutive ranges covering 0..total, sizes differing by at most one
    (the first `total % parts` ranges are one longer). Empty ranges only when total < parts."""
    size, extra = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + size + (i < extra)
        bounds.append((start, end))
        start = end
    return bounds


def token_budget_groups(prompt_lengths: list[int], response_lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices in micro-batches whose padded size stays within `budget` tokens. A micro-batch of
    rows is as wide as its longest prompt plus its longest response (`Batch.trim`), so its size is
    rows x that width. Rows are sorted by length, longest first, and cut greedily: rows of like
    length share a micro-batch and padding does not dominate the compute. A row longer than the
    budget is a micro-batch of its own. Every row is in exactly one group, in sorted order."""
    order = sorted(range(len(prompt_lengths)), key=lambda i: (-(prompt_lengths[i] + response_lengths[i]), i))
    groups: list[list[int]] = []
    wide_p = wide_r = 0
    for i in order:
        p, r = max(wide_p, prompt_lengths[i]), max(wide_r, response_lengths[i])
        if groups and (len(groups[-1]) + 1) * (p + r) <= budget:
            groups[-1].append(i)
            wide_p, wide_r = p, r
        else:
            groups.append([i])
            wide_p, wide_r = prompt_lengths[i], response_lengths[i]
    return groups


def row_lengths(batch: Batch) -> tuple[list[int], list[int]]:
    """(prompt tokens, response tokens) of each row, padding not counted."""
    prompts = batch.attention_mask[:, : batch.prompt_len].sum(1)
    responses = (batch.attention_mask[:, batch.prompt_len :].bool() | (batch.response_mask > 0)).sum(1)
    return prompts.tolist(), responses.tolist()


def micro_batches(batch: Batch, size: int | None = None, tokens: int | None = None) -> list[Batch]:
    """The batch in micro-batches: of `tokens` padded tokens at most (`token_budget_groups`, each
    trimmed of the padding it does not need) when given, else of `size` rows (all rows when None)."""
    if tokens:
        return [batch.select(torch.tensor(g)).trim() for g in token_budget_groups(*row_lengths(batch), tokens)]
    size = size or len(batch)
    return [batch.select(slice(i, i + size)) for i in range(0, len(batch), size)]


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (b, longest prompt), each prompt aligned to the right."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def right_pad(rows: list[list[int]], pad_id: int, dtype: torch.dtype = torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, validity mask), both (b, longest row), each row aligned to the left."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), pad_id, dtype=dtype)
    valid = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=dtype)
        valid[i, : len(r)] = 1
    return out, valid


def response_mask_until_eos(responses: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 on every token up to and including the first EOS, 0 after. (b, R) -> (b, R) float."""
    is_eos = (responses == eos_id).long()
    after_eos = (is_eos.cumsum(1) - is_eos) > 0
    return (~after_eos).float()


def build_batch(prompt_ids: list[list[int]], responses: torch.Tensor, valid: torch.Tensor, pad_id: int, n: int = 1,
                response_mask: torch.Tensor | None = None, logprobs: torch.Tensor | None = None,
                extras: list[dict[str, Any]] | None = None) -> Batch:
    """The one way rows become a Batch: prompt i (left-padded) followed by each of its n responses.

    responses: (b * n, R) token ids, the n samples of a prompt adjacent; valid: (b * n, R), 1 on the
    tokens the model sees; response_mask: 1 where the loss falls (default: `valid`); logprobs: the
    sampling log-probs, zeroed outside the response mask.
    """
    ids, mask = left_pad(prompt_ids, pad_id)
    valid = valid.long()
    attention_mask = torch.cat([mask.repeat_interleave(n, 0), valid], dim=1)
    sequences = torch.cat([ids.repeat_interleave(n, 0), responses], dim=1)
    response_mask = valid.float() if response_mask is None else response_mask
    return Batch(
        input_ids=torch.where(attention_mask.bool(), sequences, pad_id),
        attention_mask=attention_mask,
        response_mask=response_mask,
        group_ids=torch.arange(len(prompt_ids)).repeat_interleave(n),
        prompt_len=ids.shape[1],
        logprobs=logprobs * response_mask if logprobs is not None else None,
        extras=list(extras or []),
    )


def concat(batches: list[Batch]) -> Batch:
    """One Batch of several (e.g. one per rollout actor), re-padded to the widest prompt and response
    (scores kept, if every part has them: asynchronous training scores each group as it finishes)."""
    if len(batches) == 1:
        return batches[0]
    p = max(b.prompt_len for b in batches)
    r = max(b.response_mask.shape[1] for b in batches)
    parts, offset = [], 0
    for b in batches:
        lp, lr = p - b.prompt_len, r - b.response_mask.shape[1]
        pad2 = lambda t, v=0: torch.nn.functional.pad(t, (lp, lr), value=v)  # noqa: E731
        parts.append(dict(
            input_ids=pad2(b.input_ids), attention_mask=pad2(b.attention_mask),
            response_mask=torch.nn.functional.pad(b.response_mask, (0, lr)),
            logprobs=torch.nn.functional.pad(b.logprobs, (0, lr)) if b.logprobs is not None else None,
            group_ids=b.group_ids + offset, scores=b.scores,
        ))
        offset += len(b.extras)
    cat = {k: torch.cat([x[k] for x in parts]) if parts[0][k] is not None else None for k in parts[0]}
    return Batch(prompt_len=p, extras=[e for b in batches for e in b.extras], **cat)
