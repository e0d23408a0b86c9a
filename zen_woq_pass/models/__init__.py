"""Model tooling, not used by a converted model: real checkpoints made offline (``smollm2``,
``testing``), hand-built layers (``probe``), and what a model costs: its speed and bytes
(``measure``) and its quality against a reference (``quality``)."""
