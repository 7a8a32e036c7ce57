"""Hardware and cost planning (``gasungbi plan``), one module per question:

* ``catalog``: which GPUs and DRAM platforms there are, with a source for every figure (``hardware.json``);
* ``models``: what ``--model`` names (a preset, a config.json, or bare counts);
* ``counts``: what a model weighs: parameters, weight bytes per format, KV cache bytes, FLOPs per token;
* ``training``: what a training run costs: GPU-hours, days and dollars at a calibrated or given MFU;
* ``all_to_all``: whether computation hides expert parallelism's all-to-all;
* ``runs``: what one of our training runs measured (its ``report.json``);
* ``serving``: what serving takes: placement on HBM and DDR, fit, decode and prefill ceilings, cost;
* ``local``: our engine's decode ceilings at a measured bandwidth and FLOP/s (``plan here``);
* ``backtest``: the planner against published runs (``published.json``);
* ``measure``: memory bandwidth and matmul FLOP/s of the machine it runs on (the only module that
  needs torch);
* ``options``: the command's flags checked and turned into planner inputs;
* ``charts``: PNG charts; ``commands``: the ``gasungbi plan`` command.
"""
