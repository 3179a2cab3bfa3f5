"""Builders for guest state: page tables for every paging mode (and, later,
descriptor tables and small guest programs)."""

from .paging import MODES, PageTables

__all__ = ["MODES", "PageTables"]
