"""The reference docs: docs/configuration.md is what `regate config reference` prints
now, every key is described, docs/architecture.md shows the stages in code order,
and no link, path or message in the project points outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from proxy import config as config_mod
from proxy import configdoc
from proxy.pipeline import Pipeline

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def test_configuration_reference_is_current():
    current = configdoc.reference()
    on_disk = (DOCS / "configuration.md").read_text()
    assert on_disk == current, (
        "docs/configuration.md is stale (proxy/config.py changed): regenerate it with `make docs` "
        "(regate config reference > docs/configuration.md)")


def test_every_key_is_described():
    missing = configdoc.undescribed()
    assert not missing, (
        f"keys without a description: {missing}. Write a comment above the field in proxy/config.py "
        "(or Field(description=...)), or an entry in proxy/configdoc.py DESCRIPTIONS; then `make docs`")


def test_descriptions_table_names_real_fields_the_source_does_not_describe():
    models = {name: obj for name, obj in vars(config_mod).items()
              if isinstance(obj, type) and issubclass(obj, config_mod.BaseModel)}
    for key in configdoc.DESCRIPTIONS:
        model_name, _, field = key.partition(".")
        assert model_name in models and field in models[model_name].model_fields, \
            f"configdoc.DESCRIPTIONS[{key!r}]: no such field in proxy/config.py; remove the entry"
        model = models[model_name]
        f = model.model_fields[field]
        assert not (f.description or configdoc._comments(model).get(field)), \
            f"configdoc.DESCRIPTIONS[{key!r}]: proxy/config.py describes it now; remove the entry"


def test_reference_lists_every_key_with_type_and_default():
    text = (DOCS / "configuration.md").read_text()
    for name in config_mod.Config.model_fields:
        if name != "base_dir":
            assert f"| `{name}` |" in text
    assert "| `shutdown_grace_s` | number; ≥ 0 | `30.0` |" in text


def test_architecture_shows_the_stages_in_code_order():
    text = (DOCS / "architecture.md").read_text()
    line = ", ".join(Pipeline.STAGE_ORDER)
    assert f"    {line}\n" in text, f"docs/architecture.md must list STAGE_ORDER as in code: {line}"
    numbered = re.findall(r"^\d+\. \*\*(\w+)\*\*", text, re.M)
    assert numbered[:len(Pipeline.STAGE_ORDER)] == list(Pipeline.STAGE_ORDER)
    for word in ("ingress.py", "state.gpu", "echo", "Decision limits", "observability"):
        assert word.lower() in text.lower()


# ---- links and paths ---------------------------------------------------------------

OUTSIDE = re.compile(r"\.\./shared|shared/DESIGN|DESIGN\.md|/work/")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    docs = [REPO / "README.md", REPO / "SECURITY.md", REPO / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
    return [d for d in docs if d.exists()]


@pytest.mark.parametrize("doc", documents(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_no_link_points_outside_the_repository(doc):
    text = doc.read_text()
    for n, line in enumerate(text.splitlines(), 1):
        assert not OUTSIDE.search(line), f"{doc.name}:{n} points outside the repository: {line.strip()}"
    for target in LINK.findall(text):
        if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            assert target.startswith(("https://", "http://", "mailto:", "#")), f"{doc.name}: link {target}"
            continue
        path = (doc.parent / target.split("#", 1)[0]).resolve()
        assert path.is_relative_to(REPO), f"{doc.name}: {target} leaves the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"


def _messages(tree: ast.AST) -> list[tuple[int, str]]:
    """String constants that are not docstrings (what the code says to users)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_message_in_the_code_points_outside_the_repository():
    bad = []
    for path in sorted((REPO / "proxy").rglob("*.py")):
        for line, text in _messages(ast.parse(path.read_text())):
            if OUTSIDE.search(text):
                bad.append(f"{path.relative_to(REPO)}:{line}: {text[:80]!r}")
    for path in [REPO / "Dockerfile", *sorted((REPO / "deploy").rglob("*.yaml")),
                 *sorted((REPO / "deploy").rglob("*.tpl")), REPO / "deploy/render.py"]:
        if path.name in ("sidecar.yaml", "gateway.yaml") and path.parent.name == "kubernetes":
            continue  # rendered: they carry the shipped bundle's own comments
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if OUTSIDE.search(line):
                bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:80]}")
    assert not bad, "messages pointing outside the repository:\n" + "\n".join(bad)
