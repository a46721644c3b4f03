"""A tenant's job spec, as REST takes it, turned into the spec the job runs.

Over REST a tenant names things by id or by the operator's name, never by server path or import
path (the trusted entrypoints, `rlhf train` and `ray job submit`, keep both):

    data.train_file, data.eval_file          file-...   an upload of this tenant (POST /v1/files)
    model.path, model.critic_path, rm_path   a registry model this tenant may use, or ckpt-... of its own
    rewards[].function                       a built-in reward, or a reward function the operator registered
    rewards[].model                          a registry model, ckpt-... of its own, or stage:NAME (its pipeline)
    rollout.agent.environment                a built-in environment (core/environments.py ENVIRONMENTS), or
                                             one the operator registered (its import path in the launch spec)
    output_dir, checkpoint.dir               refused: the server puts every run under the tenant's area
    model.trust_remote_code                  the policy's, and the default of every other model's own flag below
    model.critic_trust_remote_code,          each model's own: only where the registry entry of that model
      rm_trust_remote_code,                  allows it (a checkpoint's never); the launch spec spells out
      rewards[].trust_remote_code            every model's, so no model ever runs with another's trust

The same holds inside `stages[]`. Each refusal is a 422 naming the field; nothing is read first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from api.errors import APIError
from api.registry import Registry
from api.storage import ArtifactStore
from api.store import JobStore
from orchestrator.core.algorithms import ALGORITHMS, BUILTIN_REWARDS
from orchestrator.core.environments import ENVIRONMENTS
from orchestrator.core.spec import STAGE_REF

FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
CHECKPOINT_ID = re.compile(r"^ckpt-([0-9a-f]{24})-(\d{1,9})$")

# The upload purposes each kind of data may come from (core/algorithms.py: Algorithm.data / eval_data).
PURPOSES = {"prompts": ("train", "eval"), "sft": ("sft",), "preference": ("preference",)}


def checkpoint_id(job_id: str, step: int) -> str:
    return f"ckpt-{job_id.removeprefix('job-')}-{step}"


def refused(param: str, message: str) -> APIError:
    return APIError(422, "invalid_spec", f"{param}: {message}", param)


@dataclass
class TenantSpec:
    """Resolves one tenant's spec; `launch_spec()` returns the spec the job runs (server paths)."""

    tenant: str
    registry: Registry
    storage: ArtifactStore
    store: JobStore
    mlflow_tracking_uris: list[str]

    async def launch_spec(self, spec: dict[str, Any], job_id: str) -> dict[str, Any]:
        out = {**spec}
        for param in ("output_dir",):
            if spec.get(param) is not None:
                raise refused(param, "the server chooses where a job's run directory goes; leave it out")
        self._check_tracking_uri(spec)
        out["model"] = await self._models(spec["model"])
        policy_trust = spec["model"]["trust_remote_code"]
        algorithm = spec["algorithm"]["name"]
        out["data"] = await self._data(spec["data"], algorithm, "data")
        out["rewards"] = [await self._reward(r, f"rewards.{i}", policy_trust) for i, r in enumerate(spec.get("rewards") or [])]
        out["checkpoint"] = self._checkpoint(spec.get("checkpoint") or {}, "checkpoint")
        out["rollout"] = self._environment(spec.get("rollout"), "rollout")
        if spec.get("stages"):
            out["stages"] = []
            for i, stage in enumerate(spec["stages"]):
                stage = {**stage}
                where = f"stages.{i}"
                kind = (stage.get("algorithm") or {}).get("name") or algorithm
                if stage.get("data") is not None:
                    stage["data"] = await self._data(stage["data"], kind, f"{where}.data")
                if stage.get("rewards") is not None:
                    stage["rewards"] = [await self._reward(r, f"{where}.rewards.{j}", policy_trust) for j, r in enumerate(stage["rewards"])]
                if stage.get("checkpoint") is not None:
                    stage["checkpoint"] = self._checkpoint(stage["checkpoint"], f"{where}.checkpoint")
                if stage.get("rollout") is not None:
                    stage["rollout"] = self._environment(stage["rollout"], f"{where}.rollout")
                out["stages"].append(stage)
        out["output_dir"] = self.storage.url(self.storage.run_path(self.tenant, job_id))
        return out

    # --- each kind of reference ----------------------------------------------------------------

    def _check_tracking_uri(self, spec: dict) -> None:
        uri = ((spec.get("trackers") or {}).get("mlflow") or {}).get("tracking_uri")
        if uri is not None and uri not in self.mlflow_tracking_uris:
            # The driver writes from inside the cluster: a tenant may not point it at any address or path.
            raise refused("trackers.mlflow.tracking_uri", f"{uri!r} is not a tracking URI the operator allows "
                          f"(allowed: {self.mlflow_tracking_uris or 'none'})")

    @staticmethod
    def _checkpoint(section: dict, where: str) -> dict:
        if section.get("dir") is not None:
            raise refused(f"{where}.dir", "the server chooses where checkpoints go (under the job's run directory); leave it out")
        return section

    def _environment(self, rollout: dict | None, where: str) -> dict | None:
        """`rollout` with `agent.environment` a built-in environment, or a registered one's import path (the spec
        refused unknown names; import paths reach here and are refused)."""
        agent = (rollout or {}).get("agent") or {}
        name = agent.get("environment")
        if name is None or name in ENVIRONMENTS:
            return rollout
        registered = self.registry.environments
        if name not in registered:
            raise refused(f"{where}.agent.environment", f"{name!r} is neither a built-in environment ({', '.join(ENVIRONMENTS)}) nor one "
                          f"the operator registered ({', '.join(sorted(registered)) or 'none'}); import paths are for the trusted "
                          "entrypoints only")
        return {**rollout, "agent": {**agent, "environment": registered[name]}}

    async def _models(self, model: dict) -> dict:
        out = {**model}
        for field, flag in (("path", "trust_remote_code"), ("critic_path", "critic_trust_remote_code"), ("rm_path", "rm_trust_remote_code")):
            ref = model.get(field)
            if ref is not None:
                out[field] = await self._model(ref, f"model.{field}", want="policy")
                out[flag] = self._trust(ref, f"model.{field}", model.get(flag), f"model.{flag}", model["trust_remote_code"])
        return out

    def _trust(self, ref: str, param: str, own: bool | None, own_param: str, policy: bool) -> bool:
        """Whether the model `ref` (named at `param`) may run its repository's code: as its own flag asks
        (`own_param`), else as the policy's does, and only where the registry entry of that model allows it."""
        asked = policy if own is None else own
        if not asked:
            return False
        entry = None if CHECKPOINT_ID.match(ref) else self.registry.model_for(ref, self.tenant)
        if entry is not None and entry.trust_remote_code:
            return True
        why = f"{param} is {ref!r}, whose repository code may not run (the operator's registry allows it per model; checkpoints never)"
        if own is None:  # asked by the policy's flag, which is every model's default
            raise refused("model.trust_remote_code", f"{why}; the policy's flag is the default of every model's own: set {own_param}: false")
        raise refused(own_param, why)

    async def _model(self, ref: str, param: str, want: str) -> str:
        """A registry model's path, or the directory of one of the tenant's checkpoints."""
        match = CHECKPOINT_ID.match(ref)
        if match:
            return await self._checkpoint_model(ref, match, param, want)
        entry = self.registry.model_for(ref, self.tenant)
        if entry is None:
            names = sorted(self.registry.visible_models(self.tenant))
            raise refused(param, f"{ref!r} is neither a model the operator registered for you (registered: {names or 'none'}) "
                          "nor one of your checkpoint ids (ckpt-...; GET /v1/jobs/{id}/checkpoints)")
        return entry.path

    async def _checkpoint_model(self, ref: str, match: re.Match, param: str, want: str) -> str:
        job = await self.store.get(f"job-{match.group(1)}", self.tenant)
        step = int(match.group(2))
        found = [c for c in (job or {}).get("checkpoints") or [] if c.get("step") == step]
        if not found:
            raise refused(param, f"no checkpoint {ref!r} among your jobs' checkpoints")
        root = self.storage.strip(found[-1]["path"])
        if not root.startswith(self.storage.tenant_root(self.tenant) + "/"):
            raise refused(param, f"checkpoint {ref!r} is not in your storage area")
        if self.storage.isdir(f"{root}/{want}"):
            return self.storage.url(f"{root}/{want}")
        other = "an rm job's reward model" if want == "policy" else "a policy"
        raise refused(param, f"checkpoint {ref!r} holds no {want.replace('_', ' ')}: it holds {other}")

    async def _data(self, data: dict, algorithm: str, where: str) -> dict:
        out = {**data}
        algo = ALGORITHMS[algorithm]
        for field, kind in (("train_file", algo.data), ("eval_file", algo.eval_data)):
            ref = data.get(field)
            if ref is None:
                continue
            param = f"{where}.{field}"
            if not FILE_ID.match(str(ref)):
                raise refused(param, f"{ref!r} is not a file id: upload the file with POST /v1/files and name it by its id (file-...)")
            rec = await self.store.get_file(ref, self.tenant)
            if rec is None:
                raise refused(param, f"no file {ref!r} among your files")
            if rec["purpose"] not in PURPOSES[kind]:
                raise refused(param, f"file {ref!r} was uploaded for purpose {rec['purpose']!r}; {algorithm} reads "
                              f"{kind} data here (purpose {' or '.join(map(repr, PURPOSES[kind]))})")
            out[field] = self.storage.url(rec["path"])
        return out

    async def _reward(self, source: dict, where: str, policy_trust: bool) -> dict:
        out = {**source}
        fn, model = source.get("function"), source.get("model")
        if fn is not None:
            if fn in BUILTIN_REWARDS:
                pass
            elif fn in self.registry.reward_functions:
                out["function"] = self.registry.reward_functions[fn]
                out["name"] = source.get("name") or fn
            else:
                raise refused(f"{where}.function", f"{fn!r} is neither a built-in reward ({', '.join(BUILTIN_REWARDS)}) nor a reward "
                              f"function the operator registered ({', '.join(sorted(self.registry.reward_functions)) or 'none'}); "
                              "import paths are for the trusted entrypoints only")
        if model is not None and not model.startswith(STAGE_REF):
            out["model"] = await self._model(model, f"{where}.model", want="reward_model")
            out["name"] = source.get("name") or model
            out["trust_remote_code"] = self._trust(model, f"{where}.model", source.get("trust_remote_code"), f"{where}.trust_remote_code",
                                                   policy_trust)
        return out
