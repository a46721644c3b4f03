"""The orchestrator: one per job. It places the roles on Ray and runs rollout -> score -> update -> sync.

`Orchestrator.train_step` is the whole algorithm in one screen; each phase below it is one
short method. Data moves between actors as one `Batch` of tensors through Ray's object store.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future

import ray
import torch

from orchestrator.core import algos, checkpoint, storage
from orchestrator.core.advantages import compute_advantages
from orchestrator.core.batch import Batch, concat, tensors_from_wire
from orchestrator.core.data import PromptDataset, PromptSampler
from orchestrator.core.plan import StagePlan
from orchestrator.core.records import json_safe
from orchestrator.core.spec import JobSpec
from orchestrator.reporting.reporters import Reporter
from orchestrator.runtime import stopping, waits, weight_sync
from orchestrator.runtime.placement import (
    ActorGroup,
    actor_env,
    create_placement_group,
    layout_of,
    role_threads,
    spawn_group,
    stage_plan,
)
from orchestrator.runtime.waits import PhaseTimeout  # noqa: F401  (re-exported: run.py names its error code)
from orchestrator.stages import evaluation, roles
from workers.agent_rollout import agent_metrics, episodes_of_rows
from workers.common import load_tokenizer
from workers.reward import RewardWorker


def rollout_metrics(batch: Batch, per_source: dict[str, torch.Tensor], spec: JobSpec, eos_token_id: int) -> dict[str, float]:
    mask, scores = batch.response_mask, batch.scores
    lengths = mask.sum(1)
    groups = scores.view(-1, spec.rollout.n)
    out = {
        "reward/mean": scores.mean().item(),
        "reward/std": scores.std().item() if len(scores) > 1 else 0.0,
        "frac_reward_zero_std": (groups.std(1) < 1e-6).float().mean().item(),
        "response_length/mean": lengths.mean().item(),
        "response_length/max": lengths.max().item(),
        "response_length/min": lengths.min().item(),
        # Completions cut at max_new_tokens, without an EOS.
        "response_length/clipped_frac": ((lengths >= spec.rollout.max_new_tokens) & (batch.responses[:, -1] != eos_token_id)).float().mean().item(),
    }
    for label, values in per_source.items():
        finite = values[~values.isnan()]
        out[f"rewards/{label}/mean"] = finite.mean().item() if len(finite) else float("nan")
        out[f"rewards/{label}/std"] = finite.std().item() if len(finite) > 1 else 0.0
    if batch.ref_logprobs is not None:
        out["kl"] = algos.masked_mean(algos.kl_estimate(batch.logprobs, batch.ref_logprobs, spec.optim.kl_estimator), mask).item()
    if batch.values is not None:
        out["critic/values/mean"] = algos.masked_mean(batch.values, mask).item()
    out["advantages/mean"] = algos.masked_mean(batch.advantages, mask).item()
    return out


def in_daemon_thread(fn, *args) -> Future:
    """`fn(*args)` on a thread of this process, waited for like an actor call (`Orchestrator.wait`): a
    call that hangs past the timeout fails the job and, being a daemon, does not keep the process alive."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as err:  # noqa: BLE001 - handed to whoever waits, as a remote call's error would be
            future.set_exception(err)

    threading.Thread(target=run, name="rewards", daemon=True).start()
    return future


class Orchestrator:
    # Whether the rollouts get the new weights after every step (an SFT stage syncs only to evaluate).
    syncs_every_step = True

    def __init__(self, spec: JobSpec, dataset: PromptDataset, reporter: Reporter, job_id: str, eos_token_id: int, pad_token_id: int,
                 stage: StagePlan | None = None, eval_set=None):
        """`stage`: the stage's plan, with its step range (the pipeline's; None: the plan of `spec` alone,
        from step 1). `eval_set`: held-out prompts (or pairs) to evaluate on, on the schedule `eval.every` gives."""
        self.spec, self.dataset, self.reporter, self.job_id = spec, dataset, reporter, job_id
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.sampler = PromptSampler(len(dataset), spec.optim.prompts_per_step, spec.optim.seed, spec.data.shuffle)
        stage = stage or stage_plan(spec)
        self.stage = stage if stage.last_step is not None else stage.with_steps(1, self.sampler.steps_per_epoch)
        self.groups: dict[str, ActorGroup] = {}
        self.placement_group = None
        self.evaluator = evaluation.Evaluator(eval_set, spec.eval.every, self.stage) if eval_set is not None else None
        opt = spec.optim
        self.num_mini_batches = spec.samples_per_step // (opt.mini_batch_size or spec.samples_per_step)
        self.on_policy = self.num_mini_batches == 1 and opt.ppo_epochs == 1
        # Behaviour log-probs feed off-policy ratios, KL and IS correction; an on-policy step without them skips them.
        self.need_logprobs = not self.on_policy or self.stage.where("reference") is not None or spec.rollout.importance_sampling.enabled
        self.weight_sync: weight_sync.WeightSync | None = None  # the path `setup_weight_sync` prepares
        self.local_rewards: RewardWorker | None = None  # the rewards, when computed in this process (`resources.reward_in`)
        self.current_step = 0

    @property
    def total_steps(self) -> int:
        """The global number of the stage's last step (steps are numbered across the job)."""
        return self.stage.last_step

    # ------------------------------------------------------------ the loop
    def fit(self, start_step: int = 0) -> dict[str, float]:
        last: dict[str, float] = {}
        every = self.spec.checkpoint.every
        for step in range(start_step + 1, self.total_steps + 1):
            self.current_step = step
            last = self.train_step(step)
            if self.evaluator is not None and self.evaluator.due(step):
                last.update(self.evaluate(self.evaluator.dataset))
            self.reporter.metrics(step, last)
            if (every and step % every == 0) or step == self.total_steps or stopping.requested():
                self.save_checkpoint(step)
            if stopping.requested() and step < self.total_steps:  # (at the stage's end, the pipeline decides)
                raise stopping.StopRequested(step, stopping.requested())
        return last

    def train_step(self, step: int) -> dict[str, float]:
        timing: dict[str, float] = {}
        start = time.perf_counter()
        if self.stage.one_call_step:  # a lone trainer that samples runs every phase below in one call
            batch, per_source, metrics = self.whole_step(step, timing)
        else:
            batch = self.generate(step, timing)
            batch, per_source = self.score(batch, timing)
            batch = self.advantages(batch, timing)
            metrics = self.update(batch, step, timing)
            if not self.weights_in_update:
                self.sync_weights(timing)
        timing["step"] = time.perf_counter() - start
        metrics.update(rollout_metrics(batch, per_source, self.spec, self.eos_token_id))
        if self.stage.rollout_mode == "multi_turn":
            metrics.update(self.report_episodes(step, batch))
        return {**metrics, **self.throughput(batch, timing), **{f"timing/{k}": v for k, v in timing.items()}}

    def report_episodes(self, step: int, batch: Batch) -> dict[str, float]:
        """A multi-turn step's agent metrics; its first prompt's episodes (turns, rewards) appended to the
        run directory's trajectories.jsonl."""
        episodes = episodes_of_rows(batch)
        group = [e for e, g in zip(episodes, batch.group_ids.tolist()) if g == 0]
        with (self.spec.run_dir / "trajectories.jsonl").open("a") as f:
            for i, episode in enumerate(group):
                f.write(json.dumps(json_safe({"step": step, "sample": i, **episode}), default=str) + "\n")
        return agent_metrics(episodes)

    def wait(self, refs, phase: str):
        """The results of actor calls (or of a `Future`), bounded by `fault_tolerance.call_timeout_s`:
        a phase that hangs fails the job, naming it and the step (none before the first)."""
        return waits.wait(refs, phase, self.spec.fault_tolerance.call_timeout_s, self.current_step)

    # ------------------------------------------------------------ phases
    def step_prompts(self, step: int) -> tuple[list[list[int]], list[dict]]:
        """The step's prompts (token ids) and their data columns."""
        index = self.sampler.indices(step - 1)
        return [self.dataset.prompt_ids[i] for i in index], [self.dataset.extras[i] for i in index]

    def generate(self, step: int, timing: dict) -> Batch:
        t0 = time.perf_counter()
        prompts, extras = self.step_prompts(step)
        results = self.wait(self.rollout_group.call_on_rows("generate", [prompts, extras], step, False, self.need_logprobs), "generate")
        batch = concat([b for b, _ in results])
        timing["generate_compute"] = max(t for _, t in results)
        timing["generate"] = time.perf_counter() - t0
        return batch

    def score(self, batch: Batch, timing: dict) -> tuple[Batch, dict[str, torch.Tensor]]:
        """Reference log-probs, rewards and critic values of one rollout, computed concurrently."""
        t0 = time.perf_counter()
        # Several consumers share one copy in the object store; a lone reward call takes the batch inline.
        batch_ref = ray.put(batch) if (self.reference_group is not None or "critic" in self.groups) else batch
        reference = self.reference_group
        ref_refs = reference.call_sharded("compute_logprobs", batch) if reference is not None else None
        critic_refs = self.groups["critic"].call_sharded("compute_values", batch, whole=batch_ref) if "critic" in self.groups else None
        rewards = self.score_rewards(batch, batch_ref)
        scores, per_source, timing["reward"] = self.wait(rewards, "reward")
        batch = batch.replace(scores=scores)
        if ref_refs is not None:
            results = self.wait(ref_refs, "reference")
            batch = batch.replace(ref_logprobs=torch.cat([lp for lp, _ in results]))
            timing["reference"] = max(t for _, t in results)
        if critic_refs is not None:
            results = self.wait(critic_refs, "critic")
            batch = batch.replace(values=torch.cat([v for v, _ in results]))
            timing["critic"] = max(t for _, t in results)
        timing["score"] = time.perf_counter() - t0
        return batch, per_source

    def score_rewards(self, batch: Batch, shared=None):
        """Start scoring `batch` with the job's rewards: in this process (a `Future`) or on the reward
        actor (an ObjectRef, given `shared`, the batch's copy in the object store, if there is one)."""
        if self.local_rewards is not None:
            return in_daemon_thread(self.local_rewards.score, batch)
        return self.groups["reward"].call("score", batch if shared is None else shared)[0]

    def advantages(self, batch: Batch, timing: dict) -> Batch:
        t0 = time.perf_counter()
        batch = compute_advantages(batch, self.spec)
        timing["advantages"] = time.perf_counter() - t0
        return batch

    def update(self, batch: Batch, step: int, timing: dict) -> dict[str, float]:
        """Policy update (and critic update, concurrently) over the step's samples."""
        t0 = time.perf_counter()
        opt, num_mini = self.spec.optim, self.num_mini_batches
        publish = self.weights_in_update
        trainer_refs = self.groups["trainer"].call_sharded("train_step", batch, step, num_mini, opt.micro_batch_size, self.on_policy, publish)
        critic_refs = self.groups["critic"].call_sharded("train_step", batch, step, num_mini, opt.micro_batch_size) if "critic" in self.groups else []
        results = self.wait(trainer_refs + critic_refs, "update")
        trainer_stats, critic_stats = results[0], (results[len(trainer_refs)] if critic_refs else {})
        timing["update_compute"] = max(r.pop("timing/update_compute") for r in results[: len(trainer_refs)])
        if publish:
            timing["weight_sync"] = trainer_stats.pop("timing/weight_sync")
        if critic_stats:
            timing["critic_update_compute"] = critic_stats.pop("timing/critic_update_compute")
        timing["update"] = time.perf_counter() - t0
        return {**trainer_stats, **critic_stats, "lr": opt.lr}

    def whole_step(self, step: int, timing: dict) -> tuple[Batch, dict[str, torch.Tensor], dict[str, float]]:
        """generate, score, advantages and update as one call to the lone policy trainer
        (the plan's `one_call_step`): it samples, scores with the reward functions, and updates in place."""
        t0 = time.perf_counter()
        prompts, extras = self.step_prompts(step)
        opt = self.spec.optim
        [ref] = self.groups["trainer"].call("whole_step", prompts, extras, step, self.need_logprobs, self.num_mini_batches,
                                            opt.micro_batch_size, self.on_policy)
        batch, per_source, stats = self.wait(ref, "generate, reward and update")
        per_source = tensors_from_wire(per_source)
        for phase in ("generate_compute", "reward", "advantages", "update_compute"):
            timing[phase] = stats.pop(f"timing/{phase}")
        timing["step_call"] = time.perf_counter() - t0
        return batch, per_source, {**stats, "lr": opt.lr}

    @property
    def rollout_group(self) -> ActorGroup:
        """Who samples the completions: the rollout actors, or the policy trainers themselves (`resources.rollout_in`)."""
        return self.groups[self.stage.where("rollout")]

    @property
    def reference_group(self) -> ActorGroup | None:
        """Who computes the reference log-probs: the reference actors, or the policy trainers (a LoRA
        policy's frozen base, or a copy: `resources.reference_in`); None when the step needs none."""
        where = self.stage.where("reference")
        return None if where is None else self.groups[where]

    @property
    def weights_in_update(self) -> bool:
        """Whether the trainer writes the rollouts' weights as the last act of its update call (shared memory)."""
        return self.weight_sync is not None and self.weight_sync.in_update

    def sync_weights(self, timing: dict | None = None) -> None:
        """Trainer rank 0's weights to every rollout actor, by the path `setup_weight_sync` chose."""
        if self.weight_sync is None:  # the trainers sample with their own weights (`resources.rollout_in`)
            return
        t0 = time.perf_counter()
        self.weight_sync.sync()
        if timing is not None:
            timing["weight_sync"] = time.perf_counter() - t0

    def setup_weight_sync(self) -> None:
        """Pick how weights travel (`rollout.weight_sync`, see orchestrator/runtime/weight_sync.py) and prepare it;
        reported as a `weight_sync` event."""
        planned = self.stage.weight_sync
        if planned is None:  # an SFT stage that does not evaluate has no rollouts to sync
            return
        if planned.method == "none":
            self.reporter.event("weight_sync", "no weight sync: the trainers sample the completions with their own weights",
                                method="none", reason=planned.reason)
            return
        path = self.weight_sync = weight_sync.setup(self.spec, self.groups["trainer"], self.groups["rollout"], self.job_id, self.wait, planned)
        self.reporter.event("weight_sync", f"weights sync by {path.method} ({path.reason})", method=path.method, reason=path.reason)

    def evaluate(self, dataset: PromptDataset) -> dict[str, float]:
        """Held-out metrics (`eval/...`): greedy completions of the prompts on whoever samples, scored by
        the job's rewards, with the trainer's current policy (a stage that does not sync every step syncs first)."""
        start = time.perf_counter()
        if not self.syncs_every_step:
            self.sync_weights()
        out = evaluation.evaluate(dataset, self.rollout_group, self.score_rewards, self.wait)
        out["timing/eval"] = time.perf_counter() - start
        return out

    def throughput(self, batch: Batch, timing: dict) -> dict[str, float]:
        accounted = sum(timing.get(k, 0.0) for k in ("generate_compute", "advantages", "weight_sync"))
        accounted += max(timing.get(k, 0.0) for k in ("reward", "reference", "critic"))
        accounted += max(timing.get("update_compute", 0.0), timing.get("critic_update_compute", 0.0))
        tokens = float(batch.attention_mask.sum())
        return {
            "timing/overhead": max(timing["step"] - accounted, 0.0),
            "throughput/tokens_per_s": tokens / timing["step"],
            "throughput/samples_per_s": len(batch) / timing["step"],
        }

    # ------------------------------------------------------------ setup and checkpoints
    def start(self) -> None:
        """Place the stage's roles as its plan says: one factory per role (orchestrator/stages/roles.py)."""
        spec, stage = self.spec, self.stage
        layout = layout_of(stage)
        started = [r.role for r in stage.roles]
        self.reporter.event("placement", f"placing {', '.join(started)} in {len(layout.bundles)} bundles", bundles=layout.bundles)
        pg = self.placement_group = create_placement_group(layout, self.job_id)
        env = actor_env(stage)
        for role in started:
            factory = roles.FACTORIES[role](spec, stage)
            threads = role_threads(spec.resources.torch_threads, stage, role)
            self.groups[role] = spawn_group(factory.cls, role, self.job_id, pg, layout, factory.kwargs, env, threads)
        self.local_rewards = roles.driver_rewards(spec, stage)  # (functions only: no device, no actor)
        self.wait_started()
        if "sandbox" in self.groups:  # (whoever samples runs the environments, whose code runs there)
            self.wait(self.rollout_group.call("attach_sandbox", self.groups["sandbox"].actors), "sandbox")
        self._init_data_parallel("trainer")
        if "critic" in self.groups:
            self._init_data_parallel("critic")
        if "reference" in self.groups and spec.resources.reference.strategy == "fsdp":  # (plain reference replicas need no process group)
            self._init_data_parallel("reference")
        self.setup_weight_sync()
        names = [f"{self.job_id}/{r}-{i}" for r, g in self.groups.items() for i in range(len(g))]
        self.reporter.event("actors_ready", f"{len(names)} actors up", actors=names)

    def wait_started(self) -> None:
        """Every actor constructed (its model loaded), within `fault_tolerance.start_timeout_s`: the
        phases' own deadline (`call_timeout_s`) then never has to cover a model's loading."""
        refs = [actor.__ray_ready__.remote() for group in self.groups.values() for actor in group.actors]
        waits.wait(refs, f"start ({', '.join(self.groups)})", self.spec.fault_tolerance.start_timeout_s,
                   setting="fault_tolerance.start_timeout_s")

    def actor_names(self) -> dict[str, str]:
        """Actor id (hex) -> `job/role-i`: how the job names its actors (in events and in Ray's dashboard)."""
        return {actor._actor_id.hex(): f"{self.job_id}/{role}-{i}" for role, group in self.groups.items()
                for i, actor in enumerate(group.actors)}

    def shutdown(self) -> None:
        """Kill the job's actors and free its placement group."""
        from ray.util.placement_group import remove_placement_group

        for group in self.groups.values():
            for actor in group.actors:
                ray.kill(actor)
        self.groups = {}
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None

    def _init_data_parallel(self, role: str) -> None:
        group = self.groups[role]
        master = self.wait(group.actors[0].address.remote(), f"{role} process group")
        strategy = getattr(self.spec.resources, role).strategy
        self.wait(group.call_each("init_distributed", [(master, rank, len(group), strategy) for rank in range(len(group))]), f"{role} process group")

    def save_checkpoint(self, step: int) -> None:
        path = checkpoint.step_dir(self.spec.checkpoint_dir, step)  # a Path, or a URL (core/storage.py)
        if not storage.is_url(path):
            path.mkdir(parents=True, exist_ok=True)
        refs = self.groups["trainer"].call("save", str(path))
        if "critic" in self.groups:
            refs += self.groups["critic"].call("save", str(path))
        self.wait(refs, "checkpoint save")
        model_dir = storage.join(path, self.spec.algo.produces)  # `policy/` or `reward_model/`
        if storage.isdir(model_dir) and not storage.exists(storage.join(model_dir, "tokenizer_config.json")):
            # With its tokenizer, it is a complete model: the next stage's model.path, a later stage's reward model, or anyone's.
            with storage.local_dir_for(model_dir) as out:
                load_tokenizer(self.spec.trained_model_path, self.spec.trained_model_trust).save_pretrained(out)
        checkpoint.finish(path, step, self.spec)
        checkpoint.prune(self.spec.checkpoint_dir, self.spec.checkpoint.keep_last)
        self.reporter.event("checkpoint", f"saved step {step} to {path}", step=step, path=str(path))

    def load_checkpoint(self, path) -> int:
        refs = self.groups["trainer"].call("load", str(path))
        if "critic" in self.groups:
            refs += self.groups["critic"].call("load", str(path))
        self.wait(refs, "checkpoint load")
        self.sync_weights()
        return checkpoint.read_state(path)["step"]
