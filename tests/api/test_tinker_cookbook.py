"""tinker-cookbook's supervised training loop (`tinker_cookbook.supervised.train.main`, unmodified) against
`rlhf serve`: only the model name ("tiny", the registry's), local data and the base URL are ours.

tinker-cookbook 0.6.1 declares tml-renderers>=0.4.1, which the package index here lacks; the
supervised loop does not import it (it is needed by the tml_renderers tokenizers of Thinking Machines'
own models and the audio recipes), so the cookbook is installed with `pip install --no-deps` and its
other dependencies (chz, blobfile, termcolor, pyrage): see docs/tinker.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import pytest

from tests.api.test_tinker import SEQ, tinker_api, tokenizer  # noqa: F401  (tinker_api: the served API fixture)

pytest.importorskip("tinker_cookbook")
import chz
import tinker
from tinker_cookbook import tokenizer_utils
from tinker_cookbook.rl import train as rl_train
from tinker_cookbook.rl.types import (
    Env,
    EnvGroupBuilder,
    RLDataset,
    RLDatasetBuilder,
    StepResult,
)
from tinker_cookbook.supervised import train
from tinker_cookbook.supervised.types import SupervisedDataset, SupervisedDatasetBuilder

TEXTS = [SEQ, "hello world, " * 6, "one two three four five six seven eight nine ten", "a b c d e f g h i j k l m n o p"]


class LocalTexts(SupervisedDataset):
    """Batches of next-token data from local texts, tokenized with the tiny model's tokenizer."""

    def __init__(self, model_path: str, batch_size: int):
        tok = tokenizer(model_path)
        self.data = []
        for text in TEXTS:
            ids = tok.encode(text)
            self.data.append(tinker.Datum(model_input=tinker.ModelInput.from_ints(ids[:-1]),
                                          loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)}))
        self.batch_size = batch_size

    def get_batch(self, index: int) -> list[tinker.Datum]:
        return self.data[index * self.batch_size:(index + 1) * self.batch_size]

    def __len__(self) -> int:
        return len(self.data) // self.batch_size

    def set_epoch(self, seed: int = 0):
        pass


@chz.chz
class LocalTextsBuilder(SupervisedDatasetBuilder):
    model_path: str
    batch_size: int = 2

    def __call__(self):
        return LocalTexts(self.model_path, self.batch_size), None


@pytest.mark.slow
def test_the_cookbooks_supervised_loop_trains_against_the_service(tinker_api, keys, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TINKER_API_KEY", keys["watcher"])
    # The cookbook loads the tokenizer by the model's name; the registry's name is not a hub id, so register it.
    tokenizer_utils.register_tokenizer("tiny", lambda: tokenizer(tiny_model))
    def config(epochs: int) -> train.Config:
        return train.Config(log_path=str(tmp_path / "log"), model_name="tiny", recipe_name="rlhf_test", base_url=tinker_api.url,
                            dataset_builder=LocalTextsBuilder(model_path=str(tiny_model)), learning_rate=2e-3, lr_schedule="constant",
                            num_epochs=epochs, lora_rank=8, save_every=6, eval_every=0, infrequent_eval_every=0, ttl_seconds=None)

    def nll() -> list[float]:
        rows = [json.loads(line) for line in (tmp_path / "log" / "metrics.jsonl").read_text().splitlines()]
        return [r["train_mean_nll"] for r in rows if "train_mean_nll" in r]

    asyncio.run(train.main(config(8)))
    first = nll()
    print("cookbook supervised loop, train_mean_nll per step:", [round(x, 3) for x in first])
    assert len(first) == 16 and first[-1] < 0.8 * first[0], first
    checkpoints = [json.loads(line) for line in (tmp_path / "log" / "checkpoints.jsonl").read_text().splitlines()]
    print("checkpoints:", [(c["name"], c["state_path"]) for c in checkpoints])
    assert [c["name"] for c in checkpoints] == ["000006", "000012", "final"], checkpoints
    # Run again for 10 epochs: the cookbook resumes from its last checkpoint (create_training_client_from_state_with_optimizer)
    # and trains the 4 steps left, going on from where the loss was.
    asyncio.run(train.main(config(10)))
    resumed = nll()[16:]
    print("resumed for 2 more epochs:", [round(x, 3) for x in resumed])
    assert len(resumed) == 4 and max(resumed) < first[0] * 0.8, resumed


class EvenTokens(Env):
    """One turn: the reward is the fraction of the completion's tokens with an even id (a signal the tiny model can learn)."""

    def __init__(self, prompt: list[int]):
        self.prompt = prompt

    async def initial_observation(self):
        return tinker.ModelInput.from_ints(self.prompt), []

    async def step(self, action, *, extra=None) -> StepResult:
        reward = sum(1 for t in action if t % 2 == 0) / max(1, len(action))
        return StepResult(reward=reward, episode_done=True, next_observation=tinker.ModelInput.empty(), next_stop_condition=[])


@dataclasses.dataclass(frozen=True)
class EvenTokensGroup(EnvGroupBuilder):
    prompt: tuple[int, ...]
    size: int

    async def make_envs(self):
        return [EvenTokens(list(self.prompt)) for _ in range(self.size)]

    def logging_tags(self) -> list[str]:
        return ["even"]


class EvenTokensData(RLDataset):
    def __init__(self, prompts: list[list[int]], group_size: int, batches: int):
        self.prompts, self.group_size, self.batches = prompts, group_size, batches

    def get_batch(self, index: int):
        return [EvenTokensGroup(tuple(p), self.group_size) for p in self.prompts]

    def __len__(self) -> int:
        return self.batches


@chz.chz
class EvenTokensBuilder(RLDatasetBuilder):
    model_path: str
    batches: int = 10

    async def __call__(self):
        tok = tokenizer(self.model_path)
        return EvenTokensData([tok.encode(t) for t in ("count:", "numbers:")], group_size=8, batches=self.batches), None


@pytest.mark.slow
def test_the_cookbooks_rl_loop_trains_against_the_service(tinker_api, keys, tiny_model, tmp_path, monkeypatch):  # noqa: F811
    """tinker_cookbook.rl.train.main, unmodified: it samples groups with log-probs through the service's sampler, takes
    importance-sampling steps and saves sampler weights every step; the reward rises."""
    monkeypatch.setenv("TINKER_API_KEY", keys["streamer"])
    tokenizer_utils.register_tokenizer("tiny", lambda: tokenizer(tiny_model))
    config = rl_train.Config(log_path=str(tmp_path / "rl"), model_name="tiny", recipe_name="rlhf_test", base_url=tinker_api.url,
                             dataset_builder=EvenTokensBuilder(model_path=str(tiny_model)), learning_rate=1e-2, max_tokens=8,
                             lora_rank=8, eval_every=0, save_every=0)
    asyncio.run(rl_train.main(config))
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    reward = [r["env/all/reward/total"] for r in rows if "env/all/reward/total" in r]
    print("cookbook RL loop, mean reward per step:", [round(x, 3) for x in reward])
    assert len(reward) == 10 and all(math.isfinite(x) for x in reward)
    assert sum(reward[-3:]) / 3 > sum(reward[:3]) / 3, reward
