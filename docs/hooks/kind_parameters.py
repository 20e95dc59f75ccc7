"""MkDocs hook (mkdocs.yml `hooks:`): the marker line `<!-- chla:kind-parameters -->` in a page
becomes every stage kind's reference, generated from the kinds' params models at build time
(chla_launcher.kinds_reference), so the parameter tables cannot drift from the code."""

from __future__ import annotations

from typing import Any

MARKER = "<!-- chla:kind-parameters -->"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    # Imported here, not at the top: mkdocs loads hooks before it reads any page.
    from chla_launcher.kinds_reference import kinds_reference

    return markdown.replace(MARKER, kinds_reference())
