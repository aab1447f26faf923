"""hubmerge: average or ensemble neighbouring pretraining checkpoints, and measure the stability gain.

The heavy libraries (torch, transformers) are imported only by the functions that use them, so
importing hubmerge and running commands that do no tensor arithmetic stays fast.
"""

__version__ = "0.1.0"
