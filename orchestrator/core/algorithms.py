"""The table of training algorithms: what each one needs, read by the spec, placement and the driver.

Adding an algorithm is one new module (its driver class, and its trainer class if the policy
trainer's update does not fit) and one line in `ALGORITHMS`. Classes are named by import path,
`module:Class`, so this floor imports nothing of the project; `orchestrator.runtime.registry` resolves them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Algorithm:
    name: str
    data: str  # the rows it reads: "prompts" (RL), "sft" (prompt + completion) or "preference" (chosen/rejected pairs); see core/data.py LOADERS
    rollouts: bool  # samples completions from the policy every step (rollout -> score -> update -> sync)
    critic: bool  # trains a value model beside the policy
    default_estimator: str | None  # advantage estimator when the spec names none
    driver: str  # import path of the driver class that runs one stage of it
    trainer: str  # import path of the policy trainer's worker class
    description: str = ""
    reference: bool = False  # always starts the frozen reference model (DPO's log-ratios), whatever optim.kl_coef
    # What `data.eval_file` holds: "prompts" (greedy completions of the rollout actors, scored by the
    # job's rewards) or "preference" (held-out pairs scored by the trainer itself).
    eval_data: str = "prompts"
    # The checkpoint subdirectory holding the model a stage of it produces: "policy" (the next stage
    # starts from it) or "reward_model" (a later stage's `rewards: [{model: "stage:NAME"}]`).
    produces: str = "policy"

    def roles(self, kl_coef: float, evaluates: bool) -> list[str]:
        """The roles a stage of this algorithm needs, in placement order ("reward": its rewards, which the spec
        may compute in the driver instead of on an actor; see JobSpec.roles)."""
        if not self.rollouts:
            # The trainer (and reference) alone take the steps; greedy generation and rewards serve only evaluation.
            roles = ["trainer", "reference"] if self.reference else ["trainer"]
            return roles + ["rollout", "reward"] if evaluates and self.eval_data == "prompts" else roles
        roles = ["rollout", "trainer", "reward"]
        if kl_coef > 0 or self.reference:
            roles.append("reference")
        if self.critic:
            roles.append("critic")
        return roles


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("grpo", "prompts", rollouts=True, critic=False, default_estimator="grpo",
                  driver="orchestrator.stages.driver:Orchestrator", trainer="workers.trainer:PolicyTrainer",
                  description="group-relative advantages, no critic"),
        Algorithm("ppo", "prompts", rollouts=True, critic=True, default_estimator="gae",
                  driver="orchestrator.stages.driver:Orchestrator", trainer="workers.trainer:PolicyTrainer",
                  description="with a critic"),
        Algorithm("sft", "sft", rollouts=False, critic=False, default_estimator=None,
                  driver="orchestrator.stages.sft:SFTOrchestrator", trainer="workers.sft:SFTTrainer",
                  description="supervised fine-tuning on completions; no rollout, reward or reference actors except to evaluate"),
        Algorithm("rm", "preference", rollouts=False, critic=False, default_estimator=None,
                  driver="orchestrator.stages.rm:RewardModelOrchestrator", trainer="workers.rm:RewardTrainer",
                  eval_data="preference", produces="reward_model",
                  description="a reward model from preference pairs, Bradley-Terry loss; it leaves the policy as it was"),
        Algorithm("dpo", "preference", rollouts=False, critic=False, default_estimator=None,
                  driver="orchestrator.stages.dpo:DPOOrchestrator", trainer="workers.dpo:DPOTrainer",
                  reference=True, eval_data="preference",
                  description="direct preference optimisation on preference pairs (sigmoid, IPO or hinge loss) against a frozen reference"),
    )
}

# The built-in reward functions: name -> import path (`module:function`, TRL's signature). The one
# table of them: the spec's and the API's checks read its names (what a REST spec may name without the
# operator's registry), the reward worker imports a name's function from its path.
BUILTIN_REWARDS: dict[str, str] = {
    "accuracy": "workers.rewards:accuracy",
    "regex_match": "workers.rewards:regex_match",
    "length_penalty": "workers.rewards:length_penalty",
}

# Rollout backends, the same way: `rollout.backend` -> the worker class (see workers/rollout.py's RolloutBackend).
ROLLOUT_BACKENDS: dict[str, str] = {
    "hf": "workers.rollout:HFRollout",
    "vllm": "workers.rollout_vllm:VLLMRollout",  # vllm is an optional extra: imported only when named
}
