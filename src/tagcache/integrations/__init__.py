"""Integrations with web and database frameworks, each behind its own extra.

Importing this package imports none of them; import the one you use, e.g.
``from tagcache.integrations.sqlalchemy import QueryCache`` (extra ``sqlalchemy``).
"""
