"""``tinymrcnn course ...``: the course kit's commands.

tinymrcnn course list                                   the exercises, times, files
tinymrcnn course make-student OUT_DIR [--exercises A,B] a copy with the exercises blanked
tinymrcnn course grade STUDENT_DIR [--exercises A,B]    the score table (exit 0 whatever the score);
                                                        runs the student's code: see docs/course.md
"""

from __future__ import annotations


def cmd_list(args):
    from .exercises import EXERCISES

    print(f"{'#':>2}  {'name':<20} {'min':>4}  where")
    for ex in EXERCISES:
        print(f"{ex.number:>2}  {ex.name:<20} {ex.minutes:>4}  {ex.path}: {', '.join(p.function for p in ex.parts)}")
    print(f"\ntotal {sum(ex.minutes for ex in EXERCISES)} min; docs/course.md is the instructor's page")
    return 0


def cmd_make_student(args):
    from .make import MarkerError, make_student

    notebooks = False if args.no_notebooks else args.notebooks
    try:
        info = make_student(
            args.out_dir, args.exercises, notebooks=notebooks, force=args.force, reference=not args.no_reference
        )
    except (FileNotFoundError, FileExistsError, MarkerError, ValueError, RuntimeError) as e:
        raise SystemExit(f"tinymrcnn course make-student: {e}") from None
    print(
        f"wrote {info['package']} with {len(info['stubbed'])} stubbed function(s) "
        f"for {len(info['exercises'])} exercise(s):"
    )
    for path, fn in info["stubbed"]:
        print(f"  tinymrcnn/{path}: {fn}")
    for nb in info["notebooks"]:
        print(f"  {nb}")
    return 0


def cmd_grade(args):
    try:
        from .grade import main_grade
    except ImportError:
        raise SystemExit(
            "tinymrcnn course grade: the grader is not part of a student's copy; "
            "grade with the instructor's installation"
        ) from None
    from .grade import Limits

    limits = Limits(wall_seconds=args.timeout, cpu_seconds=args.cpu_seconds, memory_mb=args.memory_mb)
    rc = main_grade(
        args.student_dir, args.exercises, seed=args.seed, timeout=args.timeout, json_path=args.json, limits=limits
    )
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
    m.add_argument(
        "--notebooks",
        default=None,
        help="folder of the exercise notebooks (default: the ones installed with the package)",
    )
    m.add_argument("--no-notebooks", action="store_true", help="write the copy without notebooks")
    m.add_argument(
        "--no-reference",
        action="store_true",
        help="leave out tinymrcnn/course/reference/ (the solutions the notebooks fall back on)",
    )
    m.add_argument("--force", action="store_true", help="replace an existing OUT_DIR/tinymrcnn")
    m.set_defaults(func=cmd_make_student)

    g = sub.add_parser("grade", help="grade a student's copy; prints a score table")
    g.add_argument("student_dir", help="the folder that holds the student's tinymrcnn/")
    g.add_argument("--exercises", default=None, help="comma-separated names (default: all)")
    g.add_argument("--json", default=None, help="also write the report as JSON to this file")
    g.add_argument("--timeout", type=float, default=300.0, help="wall-clock seconds per exercise (default 300)")
    g.add_argument(
        "--cpu-seconds", type=float, default=None, help="CPU seconds of one child interpreter (default: as --timeout)"
    )
    g.add_argument(
        "--memory-mb", type=int, default=2048, help="address space of the child interpreter in MiB (default 2048)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the random check inputs")
    g.set_defaults(func=cmd_grade)
    return c
