"""The access audit: the writer, the hash chains, the queries and retention."""

from .writer import AuditRow, AuditWriter

__all__ = ["AuditRow", "AuditWriter"]
