"""The docs cannot drift from the code: the configuration page and the benchmarks page are generated
(and must be current), and the API page is checked against the OpenAPI schema both ways."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.errors import HTTP_ERRORS
from service.settings import ServiceSettings
from tools import docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.mark.parametrize("page", sorted(docs.PAGES))
def test_generated_pages_are_current(page):
    assert (DOCS / page).read_text() == docs.PAGES[page](), (
        f"run `python -m tools.docs` to update docs/{page}"
    )


def test_the_docs_point_at_nothing_outside_the_repository():
    for page in DOCS.glob("*.md"):
        text = page.read_text()
        assert "METHOD.md" not in text and "../shared" not in text, page.name
        for target in re.findall(r"\]\(([^)#:]+)", text):  # relative links resolve
            assert (page.parent / target).exists(), f"{page.name}: {target}"


@pytest.fixture(scope="module")
def schema() -> dict:
    return TestClient(create_app(ServiceSettings(preset="demo"))).get("/openapi.json").json()


def _sections() -> dict[str, set[str]]:
    """`METHOD /path` -> the names in the first column of its section's tables."""
    sections: dict[str, set[str]] = {}
    for block in re.split(r"^## ", (DOCS / "api.md").read_text(), flags=re.M)[1:]:
        heading, _, body = block.partition("\n")
        names = {
            n
            for row in re.findall(r"^\| ([^|]+) \|", body, flags=re.M)
            for n in re.findall(r"`([^`]+)`", row)
        }
        for endpoint in re.findall(r"`([A-Z]+ /[\w/-]*)`", heading):
            sections[endpoint] = names
    return sections


def _resolve(schema: dict, node: dict) -> dict:
    if "$ref" in node:
        return schema["components"]["schemas"][node["$ref"].split("/")[-1]]
    for option in node.get("anyOf", []):
        if option.get("type") != "null":
            return _resolve(schema, option)
    return node


def _fields(schema: dict, node: dict, prefix: str = "") -> dict[str, bool]:
    """Field names of a schema -> whether each is top-level; nested ones as `a[].b` or `a.b`."""
    node = _resolve(schema, node)
    names = {}
    for name, prop in node.get("properties", {}).items():
        names[prefix + name] = not prefix
        inner = _resolve(schema, prop)
        if inner.get("type") == "array":
            inner, sep = _resolve(schema, inner.get("items", {})), "[]."
        else:
            sep = "."
        if inner.get("properties"):
            names |= _fields(schema, inner, f"{prefix}{name}{sep}")
    return names


def test_the_api_page_documents_every_endpoint_field_and_error(schema):
    sections = _sections()
    all_documented = set().union(*sections.values())
    statuses = set()
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            endpoint = f"{method.upper()} {path}"
            assert endpoint in sections, f"docs/api.md has no section for {endpoint}"
            documented = sections[endpoint]
            body = operation.get("requestBody", {}).get("content", {})
            request = {n for content in body.values() for n in _fields(schema, content["schema"])}
            response = _fields(
                schema,
                operation["responses"]["200"]
                .get("content", {})
                .get("application/json", {})
                .get("schema", {}),
            )
            for name in request:
                assert name in documented, f"{endpoint}: request field {name} is not documented"
            for name, top in response.items():
                assert name in (documented if top else all_documented), f"{endpoint}: response field {name}"
            for name in documented:  # nothing documented that the endpoint does not have
                assert name in request or name in response or "/" in name, (
                    f"{endpoint}: {name} is not in the schema"
                )
            statuses |= {s for s in operation["responses"] if s != "200"}
    errors = (DOCS / "api.md").read_text().split("## Errors", 1)[1]
    for status in statuses:
        assert re.search(rf"^\| {status} \|", errors, flags=re.M), (
            f"status {status} is not in the errors table"
        )
    for status, (code, _) in HTTP_ERRORS.items():  # the framework's errors, worded by the project
        assert f"| {status} | `{code}` |" in errors, f"{status} {code} is not in the errors table"
