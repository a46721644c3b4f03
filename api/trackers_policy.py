"""What a tenant's spec may ask of the experiment trackers over REST (the trusted entrypoints are not checked).

A tracker's server is reached from the cluster, with credentials the operator put there: a tenant
must not choose where the job's config and metrics go. MLflow tracking URIs are checked against
the operator's list (api/tenant_spec.py); W&B online mode is an operator setting.
"""

from __future__ import annotations

from typing import Any

from api.errors import APIError


def check_wandb_mode(spec: dict[str, Any], online_allowed: bool) -> None:
    """A 422 naming `trackers.wandb.mode` and the setting, for `online` while the operator has not allowed it."""
    mode = ((spec.get("trackers") or {}).get("wandb") or {}).get("mode")
    if mode == "online" and not online_allowed:
        raise APIError(422, "invalid_spec", "trackers.wandb.mode: 'online' is not allowed on this service: it would stream the "
                       "job's config and metrics to a W&B entity of the spec's choosing with the operator's key (the operator "
                       "allows it with the setting RLHF_API_WANDB_ONLINE); use 'offline', written under the job's run directory",
                       "trackers.wandb.mode")
