"""The recipe behind ``orchmoe train``/``eval``/``report``/``analyze`` (the command line itself is
`orchmoe.cli`): training over `transformers.Trainer`, thin on top of the library.
Its modules: the options (`args`, `parse`), the run folder (`run_folder`),
the training recipe (`train`), the evaluation of a run (`evaluate`), reports and analyses.

Import the analysis from `orchmoe.recipe.analysis` (it needs matplotlib and scipy).
"""
