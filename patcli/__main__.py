"""``python -m patcli``: the same CLI as the ``patcli`` command."""

from .entry import main

main()
