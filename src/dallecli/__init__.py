"""dallecli: turn text into images on your own machine (the ``dalle`` command)."""

__version__ = "0.1.0"
