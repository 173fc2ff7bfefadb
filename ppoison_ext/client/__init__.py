"""Clients of a served defended victim (``ppoison serve``): :class:`RemoteBlackbox`."""

from .remote import BudgetExhausted, RemoteBlackbox, RemoteError, is_url, read_api_key

__all__ = ["RemoteBlackbox", "RemoteError", "BudgetExhausted", "is_url", "read_api_key"]
