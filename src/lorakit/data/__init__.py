"""Chat formatting with assistant-only loss masks, JSONL readers, the default task and held-out text.

This package imports nothing else from lorakit, so the trainer and the CLI can depend on it freely.
"""

from lorakit.data.chat import (
    ALLOWED_ROLES,
    IGNORE_INDEX,
    Conversation,
    Encoded,
    Message,
    encode_chat,
    render_mask,
    validate_messages,
)
from lorakit.data.dataset import SFTData, build_sft_dataset, collate, count_loss_tokens
from lorakit.data.general import general_prompts, general_texts
from lorakit.data.jsonl import DataFormatError, read_examples, record_to_conversation
from lorakit.data.tasks import TASKS, EvalItem, Task, load_task, score_exact_match

__all__ = [
    "ALLOWED_ROLES",
    "IGNORE_INDEX",
    "TASKS",
    "Conversation",
    "DataFormatError",
    "Encoded",
    "EvalItem",
    "Message",
    "SFTData",
    "Task",
    "build_sft_dataset",
    "collate",
    "count_loss_tokens",
    "encode_chat",
    "general_prompts",
    "general_texts",
    "load_task",
    "read_examples",
    "record_to_conversation",
    "render_mask",
    "score_exact_match",
    "validate_messages",
]
