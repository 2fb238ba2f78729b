"""Alignment: supervised instruction tuning, reward models, PPO, DPO and RLAIF, on the shared Trainer.

    data.py      instruction / preference records (alpaca, sharegpt, messages, prompt/chosen/rejected) -> messages
    instruct.py  chat-template rendering, assistant-token label masks, truncation, packing, --preview highlighting
    sft.py       SFT data and loss (cross-entropy on assistant tokens)
    reward.py    Bradley-Terry reward model loss on preference pairs
    dpo.py       DPO / IPO / label-smoothed DPO, the reference policy (disabled adapters or a frozen copy)
    ppo.py       PPO: value head, rollouts, KL-penalised rewards, GAE, clipped losses, resumable rollout loader
    scoring.py   rules, reward models and LLM judges behind one scorer interface
    rlaif.py     AI-feedback preference data: rank sampled answers, or critique and revise (constitution)
    modeling.py  start models (asset, folder, adapter chains), PEFT wiring, checkpoint format, final save
    common.py    run plumbing shared by the stages (tokenizer with template, samples, held-out scores, summary)
    config.py    config sections shared by the stages
    plots.py     PPO / DPO / SFT curves
    toy.py       a toy chat task with a rule-checkable goal (tests, recipes, docs/results)

The CLI stages are lmcraft.stages.{sft, reward, dpo, ppo, label_preferences}.
"""
