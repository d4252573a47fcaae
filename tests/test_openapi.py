"""docs/openapi.yaml documents exactly the routes the application serves."""

from __future__ import annotations

from pathlib import Path

import yaml
from aiohttp import web

from server import create_app
from tests.support.settings import SettingsFactory

SPEC = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
# Methods aiohttp adds by itself (HEAD for every GET).
IMPLICIT = {"HEAD"}


def documented_routes() -> set[tuple[str, str]]:
    spec = yaml.safe_load(SPEC.read_text())
    return {
        (method.upper(), path)
        for path, operations in spec["paths"].items()
        for method in operations
        if method in {"get", "post", "put", "patch", "delete"}
    }


def served_routes(make_settings: SettingsFactory) -> set[tuple[str, str]]:
    app = create_app(make_settings())
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method not in IMPLICIT
        # Static files (scripts, styles) are not API.
        and not isinstance(route.resource, web.StaticResource)
    }


def test_every_served_route_is_documented_and_every_documented_route_is_served(
    make_settings: SettingsFactory,
) -> None:
    served = served_routes(make_settings)
    assert served, "the application serves no routes"
    assert served == documented_routes()


def test_every_operation_documents_its_responses() -> None:
    spec = yaml.safe_load(SPEC.read_text())
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("responses"), f"{method.upper()} {path} has no responses"
            assert operation.get("operationId"), f"{method.upper()} {path} has no operationId"
