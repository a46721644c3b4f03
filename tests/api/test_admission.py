"""The admission queue's decisions, worked out by hand (api/admission.py `decide` is pure)."""

from api.admission import Capacity, Quota, decide, never_fits

CLUSTER = Capacity(total={"CPU": 4.0, "GPU": 0.0}, largest={"CPU": 4.0, "GPU": 0.0})
SMALL = [{"CPU": 0.5}] * 3  # a tiny GRPO job: rollout, trainer, reward


def job(i: int, tenant: str, bundles=SMALL, priority: int = 0) -> dict:
    return {"id": f"j{i}", "tenant": tenant, "seq": i, "priority": priority, "demand": bundles}


def test_admits_what_fits_in_submit_order_then_waits_naming_what_is_missing():
    waiting = [job(1, "a"), job(2, "a"), job(3, "a")]
    d = decide(waiting, [], CLUSTER, {}, Quota())
    # 1.5 + 1.5 = 3 of 4 CPUs; the third needs 1.5 with 1 free.
    assert d.admit == ["j1", "j2"]
    assert d.waiting == {"j3": (1, "waiting for 0.5 more CPUs (the job asks for 1.5 CPUs, 0 GPUs; 1 CPUs and 0 GPUs are free)")}


def test_running_jobs_hold_their_resources():
    d = decide([job(2, "a")], [job(1, "b", [{"CPU": 3.0}])], CLUSTER, {}, Quota())
    assert d.admit == [] and d.waiting["j2"][1].startswith("waiting for 0.5 more CPUs")


def test_fair_share_the_tenant_holding_least_goes_first():
    # b already holds 1.5 CPUs, a nothing: a's later job goes before b's earlier one.
    d = decide([job(2, "b"), job(3, "a")], [job(1, "b")], CLUSTER, {}, Quota())
    assert d.admit == ["j3"]
    assert d.waiting == {"j2": (1, "waiting for 0.5 more CPUs (the job asks for 1.5 CPUs, 0 GPUs; 1 CPUs and 0 GPUs are free)")}


def test_priority_first_then_fair_share():
    d = decide([job(1, "a"), job(2, "b", priority=5), job(3, "b")], [], Capacity({"CPU": 1.5, "GPU": 0}, {"CPU": 1.5, "GPU": 0}),
               {}, Quota())
    assert d.admit == ["j2"]
    # Then a (holding nothing) before b's second job; the first in line waits for CPUs, the next waits behind it.
    assert d.waiting == {"j1": (1, "waiting for 1.5 more CPUs (the job asks for 1.5 CPUs, 0 GPUs; 0 CPUs and 0 GPUs are free)"),
                         "j3": (2, "behind job j1, which waits for resources")}


def test_quota_holds_a_tenant_back_and_lets_others_pass():
    quotas = {"a": Quota(cpus=2.0)}
    d = decide([job(2, "a"), job(3, "b")], [job(1, "a")], CLUSTER, quotas, Quota())
    assert d.admit == ["j3"]
    assert d.waiting == {"j2": (1, "tenant quota: 1.5 of 2 CPUs in use (the job asks for 1.5 CPUs, 0 GPUs)")}


def test_no_backfill_behind_a_job_waiting_for_resources():
    big = [{"CPU": 3.0}]
    d = decide([job(1, "a", big), job(2, "b")], [job(0, "c", [{"CPU": 2.0}])], CLUSTER, {}, Quota())
    assert d.admit == []  # j2 would fit (2 free) but would starve j1
    assert d.waiting["j2"] == (2, "behind job j1, which waits for resources")


def test_unknown_capacity_admits_nothing():
    d = decide([job(1, "a")], [], None, {}, Quota())
    assert d.admit == [] and "not known" in d.waiting["j1"][1]


def test_never_fits_names_what_it_asks_and_what_the_cluster_has():
    assert never_fits([{"CPU": 3.0}, {"CPU": 3.0}], CLUSTER) == "the job asks for 6 CPUs in all; the cluster has 4"
    assert never_fits([{"CPU": 0.5, "GPU": 1.0}], CLUSTER) == "the job asks for 1 GPUs in all; the cluster has 0"
    two_nodes = Capacity(total={"CPU": 8.0, "GPU": 0.0}, largest={"CPU": 4.0, "GPU": 0.0})
    assert never_fits([{"CPU": 5.0}], two_nodes) == "one of the job's bundles asks for 5 CPUs; the cluster's largest node has 4"
    assert never_fits(SMALL, CLUSTER) is None
