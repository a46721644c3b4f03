"""`rlhf serve`, `rlhf keys create` and `rlhf jobs submit|list|get|cancel|watch` (a small REST client, for CI)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

EXIT_BY_STATUS = {"succeeded": 0, "failed": 1, "cancelled": 130}


def register(sub) -> None:
    p = sub.add_parser("serve", help="Run the REST control plane (settings from RLHF_API_* environment variables).")
    p.add_argument("--host", help="Bind address (default RLHF_API_HOST or 127.0.0.1).")
    p.add_argument("--port", type=int, help="Port (default RLHF_API_PORT or 8000).")
    p.set_defaults(func=_serve)

    p = sub.add_parser("keys", help="Manage API keys.")
    ksub = p.add_subparsers(dest="keys_command", required=True)
    k = ksub.add_parser("create", help="Make a key for a tenant; its hash goes to the keys file, the key is printed once.")
    k.add_argument("--tenant", required=True, help="Tenant the key acts for.")
    k.add_argument("--file", default=None, help="Keys file (default RLHF_API_API_KEYS_FILE or api_keys.yaml).")
    k.set_defaults(func=_keys_create)

    p = sub.add_parser("jobs", help="Submit and follow jobs through the REST API (RLHF_API_URL, RLHF_API_KEY).")
    p.add_argument("--url", help="API base URL (default RLHF_API_URL or http://127.0.0.1:8000).")
    p.add_argument("--api-key", help="API key (default RLHF_API_KEY).")
    jsub = p.add_subparsers(dest="jobs_command", required=True)

    j = jsub.add_parser("submit", help="Submit a job spec (YAML or JSON); prints the job as JSON.")
    j.add_argument("spec", help="Job spec file.")
    j.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="Metadata pair (repeatable).")
    j.add_argument("--idempotency-key", help="Retry-safe submission: the same key and spec return the same job.")
    j.add_argument("--model", help="Set model.path: a model of the operator's registry (`rlhf models`) or one of your checkpoint ids.")
    j.add_argument("--watch", action="store_true", help="Then follow it to the end (exit code: 0 succeeded, 1 failed, 130 cancelled).")
    j.set_defaults(func=_submit)

    f = sub.add_parser("files", help="Upload and list your data files (POST /v1/files).")
    f.add_argument("--url", help="API base URL (default RLHF_API_URL or http://127.0.0.1:8000).")
    f.add_argument("--api-key", help="API key (default RLHF_API_KEY).")
    fsub = f.add_subparsers(dest="files_command", required=True)
    u = fsub.add_parser("upload", help="Upload a JSONL or Parquet file; prints its record (its id goes in data.train_file).")
    u.add_argument("path")
    u.add_argument("--purpose", required=True, choices=["train", "eval", "sft", "preference"])
    u.set_defaults(func=_upload)
    m = sub.add_parser("models", help="List the models the operator registered for you.")
    m.add_argument("--url", help="API base URL (default RLHF_API_URL or http://127.0.0.1:8000).")
    m.add_argument("--api-key", help="API key (default RLHF_API_KEY).")
    m.set_defaults(func=lambda args: print(json.dumps(_run(lambda: _client(args)._json(_client(args).http.get("/v1/models"))), indent=1)) or 0)

    j = jsub.add_parser("list", help="List jobs, newest first.")
    j.add_argument("--status", help="Only jobs in this status.")
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--after", help="Id of the last job of the previous page.")
    j.add_argument("--json", action="store_true", help="Print the raw JSON page.")
    j.set_defaults(func=_list)

    for name, helptext in (("get", "Show a job as JSON."), ("cancel", "Cancel a job."), ("watch", "Follow a job with a live progress bar.")):
        j = jsub.add_parser(name, help=helptext)
        j.add_argument("job_id")
        j.set_defaults(func={"get": _get, "cancel": _cancel, "watch": _watch}[name])


def _serve(args) -> int:
    from api.main import serve
    from api.settings import Settings

    from pydantic import ValidationError

    from api.auth import KeysFileError
    from api.registry import RegistryError

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
        from api.main import create_app

        app = create_app(settings)  # reads the keys file, the registry and the store: their errors now, in one line
    except ValidationError as err:
        problems = "; ".join(f"RLHF_API_{'_'.join(str(p) for p in e['loc'][:1]).upper()} ({'.'.join(str(p) for p in e['loc'])}): {e['msg']}"
                             for e in err.errors())
        print(f"error: invalid settings: {problems}", file=sys.stderr)
        return 2
    except (KeysFileError, RegistryError, OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    serve(settings, app)
    return 0


def _keys_create(args) -> int:
    from api.auth import add_key
    from api.settings import Settings

    path = Path(args.file) if args.file else Settings().api_keys_file
    key = add_key(path, args.tenant)
    print(f"created a key for tenant {args.tenant!r} (its SHA-256 is in {path}; the key is not stored, keep it now):", file=sys.stderr)
    print(key)
    return 0


def _client(args):
    from api.client import Client

    return Client(args.url, args.api_key)


def _run(fn):
    """Run a client call, turning API and connection errors into one line on stderr and exit 1."""
    import httpx

    from api.client import ApiError

    try:
        return fn()
    except ApiError as err:
        print(f"error: {err}", file=sys.stderr)
    except httpx.TransportError as err:
        print(f"error: cannot reach the API: {err}", file=sys.stderr)
    raise SystemExit(1)


def _submit(args) -> int:
    from orchestrator.core.spec import SpecError, read_spec_file

    try:
        spec = read_spec_file(args.spec)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metadata = {}
    for pair in args.metadata:
        key, sep, value = pair.partition("=")
        if not sep:
            print(f"error: --metadata {pair!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        metadata[key] = value
    client = _client(args)
    from api.client import rest_spec

    # Over REST a spec names data by file id: local data files are uploaded first (POST /v1/files).
    spec = _run(lambda: rest_spec(spec, client, args.model, say=lambda msg: print(msg, file=sys.stderr)))
    job = _run(lambda: client.submit(spec, metadata or None, args.idempotency_key))
    print(json.dumps(job, indent=1))
    if args.watch:
        return _follow(client, job["id"])
    return 0


def _upload(args) -> int:
    if not Path(args.path).is_file():
        print(f"error: {args.path}: no such file", file=sys.stderr)
        return 2
    print(json.dumps(_run(lambda: _client(args).upload(args.path, args.purpose)), indent=1))
    return 0


def _list(args) -> int:
    page = _run(lambda: _client(args).list(args.limit, args.after, args.status))
    if args.json:
        print(json.dumps(page, indent=1))
        return 0
    print(f"{'ID':30} {'NAME':20} {'STATUS':11} {'STEP':>9}  REWARD")
    for job in page["data"]:
        reward = (job.get("metrics") or {}).get("reward/mean")
        steps = f"{job['step']}/{job['total_steps'] or '?'}"
        print(f"{job['id']:30} {job['name'][:20]:20} {job['status']:11} {steps:>9}  {'' if reward is None else f'{reward:.3f}'}")
    if page["has_more"]:
        print(f"... more: --after {page['last_id']}")
    return 0


def _get(args) -> int:
    print(json.dumps(_run(lambda: _client(args).get(args.job_id)), indent=1))
    return 0


def _cancel(args) -> int:
    job = _run(lambda: _client(args).cancel(args.job_id))
    print(f"{job['id']}: {job['status']}")
    return 0


def _watch(args) -> int:
    return _follow(_client(args), args.job_id)


def _follow(client, job_id: str) -> int:
    """A progress bar over the job's steps with the live reward, fed by the metrics SSE stream."""
    from tqdm import tqdm

    job = _run(lambda: client.get(job_id))
    bar = tqdm(total=job["total_steps"], initial=job["step"] or 0, desc=f"{job_id} {job['status']}", unit="step", dynamic_ncols=True)
    try:
        for m in _run(lambda: client.stream(job_id, "metrics")):
            if bar.total is None:
                bar.total = client.get(job_id)["total_steps"]
            values = m["values"]
            shown = {"reward": values.get("reward/mean"), "kl": values.get("kl")}
            bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None}, refresh=False)
            bar.update(max(0, m["step"] - bar.n))
        job = _run(lambda: client.get(job_id))
        bar.set_description(f"{job_id} {job['status']}")
    finally:
        bar.close()
    line = f"{job_id}: {job['status']}"
    if job.get("error"):
        line += f" ({job['error']['code']}: {job['error']['message']})"
    print(line)
    return EXIT_BY_STATUS.get(job["status"], 1)
