"""Under the control plane a role computes on the CPUs it declares (issue 27, item 9): tenants' quotas
count declared CPUs, so an actor's torch, OpenMP and MKL threads are pinned to them (rounded up);
`rlhf train` and `ray job submit` keep `resources.torch_threads` as asked (default: every core)."""

from __future__ import annotations

import uuid

import pytest

from orchestrator.core.spec import parse_spec
from orchestrator.runtime.placement import pinned_threads
from tests.conftest import tiny_spec


def test_threads_are_pinned_to_the_declared_cpus_only_under_the_control_plane(monkeypatch):
    monkeypatch.delenv("RLHF_JOB_ID", raising=False)
    assert [pinned_threads(None, 0.5), pinned_threads(8, 0.5)] == [None, 8]
    monkeypatch.setenv("RLHF_JOB_ID", "job-1")
    assert [pinned_threads(None, 0.5), pinned_threads(None, 1.5), pinned_threads(8, 2), pinned_threads(1, 4)] == [1, 2, 2, 1]


@pytest.mark.slow
def test_a_role_computes_with_the_threads_it_declares(ray_session, tiny_model, arith_file, tmp_path, monkeypatch):
    """Real actors of a job: torch.get_num_threads() and the OpenMP/MKL environment inside each."""
    import os

    import torch

    from orchestrator.core.data import PromptDataset
    from orchestrator.stages.driver import Orchestrator
    from orchestrator.reporting.reporters import FileReporter

    def probe(actor) -> tuple:
        return torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("MKL_NUM_THREADS")

    def threads_inside(torch_threads: int | None) -> dict[str, tuple]:
        spec = parse_spec(tiny_spec(tiny_model, arith_file, tmp_path / uuid.uuid4().hex[:6],
                                    resources={"rollout_in": "actor", "torch_threads": torch_threads,
                                               "rollout": {"num_cpus": 0.5}, "trainer": {"num_cpus": 2}}))
        orch = Orchestrator(spec, PromptDataset([[1, 2]] * 4, [{}] * 4), FileReporter(spec.run_dir), f"threads-{uuid.uuid4().hex[:6]}", 0, 0)
        try:
            orch.start()
            return {role: orch.wait(group.actors[0].__ray_call__.remote(probe), "probe") for role, group in orch.groups.items()}
        finally:
            orch.shutdown()

    monkeypatch.setenv("RLHF_JOB_ID", "job-threads")  # as the control plane launches a driver
    assert threads_inside(None) == {"rollout": (1, "1", "1"), "trainer": (2, "2", "2")}
    assert threads_inside(3) == {"rollout": (1, "1", "1"), "trainer": (2, "2", "2")}  # a tenant cannot ask for more
    monkeypatch.delenv("RLHF_JOB_ID")
    assert threads_inside(3)["rollout"][0] == 3  # trusted runs: as asked
