"""docs/api.md's endpoint reference is generated from the routes and schemas: it must match."""

from __future__ import annotations

from pathlib import Path

from netsvc.apidoc import default_api
from netsvc.cluster.apidoc import MARKER, reference, render_file

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_the_api_reference_is_up_to_date() -> None:
    text = DOC.read_text()
    assert MARKER in text
    assert render_file(text, default_api()) == text, (
        "docs/api.md is out of date: run `python -m netsvc.apidoc docs/api.md`")


def test_every_route_and_body_field_is_in_the_reference() -> None:
    api = default_api()
    ref = reference(api)
    for compiled in api.routes:
        assert f"| {compiled.route.method} |" in ref
    for field in ("wait_s", "executor", "claimants[i].mac", "claimants[i].last_seen_age_s", "vms"):
        assert f"`{field}`" in ref, field
