"""The job spec: one pydantic model shared by `rlhf train`, `python -m orchestrator.entrypoints.run`
(what `ray job submit` runs) and `POST /v1/jobs`.

It is validated once and never mutated afterwards (`frozen=True`). Unknown fields are an
error that names the field's path (`extra="forbid"`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from orchestrator.core import plan
from orchestrator.core.algorithms import (
    ALGORITHMS,
    BUILTIN_REWARDS,
    ROLLOUT_BACKENDS,
    Algorithm,
)
from orchestrator.core.environments import ENVIRONMENTS, IMPORT_PATH
from orchestrator.core.storage import is_url

API_VERSION = "rlhf/v1"
STAGE_REF = "stage:"  # `rewards[].model: "stage:NAME"`: the reward model an earlier stage of the job trains


def _depth(value: Any, limit: int) -> int:
    """How deep `value` nests, counted up to `limit + 1`: it never descends further, since JSON from a
    tenant may nest deeper than Python's recursion limit."""
    if limit < 0 or not isinstance(value, (dict, list)):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in children), default=0)


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` from a tenant: at most 16 KiB of JSON, nested at most 4 deep."""
    if _depth(value, 4) > 4:  # (first: a deeper value would not even serialise)
        raise ValueError("at most 16 KiB of JSON nested at most 4 deep (got more than 4 deep)")
    size = len(json.dumps(value, default=str))
    if size > 16384:
        raise ValueError(f"at most 16 KiB of JSON nested at most 4 deep (got {size} bytes)")
    return value


class SpecError(ValueError):
    """A job spec that does not validate; the message names each field at fault."""

    def __init__(self, message: str, errors: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.errors = errors or []


class _Strict(BaseModel):
    # No NaN or infinity anywhere (JSON parsers accept `NaN`), and every number below has a finite range.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class AlgorithmSpec(_Strict):
    name: Literal[tuple(ALGORITHMS)] = Field(  # type: ignore[valid-type]
        "grpo",
        description="Training algorithm: " + ", ".join(f"`{a.name}` ({a.description})" for a in ALGORITHMS.values()) + ".",
    )
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp", "gae"] | None = Field(
        None,
        description="Advantage estimator. Defaults to `grpo` for GRPO and `gae` for PPO. "
        "`gae` needs a critic, so it is only valid with `ppo`.",
    )
    norm_adv_by_std: bool = Field(
        True, description="GRPO only: divide group-centred rewards by the group std (false gives Dr. GRPO's scaling)."
    )
    adv_std_eps: float = Field(
        1e-6, gt=0, le=1, description="GRPO with `norm_adv_by_std` only: the eps of A = (r - mean) / (std + eps), which "
        "bounds the advantages of a group whose rewards barely differ. 1e-6 as verl; TRL's GRPOTrainer uses 1e-4."
    )
    loss_type: Literal["sigmoid", "ipo", "hinge"] = Field(
        "sigmoid",
        description="`dpo` only: `sigmoid` (DPO, Rafailov et al. 2023), `ipo` (Azar et al. 2023; on length-averaged "
        "log-probs, as TRL) or `hinge` (SLiC, Zhao et al. 2023). See orchestrator/core/algos.py `dpo_loss`.",
    )
    beta: float = Field(
        0.1, gt=0, le=1e4, description="`dpo` only: strength of the implicit KL to the reference: the scale of the log-ratio margin "
        "(sigmoid, hinge) or the inverse of IPO's target margin 1 / (2 beta)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="`dpo` with `loss_type: sigmoid` only: the probability that a preference label is "
        "flipped (conservative DPO, Mitchell 2023, as earlier TRL releases' `sigmoid`); 0 is plain DPO. Not TRL 1.16's: its "
        "`sigmoid` loss ignores `label_smoothing` (only its `robust`, `exo_pair` and `aot` losses read it)."
    )

    @property
    def estimator(self) -> str:
        return self.advantage_estimator or ALGORITHMS[self.name].default_estimator or "grpo"

    @model_validator(mode="after")
    def _gae_needs_critic(self) -> "AlgorithmSpec":
        if self.advantage_estimator == "gae" and not ALGORITHMS[self.name].critic:
            raise ValueError("advantage_estimator 'gae' needs a critic: use algorithm.name 'ppo'")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing smooths the sigmoid loss's labels: it does not apply to loss_type '{self.loss_type}'")
        return self


class LoraSpec(_Strict):
    rank: int = Field(16, gt=0, le=4096, description="Rank r of each adapter (B: out x r, A: r x in).")
    alpha: float = Field(32.0, gt=0, le=1e6, description="Scale: the adapter adds (alpha / rank) * B A to each weight.")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] | Literal["all-linear"] = Field(
        "all-linear", min_length=1, max_length=64, description="Linear layers that get adapters, by name suffix "
        "(`[q_proj, v_proj]`), or every linear layer but the output head (`all-linear`)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input.")
    critic: bool = Field(True, description="PPO: the critic gets adapters too (same rank, alpha and targets; its value "
                         "head trains whole); false trains the whole critic.")


class ModelSpec(_Strict):
    path: str = Field(..., min_length=1, max_length=4096, description="Local directory (`save_pretrained` layout) or hub id of the policy model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype of every role.")
    trust_remote_code: bool = Field(
        False, description="Allow the policy's repository code (`model.path`'s) to run. It is also the default of every "
        "other model's own flag (`critic_trust_remote_code`, `rm_trust_remote_code`, `rewards[].trust_remote_code`); over "
        "REST each model's is allowed only where the registry entry of that model allows it."
    )
    critic_path: str | None = Field(None, description="PPO: model for the critic's backbone (default: the policy's).")
    critic_trust_remote_code: bool | None = Field(
        None, description="Allow `critic_path`'s repository code to run (default: `trust_remote_code`)."
    )
    rm_path: str | None = Field(
        None, description="`rm`: model whose backbone the reward model is trained from, with its own tokenizer (default: the "
        "model the stage starts from: the policy, e.g. the SFT stage's)."
    )
    rm_trust_remote_code: bool | None = Field(None, description="Allow `rm_path`'s repository code to run (default: `trust_remote_code`).")
    lora: LoraSpec | None = Field(
        None, description="Train LoRA adapters (peft) instead of every weight of the policy: only the adapters have "
        "gradients and optimizer state; the reference is the trainer's own frozen base (adapters off: no reference actor, "
        "no second copy of the weights); rollouts get the merged weights; checkpoints hold the adapters (`policy_adapter/`) "
        "and the merged model in HF layout (`policy/`). Unset: full fine-tuning."
    )

    @model_validator(mode="after")
    def _trust_names_a_model(self) -> ModelSpec:
        for path, flag in (("critic_path", "critic_trust_remote_code"), ("rm_path", "rm_trust_remote_code")):
            if getattr(self, flag) is not None and getattr(self, path) is None:
                raise _field_error((flag,), f"is the trust of model.{path}, which is not set (the policy's is trust_remote_code)")
        return self

    @property
    def critic_trust(self) -> bool:
        """Whether the critic's model may run its repository's code (without `critic_path` it is the policy's model)."""
        return self.trust_remote_code if self.critic_trust_remote_code is None else self.critic_trust_remote_code

    @property
    def rm_trust(self) -> bool:
        """Whether `rm_path`'s model may run its repository's code."""
        return self.trust_remote_code if self.rm_trust_remote_code is None else self.rm_trust_remote_code


class DataSpec(_Strict):
    train_file: str = Field(
        ...,
        description="Training prompts: a JSONL or Parquet file, or a directory written by `datasets.save_to_disk`. "
        "Each row has a `prompt` (a string or a list of chat messages); other columns reach the reward functions. "
        "SFT rows also have a `completion`, or instead a chat `messages` list. Preference rows (`rm`, `dpo`) have "
        "`chosen` and `rejected` completions (strings or assistant messages) with an explicit `prompt`, or without one, "
        "the prompt being their shared start (TRL's implicit prompt); an optional numeric `margin` (`rm`).",
    )
    eval_file: str | None = Field(
        None, description="Optional held-out data, same format as `train_file`: prompts whose greedy completions the rewards "
        "score, or for `rm` and `dpo` preference pairs (held-out pairwise accuracy, `eval/accuracy` and `eval/rewards/accuracies`)."
    )
    prompt_key: str = Field("prompt", description="Column that holds the prompt.")
    completion_key: str = Field("completion", description="SFT: column that holds the target completion (a string or assistant messages).")
    messages_key: str = Field(
        "messages", description="SFT: column that holds a whole chat (used instead of prompt/completion when present); loss on assistant turns only."
    )
    max_completion_length: int = Field(
        256, gt=0, le=1 << 20, description="SFT, `rm`, `dpo`: longest completion in tokens (EOS included); longer ones are cut (or see `overlong_prompt`)."
    )
    max_prompt_length: int = Field(128, gt=0, le=1048576, description="Longest prompt in tokens.")
    overlong_prompt: Literal["truncate_left", "drop", "error"] = Field(
        "truncate_left",
        description="What to do with a prompt longer than `max_prompt_length`: keep its last tokens, drop the row, "
        "or fail with the row's line number.",
    )
    shuffle: bool = Field(True, description="Shuffle prompts each epoch (seeded by `optim.seed`).")


class ImportanceSamplingSpec(_Strict):
    enabled: bool = Field(False, description="Weight each token's policy loss by min(pi_trainer / pi_rollout, cap) (TIS).")
    cap: float = Field(2.0, ge=1, le=1e6, description="Truncation C of the importance weight.")


class OffPolicySpec(_Strict):
    """The correction of asynchronous training (`rollout.max_staleness` >= 1) for samples drawn by
    older weights: AReaL's decoupled PPO loss weights each token by pi_prox / pi_behav (the update's
    starting weights over the weights that drew it; orchestrator/core/algos.py `off_policy_correction`)."""

    enabled: bool = Field(True, description="Weight the policy loss by the importance ratio pi_prox / pi_behav of stale "
                          "samples (async only; at max_staleness 0 every sample is on-policy and `importance_sampling` applies).")
    level: Literal["token", "sequence", "geometric"] = Field(
        "token", description="Ratio per token, per sample (the product of its tokens'), or per sample as the geometric mean "
        "(length-normalised). `token`: as AReaL's decoupled loss.")
    tis_cap: float | None = Field(
        2.0, ge=1, le=1e6, description="Truncation C of the weight, min(r, C) (Yao et al. 2025's token-level TIS uses C = 2, as "
        "`importance_sampling.cap`); null: untruncated.")
    mask_band: tuple[float, float] | None = Field(
        None, description="[lo, hi]: tokens (samples, at the sequence levels) whose ratio leaves the band get no gradient "
        "(MIS / IcePop's [0.5, 5]). Off by default: at a staleness of 1-2 versions the ratios stay near 1, and masking "
        "drops gradient that truncation already bounds.")

    @model_validator(mode="after")
    def _band(self) -> OffPolicySpec:
        if self.mask_band is not None and not 0 <= self.mask_band[0] < 1 < self.mask_band[1]:
            raise _field_error(("mask_band",), "needs 0 <= lo < 1 < hi (a band around ratio 1)")
        return self


class SandboxSpec(_Strict):
    actors: int | None = Field(
        None, ge=0, le=256, description="Sandbox actors (workers/sandbox.py), a `sandbox` role in the job's placement group "
        "that every trajectory's code runs on. Unset: 2 for an environment that runs code (`python_calculator`), else none.")
    num_cpus: float = Field(0.25, gt=0, le=64, description="CPUs each sandbox actor asks Ray for.")
    cpu_s: int = Field(5, gt=0, le=3600, description="CPU seconds per call (RLIMIT_CPU).")
    wall_s: float = Field(10.0, gt=0, le=3600, description="Wall-clock seconds per call before its process group is killed.")
    memory_mb: int = Field(512, ge=16, le=65536, description="Address space per call (RLIMIT_AS).")


class AgentSpec(_Strict):
    environment: str = Field(
        ..., min_length=1, max_length=300,
        description=f"The environment, by name ({', '.join(f'`{n}`' for n in ENVIRONMENTS)}; docs/agents.md), or, from "
        "the trusted entrypoints only (`rlhf train`, `ray job submit`), an import path `pkg.module:Class`. Over REST: "
        "a built-in name only.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the environment's constructor.")
    max_turns: int = Field(4, ge=1, le=256, description="Model turns per episode; an episode still going after them is truncated.")
    max_tokens: int = Field(
        512, ge=2, le=1048576, description="Tokens of the whole trajectory (opening, generated and appended); each turn "
        "generates at most `rollout.max_new_tokens` of what is left.")
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec, description="Where the environment's code runs.")

    @field_validator("environment")
    @classmethod
    def _known(cls, value: str, info: ValidationInfo) -> str:
        registered = (info.context or {}).get("environments") or {}  # the operator's, over REST (api/tenant_spec.py)
        if value not in ENVIRONMENTS and value not in registered and not re.match(IMPORT_PATH, value):
            raise ValueError(f"unknown environment {value!r}: built in: {', '.join(sorted(ENVIRONMENTS))}"
                             + (f"; registered: {', '.join(sorted(registered))}" if registered else "")
                             + "; or an import path 'pkg.module:Class' (trusted entrypoints only)")
        return value

    @field_validator("kwargs")
    @classmethod
    def _bounded_kwargs(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        entry = ENVIRONMENTS.get(info.data.get("environment", ""))
        if entry is not None and entry.kwargs is not None and set(value) - set(entry.kwargs):
            raise ValueError(f"{', '.join(sorted(set(value) - set(entry.kwargs)))}: not a keyword argument of the {entry.name} "
                             f"environment (it takes {', '.join(entry.kwargs) or 'none'})")
        return _bounded_json(value)

    @property
    def sandbox_actors(self) -> int:
        """The sandbox actors the job starts (`sandbox.actors`, or 2 for a built-in environment that runs code)."""
        if self.sandbox.actors is not None:
            return self.sandbox.actors
        entry = ENVIRONMENTS.get(self.environment)
        return 2 if entry is not None and entry.sandbox else 0


class RolloutSpec(_Strict):
    backend: Literal[tuple(ROLLOUT_BACKENDS)] = Field(  # type: ignore[valid-type]
        "hf", description="Generation engine: `hf` (transformers `generate`) or `vllm`."
    )
    n: int = Field(4, ge=1, le=4096, description="Completions sampled per prompt (the GRPO group size).")
    max_new_tokens: int = Field(32, gt=0, le=1048576, description="Longest completion in tokens.")
    temperature: float = Field(1.0, gt=0, le=100, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    tensor_parallel_size: int = Field(1, ge=1, le=1024, description="vLLM only: GPUs per engine.")
    weight_sync: Literal["auto", "object_store", "shared_memory", "nccl", "cuda_ipc"] = Field(
        "auto",
        description="How the trainer's weights reach the rollouts after each update. `auto`: `shared_memory` "
        "(one /dev/shm file the engines compute from) when the trainer and every rollout are on one node's CPU, "
        "`cuda_ipc` (vLLM, colocated on GPUs), `nccl` (vLLM on GPUs), else `object_store` (Ray's, any placement).",
    )
    importance_sampling: ImportanceSamplingSpec = Field(
        default_factory=ImportanceSamplingSpec,
        description="Truncated importance-sampling correction for the gap between the engine's and the trainer's log-probs.",
    )
    max_staleness: int = Field(
        0, ge=0, le=64, description="Asynchronous training: rollout actors generate while the trainer updates, and no sample "
        "trained on comes from weights more than this many updates behind (its oldest token's). 0: the synchronous loop "
        "(generate, score, update, sync), unchanged. 1 is one-step-off: the next step's generation overlaps this update (docs/async.md).")
    chunk_tokens: int = Field(
        16, gt=0, le=1048576, description="Async only: tokens generated per chunk of a partial rollout; weights are loaded "
        "between chunks, so a long completion does not hold an update back (its tokens carry their versions).")
    off_policy: OffPolicySpec = Field(
        default_factory=OffPolicySpec, description="Async only: importance weighting and masking of stale samples.")
    dynamic_sampling: bool = Field(
        False, description="Async only: DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476): a group whose `n` "
        "samples all scored the same has no advantage to learn from; it is dropped and another prompt drawn in its place "
        "(from the next epoch's order once this one runs out), so every step trains prompts_per_step groups.")
    agent: AgentSpec | None = Field(
        None, description="Multi-turn rollouts (docs/agents.md): each of the `n` samples of a prompt is an episode of an "
        "`environment` (a data row opens it) of at most `max_turns` model turns and `max_tokens` tokens, with the tool calls "
        "the model writes run and their results appended (masked out of the loss); the episode's return is its score, "
        "to which the job's `rewards`, if any, add. Fields: `environment`, `kwargs`, `max_turns`, `max_tokens`, "
        "`sandbox.{actors, num_cpus, cpu_s, wall_s, memory_mb}`. Either backend (on `vllm`, not an environment that runs its own agent on the chat endpoint). Unset: one completion per sample.",
    )


class RewardSource(_Strict):
    function: str | None = Field(
        None,
        description=f"A built-in reward ({', '.join(f'`{name}`' for name in BUILTIN_REWARDS)}) or an import path "
        "`pkg.module:fn` called as `fn(prompts, completions, **columns) -> list[float]`.",
    )
    model: str | None = Field(
        None, description="Path of a sequence-classification reward model (one logit), or `stage:NAME`: the reward model "
        "that the earlier `rm` stage NAME of this pipeline trains (its final checkpoint's `reward_model/`)."
    )
    trust_remote_code: bool | None = Field(
        None, description="`model` only: allow the reward model's repository code to run (default: `model.trust_remote_code`). "
        "A `stage:NAME` reward model has the trust of the model its stage trains from."
    )
    name: str | None = Field(None, description="Name in metrics (`rewards/<name>/mean`); defaults to the function's or model's name.")
    weight: float = Field(1.0, ge=-1e6, le=1e6, description="Weight of this source in the summed reward.")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for the function.")

    @field_validator("kwargs")
    @classmethod
    def _bounded_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _bounded_json(value)

    @model_validator(mode="after")
    def _one_source(self) -> "RewardSource":
        if (self.function is None) == (self.model is None):
            raise ValueError("give exactly one of 'function' or 'model'")
        if self.trust_remote_code is not None and (self.function is not None or self.stage):
            what = "a function" if self.function is not None else "a stage's reward model, which has the trust of the model its stage trains from"
            raise _field_error(("trust_remote_code",), f"is a reward model's; this source is {what}")
        return self

    @property
    def stage(self) -> str | None:
        """The stage whose reward model this source names (`model: "stage:NAME"`), if any."""
        return self.model[len(STAGE_REF) :] if self.model and self.model.startswith(STAGE_REF) else None

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.stage:
            return self.stage
        if self.function:
            return self.function.rsplit(":", 1)[-1]
        return Path(self.model).name or "model"


class OptimSpec(_Strict):
    lr: float = Field(1e-6, gt=0, le=10, description="Policy learning rate (AdamW).")
    critic_lr: float = Field(1e-5, gt=0, le=10, description="PPO: critic learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, le=100, description="AdamW weight decay.")
    steps: int | None = Field(None, gt=0, le=10000000, description="Training steps (one step = one batch of prompts, examples or pairs). Set this or `epochs`.")
    epochs: int | None = Field(None, gt=0, le=100_000, description="Passes over the training prompts, if `steps` is not set.")
    prompts_per_step: int = Field(
        8, gt=0, le=10000000, description="Prompts per step; each gives `rollout.n` samples. `sft`: examples per step; `rm`, `dpo`: preference pairs per step."
    )
    mini_batch_size: int | None = Field(
        None, gt=0, le=10000000, description="Samples per optimiser step (default: the whole step's samples, i.e. on-policy)."
    )
    micro_batch_size: int | None = Field(
        None, gt=0, le=10000000, description="Samples (`rm`, `dpo`: pairs) per forward/backward; gradients accumulate up to `mini_batch_size`."
    )
    micro_batch_tokens: int | None = Field(
        None, gt=0, le=1_000_000_000, description="Token budget of one forward/backward of the trainer, critic and reference "
        "(RL algorithms): the samples are sorted by length and cut so that rows x (longest prompt + longest response) stays "
        "within it, each micro-batch trimmed of the padding it does not need, so that padding does not dominate the compute "
        "when completion lengths vary. Same loss and gradients as unpacked. Replaces `micro_batch_size` for these roles."
    )
    gradient_checkpointing: bool = Field(
        False, description="Activation checkpointing for the trainer and critic: activations are recomputed in the backward "
        "pass instead of kept, for less memory at about a third more compute."
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="`bf16`: the trainer's and critic's forward and backward run under bf16 autocast while weights, "
        "gradients and optimizer state stay fp32 (the master weights); log-probs are taken in fp32 from the logits. Unlike "
        "`model.dtype: bfloat16`, which holds the weights themselves in bf16."
    )
    ppo_epochs: int = Field(1, ge=1, le=1000, description="Passes over each step's samples.")
    clip_eps_low: float = Field(0.2, ge=0, le=100, description="Lower clip of the policy ratio: 1 - eps_low.")
    clip_eps_high: float = Field(0.2, ge=0, le=100, description="Upper clip of the policy ratio: 1 + eps_high (DAPO's clip-higher if > eps_low).")
    dual_clip: float | None = Field(None, gt=1, le=1e6, description="Dual-clip constant c > 1 bounding the loss for negative advantages.")
    kl_coef: float = Field(0.0, ge=0, le=1e6, description="KL penalty coefficient (0 = no reference model at all).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="KL estimator (http://joschu.net/blog/kl-approx.html).")
    kl_in: Literal["loss", "reward"] = Field("loss", description="Apply the KL penalty in the loss (GRPO) or in the token rewards (PPO).")
    entropy_coef: float = Field(0.0, ge=-1e6, le=1e6, description="Entropy bonus coefficient: the loss subtracts it times "
                                "the mini-batch's token mean of the entropy, whatever `loss_agg` is (as TRL's GRPOTrainer).")
    loss_agg: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "token-mean", description="How per-token losses (the policy term and the KL term) become one number, each "
        "normalised by the whole mini-batch's counts, whatever the micro-batches. `token-mean`: sum over tokens / tokens "
        "(TRL's `loss_type: dapo` at any gradient accumulation; TRL's `bnpo` only with one micro-batch, as `bnpo` averages "
        "each micro-batch's tokens). `seq-mean-token-mean`: each sequence's token mean, averaged over sequences (TRL's "
        "`grpo`). `seq-mean-token-sum-norm`: token sums / (sequences x `rollout.max_new_tokens`) (TRL's `dr_grpo`, with "
        "`max_completion_length`). Whatever this is, the entropy bonus and the `entropy` metric are the mini-batch's "
        "token mean and the `kl` metric the step's (TRL's, with one micro-batch)."
    )
    grad_clip: float | None = Field(1.0, gt=0, le=1e12, description="Max global gradient norm (null = no clipping).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount factor (GAE, REINFORCE++).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    value_clip: float | None = Field(0.2, gt=0, le=1e12, description="PPO: clip range of the value update (null = unclipped).")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed of data order, sampling and initialisation.")

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> "OptimSpec":
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set 'steps' or 'epochs', not both")
        return self


class RoleResources(_Strict):
    replicas: int = Field(1, ge=1, le=4096, description="Actors of this role (data-parallel ranks for the trainer).")
    num_cpus: float = Field(0.5, gt=0, le=1e6, description="CPUs reserved per actor in Ray's accounting.")
    num_gpus: float = Field(0.0, ge=0, le=1e6, description="GPUs per actor.")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Trainer, critic and reference (GRPO, PPO): how the role's replicas split the model. `ddp`: each "
        "holds all weights (and, trained, gradients and optimizer state), and gradients are summed across replicas. `fsdp`: "
        "PyTorch FSDP2 (`fully_shard`, per decoder layer) shards the parameters, gradients and optimizer state across the "
        "replicas (gloo on CPUs, NCCL on GPUs); only replica 0 reads the weights, the others are built empty and get their "
        "shards from it. Checkpoints add `policy_dcp/` or `critic_dcp/` (torch.distributed.checkpoint, reshardable to "
        "another replica count)."
    )


class ResourcesSpec(_Strict):
    rollout: RoleResources = Field(default_factory=RoleResources, description="Rollout (generation) actors.")
    trainer: RoleResources = Field(default_factory=RoleResources, description="Policy trainer actors (data parallel).")
    reference: RoleResources = Field(default_factory=RoleResources, description="Frozen reference model.")
    reward: RoleResources = Field(default_factory=RoleResources, description="Reward actor (see `reward_in`).")
    critic: RoleResources = Field(default_factory=RoleResources, description="PPO critic.")
    reward_in: Literal["auto", "driver", "actor"] = Field(
        "auto",
        description="Where the rewards are computed. `driver`: in the job's driver process, beside the reference and "
        "critic calls (as veRL computes function rewards), so the job starts no reward actor and a step makes one Ray "
        "call fewer; for functions only. `actor`: on a reward actor (`resources.reward`), which isolates reward code "
        "that is slow, holds much memory or may crash, and is where a reward model runs. `auto`: the driver when every "
        "reward source is a function, else an actor.",
    )
    rollout_in: Literal["auto", "trainer", "actor"] = Field(
        "auto",
        description="Where the completions are sampled (`grpo`, `ppo`, and `sft`'s held-out evaluation, with "
        "`rollout.backend: hf`). `trainer`: each policy trainer replica samples its share of the prompts with its own "
        "weights (veRL's hybrid engine, TRL's one process): no rollout actor starts, nothing is synced, and generate and "
        "update run in one process; the trainer asks for the rollout's CPUs as well as its own. A lone trainer replica "
        "with built-in reward functions and no reference or critic runs each whole step (sample, rewards, advantages, "
        "update) in one call, the rewards in its process. `actor`: rollout actors (`resources.rollout`), which get the "
        "weights after every update (`rollout.weight_sync`). `auto`: the trainer when trainer and rollouts are on the CPU, the trainer "
        "shards nothing (ddp), `rollout.weight_sync` is auto and the two roles have as many replicas; else actors.",
    )
    reference_in: Literal["auto", "trainer", "actor"] = Field(
        "auto",
        description="Where the reference log-probs are computed (`grpo`, `ppo` with `optim.kl_coef` > 0). `trainer`: each "
        "policy trainer replica keeps a frozen copy of the starting weights beside the trained ones and scores its share "
        "with it: no reference actor starts (one process and its start-up fewer), at the cost of a second copy of the "
        "weights in the trainer's memory. `actor`: reference actors (`resources.reference`). `auto`: the trainer when "
        "trainer and reference are on the CPU and neither shards its model (ddp); else actors. A LoRA policy's trainer is "
        "always its own reference (its frozen base, adapters off), with no copy.",
    )
    colocate: bool = Field(
        False,
        description="Put rollout, trainer, reference and critic replica i into one placement bundle (sharing its GPU) "
        "instead of separate ones.",
    )
    torch_threads: int | None = Field(
        None,
        gt=0,
        le=4096,
        description="Torch intra-op threads per actor. Default: all cores of the node, since the phases of a "
        "step run one after another (Ray would otherwise pin a 0.5-CPU actor to one thread). Under the control plane "
        "(a job submitted over REST), where quotas count declared CPUs, an actor's threads (and its OpenMP and MKL "
        "pools) are at most its role's `num_cpus`, rounded up; this field can only lower them there.",
    )


class CheckpointSpec(_Strict):
    every: int = Field(0, ge=0, le=10000000, description="Save every k steps (0 = only at the end).")
    dir: str | None = Field(None, description="Checkpoint directory (default: `<output_dir>/checkpoints`).")
    keep_last: int = Field(2, ge=1, le=10_000, description="Checkpoints kept; older ones are deleted.")


class FaultToleranceSpec(_Strict):
    call_timeout_s: float | None = Field(
        3600.0, gt=0, le=7 * 24 * 3600, description="Longest wait for one call on the job's actors (a phase of a step in every "
        "stage kind: generate, reward, reference, critic, update, weight sync; held-out evaluation; a checkpoint save or load) "
        "before the job fails with a `timeout` error naming the phase: a reward function, rollout or trainer that hangs ends "
        "the job instead of holding its resources forever (null: wait forever)."
    )
    start_timeout_s: float | None = Field(
        3600.0, gt=0, le=7 * 24 * 3600, description="Longest wait for the job's actors to start (each loads its model) "
        "before the job fails with a `timeout` error naming the roles; counted apart from `call_timeout_s`, so that a short "
        "call deadline does not have to cover loading a large model (null: wait forever)."
    )
    max_restarts: int = Field(
        3, ge=0, le=100, description="How many times the job recovers by itself, in all, from a lost process: an actor or its "
        "node that dies (the job tears down its actors and placement group, places them again and resumes from its last "
        "checkpoint, redoing the steps after it) and, under the control plane, a driver that dies (resubmitted to Ray with "
        "`--resume`, same job id). Each is a `restart` event naming what died; one more loss fails the job with it. "
        "Errors in the job itself (bad data, a reward that raises, a timeout) are not retried."
    )


class EvalSpec(_Strict):
    every: int = Field(0, ge=0, le=10000000, description="Evaluate on `data.eval_file` every k steps (0 = only at the end of each stage).")
    max_samples: int | None = Field(None, gt=0, le=10000000, description="Evaluate on the first N held-out prompts (default: all of them).")


# ---- experiment trackers (orchestrator/reporting/trackers.py logs to them from the driver)
class MlflowTrackerSpec(_Strict):
    tracking_uri: str | None = Field(
        None, min_length=1, description="MLflow tracking server (`http://mlflow:5000`) or store URI the driver logs to; unset: no MLflow."
    )
    experiment: str | None = Field(
        None, min_length=1, max_length=250, description="Experiment of the job's run (created if missing; default: the job's `name`)."
    )
    tags: dict[str, str] = Field(
        default_factory=dict, max_length=32, description="Extra run tags, beside `rlhf.job_id`, `rlhf.job_name`, `rlhf.tenant` and `rlhf.stage`."
    )


class WandbTrackerSpec(_Strict):
    project: str | None = Field(None, min_length=1, max_length=128, description="W&B project the job's run is logged to; unset: no W&B.")
    entity: str | None = Field(None, min_length=1, max_length=128, description="W&B entity (user or team; default: the API key's).")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="`offline`: the run is written under `<output_dir>/wandb` (upload it later with `wandb sync`); "
        "`online`: streamed to the W&B server (needs `WANDB_API_KEY` in the driver's environment).",
    )
    tags: list[str] = Field(
        default_factory=list, max_length=32, description="Extra run tags, beside `tenant:<tenant>` and `stage:<stage>`."
    )


class TrackersSpec(_Strict):
    tensorboard: bool = Field(False, description="Write TensorBoard event files (every step's metrics, the job's config) to `<output_dir>/tensorboard`.")
    mlflow: MlflowTrackerSpec = Field(default_factory=MlflowTrackerSpec, description="MLflow: one run per job.")
    wandb: WandbTrackerSpec = Field(default_factory=WandbTrackerSpec, description="Weights & Biases: one run per job.")
    timeout_s: float = Field(
        5.0, gt=0, le=60,
        description="Longest wait for a tracker's server per call. A tracker that fails or times out never fails or stalls "
        "the job: it logs from its own thread, the job gets a `warning` event, and the tracker is tried again 10 s later.",
    )


def _partial(model: type[BaseModel]) -> type[BaseModel]:
    """The same fields with the same constraints, all optional and unset: one section of a stage's override.

    Field errors in an override name their path (`stages.1.optim.lr`); cross-field rules are checked
    on the merged spec."""
    fields: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, _Strict):
            ann = _partial(ann)
        elif f.metadata:
            ann = Annotated.__class_getitem__((ann, *f.metadata))  # (Annotated[ann, *meta] needs Python 3.11)
        fields[name] = (ann | None, Field(None, description=f.description))
    return create_model(f"{model.__name__}Override", __base__=_Override, **fields)


class _Override(_Strict):
    """A stage's overrides: what was set, and only that, survives a dump (the launch file, the job
    record), so that the spec read back means what was submitted: a field left unset overrides
    nothing, where a dumped `null` would override the job's value."""

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler):
        return {k: v for k, v in handler(self).items() if k in self.model_fields_set}


class StageSpec(_Override):
    """One stage of a pipeline: overrides applied on top of the job's top-level sections."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$", description="Stage name, tagged on its events and metrics (`sft`, `grpo`).")
    algorithm: _partial(AlgorithmSpec) | None = Field(None, description="Overrides of `algorithm` for this stage.")
    data: _partial(DataSpec) | None = Field(None, description="Overrides of `data` for this stage.")
    rollout: _partial(RolloutSpec) | None = Field(None, description="Overrides of `rollout` for this stage.")
    rewards: list[RewardSource] | None = Field(None, description="This stage's reward sources (replace the job's).")
    optim: _partial(OptimSpec) | None = Field(None, description="Overrides of `optim` for this stage.")
    eval: _partial(EvalSpec) | None = Field(None, description="Overrides of `eval` for this stage.")
    checkpoint: _partial(CheckpointSpec) | None = Field(None, description="Overrides of `checkpoint` for this stage.")


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class JobSpec(_Strict):
    """A post-training job: what to train, on what, how, and where results go."""

    api_version: Literal["rlhf/v1"] = Field(API_VERSION, description="Spec schema version.")
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$", description="Job name (actor names, run dir).")
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec, description="Algorithm and advantage estimator.")
    model: ModelSpec = Field(..., description="Policy model.")
    data: DataSpec = Field(..., description="Prompt data.")
    rollout: RolloutSpec = Field(default_factory=RolloutSpec, description="Sampling.")
    rewards: list[RewardSource] = Field(
        default_factory=list, description="Weighted reward sources, summed. Needed by the algorithms that score completions "
        "(`grpo`, `ppo`; with `rollout.agent` the environment scores and these add to it) and by held-out prompts (`data.eval_file` of `grpo`, `ppo`, `sft`)."
    )
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimisation.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Placement of the roles.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Held-out evaluation: greedy completions of `data.eval_file` scored by the rewards.")
    stages: list[StageSpec] | None = Field(
        None,
        description="A pipeline: stages run in order as one job, each starting from the previous stage's final "
        "checkpoint and overriding the top-level sections (e.g. `sft` then `grpo`). Absent: one stage, the spec itself.",
    )
    trackers: TrackersSpec = Field(default_factory=TrackersSpec, description="Experiment trackers the driver logs every step's metrics and the job's config to.")
    fault_tolerance: FaultToleranceSpec = Field(default_factory=FaultToleranceSpec, description="What the driver does about phases that hang.")
    output_dir: str | None = Field(None, description="Run directory for metrics, events and checkpoints (default: `runs/<name>`).")

    @model_validator(mode="after")
    def _consistent(self) -> "JobSpec":
        plan.check_weight_sync(self)  # (the placement rules live in core/plan.py)
        agent = self.rollout.agent if self.algo.rollouts else None  # (a pipeline's SFT stage ignores the job's agent)
        entry = ENVIRONMENTS.get(agent.environment) if agent is not None else None
        if entry is not None and entry.chat_endpoint and self.rollout.backend != "hf":
            raise _field_error(("rollout", "agent", "environment"), f"{entry.name} runs its own agent on the job's chat endpoint, which "
                               f"serves the transformers model: use rollout.backend hf, not {self.rollout.backend}")
        if not self.rewards and self.scores_with_rewards and self.stages is None and agent is None:  # (a pipeline's stages are checked one by one)
            what = "completions" if self.algo.rollouts else "held-out prompts' completions (data.eval_file)"
            raise _field_error(("rewards",), f"{self.algorithm.name} scores its {what} with the rewards: give at least one reward source")
        try:
            plan.check_placement(self)
        except plan.PlacementError as err:
            raise _field_error(err.loc, str(err)) from None
        for role in ("rollout", "reward"):
            if getattr(self.resources, role).strategy != "ddp":
                raise _field_error(("resources", role, "strategy"), "the trainer's, critic's and reference's replicas shard "
                                   f"their model (fsdp), not the {role}'s")
        for role in self.sharded_roles:
            if not self.algo.rollouts:
                raise _field_error(("resources", role, "strategy"), f"fsdp shards the roles of an RL algorithm (grpo, ppo); "
                                   f"not yet {self.algorithm.name}'s (use ddp)")
            if any(is_url(d) for d in (self.output_dir, self.checkpoint.dir) if d) and role != "reference":
                raise _field_error(("resources", role, "strategy"), "fsdp writes each replica's shards to one shared "
                                   "filesystem: output_dir and checkpoint.dir must be local paths, not URLs")
            if self.samples_per_step < getattr(self.resources, role).replicas:
                raise _field_error(("resources", role, "replicas"), f"every fsdp replica takes part in each forward: "
                                   f"{getattr(self.resources, role).replicas} replicas need at least as many samples per step "
                                   f"(prompts_per_step * rollout.n = {self.samples_per_step})")
            if self.model.lora and (role == "trainer" or (role == "critic" and self.model.lora.critic)):
                raise _field_error(("resources", role, "strategy"), "fsdp with model.lora is not supported yet: the adapters are small; use ddp")
        if self.model.lora and self.algo.produces != "policy":
            raise _field_error(("model", "lora"), f"{self.algorithm.name} trains a reward model: LoRA applies to a policy")
        if not self.algo.rollouts:
            if self.optim.micro_batch_tokens:
                raise _field_error(("optim", "micro_batch_tokens"), f"{self.algorithm.name} keeps its pairs or examples whole: "
                                   "a token budget applies to RL algorithms; use optim.micro_batch_size")
            if self.optim.prompts_per_step % self.resources.trainer.replicas:
                raise ValueError(f"optim.prompts_per_step (the {self.algorithm.name} batch) must be divisible by resources.trainer.replicas")
            return self
        samples = self.optim.prompts_per_step * self.rollout.n
        if self.rollout.max_staleness:
            self._check_async(samples)
        elif self.rollout.dynamic_sampling:
            raise _field_error(("rollout", "dynamic_sampling"), "dropping zero-spread groups and drawing more prompts is done "
                               "by the asynchronous loop's buffer: set rollout.max_staleness >= 1")
        mb = self.optim.mini_batch_size or samples
        if samples % mb:
            raise ValueError(f"optim.mini_batch_size ({mb}) must divide the step's samples ({samples} = prompts_per_step * rollout.n)")
        if mb % self.resources.trainer.replicas:
            raise ValueError(f"optim.mini_batch_size ({mb}) must be divisible by resources.trainer.replicas")
        micro = self.optim.micro_batch_size
        if micro and (mb // self.resources.trainer.replicas) % micro:
            raise ValueError("optim.micro_batch_size must divide the per-replica mini-batch")
        if self.algo.critic and mb % self.resources.critic.replicas:
            raise ValueError(f"optim.mini_batch_size ({mb}) must be divisible by resources.critic.replicas")
        if self.algorithm.estimator in ("grpo", "dr_grpo", "rloo") and self.rollout.n < 2:
            raise ValueError(f"advantage_estimator '{self.algorithm.estimator}' compares samples of a prompt: rollout.n must be >= 2")
        return self

    def _check_async(self, samples: int) -> None:
        """What `rollout.max_staleness` >= 1 needs (core/plan.py places its rollout in its own actor)."""
        if self.algorithm.name not in ("grpo", "ppo"):
            raise _field_error(("rollout", "max_staleness"), f"asynchronous training runs grpo and ppo; not {self.algorithm.name}")
        if self.rollout.dynamic_sampling and self.rollout.n < 2:
            raise _field_error(("rollout", "dynamic_sampling"), "a group of one sample always has zero spread: dynamic sampling "
                               "needs rollout.n >= 2")
        if self.rollout.backend == "vllm" and self.resources.colocate:
            raise _field_error(("rollout", "max_staleness"), "asynchronous training generates while the trainer updates: a vLLM "
                               "engine colocated with the trainer sleeps while it trains (set resources.colocate false)")
        if (self.optim.mini_batch_size or samples) != samples or self.optim.ppo_epochs != 1:
            raise _field_error(("rollout", "max_staleness"), "asynchronous training takes one optimiser step per step (optim."
                               "mini_batch_size unset, ppo_epochs 1): its decoupled loss's proximal policy is the update's starting weights")

    @model_validator(mode="after")
    def _stages_valid(self, info: ValidationInfo) -> "JobSpec":
        if self.stages is not None:
            names = [s.name for s in self.stages]
            if not names or len(set(names)) != len(names):
                raise ValueError(f"stages need at least one stage and distinct names, got {names}")
            self.__dict__["_environments"] = (info.context or {}).get("environments") or {}  # (the operator's, over REST)
            self.stage_specs()
        elif not (info.context or {}).get("stage"):
            for i, source in enumerate(self.rewards):
                if source.stage:
                    raise _field_error(("rewards", i, "model"), f"{source.model!r} names a stage, but the job has no stages")
        return self

    def stage_specs(self) -> list[tuple[str | None, "JobSpec"]]:
        """(stage name, the stage's own spec) for each stage; a spec without stages is one unnamed stage.

        Every stage shares the job's name, run directory and checkpoint directory; the model path of
        stage i > 0 is set when it starts (stage i-1's final checkpoint)."""
        if self.stages is None:
            return [(None, self)]
        # Built once per spec object (validation, placement and the pipeline all ask), kept beside the fields as a
        # cached_property would be: equality and dumps ignore it. A `model_copy` carries the original's, so they are
        # kept with the id of the spec they were built for.
        built = self.__dict__.get("_built_stage_specs")
        if built is None or built[0] != id(self):
            built = self.__dict__["_built_stage_specs"] = (id(self), self._build_stage_specs())
        return list(built[1])

    def _build_stage_specs(self) -> list[tuple[str, JobSpec]]:
        # Only the job spec's own sections (a subclass, e.g. the API's JobCreate, adds `metadata`).
        base = self.model_dump(exclude={"stages", *(set(type(self).model_fields) - set(JobSpec.model_fields))})
        out, rms = [], []  # rms: the earlier stages that train a reward model
        for i, stage in enumerate(self.stages):
            # A section given as null overrides nothing.
            override = {k: v for k, v in stage.model_dump(exclude_unset=True, exclude={"name"}).items() if v is not None}
            optim = override.get("optim", {})
            if "steps" in optim or "epochs" in optim:  # a stage's budget replaces the job's, in either unit
                override["optim"] = {"steps": None, "epochs": None, **optim}
            try:
                stage_spec = JobSpec.model_validate(_merge(base, override),
                                                    context={"stage": True, "environments": self.__dict__.get("_environments") or {}})
            except ValidationError as err:
                problems = "; ".join(".".join(str(p) for p in e["loc"]) + ": " * bool(e["loc"]) + e["msg"].removeprefix("Value error, ")
                                     for e in err.errors())
                raise ValueError(f"stages.{i} ({stage.name}): {problems}") from None
            for j, source in enumerate(stage_spec.rewards):
                if source.stage and source.stage not in rms:
                    raise ValueError(f"stages.{i} ({stage.name}): rewards.{j}.model: {source.model!r} names no earlier stage "
                                     f"that trains a reward model (earlier rm stages: {rms})")
            out.append((stage.name, stage_spec))
            if stage_spec.algo.produces == "reward_model":
                rms.append(stage.name)
        return out

    # Derived values, never stored back into the spec.
    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def checkpoint_dir(self) -> Path | str:
        """A local Path, or a URL string when `checkpoint.dir` is one (core/storage.py)."""
        if self.checkpoint.dir and "://" in self.checkpoint.dir and not self.checkpoint.dir.startswith("file://"):
            return self.checkpoint.dir.rstrip("/")
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"

    @property
    def algo(self) -> Algorithm:
        return ALGORITHMS[self.algorithm.name]

    @property
    def trained_model_trust(self) -> bool:
        """Whether `trained_model_path`'s model may run its repository's code."""
        return self.model.rm_trust if self.algo.produces == "reward_model" and self.model.rm_path else self.model.trust_remote_code

    @property
    def reward_sources(self) -> list[RewardSource]:
        """`rewards`, each reward model with its own trust decision spelled out (unset: `model.trust_remote_code`).
        Workers load a reward model with its source's flag alone; unset there means no remote code."""
        return [s.model_copy(update={"trust_remote_code": self.model.trust_remote_code})
                if s.model and not s.stage and s.trust_remote_code is None else s for s in self.rewards]

    @property
    def trained_model_path(self) -> str:
        """The model this stage's trainer starts from, whose tokenizer reads its data: `model.rm_path` for an
        `rm` stage that names one, else `model.path`."""
        return self.model.rm_path if self.algo.produces == "reward_model" and self.model.rm_path else self.model.path

    # Where each role and phase runs: the rules are core/plan.py's (`make_plan` puts them together); these ask them.
    @property
    def roles(self) -> list[str]:
        """The actors this (single-stage) spec starts, by role, in placement order (core/plan.py `roles`)."""
        return plan.roles(self)

    @property
    def scores_with_rewards(self) -> bool:
        """Whether this stage scores completions with `rewards` (its steps' rollouts, or held-out prompts')."""
        return plan.scores_with_rewards(self)

    @property
    def rewards_in_driver(self) -> bool:
        """Whether the rewards are computed in the driver's process, without a reward actor (`resources.reward_in`)."""
        return plan.rewards_in_driver(self)

    @property
    def rollouts_in_trainer(self) -> bool:
        """Whether the policy trainer replicas also sample the completions, with no rollout actor (`resources.rollout_in`)."""
        return plan.rollouts_in_trainer(self)

    @property
    def reference_in_trainer(self) -> bool:
        """Whether the policy trainers compute the reference log-probs, with no reference actor (LoRA, or `resources.reference_in`)."""
        return plan.reference_in_trainer(self)

    @property
    def reference_copy_in_trainer(self) -> bool:
        """Whether each policy trainer keeps a frozen copy of the starting weights as the reference (`resources.reference_in`)."""
        return plan.reference_copy_in_trainer(self)

    @property
    def steps_in_trainer(self) -> bool:
        """Whether a step is one call to the policy trainer (core/plan.py `steps_in_trainer`)."""
        return plan.steps_in_trainer(self)

    @property
    def needs_reference(self) -> bool:
        """Whether the step needs the reference policy's log-probs (from the reference actor, or a LoRA trainer)."""
        return plan.needs_reference(self)

    @property
    def needs_critic(self) -> bool:
        return self.algo.critic

    @property
    def sharded_roles(self) -> list[str]:
        """The roles whose replicas shard their model (`resources.<role>.strategy: fsdp`)."""
        return [r for r in ("trainer", "critic", "reference") if getattr(self.resources, r).strategy == "fsdp"]

    @property
    def samples_per_step(self) -> int:
        return self.optim.prompts_per_step * self.rollout.n


def _field_error(loc: tuple, message: str) -> ValidationError:
    """A cross-field rule's error, placed at the field it is about (so the API's `param` names it)."""
    return ValidationError.from_exception_data("JobSpec", [InitErrorDetails(type=PydanticCustomError("invalid_value", message), loc=loc, input=None)])


def format_validation_error(err: ValidationError, source: str = "spec") -> str:
    lines = [f"invalid job spec ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")
    return "\n".join(lines)


def parse_spec(data: Any, source: str = "spec") -> JobSpec:
    """Validate a dict into a JobSpec, raising SpecError whose message names each bad field."""
    if not isinstance(data, dict):
        raise SpecError(f"invalid job spec ({source}): expected a mapping at the top level, got {type(data).__name__}")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(format_validation_error(err, source), err.errors(include_url=False)) from None


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Read YAML or JSON into a dict, with the file and line in any syntax error."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as err:
        raise SpecError(f"{path}:{err.lineno}: invalid JSON: {err.msg}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None


def load_spec(path: str | Path) -> JobSpec:
    return parse_spec(read_spec_file(path), source=str(path))


def _type_name(ann: Any) -> str:
    import typing

    args = typing.get_args(ann)
    if typing.get_origin(ann) is Literal:
        return " / ".join(f"`{a}`" for a in args)
    if args and type(None) in args:  # Optional[X]
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " (optional)"
    if args:
        return str(ann).replace("typing.", "")
    return getattr(ann, "__name__", str(ann))


def reference_markdown() -> str:
    """The spec reference as a Markdown table, generated from the schema (docs/spec.md, between its spec-reference markers)."""
    rows = ["| field | type | default | description |", "| --- | --- | --- | --- |"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            path = f"{prefix}{name}"
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, path + ".")
                continue
            item = getattr(ann, "__args__", (None,))[0]
            is_list = getattr(ann, "__origin__", None) is list or getattr(item, "__origin__", None) is list
            if getattr(item, "__origin__", None) is list:  # list[StageSpec] | None
                item = item.__args__[0]
            if is_list and isinstance(item, type) and issubclass(item, BaseModel):  # list[RewardSource]
                default = "required" if field.is_required() else f"`{json.dumps(field.get_default(call_default_factory=True))}`"
                rows.append(f"| `{path}` | list | {default} | {field.description} |")
                walk(item, path + "[].")
                continue
            type_name = _type_name(ann)
            default = "required" if field.is_required() else f"`{json.dumps(field.get_default(call_default_factory=True), default=str)}`"
            desc = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{path}` | {type_name} | {default} | {desc} |")

    walk(JobSpec, "")
    return "\n".join(rows)
