"""``python -m dallecli`` runs the ``dalle`` command."""

from dallecli.cli.app import main

if __name__ == "__main__":
    main()
