"""The training floor: the ranker, its losses and metrics, the shared training loop and the three stages.

* ``model`` / ``text_model``: the built-in rankers and the interface any ranker provides; ``device`` and
  ``distributed``: where and on how many processes it runs;
* ``masked`` (masks and masked group statistics), ``losses``, ``metrics`` and ``baselines``: what is optimised
  and what is measured;
* ``training`` (the loop: ``fit``), ``optim`` (``OptimConfig`` and the non-finite guards of a step), ``checkpoint``, ``selection``, and the stages ``sft``, ``rce`` and ``grpo``;
  ``import_sft`` turns your own trained weights into a stage-1 checkpoint (``import_state_dict``,
  ``import_pretrained`` and ``import_checks`` hold the imports it re-exports); ``stacked`` trains K runs as one
  model (``stacked_members``, ``stacked_towers``, ``stacked_losses``).

It may import the data floor (:mod:`v3kit.data`) and the infrastructure modules at the package's top (``rundir``,
``bounds``, ``provenance``), never the run config, the pipeline or the layers above (``tests/test_layout.py``
checks it).
"""
