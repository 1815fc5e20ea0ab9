"""The admin pages (approval inbox, overview): served as one fixed file each,
with a content-security policy that lets only that file's own inline script
and style run — whatever an agent puts in the data the page shows."""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def load_page(path: Path) -> tuple[str, dict[str, str]]:
    """The page's HTML and the headers to serve it with."""
    page = path.read_text()
    script = re.search(r"<script>(.*?)</script>", page, re.S).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    headers = {
        "Content-Security-Policy": (
            f"default-src 'none'; script-src {_csp_hash(script)}; style-src {_csp_hash(style)}; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ),
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
    }
    return page, headers
