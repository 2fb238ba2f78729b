"""Alignment: supervised instruction tuning, reward models, PPO, DPO and RLAIF, on the shared Trainer.

    run.py       the one run template of sft/reward/dpo/ppo: start -> data -> samples -> PEFT -> Trainer -> final
                 -> summary; each method (an `AlignmentMethod`) supplies its data, its loss and its numbers
    data.py      instruction / preference records (alpaca, sharegpt, messages, prompt/chosen/rejected) -> messages
    instruct.py  chat-template rendering, assistant-token label masks, truncation, packing, --preview highlighting
    sft.py       SFT data and loss (cross-entropy on assistant tokens); the `SFT` method
    reward.py    Bradley-Terry reward model loss on preference pairs; the `RewardModeling` method
    dpo.py       DPO / IPO / label-smoothed DPO against the reference policy; the `DPO` method
    ppo.py       PPO: value head, rollouts, KL-penalised rewards, GAE, clipped losses, resumable rollout loader; `PPO`
    scoring.py   rules, reward models and LLM judges behind one scorer interface
    rlaif.py     AI-feedback preference data: rank sampled answers, or critique and revise (constitution)
    modeling.py  start models (asset, folder, adapter chains) and their tokenizers with the chat template
    common.py    pieces of the template: start point, samples, held-out scores, start evaluation, summary
    config.py    config sections shared by the stages (and the dpo / ppo sections)
    data_checks.py  chat training data checked before step 0
    plots.py     PPO / DPO / SFT curves
    toy.py       a toy chat task with a rule-checkable goal (tests, recipes, docs/results)

PEFT wiring, checkpoints, the final save and the reference policy are lmcraft.peft.training's; answer log-probs and
the batched no-grad scoring loop are lmcraft.objectives.lm_head's. The CLI stages are
lmcraft.stages.{sft, reward, dpo, ppo, label_preferences}.
"""
