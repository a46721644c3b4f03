"""The plan of a job: what a validated spec means for placement, worked out once.

`make_plan(spec)` turns a validated `JobSpec` into one frozen `Plan`: per stage, the roles that
start (with what each actor asks Ray for, and its bundle), where each phase of a step runs
(rollout, reference, reward, update, critic), whether a step is one call to the trainer, the
weight-sync path, the placement group's bundles, and the stage's step range. `rlhf train --plan`
prints it without starting anything.

The placement rules live here and nowhere else: the spec's derived flags (`JobSpec.roles`,
`rollouts_in_trainer`, ...) and its validation call the functions below. So this module sits
beneath core/spec.py: it reads a spec's fields (duck-typed) and imports nothing of the project but
the algorithm table.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from orchestrator.core.algorithms import ALGORITHMS

COLOCATABLE = ("rollout", "trainer", "reference", "critic")  # the roles `resources.colocate` puts into one bundle per replica
PHASES = ("rollout", "reference", "reward", "update", "critic")


class PlacementError(ValueError):
    """A placement rule the spec breaks; `loc` is the field at fault (the spec raises it as that field's error)."""

    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc = loc


# ---- the rules, each on one stage's spec (a spec without `stages`, or one of `JobSpec.stage_specs()`)
def needed_roles(spec: Any) -> list[str]:
    """The roles the stage's algorithm needs, before the trainer or the driver takes any of them over."""
    return ALGORITHMS[spec.algorithm.name].roles(spec.optim.kl_coef, evaluates=spec.data.eval_file is not None)


def needs_reference(spec: Any) -> bool:
    return "reference" in needed_roles(spec)


def scores_with_rewards(spec: Any) -> bool:
    return "reward" in needed_roles(spec)


def rewards_in_driver(spec: Any) -> bool:
    where = spec.resources.reward_in
    return where == "driver" or (where == "auto" and all(s.function for s in spec.rewards))


def cannot_sample_in_trainer(spec: Any) -> str | None:
    """Why the policy trainer cannot sample the completions itself, if it cannot."""
    res, algo = spec.resources, ALGORITHMS[spec.algorithm.name]
    if not algo.rollouts and "rollout" not in needed_roles(spec):
        return f"{spec.algorithm.name} samples no completions each step, nor held-out prompts' (data.eval_file)"
    if spec.rollout.backend != "hf":
        return f"rollout.backend {spec.rollout.backend} runs its engines in rollout actors"
    if res.trainer.strategy != "ddp":
        return "an fsdp trainer holds only a shard of the weights"
    if spec.rollout.weight_sync != "auto":
        return f"rollout.weight_sync is {spec.rollout.weight_sync}, but nothing is synced"
    if max_staleness(spec):
        return "rollout.max_staleness >= 1 generates while the trainer updates: the rollout runs in its own actor"
    if res.rollout.replicas != res.trainer.replicas:
        return (f"resources.rollout.replicas ({res.rollout.replicas}) differs from resources.trainer.replicas "
                f"({res.trainer.replicas}), and each trainer replica samples its share")
    return None


def max_staleness(spec: Any) -> int:
    """`rollout.max_staleness` of an algorithm that samples each step (0: the synchronous loop)."""
    return spec.rollout.max_staleness if ALGORITHMS[spec.algorithm.name].rollouts else 0


def cannot_keep_reference(spec: Any) -> str | None:
    """Why the policy trainer cannot keep the reference model itself, if it cannot."""
    if spec.model.lora:
        return None  # (its frozen base is the reference already)
    if not ALGORITHMS[spec.algorithm.name].rollouts:
        return f"{spec.algorithm.name}'s trainer scores its pairs against a reference actor"
    if "fsdp" in (spec.resources.trainer.strategy, spec.resources.reference.strategy):
        return "a sharded (fsdp) trainer or reference holds only a shard of the weights"
    return None


def rollouts_in_trainer(spec: Any) -> bool:
    """Whether the policy trainer replicas also sample the completions, with no rollout actor (`resources.rollout_in`)."""
    res = spec.resources
    if res.rollout_in == "auto":
        return res.trainer.num_gpus == 0 and res.rollout.num_gpus == 0 and cannot_sample_in_trainer(spec) is None
    return res.rollout_in == "trainer"


def reference_copy_in_trainer(spec: Any) -> bool:
    """Whether each policy trainer keeps a frozen copy of the starting weights as the reference (`resources.reference_in`)."""
    res = spec.resources
    if spec.model.lora or not needs_reference(spec) or cannot_keep_reference(spec):
        return False
    return res.reference_in == "trainer" or (res.reference_in == "auto" and res.trainer.num_gpus == 0 and res.reference.num_gpus == 0)


def reference_in_trainer(spec: Any) -> bool:
    """Whether the policy trainers compute the reference log-probs: a LoRA policy's frozen base, or a kept copy."""
    return needs_reference(spec) and (bool(spec.model.lora) or reference_copy_in_trainer(spec))


def steps_in_trainer(spec: Any) -> bool:
    """Whether a step is one call to the policy trainer: a lone trainer replica that samples the
    completions, scored by built-in reward functions only, with no reference or critic in the step,
    also computes the rewards and advantages before its update (TRL's one process, without a Ray
    round trip per phase). Reward code from an import path stays in the driver, where a hang is
    named as the reward phase's."""
    builtin_rewards = all(s.function and ":" not in s.function for s in spec.rewards)  # (`pkg.module:fn` is an import path)
    algo = ALGORITHMS[spec.algorithm.name]
    return (algo.rollouts and rollouts_in_trainer(spec) and scores_with_rewards(spec) and rewards_in_driver(spec) and builtin_rewards
            and not needs_reference(spec) and not algo.critic and spec.resources.trainer.replicas == 1)


def agent(spec: Any) -> Any:
    """`rollout.agent` of an algorithm that samples each step (None: one completion per sample)."""
    return spec.rollout.agent if ALGORITHMS[spec.algorithm.name].rollouts else None


def rollout_mode(spec: Any) -> str:
    """`multi_turn`: each sample is an episode of `rollout.agent`'s environment (workers/agent_rollout.py),
    run where the rollout phase runs; `single_turn`: one completion per sample."""
    return "multi_turn" if agent(spec) is not None else "single_turn"


def sandbox_actors(spec: Any) -> int:
    """The `sandbox` role's actors: where a multi-turn environment's code runs (0: none)."""
    return agent(spec).sandbox_actors if agent(spec) is not None else 0


def roles(spec: Any) -> list[str]:
    """The actors the stage starts, by role, in placement order: a trainer that is its own reference
    (LoRA, or a kept copy) starts no reference actor, one that samples no rollout actor, and rewards
    computed in the driver no reward actor; a multi-turn environment that runs code adds sandbox actors."""
    dropped = {"reference"} if spec.model.lora or reference_copy_in_trainer(spec) else set()
    if rewards_in_driver(spec):
        dropped.add("reward")
    if rollouts_in_trainer(spec):
        dropped.add("rollout")
    return [r for r in needed_roles(spec) if r not in dropped] + (["sandbox"] if sandbox_actors(spec) else [])


@dataclass(frozen=True)
class _SandboxResources:
    """The sandbox role's resources, in the shape of `resources.<role>` (it has no section there)."""

    replicas: int
    num_cpus: float
    num_gpus: float = 0.0
    strategy: str = "ddp"


def role_resources(spec: Any, role: str) -> Any:
    """`resources.<role>`, or for the sandbox role what `rollout.agent.sandbox` asks for."""
    if role == "sandbox":
        return _SandboxResources(sandbox_actors(spec), agent(spec).sandbox.num_cpus)
    return getattr(spec.resources, role)


def sync_path(spec: Any) -> tuple[str, str]:
    """(method, reason): the weight-sync path `rollout.weight_sync` names, or the one `auto` picks from the
    placement, for a stage with rollout actors (orchestrator/runtime/weight_sync.py prepares it)."""
    res, vllm = spec.resources, spec.rollout.backend == "vllm"
    if spec.rollout.weight_sync != "auto":
        return spec.rollout.weight_sync, "set in the spec"
    if max_staleness(spec):
        return "object_store", "async: the trainer publishes each update, the rollout loads it between chunks"
    on_gpu = res.trainer.num_gpus > 0 and res.rollout.num_gpus > 0
    if on_gpu and vllm and not res.colocate:
        return "nccl", "vLLM engines on their own GPUs"
    if on_gpu and vllm and res.trainer.replicas == res.rollout.replicas:
        return "cuda_ipc", "each vLLM engine shares its GPU with a trainer rank"
    if res.trainer.num_gpus == 0 and res.rollout.num_gpus == 0:
        return "shared_memory", "trainer and rollouts on the CPU"
    return "object_store", "the rollouts are not vLLM engines on GPUs"


def one_at_a_time(spec: Any) -> bool:
    """Whether the stage's actors compute one at a time: one replica per role, no critic (its values and
    updates run beside the reference's and the trainer's) and no reward actor beside a reference."""
    res, started = spec.resources, roles(spec)
    if max_staleness(spec):  # the rollout generates while the trainer updates
        return False
    if "critic" in started or any(getattr(res, r).replicas > 1 for r in started if r not in ("reward", "sandbox")):
        return False
    scorers = [r for r in ("reward", "reference") if r in started] + (["trainer"] if reference_in_trainer(spec) else [])
    return len(scorers) <= 1


def check_weight_sync(spec: Any) -> None:
    """A ValueError if `rollout.weight_sync` names a path the placement cannot take."""
    res, sync = spec.resources, spec.rollout.weight_sync
    if sync in ("nccl", "cuda_ipc") and not (spec.rollout.backend == "vllm" and res.trainer.num_gpus > 0 and res.rollout.num_gpus > 0):
        raise ValueError(f"rollout.weight_sync {sync} needs rollout.backend vllm and GPUs for the trainer and the rollouts")
    if sync == "cuda_ipc" and not (res.colocate and res.trainer.replicas == res.rollout.replicas):
        raise ValueError("rollout.weight_sync cuda_ipc needs resources.colocate and as many trainer as rollout replicas "
                         "(each engine shares a GPU with one trainer rank)")
    if sync == "shared_memory" and max_staleness(spec):
        raise ValueError("rollout.weight_sync shared_memory: the rollouts compute from the file the trainer writes, which "
                         "would change under a chunk in flight; asynchronous training (rollout.max_staleness) uses object_store")
    if sync == "shared_memory" and (res.trainer.num_gpus > 0 or res.rollout.num_gpus > 0):
        raise ValueError("rollout.weight_sync shared_memory is for CPU trainers and rollouts (set num_gpus 0)")


def check_placement(spec: Any) -> None:
    """A PlacementError naming the field if `resources.reward_in`, `reference_in` or `rollout_in` asks for what cannot be."""
    res = spec.resources
    if res.reward_in == "driver" and (models := [i for i, s in enumerate(spec.rewards) if s.model]):
        raise PlacementError(("resources", "reward_in"), f"rewards.{models[0]} is a reward model, which runs on a reward "
                             "actor: use reward_in auto or actor")
    if res.reference_in == "trainer" and needs_reference(spec) and (why := cannot_keep_reference(spec)):
        raise PlacementError(("resources", "reference_in"), f"the trainer cannot keep the reference: {why}; use reference_in auto or actor")
    if res.rollout_in == "trainer" and (why := cannot_sample_in_trainer(spec)):
        raise PlacementError(("resources", "rollout_in"), f"the trainer cannot also be the rollout: {why}; use rollout_in auto or actor")


# ---- the plan
@dataclass(frozen=True)
class Bundle:
    """One bundle of the placement group."""

    cpu: float
    gpu: float = 0.0

    def as_ray(self) -> dict[str, float]:
        """As Ray's placement group takes it (no GPU key where none is asked for)."""
        return {"CPU": self.cpu, **({"GPU": self.gpu} if self.gpu else {})}


@dataclass(frozen=True)
class RolePlan:
    role: str
    replicas: int
    num_cpus: float  # what each actor asks Ray for inside its bundle (a trainer that samples or keeps the reference: theirs too)
    num_gpus: float  # (colocated roles time-share their bundle's GPU: each asks for its share)
    strategy: str  # ddp or fsdp
    slots: tuple[int, ...]  # the bundle of each replica
    also: tuple[str, ...] = ()  # the phases it runs besides its own (a trainer's: rollout, reference, reward)


@dataclass(frozen=True)
class WeightSyncPlan:
    method: str  # none, object_store, shared_memory, nccl or cuda_ipc (the one planned; shared memory that cannot be set up falls back)
    reason: str
    when: str  # "every step", or "before each evaluation" (a stage that samples only to evaluate)


@dataclass(frozen=True)
class LoopPlan:
    """How a step's phases follow each other. `sync`: generate, score, update, sync, one after the
    other (orchestrator/stages/driver.py). `async`: the rollout actor generates in chunks into a
    bounded buffer while the trainer updates, weights loaded between chunks, and no sample trained
    on is more than `max_staleness` updates old (orchestrator/stages/async_loop.py)."""

    kind: str  # sync or async
    max_staleness: int = 0
    chunk_tokens: int | None = None  # async: tokens per chunk of a partial rollout
    buffer_groups: int | None = None  # async: groups buffered or in flight at most, (k + 1) x prompts per step


SYNC_LOOP = LoopPlan("sync")


def _loop(spec: Any) -> LoopPlan:
    k = max_staleness(spec)
    if not k:
        return SYNC_LOOP
    return LoopPlan("async", k, spec.rollout.chunk_tokens, (k + 1) * spec.optim.prompts_per_step)


@dataclass(frozen=True)
class StagePlan:
    """One stage: what it starts and where each phase of its step runs. The driver, the role factories
    (orchestrator/stages/roles.py), placement and weight sync read it and nothing of the spec's placement.

    `phases` maps rollout, reference, reward, update and critic to where each runs: a role's actors
    ("rollout", "reference", "reward", "trainer", "critic"), "driver" (reward functions in the driver
    process), or None (the stage has no such phase). A new way to run a phase is a new value here,
    not a new flag. `first_step..last_step` are the stage's global step numbers (None until its data
    is read, for a stage counted in `epochs`: `Plan.with_epoch_steps`, `with_steps`)."""

    name: str | None  # None: the job has no stages
    index: int
    algorithm: str
    roles: tuple[RolePlan, ...]  # the actors it starts, in placement order
    phases: tuple[tuple[str, str | None], ...]  # (phase, where it runs: a role, "driver", or None: the stage has none)
    one_call_step: bool  # a step is one call to the lone trainer (`steps_in_trainer`)
    reference_copy: bool  # the trainer keeps a frozen copy of the weights as the reference
    weight_sync: WeightSyncPlan | None  # None: no rollout actor to sync
    bundles: tuple[Bundle, ...]
    driver_cpus: float  # what the driver asks for where it computes the rewards itself
    one_at_a_time: bool  # its actors compute one at a time (their OpenMP threads may spin: orchestrator/runtime/placement.py)
    steps: int | None  # optim.steps, or None: `epochs`, counted once the data is read
    epochs: int | None
    first_step: int | None  # global step numbers first_step..last_step (None until the steps are known)
    last_step: int | None
    loop: LoopPlan = SYNC_LOOP
    rollout_mode: str = "single_turn"  # or multi_turn: episodes of `rollout.agent`'s environment (`rollout_mode`)

    def where(self, phase: str) -> str | None:
        """Where `phase` runs: a role, "driver", or None."""
        return dict(self.phases)[phase]

    def with_steps(self, first_step: int, steps_per_epoch: int) -> StagePlan:
        """The stage with its step range from `first_step`, given its data's steps per epoch (`optim.steps`
        wins over `epochs`): the one place a stage's step count is worked out."""
        steps = self.steps or self.epochs * steps_per_epoch
        return replace(self, first_step=first_step, last_step=first_step + steps - 1)

    @property
    def cpus(self) -> float:
        """The CPUs of its placement group."""
        return sum(b.cpu for b in self.bundles)

    def role(self, name: str) -> RolePlan | None:
        return next((r for r in self.roles if r.role == name), None)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "index": self.index, "algorithm": self.algorithm,
                "roles": [{**r.__dict__, "slots": list(r.slots), "also": list(r.also)} for r in self.roles],
                "phases": dict(self.phases), "one_call_step": self.one_call_step, "reference_copy": self.reference_copy,
                "weight_sync": None if self.weight_sync is None else dict(self.weight_sync.__dict__),
                "bundles": [b.as_ray() for b in self.bundles], "driver_cpus": self.driver_cpus, "one_at_a_time": self.one_at_a_time,
                "steps": self.steps, "epochs": self.epochs, "first_step": self.first_step, "last_step": self.last_step,
                "loop": dict(self.loop.__dict__), "rollout_mode": self.rollout_mode}


@dataclass(frozen=True)
class Plan:
    """A job's plan: its stages in order (each a `StagePlan`, run one after another on its own
    placement group), the driver's CPUs and what the job holds at once. Frozen: built once per
    validated spec (`make_plan`); the step ranges are filled in once the data is read (`with_epoch_steps`)."""

    job: str
    stages: tuple[StagePlan, ...]
    driver_cpus: float  # the driver's CPUs (the Ray job's entrypoint_num_cpus): the most any stage asks for
    demand: tuple[Bundle, ...]  # what the job holds at once: its largest placement group, and its driver's CPUs

    @property
    def total_steps(self) -> int | None:
        return self.stages[-1].last_step

    def with_epoch_steps(self, steps_per_epoch: list[int]) -> Plan:
        """The plan with every stage's step range, given each stage's steps per epoch of its data
        (a stage with `optim.steps` keeps its own)."""
        stages, first = [], 1
        for stage, per_epoch in zip(self.stages, steps_per_epoch, strict=True):
            stages.append(stage.with_steps(first, per_epoch))
            first = stages[-1].last_step + 1
        return replace(self, stages=tuple(stages))

    def as_dict(self) -> dict[str, Any]:
        return {"job": self.job, "total_steps": self.total_steps, "driver_cpus": self.driver_cpus,
                "demand": [b.as_ray() for b in self.demand], "stages": [s.as_dict() for s in self.stages]}


def _asks(spec: Any) -> dict[str, dict[str, float]]:
    """What one actor of each started role asks Ray for: the role's resources, and for a trainer that is
    also the rollout or keeps the reference, their CPUs as well (the phases take turns on one device)."""
    res, out = spec.resources, {}
    for role in roles(spec):
        own = role_resources(spec, role)
        ask = {"num_cpus": own.num_cpus, "num_gpus": own.num_gpus}
        if role == "trainer":
            for other in [r for r, inside in (("rollout", rollouts_in_trainer(spec)), ("reference", reference_copy_in_trainer(spec))) if inside]:
                extra = getattr(res, other)
                ask = {"num_cpus": ask["num_cpus"] + extra.num_cpus, "num_gpus": max(ask["num_gpus"], extra.num_gpus)}
        out[role] = ask
    return out


def _bundles(spec: Any) -> tuple[list[Bundle], dict[str, list[int]], dict[str, dict[str, float]]]:
    """(bundles, each role's slots, each role's ask inside its bundle). Roles get separate bundles by default;
    with `resources.colocate`, replica i of rollout, trainer, reference and critic share bundle i (and its GPU,
    each taking a fraction). The reward actor always has its own bundle and one replica."""
    res, started, asks = spec.resources, roles(spec), _asks(spec)
    bundles: list[Bundle] = []
    slots: dict[str, list[int]] = {}
    shared = [r for r in started if r in COLOCATABLE] if res.colocate else []
    if shared:
        for i in range(max(getattr(res, r).replicas for r in shared)):
            members = [r for r in shared if i < getattr(res, r).replicas]
            bundles.append(Bundle(sum(asks[r]["num_cpus"] for r in members), max(asks[r]["num_gpus"] for r in members)))
            for r in members:
                slots.setdefault(r, []).append(len(bundles) - 1)
        for r in shared:
            if asks[r]["num_gpus"]:
                asks[r]["num_gpus"] = asks[r]["num_gpus"] / len(shared)  # colocated roles time-share the bundle's GPU
    for r in started:
        if r in shared:
            continue
        for _ in range(1 if r == "reward" else role_resources(spec, r).replicas):
            bundles.append(Bundle(asks[r]["num_cpus"], asks[r]["num_gpus"]))
            slots.setdefault(r, []).append(len(bundles) - 1)
    return bundles, slots, asks


def _phases(spec: Any) -> tuple[tuple[str, str | None], ...]:
    algo, needed = ALGORITHMS[spec.algorithm.name], needed_roles(spec)
    rollout = None if "rollout" not in needed else "trainer" if rollouts_in_trainer(spec) else "rollout"
    reference = None if not needs_reference(spec) else "trainer" if reference_in_trainer(spec) else "reference"
    reward = (None if not scores_with_rewards(spec) else "trainer" if steps_in_trainer(spec)
              else "driver" if rewards_in_driver(spec) else "reward")
    return (("rollout", rollout), ("reference", reference), ("reward", reward), ("update", "trainer"),
            ("critic", "critic" if algo.critic else None))


def _weight_sync(spec: Any) -> WeightSyncPlan | None:
    when = "every step" if ALGORITHMS[spec.algorithm.name].rollouts else "before each evaluation"
    if rollouts_in_trainer(spec):
        return WeightSyncPlan("none", "resources.rollout_in: the trainers are the rollouts", when)
    if "rollout" not in roles(spec):  # (a stage that samples nothing)
        return None
    return WeightSyncPlan(*sync_path(spec), when)


def plan_stage(spec: Any, name: str | None = None, index: int = 0, first_step: int | None = 1) -> StagePlan:
    """The plan of one stage's spec (its own sections: any `stages` it has are not read here)."""
    res = spec.resources
    bundles, slots, asks = _bundles(spec)
    also = {"rollout": rollouts_in_trainer(spec), "reference": reference_in_trainer(spec), "reward": steps_in_trainer(spec)}
    role_plans = tuple(
        RolePlan(r, len(slots[r]), asks[r]["num_cpus"], asks[r]["num_gpus"], role_resources(spec, r).strategy, tuple(slots[r]),
                 tuple(p for p, inside in also.items() if inside) if r == "trainer" else ())
        for r in roles(spec))
    steps = spec.optim.steps
    known = steps is not None and first_step is not None
    return StagePlan(
        name=name, index=index, algorithm=spec.algorithm.name, roles=role_plans, phases=_phases(spec),
        one_call_step=steps_in_trainer(spec), reference_copy=reference_copy_in_trainer(spec), weight_sync=_weight_sync(spec),
        bundles=tuple(bundles), driver_cpus=res.reward.num_cpus if scores_with_rewards(spec) and rewards_in_driver(spec) else 0.0,
        one_at_a_time=one_at_a_time(spec), steps=steps, epochs=spec.optim.epochs,
        first_step=first_step if known else None, last_step=first_step + steps - 1 if known else None, loop=_loop(spec),
        rollout_mode=rollout_mode(spec))


def make_plan(spec: Any) -> Plan:
    """The plan of a validated JobSpec (every stage of a pipeline), built once per spec object."""
    cached = spec.__dict__.get("_plan")  # (kept beside the fields, as JobSpec.stage_specs keeps its stages; a copy rebuilds)
    if cached is not None and cached[0] == id(spec):
        return cached[1]
    stages, first = [], 1
    for index, (name, stage_spec) in enumerate(spec.stage_specs()):
        stage = plan_stage(stage_spec, name, index, first)
        stages.append(stage)
        first = stage.last_step + 1 if stage.last_step is not None else None
    # Stages run one after another, each with its own placement group: the job holds the largest at once.
    largest = max((s.bundles for s in stages), key=lambda b: (sum(x.gpu for x in b), sum(x.cpu for x in b)))
    cpus = max((s.driver_cpus for s in stages), default=0.0)
    plan = Plan(spec.name, tuple(stages), cpus, tuple(largest) + ((Bundle(cpus),) if cpus else ()))
    spec.__dict__["_plan"] = (id(spec), plan)
    return plan


def describe(plan: Plan) -> str:
    """The plan as text, for `rlhf train --plan`."""
    total = plan.total_steps
    lines = [f"plan of job {plan.job}: {len(plan.stages)} stage{'s' * (len(plan.stages) > 1)}, "
             + (f"{total} steps" if total is not None else "steps known once the data is read (optim.epochs)")]
    for s in plan.stages:
        span = (f"steps {s.first_step}..{s.last_step}" if s.first_step is not None
                else f"{s.epochs} epochs" if s.steps is None else f"{s.steps} steps")
        lines.append(f"stage {s.index}{f' {s.name}' if s.name else ''} ({s.algorithm}): {span}")
        for r in s.roles:
            gpu = f", {r.num_gpus:g} GPU" if r.num_gpus else ""
            extra = f"; also {', '.join(r.also)}" if r.also else ""
            copy = " (a copy of the weights)" if r.role == "trainer" and s.reference_copy else ""
            lines.append(f"  {r.role}: {r.replicas} x ({r.num_cpus:g} CPU{gpu}), {r.strategy}, bundles {list(r.slots)}{extra}{copy}")
        lines.append("  phases: " + ", ".join(f"{p} on {w}" for p, w in s.phases if w)
                     + ("; rollout multi-turn (rollout.agent's episodes)" if s.rollout_mode == "multi_turn" else ""))
        lines.append(f"  step: {'one call to the trainer' if s.one_call_step else 'one call per phase'}")
        if s.loop.kind == "async":
            lines.append(f"  loop: async, max_staleness {s.loop.max_staleness}: the rollout generates in chunks of {s.loop.chunk_tokens} "
                         f"tokens while the trainer updates, weights loaded between chunks; buffer of {s.loop.buffer_groups} groups")
        else:
            lines.append("  loop: sync (generate, score, update, weight sync)")
        sync = s.weight_sync
        lines.append(f"  weight sync: {sync.method} ({sync.reason}), {sync.when}" if sync else "  weight sync: none (no rollouts)")
        lines.append(f"  bundles: {[b.as_ray() for b in s.bundles]}" + (f"; driver {s.driver_cpus:g} CPU" if s.driver_cpus else ""))
    lines.append(f"demand: {[b.as_ray() for b in plan.demand]}")
    return "\n".join(lines)
