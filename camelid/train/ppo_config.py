"""PPO's settings: one frozen dataclass; defaults run on a laptop CPU, presets scale it up.

Defaults follow TRL 0.11's PPOConfig and StackLLaMA's `rl_training.py` where they are the same
thing under another name (cited per field); sizes are smaller so that a default run finishes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from camelid.models.lora import LoraSettings


@dataclass(frozen=True)
class PPOConfig:
    """PPO with a KL penalty against a frozen reference (Ziegler et al. 2019; StackLLaMA)."""

    policy: str = "smollm2-135m"
    """The SFT model to start from: bundled name, model folder or a `camelid sft` run folder."""
    reward_model: str | None = None
    """The reward model: a `camelid reward train` run folder or a sequence classifier with one logit."""
    data: str = "runs/data"
    """Dataset folder from `camelid data` (its rl split's questions are the prompts)."""
    out: str = "runs/ppo"
    """Run folder: metrics, samples, checkpoints, adapter, value head and merged model go here."""
    ref_model: str | None = None
    """A separate frozen reference model; by default the policy with its adapter switched off."""
    load_8bit: bool = False
    """Load the frozen base (and a separate reference) in 8 bits with bitsandbytes."""
    reward_load_8bit: bool = False
    """Load the reward model in 8 bits with bitsandbytes (a merged reward model; its score head stays 16/32-bit)."""
    dtype: str = "auto"
    """Training dtype: auto (bfloat16 on GPUs that support it and on CPUs with bfloat16 matrix hardware (AMX), else float32), float32, bfloat16."""
    lora_r: int = 16
    """LoRA rank (StackLLaMA: 16)."""
    lora_alpha: int = 32
    """LoRA scaling numerator (StackLLaMA: 32)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input (StackLLaMA: 0.05)."""
    lora_target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    """Module names that get LoRA adapters, comma-separated."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, slower."""
    steps: int = 20
    """PPO steps; each rolls out one batch per process and optimises on it."""
    batch_size: int = 8
    """Prompts rolled out per process per step (StackLLaMA: 8 per GPU)."""
    mini_batch_size: int = 2
    """Sequences per forward/backward pass in the PPO epochs."""
    gradient_accumulation_steps: int = 1
    """Mini-batches per optimizer step; batch_size must be a multiple of mini_batch_size x this."""
    ppo_epochs: int = 4
    """Passes over each batch (TRL and StackLLaMA: 4)."""
    learning_rate: float = 1.41e-5
    """Adam learning rate (TRL's default; StackLLaMA used 1.4e-5)."""
    max_grad_norm: float = 0.0
    """Clip the gradient norm to this (0: no clipping, as TRL's default)."""
    seed: int = 0
    """Seed for the adapter and value head init, data order, lengths, sampling and dropout."""
    forward_batch_size: int = 8
    """Sequences per no-grad forward when computing old and reference log-probabilities."""
    old_from_rollout: bool = True
    """Old log-probs and values from the hidden states the rollout sampled each token from (the
    engine keeps them), instead of one more forward pass over the batch as TRL does. The same
    numbers up to rounding: float32 agrees to ~1e-5; in bfloat16 the two differ by about what any
    two forwards of different batch shapes do (docs/architecture.md)."""
    max_prompt_tokens: int = 256
    """Prompts longer than this many tokens are dropped (and counted)."""
    max_prompts: int = 0
    """Use at most this many distinct questions (0: all)."""
    min_new_tokens: int = 16
    """Shortest response length drawn (StackLLaMA's LengthSampler: 32)."""
    max_new_tokens: int = 48
    """Longest response length drawn, inclusive (StackLLaMA: 128)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts."""
    top_k: int = 0
    """Top-k filter of rollouts (0: off, as StackLLaMA)."""
    top_p: float = 1.0
    """Nucleus filter of rollouts (1: off, as StackLLaMA)."""
    stop_at_eos: bool = True
    """End responses at EOS. Off = StackLLaMA's fixed length; tokens after EOS are masked either way."""
    reward_baseline: float = 0.0
    """Subtracted from every reward-model score (StackLLaMA's reward_baseline)."""
    score_scaling: bool = False
    """Divide scores by the running std of all scores seen (TRL's use_score_scaling)."""
    score_norm: bool = False
    """With score_scaling, also subtract the running mean (TRL's use_score_norm)."""
    score_clip: float = 0.0
    """Clip scores to [-x, x] after scaling (0: off)."""
    reward_batch_size: int = 16
    """Texts per reward-model forward pass."""
    kl_penalty: Literal["kl", "abs", "mse"] = "kl"
    """Per-token KL estimate: kl = log p - log p_ref, abs = |kl|, mse = kl^2 / 2."""
    init_kl_coef: float = 0.2
    """Initial KL coefficient beta (TRL and StackLLaMA: 0.2)."""
    adaptive_kl: bool = True
    """Adapt beta with Ziegler et al.'s controller; off keeps it fixed."""
    kl_target: float = 6.0
    """KL (nats per response) the adaptive controller steers to (TRL's `target`)."""
    kl_horizon: float = 10000.0
    """Adaptive controller horizon in sequences (TRL's `horizon`)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """PPO policy clip epsilon."""
    cliprange_value: float = 0.2
    """Value clip epsilon."""
    vf_coef: float = 0.1
    """Value loss coefficient."""
    ratio_threshold: float = 10.0
    """Skip (zero the loss of) a mini-batch whose mean ratio pi/pi_old exceeds this."""
    early_stopping: bool = False
    """Stop a step's PPO epochs once the policy KL exceeds 1.5 x target_kl."""
    target_kl: float = 1.0
    """Early-stopping KL target (StackLLaMA ran with 0.1)."""
    samples_every: int = 10
    """Write the step's (query, response, score, kl) to samples.jsonl every N steps."""
    save_steps: int = 50
    """Checkpoint every N steps; --resume continues from the last one."""
    save_total_limit: int = 2
    """Checkpoints kept (older ones are deleted)."""
    report_to: tuple[str, ...] = ()
    """Extra metric sinks beside metrics.jsonl: tensorboard, wandb, trackio."""
    merge: bool = True
    """Also write the adapter merged into its base as a full model (model/), for `camelid chat`."""
    num_threads: int = 0
    """torch CPU threads per process (0: the cores divided among the local processes)."""

    def __post_init__(self) -> None:
        from camelid.train.tracking import parse_report_to

        for name in ("steps", "batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs",
                     "forward_batch_size", "max_prompt_tokens", "min_new_tokens", "reward_batch_size",
                     "samples_every", "save_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompts", "num_threads", "max_grad_norm", "score_clip", "init_kl_coef", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size % (self.mini_batch_size * self.gradient_accumulation_steps):
            raise ValueError(f"batch_size {self.batch_size} must be a multiple of mini_batch_size x "
                             f"gradient_accumulation_steps = {self.mini_batch_size * self.gradient_accumulation_steps}")
        if self.max_new_tokens < self.min_new_tokens:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} < min_new_tokens {self.min_new_tokens}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.kl_target <= 0 or self.kl_horizon <= 0 or self.target_kl <= 0:
            raise ValueError("kl_target, kl_horizon and target_kl must be > 0")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("need 0 < gamma <= 1 and 0 <= lam <= 1")
        if self.cliprange <= 0 or self.cliprange_value <= 0 or self.vf_coef < 0 or self.ratio_threshold <= 1:
            raise ValueError("need cliprange > 0, cliprange_value > 0, vf_coef >= 0 and ratio_threshold > 1")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.kl_penalty not in ("kl", "abs", "mse"):
            raise ValueError(f"kl_penalty must be kl, abs or mse, got {self.kl_penalty!r}")
        self.lora()
        parse_report_to(self.report_to)

    def lora(self) -> LoraSettings:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout, tuple(self.lora_target_modules))

    def micro_batches_per_step(self) -> int:
        """Forward/backward passes per PPO epoch."""
        return self.batch_size // self.mini_batch_size
