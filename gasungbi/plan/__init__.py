"""Hardware and cost planning: a catalog of GPUs and DRAM platforms (``catalog``), what ``--model``
names (``models``: a preset, a config.json or bare counts), training cost and serving speed
arithmetic (``estimate``), the planner against published runs (``backtest``, ``published.json``),
quick measurements of this machine (``measure``, the only module that needs torch), charts
(``charts``) and the ``gasungbi plan`` command (``commands``)."""
