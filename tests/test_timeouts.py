"""Every wait on an actor has a deadline (`fault_tolerance.call_timeout_s`, orchestrator/runtime/waits.py): a
hang injected into a real job's actor, in an SFT stage, a DPO stage and a weight sync, fails the job
with a `timeout` error that names the phase.

The hang rides in with the model: its directory holds its own modeling code (`model.trust_remote_code`),
a tiny Qwen2 whose forward (or weight load) sleeps, loaded by the actors exactly as any model is.
(tests/test_layers.py checks that no wait in the source goes around orchestrator/runtime/waits.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import read_jsonl, run_entrypoint, tiny_spec, write_spec

pytestmark = pytest.mark.slow

# Which call of the model sleeps for an hour.
HANGS = {
    "training_forward": "def forward(self, *args, **kwargs):\n"
                        "        if torch.is_grad_enabled():\n            time.sleep(3600)\n"
                        "        return super().forward(*args, **kwargs)\n",
    "scoring_forward": "def forward(self, *args, **kwargs):\n"
                       "        if not torch.is_grad_enabled():\n            time.sleep(3600)\n"
                       "        return super().forward(*args, **kwargs)\n",
    "weight_load": "def load_state_dict(self, *args, **kwargs):\n        time.sleep(3600)\n",
}


def hanging_model(tiny_model: Path, out: Path, hang: str) -> Path:
    """A copy of the tiny model whose `hang` sleeps (its class comes from the directory's own code)."""
    shutil.copytree(tiny_model, out)
    (out / "modeling_hang.py").write_text(
        "import time\n\nimport torch\nfrom transformers import Qwen2ForCausalLM\n\n\n"
        f"class HangingQwen2(Qwen2ForCausalLM):\n    {HANGS[hang]}")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_hang.HangingQwen2"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def timeout_error(spec: dict, tmp_path: Path, ray_head) -> dict:
    """Run the job (2 s deadline per wait) on the session's Ray; its error event, after checking it failed."""
    spec["fault_tolerance"] = {"call_timeout_s": 2}
    spec["model"]["trust_remote_code"] = True
    result = run_entrypoint(write_spec(tmp_path / "job.yaml", spec), timeout=300, ray=ray_head)
    assert result.returncode == 1, result.stderr[-3000:]
    events = read_jsonl(Path(spec["output_dir"]) / "events.jsonl")
    assert events[-1]["status"] == "failed", events[-3:]
    return [e for e in events if e["type"] == "error"][-1]


def test_an_sft_step_that_hangs_fails_the_job_at_the_timeout(ray_head, tiny_model, tmp_path):
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}) + "\n" for a in range(4) for b in range(4)))
    model = hanging_model(tiny_model, tmp_path / "hang_training_forward", "training_forward")
    spec = tiny_spec(model, data, tmp_path / "run", algorithm={"name": "sft"})
    del spec["rewards"]
    error = timeout_error(spec, tmp_path, ray_head)
    assert (error["code"], error["message"]) == ("timeout", "the update phase of step 1 did not finish within fault_tolerance.call_timeout_s=2 s")


def test_a_dpo_reference_that_hangs_fails_the_job_at_the_timeout(ray_head, tiny_model, tmp_path):
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n"
                            for a in range(4) for b in range(4)))
    model = hanging_model(tiny_model, tmp_path / "hang_scoring_forward", "scoring_forward")
    spec = tiny_spec(model, data, tmp_path / "run", algorithm={"name": "dpo"})
    del spec["rewards"]
    error = timeout_error(spec, tmp_path, ray_head)
    assert (error["code"], error["message"]) == ("timeout", "the reference phase of step 1 did not finish within fault_tolerance.call_timeout_s=2 s")


def test_a_weight_sync_that_hangs_fails_the_job_at_the_timeout(ray_head, tiny_model, arith_file, tmp_path):
    # Rollout actors that load the trainer's weights from the object store after each update.
    model = hanging_model(tiny_model, tmp_path / "hang_weight_load", "weight_load")
    spec = tiny_spec(model, arith_file, tmp_path / "run", rollout={"weight_sync": "object_store"}, resources={"rollout_in": "actor"})
    error = timeout_error(spec, tmp_path, ray_head)
    assert (error["code"], error["message"]) == ("timeout", "the weight_sync phase of step 1 did not finish within fault_tolerance.call_timeout_s=2 s")
