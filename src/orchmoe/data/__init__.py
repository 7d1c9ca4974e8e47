"""Multi-task instruction data: every accepted format, the sampling protocol, prompts and batching.

``load_multitask(data, tasks, ...)`` takes the official SuperNI folder layout, ``"builtin"``, Hugging
Face tables (natural-instructions, instruction or prompt/completion columns; jsonl/json/parquet files
or folders, ``save_to_disk`` folders) or a hub dataset id: see :mod:`orchmoe.data.tables` for the
formats with example rows. ``tokenized_features`` (:mod:`orchmoe.data.features`) tokenises a part
of the protocol with ``datasets`` and caches it on disk.
"""

from orchmoe.data.batching import pad_batch
from orchmoe.data.builtin import (
    BUILTIN_TASKS,
    BUILTIN_VERSION,
    builtin_data_dir,
    builtin_task_names,
    generate_task,
    write_builtin,
)
from orchmoe.data.core import BUILTIN, DataError, Example, MultiTaskData, SuperNITask, TaskSource
from orchmoe.data.features import default_features_dir, tokenized_features, tokenizer_fingerprint
from orchmoe.data.multitask import (
    available_tasks,
    load_multitask,
    load_task,
    read_split,
    sample_instances,
    select_tasks,
    unseen_eval_instances,
)
from orchmoe.data.prompt_format import PROMPT_FORMAT_KEY, PromptFormat, PromptFormatWarning
from orchmoe.data.prompts import (
    IGNORE_INDEX,
    encode_answer,
    encode_example,
    encode_prompt,
    format_prompt,
    quiet_length_warning,
)
from orchmoe.data.sources import open_source
from orchmoe.data.superni import FolderSource, resolve_data_dir

__all__ = [
    "BUILTIN",
    "BUILTIN_TASKS",
    "BUILTIN_VERSION",
    "IGNORE_INDEX",
    "PROMPT_FORMAT_KEY",
    "PromptFormat",
    "PromptFormatWarning",
    "DataError",
    "Example",
    "FolderSource",
    "MultiTaskData",
    "SuperNITask",
    "TaskSource",
    "available_tasks",
    "builtin_data_dir",
    "builtin_task_names",
    "default_features_dir",
    "encode_answer",
    "encode_example",
    "encode_prompt",
    "format_prompt",
    "generate_task",
    "load_multitask",
    "load_task",
    "open_source",
    "pad_batch",
    "quiet_length_warning",
    "read_split",
    "resolve_data_dir",
    "sample_instances",
    "select_tasks",
    "tokenized_features",
    "tokenizer_fingerprint",
    "unseen_eval_instances",
    "write_builtin",
]
