"""The command line, thin on top of the library: ``orchmoe train`` (a recipe over `transformers.Trainer`),
``eval``, ``report``, ``analyze``. Its modules: the options (`args`, `parse`), the run folder (`run_folder`),
the training recipe (`train`), the evaluation of a run (`evaluate`), reports and analyses.

Import the analysis from `orchmoe.recipe.analysis` (it needs matplotlib and scipy).
"""
