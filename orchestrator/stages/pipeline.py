"""Running a job's stages: `sft` then `grpo` (or any list), as one job with one history.

Each stage is an ordinary single-algorithm run of the driver. Steps are numbered across the whole
job, so metrics, checkpoints (`step_000120/`) and resume see one sequence; stage i+1 starts from
stage i's final checkpoint (its `policy/` directory, a complete HF model with its tokenizer).
A spec without `stages` is one unnamed stage and runs exactly as before.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.core import checkpoint, storage
from orchestrator.core.data import PromptSampler, load_dataset
from orchestrator.core.plan import StagePlan, make_plan, plan_stage
from orchestrator.core.spec import JobSpec, SpecError
from orchestrator.reporting.reporters import FileReporter, MultiReporter
from orchestrator.runtime import stopping
from orchestrator.runtime.recovery import RestartBudget, RestartsExhausted, lost_process
from orchestrator.runtime.registry import driver_class
from workers.common import ModelLoadError


@dataclass(frozen=True)
class Stage:
    name: str | None  # None: the job has no stages
    index: int
    spec: JobSpec
    dataset: Any  # PromptDataset (RL), SFTDataset or PreferenceDataset
    eval_set: Any  # PromptDataset, PreferenceDataset (rm, dpo) or None
    first_step: int  # global step numbers of the stage: first_step .. last_step
    last_step: int
    plan: StagePlan | None = None  # the stage's part of the job's plan (None: planned here from `spec`, with these steps)

    def __post_init__(self) -> None:
        if self.plan is None:
            planned = dataclasses.replace(plan_stage(self.spec, self.name, self.index), first_step=self.first_step, last_step=self.last_step)
            object.__setattr__(self, "plan", planned)


def plan_stages(spec: JobSpec) -> tuple[Any, list[Stage]]:
    """(tokenizer, stages): every stage's data, eval data and rewards checked before any actor starts,
    and each stage's part of the job's plan (core/plan.py) with its step range, once the data is read.

    Later stages are checked against the first stage's model, which their checkpoints descend from."""
    tokenizer, read = None, []
    for index, (name, stage_spec) in enumerate(spec.stage_specs()):
        checked = stage_spec if index == 0 else _with_model(stage_spec, read[0][1].model.path)
        tok, dataset = preflight(checked)
        tokenizer = tokenizer or tok
        d = stage_spec.data
        eval_set = None
        if d.eval_file:
            # Held-out prompts (scored by the rewards) or preference pairs (rm, dpo), read as the stage reads its data.
            eval_set = load_dataset(stage_spec.algo.eval_data, d.eval_file, _data_tokenizer(checked, tok), d)
            eval_set = eval_set.head(stage_spec.eval.max_samples or len(eval_set))
        read.append((name, stage_spec, dataset, eval_set))
    per_epoch = [PromptSampler(len(dataset), s.optim.prompts_per_step, s.optim.seed).steps_per_epoch for _, s, dataset, _ in read]
    plan = make_plan(spec).with_epoch_steps(per_epoch)
    return tokenizer, [Stage(name, i, s, dataset, eval_set, p.first_step, p.last_step, p)
                       for i, ((name, s, dataset, eval_set), p) in enumerate(zip(read, plan.stages, strict=True))]


def preflight(spec: JobSpec):
    """Everything that can be checked before any actor starts: tokenizer, model config, data, rewards."""
    from transformers import AutoConfig

    from workers.common import check_model_path, load_tokenizer
    from workers.reward import resolve_function

    m = spec.model  # every model the spec names: a missing local directory fails here, before any actor starts
    named = {"model.path": m.path, "model.critic_path": m.critic_path, "model.rm_path": m.rm_path,
             **{f"rewards.{i}.model": r.model for i, r in enumerate(spec.rewards) if not r.stage}}
    for field, path in named.items():
        if path:
            check_model_path(path, field, ask_hub=True)
    try:
        AutoConfig.from_pretrained(storage.local_copy(spec.model.path), trust_remote_code=spec.model.trust_remote_code)
    except Exception as err:
        raise ModelLoadError(f"model.path={spec.model.path!r} does not load: {type(err).__name__}: {err}") from None
    tokenizer = load_tokenizer(spec.model.path, spec.model.trust_remote_code)
    dataset = load_dataset(spec.algo.data, spec.data.train_file, _data_tokenizer(spec, tokenizer), spec.data)
    for source in spec.rewards:
        if source.function:
            resolve_function(source.function)
    return tokenizer, dataset


def _data_tokenizer(spec: JobSpec, policy_tokenizer):
    """The tokenizer of the model the stage trains (an `rm` stage's `model.rm_path` has its own)."""
    from transformers import AutoConfig

    from workers.common import load_tokenizer

    path = spec.trained_model_path
    if path == spec.model.path:
        return policy_tokenizer
    try:
        AutoConfig.from_pretrained(storage.local_copy(path), trust_remote_code=spec.trained_model_trust)
    except Exception as err:
        raise ModelLoadError(f"model.rm_path={path!r} does not load: {type(err).__name__}: {err}") from None
    return load_tokenizer(path, spec.trained_model_trust)


def connect_ray(spec: JobSpec, cpus: float | None = None) -> None:
    """Join the cluster when there is one (RAY_ADDRESS, set by `ray job submit`); else start Ray here,
    with at least `cpus` CPUs (None: the largest placement group of the spec's plan)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    wanted = cpus if cpus is not None else max(s.cpus for s in make_plan(spec).stages)
    cores = len(os.sched_getaffinity(0))
    ray.init(address="local", num_cpus=max(cores, int(wanted + 0.999)), include_dashboard=False, log_to_driver=True)


def run_stages(stages: list[Stage], tokenizer, job_id: str, reporter: MultiReporter, resume: bool, progress: bool) -> None:
    from orchestrator.reporting.reporters import ProgressReporter, RayMetricsReporter

    spec = stages[0].spec
    for stage in stages:
        if stage.dataset.dropped:
            _tagged(reporter, stage).event("warning", f"dropped {stage.dataset.dropped} prompts longer than {stage.dataset.length_limits}")
    connect_ray(spec, max(s.plan.cpus for s in stages))
    stopping.install()  # again: ray.init replaced the SIGTERM handler
    reporter.add(RayMetricsReporter(job_id, stage=stages[0].name or spec.algorithm.name))
    start_step, latest = 0, checkpoint.latest(spec.checkpoint_dir) if resume else None
    if resume and latest is None:
        reporter.event("warning", f"--resume: no checkpoint in {spec.checkpoint_dir}; starting from step 0")
    if resume:
        for partial in checkpoint.incomplete(spec.checkpoint_dir):
            reporter.event("warning", f"--resume: ignored {partial}: a checkpoint whose save did not finish (no state.json)")
    if latest is not None:
        state = checkpoint.read_state(latest)
        start_step = state["step"]
        stage = next(s for s in stages if s.first_step <= start_step <= s.last_step)
        changes = resume_changes(state.get("spec") or {}, stage.spec.model_dump(mode="json"), first_stage=stage.index == 0)
        if changes:
            reporter.event("warning", f"--resume: the spec changed since step {start_step}: " + "; ".join(changes), changes=changes)
        reporter.event("resumed", f"resumed from {latest} at step {start_step}", step=start_step, path=str(latest))
    if resume:  # the steps after the checkpoint are redone: their first lines go, here and in Redis
        reporter.rewind(start_step)
    total = stages[-1].last_step
    if progress:
        reporter.add(ProgressReporter(total, start_step))
    names = {"stages": [s.name for s in stages]} if stages[0].name else {}
    reporter.event("status", "running", status="running", total_steps=total, start_step=start_step, **names)
    model_path = spec.model.path
    restarts = RestartBudget(spec.fault_tolerance.max_restarts)  # one budget for the job, including earlier driver attempts
    for stage in stages:
        if start_step < stage.last_step:
            resume_from = latest if start_step >= stage.first_step else None
            run_stage(with_stage_models(stage, stages), model_path, tokenizer, job_id, _tagged(reporter, stage), resume_from, restarts)
        if stage.spec.algo.produces == "policy":  # a reward-model stage leaves the policy as it found it
            model_path = _handoff(stage, latest)
        if stage.index < len(stages) - 1:  # later stages (and their resume) need it, whatever checkpoint.keep_last says
            checkpoint.pin(_final(stage), f"the final checkpoint of stage {stage.name}")
            if stopping.requested():
                raise stopping.StopRequested(stage.last_step, stopping.requested())
    reporter.event("status", "succeeded", status="succeeded", step=total)


# What a resume cannot change: the checkpoint holds weights and optimizer state of this algorithm
# and model. Budgets, checkpointing, evaluation, trackers and placement may change (with a warning).
FIXED_ON_RESUME = ("algorithm.name", "model.path", "model.dtype", "model.critic_path", "model.rm_path")
_NOT_A_CHANGE = ("optim.steps", "optim.epochs", "output_dir", "checkpoint.dir")


def resume_changes(saved: dict, now: dict, first_stage: bool = True) -> list[str]:
    """`field: old -> new` for each setting that differs between the checkpoint's spec and this one;
    a SpecError if one of them cannot change on a resume."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    old, new = flat(saved), flat(now)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in _NOT_A_CHANGE)
    # A later stage starts from the stage before it, whatever its spec's model.path says.
    fixed = [k for k in changed if k in FIXED_ON_RESUME and (first_stage or k != "model.path")]
    if fixed:
        raise SpecError("--resume: " + "; ".join(f"{k} was {old.get(k)!r} at the checkpoint, now {new.get(k)!r}" for k in fixed)
                        + ": a checkpoint resumes only the algorithm and model it was saved with (start a new run instead)")
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed if first_stage or k != "model.path"]


def with_stage_models(stage: Stage, stages: list[Stage]) -> Stage:
    """The stage with each `rewards[].model: "stage:NAME"` resolved, as it starts, to the reward model
    that the earlier stage NAME trained: its final checkpoint's `reward_model/` (pinned, so it outlives
    `checkpoint.keep_last`), loaded with the trust of the model that stage trained from. In metrics the
    source is named NAME unless it has a `name`."""
    sources = list(stage.spec.rewards)
    for i, source in enumerate(sources):
        if not source.stage:
            continue
        earlier = next(s for s in stages if s.name == source.stage)  # the spec checked that it is earlier and an rm stage
        path = storage.join(_final(earlier), earlier.spec.algo.produces)
        if not storage.exists(storage.join(path, "config.json")):
            raise ModelLoadError(f"stages.{stage.index} ({stage.name}): rewards.{i}.model: {source.model!r} is stage "
                                 f"{earlier.name}'s final reward model, but {path} does not exist")
        sources[i] = source.model_copy(update={"model": str(path), "name": source.label, "trust_remote_code": earlier.spec.trained_model_trust})
    if sources == list(stage.spec.rewards):
        return stage
    return dataclasses.replace(stage, spec=stage.spec.model_copy(update={"rewards": sources}))


def _final(stage: Stage) -> Path | str:
    return checkpoint.step_dir(stage.spec.checkpoint_dir, stage.last_step)


def run_stage(stage: Stage, model_path: str, tokenizer, job_id: str, reporter, resume_from=None,
              restarts: RestartBudget | None = None) -> None:
    """One stage on its own actors, from `model_path` (or resumed from a checkpoint inside the stage).
    A lost actor or node costs a restart from `restarts`: the actors are placed again and the stage
    resumes from its newest checkpoint, its later metric lines dropped (they are redone)."""
    restarts = restarts or RestartBudget(stage.spec.fault_tolerance.max_restarts, used=0)
    while True:
        orch = _stage_driver(stage, model_path, tokenizer, job_id, reporter)
        try:
            orch.start()
            start = stage.first_step - 1
            if resume_from is not None:
                start = orch.load_checkpoint(resume_from)
            if stage.name:
                # The message names where the model comes from, not its path (a tenant reads it); the
                # path stays in the data for the run directory's reader (the API redacts it).
                source = "model.path" if model_path == stage.spec.model.path else "the policy of the stages before it"
                reporter.event("stage", f"stage {stage.name} ({orch.spec.algorithm.name}) runs steps {start + 1}..{stage.last_step} from {source}",
                               algorithm=orch.spec.algorithm.name, model=source, model_path=model_path, first_step=stage.first_step,
                               last_step=stage.last_step)
            orch.fit(start)
            return
        except Exception as err:
            died = lost_process(err, orch.actor_names())
            if died is None or stopping.cancelled() or stopping.requested():
                raise
            if not restarts.take():
                raise RestartsExhausted(died, err, restarts) from err
            resume_from = _newest_in_stage(stage)
            resume_step = checkpoint.read_state(resume_from)["step"] if resume_from is not None else stage.first_step - 1
            message, fields = restarts.event(died, err, resume_step, resume_from)
            reporter.event("restart", message, **fields)
            reporter.rewind(resume_step)
        finally:
            names = list(orch.actor_names().values())
            orch.shutdown()
            _wait_released(names)


def _stage_driver(stage: Stage, model_path: str, tokenizer, job_id: str, reporter):
    spec = _with_model(stage.spec, model_path)
    cls = driver_class(spec.algorithm.name)
    if stage.plan.loop.kind == "async":  # the plan's loop: the rollout side generates beside the trainer
        from orchestrator.stages.async_loop import AsyncOrchestrator as cls
    return cls(spec, stage.dataset, reporter, job_id, tokenizer.eos_token_id, tokenizer.pad_token_id, stage=stage.plan,
               eval_set=stage.eval_set)


def _newest_in_stage(stage: Stage):
    """The stage's newest finished checkpoint, or None (the stage then starts over from its model)."""
    found = [p for p in checkpoint.complete(stage.spec.checkpoint_dir) if checkpoint.read_state(p)["step"] >= stage.first_step]
    return found[-1] if found else None


def _handoff(stage: Stage, latest) -> str:
    """The model the next stage starts from: this stage's final checkpoint (or, if a resumed job has
    pruned it, the newest checkpoint, whose weights the next stage loads anyway)."""
    final = _final(stage)
    if not storage.exists(storage.join(final, "state.json")) and latest is not None:
        final = latest
    return storage.join(final, "policy")


def _with_model(spec: JobSpec, path: str) -> JobSpec:
    if spec.model.path == path:
        return spec
    return spec.model_copy(update={"model": spec.model.model_copy(update={"path": path})})


def _wait_released(names: list[str], timeout_s: float = 30) -> None:
    """Named actors free their names only once dead; the next stage reuses the names."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for name in names:
            try:
                ray.get_actor(name)
                alive.append(name)
            except ValueError:
                pass
        if not alive:
            return
        names = alive
        time.sleep(0.2)


def _tagged(reporter: MultiReporter, stage: Stage):
    return StageReporter(reporter, stage.name, stage.index) if stage.name else reporter


class StageReporter:
    """Tags a stage's events with `stage`, and its metric lines with `stage` (metrics.jsonl) and the
    numeric `stage_index` (every sink: the control plane's metric values are numbers)."""

    def __init__(self, inner: MultiReporter, name: str, index: int):
        self.inner, self.name, self.index = inner, name, index

    def event(self, type: str, message: str = "", **data: Any) -> None:
        self.inner.event(type, message, stage=self.name, **data)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        values = {"stage_index": float(self.index), **values}
        for r in self.inner.reporters:
            r.metrics(step, {"stage": self.name, **values} if isinstance(r, FileReporter) else values)

    def rewind(self, after_step: int) -> None:
        self.inner.rewind(after_step)

    def close(self) -> None:
        pass
