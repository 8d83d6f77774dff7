"""Training stages: SFT (sft.py), reward model (reward.py), PPO (ppo.py), their shared helpers
(common.py) and the one metrics sink (tracking.py). Heavy imports happen inside functions."""
