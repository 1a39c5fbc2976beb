"""``custom_dataset`` hook of the offline quantlab tasks: load a JSONL file that sits beside this one.

lm-eval hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``, which resolves relative paths
against the current directory, so a task YAML with plain ``data_files: data/x.jsonl`` works only when
run from evaluation/tasks/. The YAML names this function as its ``custom_dataset`` instead (lm-eval
resolves ``!function`` against the YAML's own directory), and relative paths are resolved here
against this directory: the tasks run the same from any working directory, through quantlab or
through ``lm_eval --include_path evaluation/tasks``.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(data_files: dict[str, str], **_metadata):
    """A ``DatasetDict`` of the JSON files named per split; other keyword arguments (lm-eval passes the
    task's metadata, such as ``version``) are ignored."""
    import datasets

    return datasets.load_dataset("json", data_files={split: str(HERE / f) for split, f in data_files.items()})
