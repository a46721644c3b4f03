"""What the operator allows over REST: base models and reward functions, by name.

    # registry.yaml (settings: RLHF_API_REGISTRY_FILE)
    models:
      qwen-0.5b:
        path: /models/Qwen2.5-0.5B-Instruct      # a local directory, an fsspec URL, or a hub id
        tenants: ["*"]                           # who may use it ("*": every tenant)
        trust_remote_code: false                 # may this model run its repository's code (a checkpoint's never)
    reward_functions:
      math-verify: my_rewards.math:verify        # name -> import path, installed on the cluster
    environments:
      sql-agent: my_envs.sql:SqlEnv              # name -> an Environment class (docs/agents.md), installed on the cluster

A tenant's spec names a model here or one of its own checkpoints by id, a built-in reward, a reward
function here by name, or a reward model here or among its checkpoints; a built-in environment or one
here by name. Nothing else reaches the
cluster from REST. The file is read at startup (a bad file stops the API, naming the entry).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from orchestrator.core.environments import ENVIRONMENTS

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$"
IMPORT_PATH = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"


class RegistryError(ValueError):
    """The registry file is missing or malformed; the message names the file and the entry."""


class RegisteredModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(..., min_length=1, description="Local directory, fsspec URL or hub id of the model.")
    tenants: list[str] = Field(default_factory=lambda: ["*"], description="Tenants that may use it; '*' is every tenant.")
    trust_remote_code: bool = Field(False, description="Whether this model may run its repository's code where a spec asks for it "
                                    "(api/tenant_spec.py): its entry decides for it alone, never for another model of the same job.")
    description: str = ""

    def allows(self, tenant: str) -> bool:
        return "*" in self.tenants or tenant in self.tenants


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, RegisteredModel] = Field(default_factory=dict)
    reward_functions: dict[str, str] = Field(default_factory=dict)
    environments: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None) -> "Registry":
        if path is None:
            return cls()
        path = Path(path)
        if not path.is_file():
            raise RegistryError(f"registry file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
            registry = cls.model_validate(raw)
        except yaml.YAMLError as err:
            raise RegistryError(f"{path}: invalid YAML: {err}") from None
        except ValidationError as err:
            where = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            raise RegistryError(f"{path}: {where}") from None
        for name in [*registry.models, *registry.reward_functions, *registry.environments]:
            if not re.match(NAME, name):
                raise RegistryError(f"{path}: {name!r} is not a valid name (letters, digits, _.:- ; at most 128)")
        for section, what in (("reward_functions", "function"), ("environments", "Class")):
            for name, target in getattr(registry, section).items():
                if not re.match(IMPORT_PATH, target):
                    raise RegistryError(f"{path}: {section}.{name}: {target!r} is not an import path 'pkg.module:{what}'")
        for name in registry.environments:
            if name in ENVIRONMENTS:
                raise RegistryError(f"{path}: environments.{name}: a built-in environment has this name; choose another")
        return registry

    def model_for(self, name: str, tenant: str) -> RegisteredModel | None:
        """The model a tenant may use under this name, else None (unknown and forbidden look the same)."""
        entry = self.models.get(name)
        return entry if entry is not None and entry.allows(tenant) else None

    def visible_models(self, tenant: str) -> dict[str, RegisteredModel]:
        return {n: m for n, m in self.models.items() if m.allows(tenant)}
