"""GET /v1/me/export: a user's personal data from every backend, in one archive; and
GET /v1/euos/{euo}/users/{user}/export, the same made by an EUO admin for a user of their
EUO (audited with the admin as actor and the purpose as reason).

Every backend call goes through the same stages as any request (route, authorize with
the user as viewer, forward, redact, audit), so the export holds exactly what the user
may see of their own data and is audited call by call; export.yaml must cover every data
set a user may read. The JSON parts are gathered first: a failing backend call fails the
export with an error status before anything is sent (a 404 of an optional source is
recorded as not held). Attachments then stream into the ZIP chunk by chunk, export.json
last; if one breaks off midway the connection is cut before the ZIP's directory is
written, so the client gets a broken download, never a silently partial archive.
"""

from .http import add_routes

__all__ = ["add_routes"]
