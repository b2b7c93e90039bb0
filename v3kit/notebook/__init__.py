"""The notebook floor (the UI): what the notebooks under ``notebooks/`` draw and record.

* ``plots`` / ``live``: the stage plots and the live training plot; ``grpo_panel``: the GRPO start and compare
  panels; ``report_plots``: an ablation's figures;
* ``tools``: notebook sources as ``.py`` files, their parameters and recorded results (``v3kit notebook``,
  ``python -m v3kit.notebook.tools check``).

It is the top floor: it may import every floor below it (the data, the training stages, the run config and
pipeline, the ablation, the doctor), and nothing below imports it (``tests/test_layout.py`` checks it).
"""
