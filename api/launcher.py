"""Launches and stops jobs on Ray through its Job Submission API; the API never trains in-process.

JobSubmissionClient is synchronous (requests), so every call runs in a worker thread.

A job's spec and Redis credentials reach its driver in a launch file, `<run dir>/.launch.json`
(mode 0600 on a local store), never in the Ray job's runtime_env: Ray writes a runtime_env's
env_vars into the command line of every worker process it starts for the job
(`setup_worker.py --serialized-runtime-env-context=...`), where any user of the node reads them
with `ps`. The runtime_env carries only the file's path and what is no secret.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from api.settings import Settings
from api.storage import ArtifactStore
from orchestrator.core.layout import driver_cpus
from orchestrator.core.spec import JobSpec

log = logging.getLogger("api")

ENTRYPOINT = "python -m orchestrator.entrypoints.run --spec launch:RLHF_LAUNCH_FILE"
LAUNCH_FILE = ".launch.json"  # in the job's run directory: {"spec": ..., "env": {"RLHF_REDIS_URL": ...}}
_JOB_ID = re.compile(r"job-[0-9a-f]{24}")  # as api/routers/jobs.py makes them


class RayUnavailable(RuntimeError):
    """The Ray dashboard / Job Submission API did not answer."""


class RayJobMissing(LookupError):
    """Ray has no job with this submission id."""


@dataclass(frozen=True)
class RayJobState:
    status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    message: str
    exit_code: int | None


@dataclass(frozen=True)
class LiveRayJob:
    submission_id: str
    job_id: str
    tenant: str
    name: str
    attempt: int
    env: dict  # the runtime_env's env_vars, with RLHF_SPEC_JSON and RLHF_REDIS_URL from the job's launch file
    started_at: float | None


_RAY_IMPORT = threading.Lock()


def import_ray() -> None:
    """Import the parts of Ray the API uses, once, one thread at a time. The API imports Ray lazily (it starts while Ray
    is down) and mostly in worker threads (asyncio.to_thread): two threads importing it for the first time at once can
    see it partly initialised (ImportError: cannot import name ... from partially initialized module 'ray.util'), which
    answered the first POST /v1/jobs of a new API process with a 500 while its reconciler asked Ray about a job."""
    with _RAY_IMPORT:
        import ray  # noqa: F401
        import ray.job_submission  # noqa: F401
        import ray.util.state  # noqa: F401


class RayLauncher:
    TIMEOUT_S = 30.0

    def __init__(self, settings: Settings):
        self.settings = settings
        self._client = None
        self._lock = threading.Lock()
        self._storage: ArtifactStore | None = None

    def _get_client(self):
        # Created lazily and again after a failure: the API starts even while Ray is down.
        with self._lock:
            if self._client is None:
                import_ray()
                from ray.job_submission import JobSubmissionClient

                try:
                    self._client = JobSubmissionClient(self.settings.ray_address)
                except Exception as err:
                    raise RayUnavailable(f"Ray Job Submission API at {self.settings.ray_address} is unreachable: {err}") from None
            return self._client

    async def _call(self, fn, *args, **kwargs):
        def run():
            client = self._get_client()
            try:
                return getattr(client, fn)(*args, **kwargs)
            except RuntimeError as err:  # the SDK's way of passing on an HTTP error status
                if "status code 404" in str(err):
                    raise RayJobMissing(str(err)) from None
                raise
            except Exception as err:  # connection refused, timeouts, a rejected Ray auth token
                with self._lock:
                    self._client = None
                raise RayUnavailable(f"Ray Job Submission API at {self.settings.ray_address} failed: {type(err).__name__}: {err}") from None

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), self.TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RayUnavailable(f"Ray Job Submission API at {self.settings.ray_address} did not answer {fn} in {self.TIMEOUT_S:.0f} s") from None

    async def submit(self, job_id: str, tenant: str, name: str, spec: dict, redis_user: tuple[str, str] | None = None,
                     submission_id: str | None = None, restarts_used: int = 0) -> str:
        """`redis_user`: the job's own Redis user and password, put into the URL its processes get.
        A later attempt of a job (`restarts_used` > 0, its own `submission_id`) resumes from the job's
        last checkpoint with what is left of its restart budget."""
        url = self.settings.jobs_redis_url
        if redis_user is not None:
            parts = urlsplit(url)
            netloc = f"{quote(redis_user[0], safe='')}:{quote(redis_user[1], safe='')}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
            url = urlunsplit(parts._replace(netloc=netloc))
        launch_file = self.launch_file(tenant, job_id)
        launch = json.dumps({"spec": spec, "env": {"RLHF_REDIS_URL": url}}).encode()
        await asyncio.to_thread(self._write_launch_file, launch_file, launch)
        runtime_env: dict = {
            "env_vars": {
                "RLHF_LAUNCH_FILE": self.storage.url(launch_file),
                "RLHF_JOB_ID": job_id,
                "RLHF_TENANT": tenant,  # tags the job's Ray gauges and tracker runs
                "RLHF_RESTARTS_USED": str(restarts_used),
            }
        }
        if "://" in self.settings.storage_root and self.settings.storage_options:
            # An object store: the job's processes read and write it with the same options (core/storage.py).
            runtime_env["env_vars"]["RLHF_STORAGE_OPTIONS"] = json.dumps(self.settings.storage_options)
        if self.settings.ray_working_dir:
            runtime_env["working_dir"] = self.settings.ray_working_dir
        # A driver that computes the rewards asks Ray for their CPUs, as a reward actor would (admission counts them too).
        try:
            cpus = driver_cpus(JobSpec.model_validate(spec))
        except ValueError:  # a recorded spec that no longer validates: its driver reports why, as before
            cpus = 0.0
        return await self._call(
            "submit_job",
            entrypoint=ENTRYPOINT + (" --resume" if restarts_used else ""),
            submission_id=submission_id or job_id,
            runtime_env=runtime_env,
            **({"entrypoint_num_cpus": cpus} if cpus else {}),
            # The launch file's digest: the job's processes can write its run directory, Ray's metadata they cannot.
            metadata={"tenant": tenant, "name": name, "rlhf_job_id": job_id, "attempt": str(restarts_used + 1),
                      "launch_sha256": hashlib.sha256(launch).hexdigest()},
        )

    @property
    def storage(self) -> ArtifactStore:
        if self._storage is None:
            self._storage = ArtifactStore(self.settings.storage_root, self.settings.storage_options)
        return self._storage

    def launch_file(self, tenant: str, job_id: str) -> str:
        """Where a job's launch file is, in the store's own terms: computed here, never taken from what
        a Ray job says (anyone who may submit to Ray could name any file)."""
        return f"{self.storage.run_path(tenant, job_id)}/{LAUNCH_FILE}"

    def _write_launch_file(self, path: str, data: bytes) -> None:
        if not self.storage.local:  # an object store: who reads it is the store's access control
            with self.storage.open(path, "wb") as f:
                f.write(data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the owner only, from the first byte
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # a driver of an earlier attempt never reads half a file

    def _read_launch_env(self, tenant: str, job_id: str, sha256: str | None) -> dict[str, str]:
        """RLHF_SPEC_JSON and RLHF_REDIS_URL of a job, from its launch file: empty if it has none, or
        if its content is not what this service wrote (`sha256`, from the Ray job's metadata), since a
        record rebuilt from it would launch whatever spec a job's own processes wrote there."""
        try:
            with self.storage.open(self.launch_file(tenant, job_id), "rb") as f:
                data = f.read()
            if sha256 is None or not hmac.compare_digest(hashlib.sha256(data).hexdigest(), sha256):
                log.warning("job %s's launch file is not the one this service wrote: its record is not rebuilt from it", job_id)
                return {}
            content = json.loads(data)
        except (OSError, ValueError):
            return {}
        env = {k: v for k, v in (content.get("env") or {}).items() if isinstance(v, str)}
        return {**env, "RLHF_SPEC_JSON": json.dumps(content.get("spec") or {})}

    async def live_jobs(self) -> list[LiveRayJob]:
        """This service's Ray jobs that are PENDING or RUNNING (their metadata names the job), with
        what their submission carries and their launch file holds: how records lost by Redis are rebuilt."""
        out = []
        for job in await self._call("list_jobs"):
            meta = job.metadata or {}
            if not meta.get("rlhf_job_id") or str(job.status.value) not in ("PENDING", "RUNNING") or not job.submission_id:
                continue
            env = dict((job.runtime_env or {}).get("env_vars") or {})
            if "RLHF_LAUNCH_FILE" in env and meta.get("tenant") and _JOB_ID.fullmatch(meta["rlhf_job_id"]):  # (no path of anyone's choosing)
                env.update(await asyncio.to_thread(self._read_launch_env, meta["tenant"], meta["rlhf_job_id"], meta.get("launch_sha256")))
            out.append(LiveRayJob(job.submission_id, meta["rlhf_job_id"], meta.get("tenant") or "", meta.get("name") or "",
                                  int(meta.get("attempt") or 1), env, (job.start_time or 0) / 1000 or None))
        return out

    async def capacity(self):
        """The cluster's alive nodes' resources (admission.Capacity), asked of Ray's state API."""
        from api.admission import Capacity

        def ask():
            import_ray()
            from ray.util.state import list_nodes

            try:
                nodes = [n for n in list_nodes(address=self.settings.ray_address, limit=10000, timeout=10) if n.state == "ALIVE"]
            except Exception as err:  # connection refused, timeouts, a rejected token
                raise RayUnavailable(f"Ray's state API at {self.settings.ray_address} failed: {type(err).__name__}: {err}") from None
            totals = [{r: float(n.resources_total.get(r, 0.0)) for r in ("CPU", "GPU")} for n in nodes]
            return Capacity(total={r: sum(t[r] for t in totals) for r in ("CPU", "GPU")},
                            largest={r: max((t[r] for t in totals), default=0.0) for r in ("CPU", "GPU")})

        try:
            return await asyncio.wait_for(asyncio.to_thread(ask), self.TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RayUnavailable(f"Ray's state API at {self.settings.ray_address} did not answer in {self.TIMEOUT_S:.0f} s") from None

    async def stop(self, job_id: str) -> bool:
        return await self._call("stop_job", job_id)

    async def state(self, job_id: str) -> RayJobState:
        info = await self._call("get_job_info", job_id)
        return RayJobState(str(info.status.value), info.message or "", info.driver_exit_code)

    async def logs(self, job_id: str) -> str:
        return await self._call("get_job_logs", job_id)

    async def ping(self) -> bool:
        await self._call("get_version")
        return True

    def dashboard_url(self, job_id: str) -> str:
        return f"{self.settings.dashboard_url}/#/jobs/{job_id}"
