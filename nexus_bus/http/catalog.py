"""What the shim says about its API: the `/docs` page, `/asyncapi.json` and `GET /v1/ops`.

The docs page is Swagger UI 5 (it renders OpenAPI 3.1) from the dist files the
`swagger-ui-py` package ships, served by the shim itself: no CDN, so it works offline and
behind a firewall, and a strict Content-Security-Policy (scripts and styles from this origin
only) holds. Every URL in the page is relative, so it also works behind a proxy that mounts
the shim under a path prefix. Only the files listed in `ASSETS` are served.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from typing import Final

import msgspec

from nexus_bus.constants import CT_JSON, HTTP_ASYNCAPI, HTTP_DOCS, HTTP_OPENAPI
from nexus_bus.errors import NotFound, Unavailable
from nexus_bus.http.problems import Answer
from nexus_bus.operations import Operations
from nexus_bus.registry import OperationsListing
from nexus_bus.specs import asyncapi_document

SWAGGER_UI_PACKAGE: Final = "swagger_ui"  # the import name of the `swagger-ui-py` package
_STATIC: Final = "static"
_INIT_SCRIPT: Final = "nexus-init.js"
_CSS: Final = "text/css; charset=utf-8"
_JS: Final = "text/javascript; charset=utf-8"
# Served files and their content types; nothing else under /docs/ is.
ASSETS: Final = {
    "swagger-ui.css": _CSS,
    "swagger-ui-bundle.js": _JS,
    "favicon-32x32.png": "image/png",
    _INIT_SCRIPT: _JS,
}
_CT_HTML: Final = b"text/html; charset=utf-8"
_CT_JSON: Final = CT_JSON.encode()
# Swagger UI sets style attributes at run time, hence 'unsafe-inline' for styles only.
_CSP: Final = (
    b"default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; font-src 'self' data:; connect-src 'self'; "
    b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_PAGE_HEADERS: Final = [
    (b"content-security-policy", _CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"no-cache"),
]
_ASSET_HEADERS: Final = [
    (b"x-content-type-options", b"nosniff"),
    (b"cache-control", b"public, max-age=3600"),
]
_DOCS_DIR: Final = HTTP_DOCS.lstrip("/")  # "docs": page-relative URLs of the assets
_PAGE: Final = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nexus-bus API</title>
<link rel="stylesheet" href="{_DOCS_DIR}/swagger-ui.css">
<link rel="icon" type="image/png" href="{_DOCS_DIR}/favicon-32x32.png">
</head>
<body>
<nav style="font-family: sans-serif; padding: 10px 20px; border-bottom: 1px solid #ddd">
<strong>nexus-bus</strong> &middot;
<a href="{HTTP_OPENAPI.lstrip("/")}">OpenAPI (HTTP)</a> &middot;
<a href="{HTTP_ASYNCAPI.lstrip("/")}">AsyncAPI (NATS)</a>
</nav>
<div id="swagger-ui"></div>
<script src="{_DOCS_DIR}/swagger-ui-bundle.js"></script>
<script src="{_DOCS_DIR}/{_INIT_SCRIPT}"></script>
</body>
</html>
""".encode()
# A file rather than an inline script, so the page's CSP needs no 'unsafe-inline' scripts.
_INIT: Final = f"""window.ui = SwaggerUIBundle({{
  url: "{HTTP_OPENAPI.lstrip("/")}",
  dom_id: "#swagger-ui",
  deepLinking: true,
  displayRequestDuration: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
}});
""".encode()
_encoder: Final = msgspec.json.Encoder()


def swagger_ui_dir() -> Path:
    """The folder of Swagger UI's dist files inside the installed `swagger-ui-py` package.

    Found without importing the package (its import pulls in Jinja2, which we do not use).

    Raises:
        Unavailable: the package is not installed.
    """
    spec = importlib.util.find_spec(SWAGGER_UI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise Unavailable("the swagger-ui-py package is not installed: no /docs page")
    return Path(next(iter(spec.submodule_search_locations))) / _STATIC


class Catalog:
    """Answers `/docs`, its assets and `/asyncapi.json`; formats `GET /v1/ops`."""

    def __init__(self, groups: Iterable[Operations]) -> None:
        self._groups = list(groups)
        self._assets: dict[str, Answer] = {}
        self._asyncapi: bytes | None = None

    def page(self) -> Answer:
        """The docs page (Swagger UI on this shim's `/openapi.json`)."""
        return Answer(200, _CT_HTML, list(_PAGE_HEADERS), _PAGE)

    def asset(self, name: str) -> Answer:
        """One of the page's files, read once and kept in memory.

        Raises:
            NotFound: not a file the page uses.
            Unavailable: the swagger-ui-py package is missing.
        """
        cached = self._assets.get(name)
        if cached is not None:
            return cached
        content_type = ASSETS.get(name)
        if content_type is None:
            raise NotFound(f"no docs asset {name[:80]!r}")
        body = _INIT if name == _INIT_SCRIPT else (swagger_ui_dir() / name).read_bytes()
        answer = Answer(200, content_type.encode(), list(_ASSET_HEADERS), body)
        self._assets[name] = answer
        return answer

    def asyncapi(self) -> Answer:
        """The AsyncAPI 3.0 document of the NATS side, for the operations the shim knows."""
        if self._asyncapi is None:
            self._asyncapi = _encoder.encode(asyncapi_document(self._groups))
        return Answer(200, _CT_JSON, [], self._asyncapi)


def ops_answer(listing: OperationsListing) -> Answer:
    """`GET /v1/ops`: every declared operation, its scopes, schemas and whether it is served."""
    return Answer(200, _CT_JSON, [(b"cache-control", b"no-store")], _encoder.encode(listing))
