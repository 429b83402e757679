"""The shipped zero-shot tasks: one folder per task with an lm-eval task YAML and its items as JSONL.

Built by ``python -m sensitivity.data.build_tasks`` from the built-in corpus' test split (see ``README.md`` here);
read them with :func:`sensitivity.data.tasks.task_items` and score them with :func:`sensitivity.eval.evaluate_tasks`.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""Folder holding ``<task>/<task>.yaml``, ``<task>/<task>.jsonl`` and ``README.md``."""
