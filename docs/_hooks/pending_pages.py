"""mkdocs hook: keep ``mkdocs build --strict`` passing while a page listed in the nav is missing.

A page of ``PENDING`` that does not exist yet is replaced by a short generated page saying
so; once the real file exists it is used and this hook does nothing. Delete the hook (and
its line in ``mkdocs.yml``) once ``docs/examples.md`` exists.
"""

from __future__ import annotations

from typing import Any

from mkdocs.structure.files import File, Files

PENDING = {"examples.md": "Examples"}


def on_files(files: Files, config: Any) -> Files:
    for path, title in PENDING.items():
        if files.get_file_from_path(path) is None:
            content = f"# {title}\n\nThis page is not written yet.\n"
            files.append(File.generated(config, path, content=content))
    return files
