"""Hardware and cost planning: a catalog of GPUs and DRAM platforms (``catalog``), training cost
and serving speed arithmetic (``estimate``), quick measurements of this machine (``measure``),
charts (``charts``) and the ``gasungbi plan`` command (``commands``)."""
