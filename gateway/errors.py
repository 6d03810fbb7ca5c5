"""The one error type of the request path (a status, a stable reason id, a message) and
the catalogue of every reason id the gateway gives.

Refusals (4xx) are audited with decision `deny`; failures of a backend, the database or
the gateway itself (5xx) with decision `error`, so an auditor can tell them apart.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

# reason id -> (status, meaning). A test checks that every reason id raised in gateway/
# is listed here with its status, and that README.md's error table lists exactly these.
log = logging.getLogger("gateway.pipeline")

REASONS: dict[str, tuple[int, str]] = {
    # the request itself
    "bad_path": (400, "the path holds a character, segment or identifier outside the grammar"),
    "bad_query": (400, "a declared query parameter is repeated, empty or not an identifier"),
    "query_not_allowed": (400, "the route declares no such query parameter"),
    "bad_identifier": (400, "an identifier in a gateway API path or claim is outside the grammar"),
    "bad_json": (400, "the body is not a JSON object, or gives a field twice"),
    "bad_body": (400, "the body could not be read"),
    "bad_request": (400, "the HTTP request was refused by the server"),
    "bad_value": (400, "a written value is not plain text, a number or a flat list"),
    "field_not_writable": (400, "the write sets a field the route table does not let anyone set"),
    "invalid_text": (400, "free text is too long, not a string or holds control characters"),
    "invalid_contract": (400, "a contract body is malformed"),
    "invalid_request": (400, "a data-subject request body is malformed"),
    "invalid_break_glass": (400, "a break-glass request lacks a purpose or ticket, asks too "
                                 "long or holds an unknown field"),
    "invalid_ack": (400, "an alert's acknowledgement lacks a note (1-1000 characters) or holds "
                         "an unknown field"),
    "bad_report": (400, "a monthly report's month is not YYYY-MM, its format unknown, or it "
                          "names no EUO or partner"),
    "bad_filter": (400, "an audit or request filter is malformed, repeated or unknown"),
    "bad_explain": (400, "explain needs a method and a backend path"),
    "bad_cursor": (400, "the paging cursor is not one the gateway gave out"),
    "bad_format": (400, "the export format is not zip or json, or a parameter repeats or is unknown"),
    "bad_purpose": (400, "an assisted export names no purpose, or one export.yaml does not list"),
    "backend_rejected": (400, "the backend refused the request (400, 409, 422)"),
    "bad_idempotency_key": (400, "Idempotency-Key is repeated or outside 1-128 of A-Z a-z 0-9 . _ : -"),
    "idempotency_key_reused": (422, "the Idempotency-Key was used for another request"),
    "idempotency_key_in_use": (409, "a request with this Idempotency-Key is under way"),
    "idempotency_answer_lost": (409, "the request with this Idempotency-Key was carried out; "
                                     "its answer was not kept"),
    "body_too_large": (413, "the request body is over GATEWAY_MAX_BODY_BYTES"),
    # who is asking
    "missing_token": (401, "no Authorization header"),
    "malformed_authorization": (401, "the Authorization header is not `Bearer <token>`, or "
                                     "there are several"),
    "malformed_token": (401, "the token cannot be decoded"),
    "invalid_token": (401, "the token does not verify"),
    "bad_signature": (401, "the token's signature does not verify"),
    "unsupported_algorithm": (401, "the token's algorithm is not accepted for its key"),
    "unknown_key": (401, "the token names a key the gateway does not know"),
    "token_expired": (401, "the token has expired"),
    "token_not_yet_valid": (401, "the token is not valid yet (nbf/iat)"),
    "wrong_audience": (401, "the token is not meant for this gateway"),
    "wrong_issuer": (401, "the token comes from an unexpected issuer"),
    "missing_claim": (401, "the token lacks a required claim"),
    "missing_tenant_claim": (401, "the token lacks the tenant claim of its role"),
    "bad_claim": (401, "sub or the tenant claim is outside its grammar"),
    "unknown_role": (401, "the token's role is not one the gateway knows"),
    "ambiguous_role": (401, "the token's role claim is a list naming several roles of roles.yaml"),
    # what they may see
    "role_not_permitted": (403, "this role may not call this endpoint"),
    "no_active_contract": (403, "the partner holds no active contract with the EUO"),
    "other_euo": (403, "the resource belongs to another EUO"),
    "dataset_not_permitted": (403, "the caller may see no data set of this resource"),
    "write_not_permitted": (403, "the caller may not change this data set"),
    "processing_restricted": (403, "the user has restricted processing of their data"),
    "unknown_route": (404, "no route of the route table matches (never forwarded)"),
    "not_found": (404, "no such gateway endpoint"),
    "no_contract": (404, "the EUO has no contract"),
    "report_out_of_scope": (403, "the report is about an EUO or partner outside the caller's "
                                  "audit scope"),
    "no_such_request": (404, "no such data-subject request in the caller's scope"),
    "no_such_grant": (404, "no such break-glass grant in the caller's scope"),
    "no_such_alert": (404, "no such alert in the caller's scope"),
    "backend_not_found": (404, "the backend has no such resource"),
    "no_such_checkpoint": (404, "no audit checkpoint has that id"),
    "invalid_transition": (409, "the request cannot make that move (its state, your role) or has moved"),
    "retention_expired": (410, "the data is past its data set's retention period"),
    "export_under_way": (429, "a ZIP export of this user's data is under way already"),
    # failures: the backend, the database, the gateway
    "backend_unreachable": (502, "the backend cannot be reached or broke off"),
    "backend_error": (502, "the backend answered with an error status"),
    "backend_pages_exceeded": (502, "a backend list went on past the 1000 pages an export or "
                                     "erasure follows"),
    "backend_unmappable": (502, "the backend's answer does not fit the route table"),
    "backend_subject_mismatch": (502, "the backend answered about another EUO, user or meeting"),
    "backend_answer_too_large": (502, "the backend's JSON is over GATEWAY_MAX_JSON_ANSWER_BYTES"),
    "internal_error": (502, "the gateway failed unexpectedly (logged with a traceback)"),
    "audit_row_refused": (502, "the database refused this request's audit row (other rows "
                               "are written): nothing is served"),
    "audit_unavailable": (503, "the audit row cannot be committed: nothing is served"),
    "outcome_unknown": (503, "a change may or may not have been made (its commit or outcome "
                             "went unconfirmed); retry with the same Idempotency-Key"),
    "streams_busy": (503, "GATEWAY_MAX_STREAMS files are being copied through already"),
    "exports_busy": (503, "GATEWAY_EXPORT_DB_SLOTS ZIP exports are being prepared already"),
    "database_unavailable": (503, "the gateway's database cannot be reached"),
    "audit_tree_incomplete": (503, "the audit log's Merkle tree lacks nodes a proof needs"),
    "contracts_unavailable": (503, "the contracts mirror is stale: partners are refused"),
    "restrictions_unavailable": (503, "the restrictions mirror is stale: blocked roles are refused"),
    "break_glass_unavailable": (503, "the break-glass mirror is stale: a caller holding a grant is refused"),
    "keys_unavailable": (503, "the token issuer's key set cannot be fetched and its grace is over: "
                              "no token is verified"),
    "backend_timeout": (504, "the backend missed the deadline"),
}


class Denied(Exception):
    """Stop the request with a stable reason id of the catalogue (docs/gateway-api.md,
    Errors), answered with the status the catalogue gives it."""

    def __init__(self, code: str, message: str):
        if code not in REASONS:
            raise ValueError(f"{code!r} is not a reason id of the catalogue (errors.REASONS)")
        super().__init__(message)
        self.status = REASONS[code][0]
        self.code = code
        self.message = message


def internal(error: Exception, request_id: str) -> Denied:
    """An unexpected failure: logged with its traceback, answered and audited as an error."""
    log.error("request %s failed", request_id, exc_info=error)
    return Denied("internal_error", "the gateway could not complete the request")


def refusal(error: Exception, request_id: str) -> Denied:
    """What a failure is answered and audited as: a refusal as it is, anything else
    internal_error."""
    return error if isinstance(error, Denied) else internal(error, request_id)


def error_response(status: int, code: str, message: str, request_id: str,
                   headers: dict[str, str] | None = None) -> web.Response:
    """The error body (docs/gateway-api.md, Errors): {"error": {"code", "message", "request_id"}}."""
    body = orjson.dumps({"error": {"code": code, "message": message, "request_id": request_id}})
    return web.Response(status=status, body=body, content_type="application/json",
                        headers=headers)
