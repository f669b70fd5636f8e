"""``tinymrcnn course ...``: the course kit's commands.

    tinymrcnn course list                                   the exercises, times, files
    tinymrcnn course make-student OUT_DIR [--exercises A,B] a copy with the exercises blanked
    tinymrcnn course grade STUDENT_DIR [--exercises A,B]    the score table (exit 0 whatever the score)
"""
from __future__ import annotations

import sys


def cmd_list(args):
    from .exercises import EXERCISES
    print(f"{'#':>2}  {'name':<20} {'min':>4}  where")
    for ex in EXERCISES:
        print(f"{ex.number:>2}  {ex.name:<20} {ex.minutes:>4}  {ex.path}: "
              f"{', '.join(p.function for p in ex.parts)}")
    print(f"\ntotal {sum(ex.minutes for ex in EXERCISES)} min; docs/course.md is the instructor's page")
    return 0


def cmd_make_student(args):
    from .make import MarkerError, make_student
    try:
        info = make_student(args.out_dir, args.exercises, notebooks=args.notebooks, force=args.force)
    except (FileExistsError, MarkerError, ValueError, RuntimeError) as e:
        raise SystemExit(f"tinymrcnn course make-student: {e}")
    print(f"wrote {info['package']} with {len(info['stubbed'])} stubbed function(s) "
          f"for {len(info['exercises'])} exercise(s):")
    for path, fn in info["stubbed"]:
        print(f"  tinymrcnn/{path}: {fn}")
    for nb in info["notebooks"]:
        print(f"  {nb}")
    if info["missing_notebooks"]:
        print(f"no notebook found for: {', '.join(info['missing_notebooks'])} "
              "(pass --notebooks DIR, the folder with notebooks/exercises/*.ipynb)", file=sys.stderr)
    return 0


def cmd_grade(args):
    try:
        from .grade import main_grade
    except ImportError:
        raise SystemExit("tinymrcnn course grade: the grader is not part of a student's copy; "
                         "grade with the instructor's installation") from None
    rc = main_grade(args.student_dir, args.exercises, seed=args.seed, timeout=args.timeout,
                    json_path=args.json)
    if rc:
        raise SystemExit(rc)
    return 0


def add_course_parser(subparsers):
    """Add ``course`` and its sub-commands to the main parser's subparsers."""
    c = subparsers.add_parser("course", help="the course kit: student exercises and the autograder")
    sub = c.add_subparsers(dest="course_command", required=True)

    ls = sub.add_parser("list", help="list the exercises")
    ls.set_defaults(func=cmd_list)

    m = sub.add_parser("make-student", help="write a student's copy with the exercise bodies blanked")
    m.add_argument("out_dir")
    m.add_argument("--exercises", default=None, help="comma-separated names (default: all)")
    m.add_argument("--notebooks", default=None, help="folder of the exercise notebooks "
                                                      "(default: notebooks/exercises of this checkout)")
    m.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/tinymrcnn")
    m.set_defaults(func=cmd_make_student)

    g = sub.add_parser("grade", help="grade a student's copy; prints a score table")
    g.add_argument("student_dir", help="the folder that holds the student's tinymrcnn/")
    g.add_argument("--exercises", default=None, help="comma-separated names (default: all)")
    g.add_argument("--json", default=None, help="also write the report as JSON to this file")
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per exercise (default 300)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random check inputs")
    g.set_defaults(func=cmd_grade)
    return c
