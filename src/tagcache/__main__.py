"""``python -m tagcache``: the operator command line (see :mod:`tagcache.cli`)."""

from tagcache.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
