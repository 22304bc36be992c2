"""Logos and documentation links of Ferry's blocks, as Prefect's UI shows them.

The logo files ship in this package (``ferry.backends.logos``). Prefect keeps
a block type's ``logo_url`` and ``documentation_url`` as http(s) URLs (its
client validates them as ``HttpUrl``, so ``file:`` and ``data:`` URLs are
refused) and the UI loads the logo in the user's browser; the URLs therefore
name the same files and pages in the project's published source tree, under
:data:`SOURCE_URL`. Nothing in Ferry fetches them: registering, saving and
loading blocks work offline.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: The project's published source tree; logo and documentation URLs point into it.
SOURCE_URL = "https://github.com/ferry-etl/ferry"
#: Raw files of the main branch (what an ``<img>`` can load).
RAW_URL = "https://raw.githubusercontent.com/ferry-etl/ferry/main"

#: Where the logo files sit in the source tree (the installed package is ``ferry.backends.logos``).
LOGO_FOLDER = "backends/logos"


def logo_url(file_name: str) -> str:
    """The public URL of a shipped logo file, e.g. ``logo_url("postgres.png")``."""
    return f"{RAW_URL}/{LOGO_FOLDER}/{file_name}"


def logo_path(file_name: str) -> Path:
    """The shipped logo file in the installed package."""
    return Path(str(files(__name__) / file_name))


def docs_url(page: str) -> str:
    """The public URL of a user guide page, e.g. ``docs_url("postgres.md")``."""
    return f"{SOURCE_URL}/blob/main/docs/{page}"


def code_example(slug: str, module: str, class_name: str, variable: str, side: str = "source") -> str:
    """The UI's code example of a block type: naming a saved block in a job file, and loading it in Python."""
    return f"""
    Name the saved block in a job file:

    ```yaml
    {side}:
      block: {slug}/BLOCK_NAME
      dataset: orders
    ```

    or load it in Python:

    ```python
    from {module} import {class_name}

    {variable} = {class_name}.load("BLOCK_NAME")
    ```
    """
