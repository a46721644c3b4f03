"""One redaction step between what a job's driver writes and what its tenant reads: the events, a
failed job's error, the driver's log and the JSON files of a downloaded checkpoint.

The driver runs on server paths (a registry model's directory, an upload's place in the store, the
run directory, a node's cached copy of a URL); the tenant named those things by name and id. Each
server path becomes what the tenant named (`tiny`, `file-...`, `ckpt-...`); a path in the tenant's
own area becomes relative to it (`runs/job-.../checkpoints/step_000002`); any other registry model
or place under the storage root becomes a placeholder. Events, errors and logs also lose network
addresses (the Ray cluster's `127.0.0.1:6379`, `http://10.0.0.5:8265`, a Redis URL with its
password); a checkpoint's JSON files lose paths only (a vocabulary may hold `http://` tokens).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, NamedTuple

STORAGE = "<storage>"
MODEL = "<model>"
ADDRESS = "<address>"

# JSON files of a checkpoint up to this size are rewritten; larger ones (a big tokenizer.json) are
# weights and vocabularies that hold no path, and are sent as they are.
JSON_MAX_BYTES = 8 << 20


class Rule(NamedTuple):
    needle: str  # a string every match contains: a text without it skips the rule's regex
    regex: str
    public: str  # what a match becomes


class Redactor:
    """Rewrites a string, or every string in nested lists and dicts, by a fixed table of rules; with
    `addresses`, network addresses go too (see strip_addresses)."""

    def __init__(self, rules: list[Rule], addresses: bool = False):
        """Earlier rules win where two match at one place."""
        self.rules, self.addresses = rules, addresses
        self._patterns: dict[tuple[int, ...], re.Pattern] = {}

    def paths(self, value: str) -> str:
        # One regex of only the rules whose needle the text holds: an alternation of them all costs
        # every rule at every character (a 2 MB log: 4.7 s), a substring search almost nothing.
        active = tuple(i for i, rule in enumerate(self.rules) if rule.needle in value)
        if not active:
            return value
        if active not in self._patterns:
            self._patterns[active] = re.compile("|".join(f"(?P<r{i}>{self.rules[i].regex})" for i in active))
        return self._patterns[active].sub(lambda m: self.rules[int(m.lastgroup[1:])].public, value)

    def text(self, value: str) -> str:
        return strip_addresses(self.paths(value)) if self.addresses else self.paths(value)

    def __call__(self, value: Any) -> Any:
        return each_string(value, self.text)

    def json_bytes(self, data: bytes) -> bytes:
        """A checkpoint's JSON file with the paths in its strings redacted (not addresses: a vocabulary
        may hold `http://...` tokens); the same bytes when nothing changes. Not JSON: redacted as text."""
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            text = data.decode("utf-8", "replace")
            out = self.paths(text)
            return data if out == text else out.encode()
        out = each_string(doc, self.paths)
        return data if out == doc else json.dumps(out, indent=1).encode()


def each_string(value: Any, change) -> Any:
    """`value` with `change` applied to every string in it (lists and dicts walked)."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {k: each_string(v, change) for k, v in value.items()}
    if isinstance(value, list):
        return [each_string(v, change) for v in value]
    return value


def literal(server: str, public: str) -> Rule:
    """`server` whole (not inside a longer name or path) becomes `public`."""
    end = "" if server.endswith("/") else r"(?![\w-])"
    return Rule(server, r"(?<![\w-])" + re.escape(server) + end, public)


def cached_copy(url: str, public: str) -> Rule:
    """A node's copy of `url` becomes `public`: orchestrator/core/storage.local_copy names it
    `<cache>/<sha256 of the url>-<its last part>`, wherever the node keeps its cache."""
    name = hashlib.sha256(url.encode()).hexdigest()[:32] + "-" + url.rstrip("/").rsplit("/", 1)[-1]
    return Rule(name, r"(?:[^\s'\"]*/)?" + re.escape(name) + r"(?![\w-])", public)


def for_job(rec: dict[str, Any], storage, registry=None) -> Redactor:
    """The redactor of one job's output, for the job's tenant."""
    tenant = rec["tenant"]
    named: dict[str, str] = {}
    _resolved_names(rec.get("launch_spec") or {}, rec.get("spec") or {}, named)
    if registry is not None:
        for name, entry in sorted(registry.models.items()):
            named.setdefault(entry.path, name if entry.allows(tenant) else MODEL)
    rules: list[Rule] = []
    for server, public in named.items():
        if "://" in server and not server.startswith("file://"):
            rules.append(cached_copy(server, public))
            if server.startswith(storage.root_url):
                rules.append(literal(storage.strip(server), public))
        rules.append(literal(server, public))
    area = storage.tenant_root(tenant)
    rules += [literal(p + "/", "") for p in {storage.url(area), area}]
    rules.append(literal(storage.root_url, STORAGE))
    if storage.root != storage.root_url:  # an object store's bucket path: only as a path's start ("store" is also a word)
        rules.append(literal(storage.root + "/", STORAGE + "/"))
    return Redactor(_longest_first(rules), addresses=True)  # an error from Ray or Redis may name the cluster's hosts


def _longest_first(rules: list[Rule]) -> list[Rule]:
    """Cached copies first (their regex starts with any path), then literals longest first: a
    checkpoint's own path wins over the tenant's area it lies in."""
    return sorted(rules, key=lambda rule: (not rule.regex.startswith("(?:"), -len(rule.regex)))


def _resolved_names(launch: Any, spec: Any, out: dict[str, str]) -> None:
    """Server string -> the tenant's string, wherever the spec the job runs (the launch spec) holds
    another string than the spec the tenant sent: what api/tenant_spec.py resolved."""
    if isinstance(launch, dict) and isinstance(spec, dict):
        for key, value in launch.items():
            _resolved_names(value, spec.get(key), out)
    elif isinstance(launch, list) and isinstance(spec, list):
        for value, given in zip(launch, spec):
            _resolved_names(value, given, out)
    elif isinstance(launch, str) and isinstance(spec, str) and launch != spec and launch:
        out.setdefault(launch, spec)


# --- the Ray cluster's addresses in a driver's log -------------------------------------------------

_NET_URL = re.compile(r"\b(https?|wss?|rediss?|ray|grpcs?|gcs|tcp)://[^\s/'\"<>\x1b]+")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?::\d{1,5})?(?!\d)")
_IPV6 = re.compile(r"\[[0-9A-Fa-f:.]+\](?::\d{1,5})?")
_NAMED_ADDRESS = re.compile(r"(?i)(address\W{1,4})[A-Za-z0-9][\w.-]*:\d{1,5}")


def strip_addresses(text: str) -> str:
    """`text` without network addresses: URLs keep their scheme and path, lose host, port and any
    credentials; bare IPv4/IPv6 addresses and `address: host:port` lose the address."""
    text = _NET_URL.sub(lambda m: f"{m.group(1)}://{ADDRESS}", text)
    text = _IPV6.sub(ADDRESS, text)
    text = _IPV4.sub(ADDRESS, text)
    return _NAMED_ADDRESS.sub(lambda m: m.group(1) + ADDRESS, text)
