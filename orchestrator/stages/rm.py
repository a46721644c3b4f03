"""The `rm` stage's driver: a reward model trained on preference pairs (workers/rm.py). It produces no
policy: its checkpoints hold `reward_model/`, which a later stage scores with as
`rewards: [{model: "stage:<this stage's name>"}]`, and the next stage starts from the policy this one
started from."""

from __future__ import annotations

from orchestrator.stages.preference import PreferenceOrchestrator


class RewardModelOrchestrator(PreferenceOrchestrator):
    # workers/reward.py scores decoded text with special tokens skipped: train on the same, without EOS.
    with_eos = False
    step_method, eval_method = "rm_step", "rm_eval"
