"""The course kit: exercises cut out of the package, a student's copy, and the autograder.

exercises.py  the exercise list and every text a student sees (one place)
make.py       ``tinymrcnn course make-student``: the copy with stubs
grade.py      ``tinymrcnn course grade``: the checks and the score table (instructor only)
runner.py     runs a student's functions in a separate interpreter (instructor only)
notebook.py   helpers the exercise notebooks use to plug a student's function into training
cli.py        the ``tinymrcnn course`` commands

docs/course.md is the instructor's page.
"""
