"""Question-answering tasks used to measure what a cache policy costs: records, generators, scoring."""

from kvlab.tasks.records import Task, read_task_file, task_from_record, write_task_file
from kvlab.tasks.scoring import exact_match, normalize, score, substring_match, token_f1

__all__ = [
    "Task", "exact_match", "normalize", "read_task_file", "score", "substring_match", "task_from_record",
    "token_f1", "write_task_file",
]
