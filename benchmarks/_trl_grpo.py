"""TRL's GRPOTrainer on a job spec's model, data and settings: the baseline of `step_breakdown.py`.

    python benchmarks/_trl_grpo.py CONFIG.json RESULT.json

CONFIG.json is what `step_breakdown.trl_config` writes (model, data file, sampling, optimiser,
rewards, threads, warm-up and measured steps). RESULT.json gets per-step wall times (between
`on_step_begin` and `on_step_end`), per-step phase times, the batch shape each step really used,
and the notes on settings TRL names differently. It runs in its own process so that no Ray actor
shares the cores with it.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def reward_callable(fn, label: str, kwargs: dict[str, Any]):
    """`fn` with the spec's kwargs bound, named `label` (TRL logs rewards by function name)."""

    def call(prompts, completions, **columns):
        return fn(prompts, completions, **columns, **kwargs)

    call.__name__ = label
    return call


def grpo_config(cfg: dict[str, Any], output_dir: str):
    """The GRPOConfig that matches our step: one generation of prompts x n completions, one backward, one optimiser step."""
    from trl import GRPOConfig

    samples = cfg["prompts_per_step"] * cfg["n"]
    return GRPOConfig(
        output_dir=output_dir,
        use_cpu=cfg["use_cpu"],
        # 64 completions per optimiser step, in one micro-batch: generation_batch_size =
        # per_device_train_batch_size * steps_per_generation = 64, and 64 / num_generations = 8 prompts.
        per_device_train_batch_size=samples,
        gradient_accumulation_steps=1,
        steps_per_generation=1,
        num_generations=cfg["n"],
        num_iterations=1,  # our ppo_epochs=1, one mini-batch: on-policy, no old-log-prob pass
        max_completion_length=cfg["max_new_tokens"],
        temperature=cfg["temperature"],
        top_p=cfg["top_p"],
        top_k=0,  # our HF rollout passes top_k=0 too
        beta=cfg["kl_coef"],  # 0: TRL loads no reference model
        epsilon=cfg["clip_eps_low"],
        epsilon_high=cfg["clip_eps_high"],
        loss_type="dapo",  # token losses over the batch's response tokens = our loss_agg token-mean
        scale_rewards="group" if cfg["norm_adv_by_std"] else "none",
        reward_weights=[r["weight"] for r in cfg["rewards"]],
        learning_rate=cfg["lr"],
        lr_scheduler_type="constant",  # TRL's default decays linearly; our lr is constant
        warmup_steps=0,
        weight_decay=cfg["weight_decay"],
        max_grad_norm=cfg["grad_clip"] or 0.0,
        optim="adamw_torch",  # torch.optim.AdamW with defaults, as our trainer (TRL's default is the fused kernel)
        bf16=False,  # TRL defaults to bf16; our spec says float32
        fp16=False,
        gradient_checkpointing=False,  # TRL defaults to True; our trainer does not checkpoint
        use_vllm=False,
        max_steps=cfg["warmup"] + cfg["steps"],
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=cfg["seed"],
        log_completions=False,
    )


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch
    from datasets import disable_progress_bars, load_dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOTrainer

    from workers.common import DTYPES, configure_threads, load_tokenizer
    from workers.reward import resolve_function

    threads = configure_threads(cfg["threads"])
    torch.manual_seed(cfg["seed"])
    warmup = cfg["warmup"]
    step_times: list[float] = []
    phases: list[dict[str, float]] = []
    shapes: list[dict[str, Any]] = []

    class Instrumented(GRPOTrainer):
        """Times TRL's phases and records what each step generated and how many backward passes it ran."""

        def _add(self, key: str, seconds: float) -> None:
            self._phase[key] = self._phase.get(key, 0.0) + seconds

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            prompts = [x["prompt"] for x in inputs]
            n = self.num_generations
            groups = [prompts[i : i + n] for i in range(0, len(prompts), n)]
            self._shape["completions"] = self._shape.get("completions", 0) + len(prompts)
            self._shape["prompts"] = self._shape.get("prompts", 0) + len(groups)
            self._shape["groups_whole"] = all(len(g) == n and len(set(g)) == 1 for g in groups)
            out = super()._generate_and_score_completions(inputs)
            self._add("rollout", time.perf_counter() - t0)
            return out

        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            self._add("generate", time.perf_counter() - t0)
            self._shape["generated"] = self._shape.get("generated", 0) + len(out[0])
            self._shape["max_completion_tokens"] = max(self._shape.get("max_completion_tokens", 0), max(len(c) for c in out[0]))
            return out

        def _calculate_rewards(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = super()._calculate_rewards(*args, **kwargs)
            self._add("reward", time.perf_counter() - t0)
            return out

        def training_step(self, model, inputs, num_items_in_batch):
            self._shape["backward_calls"] = self._shape.get("backward_calls", 0) + 1
            return super().training_step(model, inputs, num_items_in_batch)

        def _compute_loss(self, model, inputs):
            self._shape["train_batch"] = self._shape.get("train_batch", 0) + len(inputs["completion_ids"])
            return super()._compute_loss(model, inputs)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            trainer._phase, trainer._shape = {}, {}
            trainer._shape["threads"] = torch.get_num_threads()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.t0)
            phases.append(dict(trainer._phase))
            shapes.append(dict(trainer._shape))

    tokenizer = load_tokenizer(cfg["model_path"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=DTYPES[cfg["dtype"]])
    disable_progress_bars()
    dataset = load_dataset("json", data_files=cfg["train_file"], split="train")
    if cfg["prompt_key"] != "prompt":
        dataset = dataset.rename_column(cfg["prompt_key"], "prompt")
    rewards = [reward_callable(resolve_function(r["function"]), r["label"], r["kwargs"]) for r in cfg["rewards"]]
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as out_dir:
        args = grpo_config(cfg, out_dir)
        trainer = Instrumented(model=model, reward_funcs=rewards, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)  # it prints every step's logs dict
        trainer._phase, trainer._shape = {}, {}
        # Trainer or accelerate may have touched the thread count; the comparison needs ours.
        torch.set_num_threads(threads)
        trainer.train()
        logs = [h for h in trainer.state.log_history if "reward" in h]
    return {
        "step_times": step_times[warmup:],
        "phases": phases[warmup:],
        "shapes": shapes[warmup:],
        "reward_mean": [h["reward"] for h in logs][warmup:],
        "config": {k: getattr(args, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "generation_batch_size",
            "num_generations", "num_iterations", "max_completion_length", "temperature", "top_p", "top_k", "beta",
            "loss_type", "scale_rewards", "learning_rate", "max_grad_norm", "bf16", "gradient_checkpointing", "use_cpu")},
        "device": str(trainer.accelerator.device),
    }


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = run(cfg)
    Path(sys.argv[2]).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
