"""What every role shares: loading a model, the response log-probs forward, threads and devices."""

from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from orchestrator.core import storage
from orchestrator.core.algos import entropy_from_logits, logprobs_from_logits
from orchestrator.core.batch import Batch, row_lengths, token_budget_groups


def _quiet_transformers() -> None:
    # Load reports and per-shard progress bars from every actor drown the job's own output.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _skip_unused_imports() -> None:
    # Where scikit-learn is installed (MLflow brings it), transformers imports it with its generation
    # code, for assisted decoding's candidate thresholds, which no role uses: 1.7 s of CPU at every
    # actor's start (8.1 -> 5.7 s for a reference actor here). SciPy (0.25 s) it imports for the
    # object-detection losses. Both stay importable by reward code.
    import transformers.utils
    import transformers.utils.import_utils

    if "transformers.generation.candidate_generator" not in sys.modules:
        transformers.utils.is_sklearn_available = transformers.utils.import_utils.is_sklearn_available = lambda: False
    if "transformers.loss.loss_for_object_detection" not in sys.modules:
        transformers.utils.is_scipy_available = transformers.utils.import_utils.is_scipy_available = lambda: False


_quiet_transformers()
_skip_unused_imports()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message names the path."""


# A model id the hub could hold: `name` or `owner/name` (huggingface_hub's repo-id rules, 96 characters at most).
_HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")
_OFF = ("1", "true", "yes", "on")


def hub_allowed() -> bool:
    """Whether a model may come from the hub: not when HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set."""
    return not any(os.environ.get(name, "").strip().lower() in _OFF for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def check_model_path(path: str, field: str = "model path", ask_hub: bool = False) -> None:
    """A ModelLoadError naming `field` and `path`, at once, unless `path` is a local directory, a URL,
    or a hub id the hub may be asked for. A missing path that can only be local (absolute, `./`, `~`,
    nested, under a local directory: `runs/x` when `runs/` is here; not a hub id) fails, as does any
    missing one with the hub off. With `ask_hub`, a hub id is asked for once (about 2 s with no network),
    not through transformers' retries (half a minute, ending in "check your internet connection")."""
    if storage.is_url(path) or os.path.isdir(path):
        return
    where = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(path):
        raise ModelLoadError(f"{field}={path!r} is a file ({where}), not a model directory")
    owner = path.split("/", 1)[0] if "/" in path else ""
    looks_local = (os.path.isabs(path) or path.startswith((".", "~")) or not _HUB_ID.match(path) or len(path) > 96
                   or "--" in path or ".." in path or (owner and os.path.isdir(owner)))
    if looks_local:
        raise ModelLoadError(f"{field}={path!r}: no such model directory ({where})")
    if not hub_allowed():
        raise ModelLoadError(f"{field}={path!r}: no such model directory ({where}), and the model hub is off (HF_HUB_OFFLINE)")
    missing = _not_on_hub(path) if ask_hub else None
    if missing:
        raise ModelLoadError(f"{field}={path!r}: no such model directory ({where}), and {missing}")


def _not_on_hub(repo_id: str) -> str | None:
    """Why the hub cannot give the model `repo_id`, or None if it has it."""
    from huggingface_hub import repo_exists

    try:
        return None if repo_exists(repo_id) else "the model hub has no model by that id"
    except Exception as err:  # noqa: BLE001 - any failure to ask is the answer: the hub cannot give it
        return f"the model hub cannot be asked for it ({type(err).__name__}: {err})"


def configure_threads(threads: int | None) -> int:
    """Set torch's intra-op threads; default to every core this process may use."""
    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def pick_device(num_gpus: float) -> torch.device:
    return torch.device("cuda") if num_gpus > 0 and torch.cuda.is_available() else torch.device("cpu")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_path(path, "model.path")
    try:
        tok = AutoTokenizer.from_pretrained(storage.local_copy(path), trust_remote_code=trust_remote_code)
    except Exception as err:
        raise ModelLoadError(f"cannot load tokenizer from model.path={path!r}: {type(err).__name__}: {err}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path: str, auto_class: str = "AutoModelForCausalLM", dtype: str = "float32", trust_remote_code: bool = False,
               device: torch.device | str = "cpu", shard_rank: int | None = None, **kwargs):
    """The model at `path` on `device`. A replica of a sharded role (`shard_rank`, workers/training.py)
    never puts the whole model on its device: rank 0 loads it on the CPU (sharding moves it to the
    device layer by layer and sends the other ranks their shards); the others build it from its
    config on the meta device, without weights."""
    import transformers

    cls = getattr(transformers, auto_class)
    check_model_path(path)
    try:
        if shard_rank:
            config = transformers.AutoConfig.from_pretrained(storage.local_copy(path), trust_remote_code=trust_remote_code, **kwargs)
            with torch.device("meta"):
                return cls.from_config(config, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
        model = cls.from_pretrained(storage.local_copy(path), dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **kwargs)
    except Exception as err:
        raise ModelLoadError(f"cannot load {auto_class} from {path!r}: {type(err).__name__}: {err}") from None
    return model if shard_rank == 0 else model.to(device)


def disable_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Every dropout layer off: an RL role's forward must be the same in its update as when it
    scored (eval mode), or on-policy ratios are not 1 and values are noisy (TRL and OpenRLHF do the same)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def response_logits(model, batch: Batch, temperature: float = 1.0) -> torch.Tensor:
    """Logits that predict each response token, scaled by 1/temperature: (b, R, vocab)."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        use_cache=False,
    )
    # The logit at position i predicts token i + 1.
    logits = out.logits[:, batch.prompt_len - 1 : -1]
    return logits / temperature if temperature != 1.0 else logits


def response_logprobs(model, batch: Batch, temperature: float = 1.0, with_entropy: bool = False, entropy_grad: bool = False):
    """(log-probs (b, R), entropy (b, R) or None) of the response tokens under `model`.

    The entropy carries gradients only with entropy_grad (an entropy bonus); as a mere metric it is
    computed without building its graph, as TRL does.
    """
    logits = response_logits(model, batch, temperature)
    logprobs = logprobs_from_logits(logits, batch.responses)
    entropy = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
    return logprobs, entropy


@torch.no_grad()
def batched_logprobs(model, batch: Batch, temperature: float, micro_batch_size: int | None, micro_batch_tokens: int | None = None,
                     rounds: Callable[[int], int] | None = None) -> torch.Tensor:
    """Response log-probs (b, R) of the whole batch, computed `micro_batch_size` rows or (with
    `micro_batch_tokens`) a token budget of rows of like length at a time (core/batch.py).
    `rounds(n)`: how many forwards to run for n micro-batches (a sharded model runs as many as its
    busiest rank: each forward is a collective); the extra ones repeat the last and are dropped."""
    if micro_batch_tokens:
        groups = [torch.tensor(rows, device=batch.input_ids.device) for rows in token_budget_groups(*row_lengths(batch), micro_batch_tokens)]
    else:
        size = micro_batch_size or len(batch)
        groups = [torch.arange(i, min(i + size, len(batch)), device=batch.input_ids.device) for i in range(0, len(batch), size)]
    out = torch.zeros(batch.response_mask.shape, dtype=torch.float32, device=batch.input_ids.device)
    for i in range(rounds(len(groups)) if rounds else len(groups)):
        index = groups[min(i, len(groups) - 1)]
        part = batch.select(index)
        logprobs = response_logprobs(model, part.trim() if micro_batch_tokens else part, temperature)[0]
        if i < len(groups):
            out[index, : logprobs.shape[1]] = logprobs
    return out


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A one-logit sequence classifier's score of each row: (b, L) -> (b,) float. transformers reads it at
    the last token that is not padding (left or right), so the rows may be padded either way."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False)
    return out.logits[:, 0].float()


@contextmanager
def timed(out: dict, key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        out[key] = out.get(key, 0.0) + time.perf_counter() - start


def cpu_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
