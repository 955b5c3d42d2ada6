"""The runtime's command-line verbs: `segment` (streams and archives), `generate`, and the flags that config
dataclasses declare (flags). The only part of the runtime that knows argparse; library code never imports it.

May import: everything in the runtime.
"""
