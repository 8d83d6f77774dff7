"""LoRA adapters for training: one settings dataclass, one function that attaches them.

    from camelid.models.lora import LoraSettings, attach_lora
    model = attach_lora(base, LoraSettings(r=16, alpha=32, dropout=0.05), task="causal_lm")

`task="seq_cls"` (reward models) uses peft's SEQ_CLS task and trains the freshly initialised
`score` head in full (`modules_to_save`), as TRL's reward docs advise: a LoRA on a random head
would learn little. Everything else in the base stays frozen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from camelid.errors import CamelidError

TASKS = ("causal_lm", "seq_cls")
# The classification head of *ForSequenceClassification models in transformers (LLaMA, Mistral, Qwen...).
SCORE_HEAD = "score"


def unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA hyper-parameters (Hu et al. 2021, arXiv:2106.09685)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")  # StackLLaMA's choice for LLaMA

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora_r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("lora_target_modules must name at least one module (e.g. q_proj,v_proj)")


def lora_config(settings: LoraSettings, task: str) -> Any:
    """A peft.LoraConfig for `task` ("causal_lm" or "seq_cls")."""
    from peft import LoraConfig, TaskType

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
        task_type=TaskType.CAUSAL_LM if task == "causal_lm" else TaskType.SEQ_CLS,
        modules_to_save=[SCORE_HEAD] if task == "seq_cls" else None,
    )


def check_targets(model: Any, settings: LoraSettings) -> None:
    """One-line error when a target module name matches no layer of `model` (peft's own is long)."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in settings.target_modules if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.startswith("Linear")})
        raise CamelidError(
            f"--lora-target-modules {','.join(missing)} match no layer of this model; its linear layers are: {', '.join(linear)}"
        )


def attach_lora(model: Any, settings: LoraSettings, task: str) -> Any:
    """Wrap `model` in a peft LoRA model: adapters on `target_modules`, base frozen."""
    import warnings

    from peft import get_peft_model

    check_targets(model, settings)
    if task == "seq_cls" and not hasattr(model, SCORE_HEAD):
        raise CamelidError(f"{type(model).__name__} has no `{SCORE_HEAD}` head; a reward model needs a LLaMA-style *ForSequenceClassification")
    with warnings.catch_warnings():
        # peft 0.21 reads transformers' renamed `is_gradient_checkpointing`; harmless FutureWarning.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config(settings, task))


def trainable_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; 8-bit weights count their logical size."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
