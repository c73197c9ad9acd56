"""`python -m fdlight.convert IN OUT.safetensors [--student CONFIG] [--teacher CONFIG] [--force]`: a checkpoint of the
official FD release (distilled or fine-tuned, recognised by its keys: models/official.py) or an fdlight export, written
as fdlight's timm-loadable export.

OUT holds the student (or classifier) in timm's key layout and, in its metadata, what a distillation run's
`student.safetensors` carries: `timm_model`, `timm_kwargs`, `stage` (distill, or finetune for a classifier, with its
`num_classes`) and `teacher` (--teacher, else the teacher the file's own config names, else `unknown`), plus `layout`
and `source`. The architecture is the student config whose shapes (depth, width, heads, patch, window) the file has:
--student (a conf/student name or a student .yaml), else the first shipped config that fits. The projector of a
distillation checkpoint is not written (a timm model has no place for it; stage=diagnose reads it from the original).
Bad input is one line, `fdlight.convert: error: ...`, exit status 2, and leaves no OUT.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fdlight.artifacts import save_safetensors
from fdlight.config import group_choices
from fdlight.errors import FDLightError, check
from fdlight.models import official
from fdlight.models.exports import export_timm
from fdlight.models.weights import read_state_dict

PROG = "fdlight.convert"


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's usage block is replaced by the one-line error of every other failure
        raise FDLightError(f"{message} (usage: python -m {PROG} IN OUT.safetensors [--student CONFIG] "
                           f"[--teacher CONFIG] [--force])")


def parser() -> Parser:
    p = Parser(prog=PROG, description="Write an official FD checkpoint as fdlight's timm-loadable export.")
    p.add_argument("input", metavar="IN", help="the checkpoint (.pth/.pt/.bin/.safetensors)")
    p.add_argument("output", metavar="OUT.safetensors", help="the export to write")
    p.add_argument("--student", help="student config (conf/student name or .yaml) whose architecture the file has; "
                                     "default: the first shipped config with its shapes")
    p.add_argument("--teacher", help="teacher config the file was distilled from, recorded in the metadata")
    p.add_argument("--force", action="store_true", help="overwrite an existing OUT")
    return p


def check_paths(src: Path, out: Path, force: bool) -> None:
    check(src.is_file(), f"{src} not found; pass an existing checkpoint file as IN")
    check(out.suffix == ".safetensors", f"OUT must be a .safetensors file, not {out.name}")
    check(not out.is_dir(), f"{out} is a directory; pass a file name ending in .safetensors")
    check(out.resolve() != src.resolve(), f"OUT is IN ({src}); write the export to another file")
    check(force or not out.exists(), f"{out} exists; pass --force to overwrite it")


def check_teacher(teacher: str | None) -> None:
    check(teacher is None or teacher in group_choices("teacher"),
          f"--teacher {teacher!r} is not a teacher config; choose one of: {', '.join(group_choices('teacher'))}")


def fdlight_export_metadata(src: Path) -> dict | None:
    """The raw metadata of an fdlight timm export (None for any other file)."""
    if src.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(src), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any decoder failure means the same thing to the user
        raise FDLightError(f"cannot read {src}: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from e
    return meta if "timm_model" in meta else None


def copy_export(src: Path, out: Path, meta: dict) -> str:
    """An fdlight export is already in the target form: rewritten as it is."""
    save_safetensors(read_state_dict(src), out, meta)
    return f"{PROG}: {src} is already an fdlight export ({meta['timm_model']}); wrote it to {out}"


def metadata(converted: official.Converted, src: Path, teacher: str | None) -> dict:
    """What a distillation run's student.safetensors carries (a fine-tuned model's stage and classes instead)."""
    meta = {"layout": converted.layout.name, "source": str(src)}
    if converted.layout.distilled:
        return {**meta, "stage": "distill", "teacher": teacher or converted.teacher or "unknown"}
    meta.update(stage="finetune", num_classes=converted.num_classes)
    return {**meta, "teacher": teacher} if teacher else meta


def convert_file(src: Path, out: Path, student: str | None = None, teacher: str | None = None,
                 force: bool = False) -> str:
    """Write `src` as an fdlight export at `out`; returns the closing line."""
    check_paths(src, out, force)
    check_teacher(teacher)
    meta = fdlight_export_metadata(src)
    if meta is not None:
        return copy_export(src, out, meta)
    raw = read_state_dict(src)
    converted = official.convert(raw, src)
    if converted is None:
        raise official.unknown_layout(src, official.tensors_of(raw))
    candidates = [official.student_config(student)] if student else official.shipped_students()
    match = official.match_or_fail(converted, src, candidates, "pass --student <config or student .yaml> with its "
                                                               "shapes")
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in converted.student.items()}
    export_timm(tensors, out, match.timm_model, match.kwargs, **metadata(converted, src, teacher))
    dropped = ", projector left out" if converted.projector is not None else ""
    return f"{PROG}: wrote {out}: {converted.layout} -> {match.timm_model} (student config {match.student}){dropped}"


def main(argv: list[str] | None = None) -> None:
    try:
        args = parser().parse_args(argv)
        line = convert_file(Path(args.input).expanduser(), Path(args.output).expanduser(), args.student,
                            args.teacher, args.force)
    except FDLightError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(line)


if __name__ == "__main__":
    main()
