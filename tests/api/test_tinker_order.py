"""A training run's calls run in the order of the SDK's seq_id across API processes (`api.tinker.Futures`): behind a
load balancer a client's forward_backward may go to one process and its optim_step to another. Two Futures (two
processes' worth: each its own id and heartbeat) on the session's real Redis, in one event loop; the calls record
when they run."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from api.tinker import Futures
from tests.api.conftest import run_async


def _futures(redis_url: str) -> tuple[aioredis.Redis, Futures, Futures]:
    r = aioredis.from_url(redis_url, decode_responses=True)
    return r, Futures(r), Futures(r)


def test_a_runs_calls_run_in_seq_order_whichever_process_got_them(redis_url):
    """seq 1 and 3 reach process A, 2 reaches B: B's call waits for A's first (still running), A's second for B's."""
    ran: list[int] = []

    async def go():
        r, a, b = _futures(redis_url)
        first_may_end = asyncio.Event()

        def call(seq: int, gate: asyncio.Event | None = None):
            async def make():
                if gate is not None:
                    await gate.wait()
                ran.append(seq)
                return {"seq": seq}
            return make

        ids = [await a.submit("t", "tm-order1", call(1, first_may_end), seq=1),
               await b.submit("t", "tm-order1", call(2), seq=2),
               await a.submit("t", "tm-order1", call(3), seq=3)]
        await asyncio.sleep(0.5)
        assert ran == []  # B's call 2 has not run ahead of A's call 1
        first_may_end.set()
        answers = [await (a if i != 1 else b).retrieve("t", rid, 10) for i, rid in enumerate(ids)]
        assert await r.hlen("tinker:order:tm-order1") == 0  # nothing left in the order once all ran
        await r.aclose()
        return answers

    answers = run_async(go())
    assert ran == [1, 2, 3], ran
    assert [x["seq"] for x in answers] == [1, 2, 3]


def test_a_call_does_not_wait_on_a_process_that_stopped_beating(redis_url):
    """An earlier call held by a process that died (its heartbeat key gone) is dropped from the order: the later call
    on another process runs instead of waiting for it forever."""

    async def go():
        r, a, b = _futures(redis_url)
        never = asyncio.Event()

        async def stuck():
            await never.wait()

        async def quick():
            return {"ok": True}

        await a.submit("t", "tm-order2", stuck, seq=1)
        a.stopped = True  # process A "dies": it beats no more ...
        a._beating.cancel()
        await asyncio.wait([a._beating], timeout=5)
        await r.delete(f"tinker:api:{a.process}")  # ... and its heartbeat key has expired
        rid = await b.submit("t", "tm-order2", quick, seq=2)
        answer = await b.retrieve("t", rid, 10)
        await r.aclose()
        return answer

    assert run_async(go()) == {"ok": True}


def test_calls_arriving_out_of_turn_at_one_process_do_not_wait_on_each_other(redis_url):
    """A process runs its own calls of a run in the order they came (the SDK sends in turn); a lower seq that came
    later is not waited for (that would wait forever), and both run."""

    async def go():
        r, a, _ = _futures(redis_url)

        async def make():
            return {"ok": True}

        late, early = await a.submit("t", "tm-order3", make, seq=5), await a.submit("t", "tm-order3", make, seq=4)
        answers = [await a.retrieve("t", rid, 10) for rid in (late, early)]
        await r.aclose()
        return answers

    assert run_async(go()) == [{"ok": True}, {"ok": True}]


def test_a_late_retry_cannot_make_two_processes_wait_on_each_other(redis_url):
    """C runs seq 1 (slow); seq 3 reaches B, seq 4 reaches A, then seq 2 reaches A late (a retry of a send that timed
    out). Waiting on every lower seq, A's 4 would wait on B's 3, B's 3 on A's 2, and A's 2 (behind 4 in A's own order)
    on A's 4: forever. A call waits only on calls that arrived before it: all four run."""

    async def go():
        r, a, b = _futures(redis_url)
        c = Futures(r)
        first_may_end = asyncio.Event()

        async def slow():
            await first_may_end.wait()
            return {"ok": True}

        async def make():
            return {"ok": True}

        ids = [(c, await c.submit("t", "tm-order4", slow, seq=1)), (b, await b.submit("t", "tm-order4", make, seq=3)),
               (a, await a.submit("t", "tm-order4", make, seq=4)), (a, await a.submit("t", "tm-order4", make, seq=2))]
        await asyncio.sleep(0.3)
        first_may_end.set()
        answers = [await f.retrieve("t", rid, 10) for f, rid in ids]
        await r.aclose()
        return answers

    assert run_async(go()) == [{"ok": True}] * 4


def test_an_answered_call_left_in_the_order_is_not_waited_on(redis_url):
    """A call whose place was not taken back (Redis failed as it finished) but whose answer is recorded, of a process
    that still beats: the later call runs."""

    async def go():
        r, a, b = _futures(redis_url)

        async def make():
            return {"ok": True}

        first = await a.submit("t", "tm-order5", make, seq=1)
        assert await a.retrieve("t", first, 10) == {"ok": True}
        ticket = await r.incr("tinker:order:tickets") - 1000  # (an arrival before the next)
        await r.hset("tinker:order:tm-order5", first, f"1 {ticket} {a.process}")  # its place, as if never taken back
        rid = await b.submit("t", "tm-order5", make, seq=2)
        answer = await b.retrieve("t", rid, 10)
        await r.aclose()
        return answer

    assert run_async(go()) == {"ok": True}


def test_a_call_waiting_past_its_deadline_fails_naming_the_wait(redis_url):
    """An earlier call of the run that never finishes (its process alive): the later call fails naming the wait."""

    async def go():
        r, a, b = _futures(redis_url)
        b.TURN_DEADLINE_S = 0.5
        never = asyncio.Event()

        async def stuck():
            await never.wait()

        async def quick():
            return {"ok": True}

        await a.submit("t", "tm-order6", stuck, seq=1)
        rid = await b.submit("t", "tm-order6", quick, seq=2)
        answer = await b.retrieve("t", rid, 10)
        await r.aclose()
        return answer

    answer = run_async(go())
    assert answer["category"] == "user" and "waited 0 s for its run's earlier calls" in answer["error"], answer
