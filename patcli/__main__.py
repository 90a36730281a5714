"""``python -m patcli``: the same CLI as the ``patcli`` command."""

from .cli import main

main()
