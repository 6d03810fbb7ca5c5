"""GET /v1/me/export: a user's personal data from every backend, in one archive.

Every backend call goes through the same stages as any request (route, authorize with
the caller as viewer, forward, redact, audit), so the export holds exactly what the user
may see of their own data and is audited call by call. The JSON parts are gathered first:
a failing backend call fails the export with an error status before anything is sent.
Attachments then stream into the ZIP chunk by chunk; if one breaks off midway the
connection is cut before the ZIP's directory is written, so the client gets a broken
download, never a silently partial archive.
"""

from .handler import ExportSpec, add_routes

__all__ = ["ExportSpec", "add_routes"]
