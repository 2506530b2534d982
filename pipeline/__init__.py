"""clickscale: click-supervised pseudo boxes and detectors (the library; no luigi here).

Data flows one way: dataset -> proposals -> selection -> classifier -> CAMs -> pseudo boxes -> detector
-> evaluation. See docs/architecture.md.
"""

__version__ = "0.1.0"
