"""The generated contract documents: fresh, complete, internally consistent and valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from nexus_bus import Operations, RequestContext, load_settings
from nexus_bus.bus.replies import problem_of
from nexus_bus.cli import build_parser
from nexus_bus.constants import (
    H_AUTHORIZATION,
    H_CONTENT_TYPE,
    H_DEADLINE,
    H_IDEMPOTENCY_KEY,
    H_REQUEST_ID,
    H_SERVICE_ERROR,
    H_SERVICE_ERROR_CODE,
    H_STATUS,
    H_TIMEOUT_MS,
    H_TRACEPARENT,
    H_TRACESTATE,
)
from nexus_bus.errors import NotFound
from nexus_bus.handlers import BUILTIN
from nexus_bus.schemas.data import ListRequest, PutRequest
from nexus_bus.specs import (
    asyncapi_document,
    default_directory,
    encode,
    export,
    json_schemas,
    openapi_document,
    render,
    stale,
)
from nexus_bus.specs.base import operations_of

BUILTIN_GROUPS = list(BUILTIN.values())
BUILTIN_OPERATIONS = operations_of(BUILTIN_GROUPS)


class Order(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    quantity: int


class OrderPlaced(msgspec.Struct, frozen=True, kw_only=True):
    order_id: str


def shop_group() -> Operations:
    """A user's own group: one public action, one that is not idempotent."""
    shop = Operations("shop", description="A user's shop.")

    @shop.action("ping", public=True)
    async def ping(req: Order, ctx: RequestContext) -> OrderPlaced:
        """Answer without a token."""
        return OrderPlaced(order_id="x")

    @shop.action("place", idempotent=False)
    async def place(req: Order, ctx: RequestContext) -> OrderPlaced:
        """Place an order."""
        return OrderPlaced(order_id="x")

    return shop


def resolve(document: dict[str, Any], pointer: str) -> Any:
    """The node a local `$ref` points at (JSON Pointer, RFC 6901)."""
    assert pointer.startswith("#"), f"non-local $ref {pointer!r}"
    node: Any = document
    for part in pointer[1:].split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and key in node, f"unresolved $ref {pointer!r}"
        node = node[key]
    return node


def refs_of(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for value in node.values() for r in refs_of(value)]
    if isinstance(node, list):
        return [r for item in node for r in refs_of(item)]
    return []


# --- the committed files ---------------------------------------------------------------


def test_committed_documents_are_fresh() -> None:
    outdated = stale(default_directory())
    assert not outdated, (
        f"generated contract documents are stale: {outdated}. Run `make schemas` "
        "(or `nexus-bus schemas export`) and commit the result."
    )


def test_export_and_stale_round_trip(tmp_path: Path) -> None:
    groups = [*BUILTIN_GROUPS, shop_group()]
    assert "openapi.json" in stale(tmp_path, groups)  # nothing written yet: all missing
    paths = export(tmp_path, groups)
    assert {p.relative_to(tmp_path).as_posix() for p in paths} == set(render(groups))
    assert (tmp_path / "jsonschema" / "shop.place.json").is_file()
    assert stale(tmp_path, groups) == []

    (tmp_path / "asyncapi.json").write_text("{}\n")
    (tmp_path / "jsonschema" / "data.get.json").unlink()
    (tmp_path / "jsonschema" / "gone.action.json").write_text("{}\n")
    assert stale(tmp_path, groups) == [
        "asyncapi.json",
        "jsonschema/data.get.json",
        "jsonschema/gone.action.json",
    ]
    export(tmp_path, groups)
    assert not (tmp_path / "jsonschema" / "gone.action.json").exists()
    assert stale(tmp_path, groups) == []
    # Dropping the user's group makes its files stale (extra) until the next export.
    assert "jsonschema/shop.place.json" in stale(tmp_path, BUILTIN_GROUPS)


def test_output_is_deterministic_and_order_independent() -> None:
    groups = [*BUILTIN_GROUPS, shop_group()]
    first = render(groups)
    assert render(list(reversed(groups))) == first
    for content in first.values():
        assert content.endswith(b"}\n")
        assert encode(msgspec.json.decode(content)) == content  # sorted, two-space indent


def test_cli_check_and_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings()

    def run(*argv: str) -> int:
        args = build_parser().parse_args(["schemas", "export", *argv])
        code: int = args.func(args, settings)
        return code

    assert run("--dir", str(tmp_path), "--check") == 1
    assert "make schemas" in capsys.readouterr().err
    assert run("--dir", str(tmp_path)) == 0
    assert str(tmp_path / "openapi.json") in capsys.readouterr().out
    assert run("--dir", str(tmp_path), "--check") == 0
    assert stale(tmp_path) == []


def test_duplicate_ops_are_refused() -> None:
    with pytest.raises(ValueError, match="given twice"):
        openapi_document([shop_group(), shop_group()])


# --- every operation in every document -------------------------------------------------


@pytest.mark.parametrize("operation", BUILTIN_OPERATIONS, ids=lambda o: f"{o.op}.{o.action}")
def test_every_builtin_operation_is_in_every_document(operation: Any) -> None:
    name = f"{operation.op}.{operation.action}"
    schema = json_schemas(BUILTIN_GROUPS)[name]
    assert {"request", "reply"} <= set(schema["$defs"])

    asyncapi = asyncapi_document(BUILTIN_GROUPS)
    assert asyncapi["channels"][name]["address"] == f"nexus.{name}"
    assert asyncapi["channels"][f"jobs.{name}"]["address"] == f"nexus.jobs.{name}"
    assert asyncapi["operations"][name]["action"] == "receive"
    assert asyncapi["operations"][name]["x-nexus-scope"] == operation.scope

    openapi = openapi_document(BUILTIN_GROUPS)
    post = openapi["paths"][f"/v1/{operation.op}/{operation.action}"]["post"]
    assert post["operationId"] == name


def test_built_in_table_of_design_is_covered() -> None:
    names = {f"{o.op}.{o.action}" for o in BUILTIN_OPERATIONS}
    design = {"data.get", "data.put", "data.delete", "data.list", "stream.publish",
              "stream.read", "ai.embed", "ai.complete"}  # fmt: skip
    assert design <= names
    assert set(json_schemas(BUILTIN_GROUPS)) == names | {"problem"}


def test_user_groups_appear_with_their_flags() -> None:
    groups = [*BUILTIN_GROUPS, shop_group()]
    assert {"shop.ping", "shop.place"} <= set(json_schemas(groups))

    openapi = openapi_document(groups)
    ping = openapi["paths"]["/v1/shop/ping"]["post"]
    place = openapi["paths"]["/v1/shop/place"]["post"]
    assert ping["security"] == [] and "401" not in ping["responses"]
    assert "security" not in place and "401" in place["responses"]  # the global bearer
    assert openapi["security"] == [{"bearer": []}]
    assert place["x-nexus-idempotent"] is False
    assert (
        resolve(openapi, place["requestBody"]["content"]["application/json"]["schema"]["$ref"])[
            "title"
        ]
        == "Order"
    )

    asyncapi = asyncapi_document(groups)
    assert asyncapi["operations"]["shop.ping"]["security"] == []
    assert asyncapi["operations"]["shop.place"]["security"] != []
    assert asyncapi["channels"]["shop.place"]["address"] == "nexus.shop.place"


# --- documents are well-formed ---------------------------------------------------------


def all_documents() -> list[Any]:
    groups = [*BUILTIN_GROUPS, shop_group()]
    documents = [("asyncapi", asyncapi_document(groups)), ("openapi", openapi_document(groups))]
    documents += sorted(json_schemas(groups).items())
    return [pytest.param(name, document, id=name) for name, document in documents]


@pytest.mark.parametrize(("name", "document"), all_documents())
def test_every_ref_resolves(name: str, document: dict[str, Any]) -> None:
    refs = refs_of(document)
    assert refs, f"{name} has no $ref at all"
    for pointer in refs:
        resolve(document, pointer)


def test_versions_and_shapes() -> None:
    openapi = openapi_document(BUILTIN_GROUPS)
    asyncapi = asyncapi_document(BUILTIN_GROUPS)
    assert openapi["openapi"] == "3.1.0"
    assert asyncapi["asyncapi"] == "3.0.0"
    assert asyncapi["servers"]["nats"]["protocol"] == "nats"
    assert asyncapi["channels"]["events"]["address"] == "nexus.events.{topic}"
    for document in json_schemas(BUILTIN_GROUPS).values():
        assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_openapi_document_is_valid() -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(openapi_document([*BUILTIN_GROUPS, shop_group()]))


def test_json_schemas_are_valid_2020_12() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    for document in json_schemas(BUILTIN_GROUPS).values():
        jsonschema.Draft202012Validator.check_schema(document)


def test_http_contract_details() -> None:
    openapi = openapi_document(BUILTIN_GROUPS)
    post = openapi["paths"]["/v1/data/put"]["post"]
    responses = post["responses"]
    parameters = {resolve(openapi, p["$ref"])["name"] for p in post["parameters"]}
    assert {"Prefer", H_IDEMPOTENCY_KEY, "X-Request-Id", H_TRACEPARENT, H_TIMEOUT_MS} <= parameters

    accepted = responses["202"]
    assert {"Location", "X-Request-Id"} <= set(accepted["headers"])
    assert accepted["content"]["application/json"]["schema"]["$ref"].endswith("/JobAccepted")
    assert "X-Request-Id" in responses["200"]["headers"]

    unauthorized = resolve(openapi, responses["401"]["$ref"])
    assert "WWW-Authenticate" in unauthorized["headers"]
    for status in ("429", "503"):
        assert "Retry-After" in resolve(openapi, responses[status]["$ref"])["headers"]
    conflict = resolve(openapi, responses["409"]["$ref"])["content"]["application/problem+json"]
    assert conflict["examples"]["conflict"]["value"]["code"] == "conflict"
    assert resolve(openapi, conflict["schema"]["$ref"])["required"] == [
        "type", "title", "status", "code"
    ]  # fmt: skip

    paths = openapi["paths"]
    assert paths["/v1/jobs/{id}"]["get"]["responses"]["200"]["content"]["application/json"][
        "schema"
    ]["$ref"].endswith("/Job")
    events = paths["/v1/events/{topic}"]["get"]
    assert "text/event-stream" in events["responses"]["200"]["content"]
    assert "Last-Event-ID" in {p["name"] for p in events["parameters"]}
    for route in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert paths[route]["get"]["security"] == []


def test_nats_contract_details() -> None:
    asyncapi = asyncapi_document(BUILTIN_GROUPS)
    messages = asyncapi["components"]["messages"]
    request_headers = resolve(asyncapi, messages["data.put.request"]["headers"]["$ref"])
    assert set(request_headers["properties"]) == {
        H_AUTHORIZATION, H_REQUEST_ID, H_TRACEPARENT, H_TRACESTATE, H_TIMEOUT_MS, H_DEADLINE,
        H_IDEMPOTENCY_KEY, H_CONTENT_TYPE,
    }  # fmt: skip
    job_headers = resolve(asyncapi, messages["data.put.job"]["headers"]["$ref"])["properties"]
    assert {"Nexus-Job-Id", "Nats-Msg-Id", H_AUTHORIZATION, H_IDEMPOTENCY_KEY} <= set(job_headers)
    assert H_TIMEOUT_MS not in job_headers  # a job has no caller waiting: no deadline travels
    reply_headers = resolve(asyncapi, messages["data.put.reply"]["headers"]["$ref"])
    assert reply_headers["required"] == [H_STATUS]
    problem_headers = resolve(asyncapi, messages["problem"]["headers"]["$ref"])
    assert {H_STATUS, H_SERVICE_ERROR_CODE, H_SERVICE_ERROR} <= set(problem_headers["required"])
    assert messages["problem"]["contentType"] == "application/problem+json"

    reply = asyncapi["operations"]["data.put"]["reply"]
    assert reply["channel"] == {"$ref": "#/channels/data.put.reply"}
    assert asyncapi["channels"]["data.put.reply"]["address"] is None  # the requester's inbox
    reply_messages = [resolve(asyncapi, m["$ref"]) for m in reply["messages"]]
    assert messages["problem"] in [resolve(asyncapi, m["$ref"]) for m in reply_messages]


# --- the JSON Schema agrees with msgspec -------------------------------------------------

PUT_SAMPLES = [
    {"key": "a", "value": 1},
    {"key": "users.42/profile", "value": {"n": [1, 2]}, "expected_revision": 0},
    {"key": "a", "value": None, "expected_revision": None},
    {"key": "a", "value": 1, "unknown_field": True},
    {"key": "a b", "value": 1},
    {"key": ".a", "value": 1},
    {"key": "a..b", "value": 1},
    {"key": "", "value": 1},
    {"key": "k" * 257, "value": 1},
    {"key": "a\n", "value": 1},  # Python's `$` matches before a final newline
    {"key": "a.b\n", "value": 1},
    {"key": "a"},
    {"value": 1},
    {"key": 5, "value": 1},
    {"key": "a", "value": 1, "expected_revision": -1},
    {"key": "a", "value": 1, "expected_revision": "3"},
    [],
]


def request_validator(name: str) -> Any:
    """A validator of `name`'s request, the way a non-Python client uses the schema file:
    load it, then validate against its request."""
    jsonschema = pytest.importorskip("jsonschema")
    referencing = pytest.importorskip("referencing")
    document = json_schemas(BUILTIN_GROUPS)[name]
    registry = referencing.Registry().with_resource(
        document["$id"], referencing.Resource.from_contents(document)
    )
    return jsonschema.Draft202012Validator(
        {"$ref": document["$id"] + "#/$defs/request"}, registry=registry
    )


@pytest.mark.parametrize("sample", PUT_SAMPLES, ids=lambda s: msgspec.json.encode(s).decode()[:40])
def test_data_put_schema_agrees_with_msgspec(sample: Any) -> None:
    validator = request_validator("data.put")
    try:
        msgspec.json.decode(msgspec.json.encode(sample), type=PutRequest)
        msgspec_accepts = True
    except msgspec.ValidationError:
        msgspec_accepts = False
    assert validator.is_valid(sample) == msgspec_accepts


LIST_PREFIXES = {
    # The start of some key: accepted (every start of this one, "" included).
    **{"users.42/p=_-.x"[:end]: True for end in range(len("users.42/p=_-.x") + 1)},
    # No key starts so (an empty token, or a character keys cannot hold). As a KV watch
    # filter the ones ending in a dot were a malformed subject ("a..>"): 503 from JetStream.
    ".": False, "..": False, "a..": False, "a.b..": False, ".a.": False, ".a": False,
    "a..b": False, "a b.": False, "*.": False, "a.\n": False,
}


@pytest.mark.parametrize(("prefix", "accepted"), LIST_PREFIXES.items())
def test_a_data_list_prefix_is_the_start_of_a_key(prefix: str, accepted: bool) -> None:
    validator = request_validator("data.list")
    try:
        msgspec.convert({"prefix": prefix}, ListRequest)
        msgspec_accepts = True
    except msgspec.ValidationError:
        msgspec_accepts = False
    assert msgspec_accepts is accepted
    assert validator.is_valid({"prefix": prefix}) is accepted


def test_problem_schema_accepts_real_problems() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(json_schemas(BUILTIN_GROUPS)["problem"])
    problem = msgspec.json.decode(msgspec.json.encode(problem_of(NotFound("no key"), "r1")))
    assert validator.is_valid(problem)
    del problem["code"]
    assert not validator.is_valid(problem)
