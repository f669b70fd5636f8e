"""The course kit: exercises cut out of the package, a student's copy, and the autograder.

exercises.py  the exercise list and every text a student sees (one place)
make.py       ``tinymrcnn course make-student``: the copy with stubs
grade.py      ``tinymrcnn course grade``: the checks and the score table (instructor only)
runner.py     runs a student's functions in a separate interpreter (instructor only)
notebook.py   what the exercise notebooks call: setup (inline figures, the reference for other
              exercises' stubs), a short training run, routing the model through a student's function
notebooks/    the exercise notebooks (package data; in the repository a link to notebooks/exercises)
cli.py        the ``tinymrcnn course`` commands

A student's copy also holds reference/: the solution of its stubbed files, which the notebooks
fall back on (written by make.py, absent here).

docs/course.md is the instructor's page.
"""
