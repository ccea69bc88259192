"""Command lines from a dataclass, and one-line errors for bad input.

Every script declares one `@dataclass Args` whose fields carry their help text; `parse` turns it
into argparse (cleanrl's pattern, without tyro) so `--help` documents every flag.
"""
import argparse
import dataclasses
import inspect
import os
import sys
import types
import typing


class UserError(Exception):
    """Bad input from the user: printed as one line, exit code 2, no traceback."""


def arg(default, help, *, choices=None, gt=None, ge=None, alias=None):
    """A dataclass field with its help text, allowed choices, numeric bounds and an optional alias flag."""
    meta = dict(help=help, choices=choices, gt=gt, ge=ge, alias=alias)
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _unwrap(tp):
    """(base type, is_list) for X, X | None, Optional[X] and list[X]."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if typing.get_origin(tp) is list:
        return typing.get_args(tp)[0], True
    return tp, False


def build_parser(cls, description=None):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    # The script's own flags first; those it inherits (RunArgs' plumbing) after, each class's under its docstring.
    owners = [k for k in cls.__mro__ if dataclasses.is_dataclass(k)]
    owner = {f.name: next(k for k in owners if f.name in inspect.get_annotations(k)) for f in dataclasses.fields(cls)}
    groups = {cls: p} | {k: p.add_argument_group(f"{k.__name__} options", " ".join((k.__doc__ or "").split()))
                         for k in owners[1:]}
    for f in sorted(dataclasses.fields(cls), key=lambda f: owners.index(owner[f.name])):
        tp, is_list = _unwrap(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        text = f.metadata.get("help", "").replace("%", "%%")  # argparse %-formats help: "~30% slower" would break
        kw = dict(help=text, default=default, choices=f.metadata.get("choices"))
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif is_list:
            kw.update(type=tp, action="extend", nargs="+", default=None)
            # "%(default).0s" prints nothing; it only stops the formatter appending the None used for parsing
            kw["help"] += f" Repeatable. (default: {default})%(default).0s"
        else:
            kw["type"] = tp
        names = ["--" + f.name.replace("_", "-")] + ([f.metadata["alias"]] if f.metadata.get("alias") else [])
        groups[owner[f.name]].add_argument(*names, dest=f.name, **kw)
    return p


def _dashes(argv):
    """Accept TRL's `--learning_rate` spelling as well as `--learning-rate`."""
    out = []
    for a in argv:
        if a.startswith("--"):
            name, eq, val = a.partition("=")
            a = name.replace("_", "-") + eq + val
        out.append(a)
    return out


def check_bounds(args):
    """Raise UserError for a field outside its declared bounds (e.g. --lr 0)."""
    for f in dataclasses.fields(args):
        v, gt, ge = getattr(args, f.name), f.metadata.get("gt"), f.metadata.get("ge")
        flag = "--" + f.name.replace("_", "-")
        if gt is not None and v is not None and not v > gt:
            raise UserError(f"{flag} must be > {gt}, got {v}")
        if ge is not None and v is not None and not v >= ge:
            raise UserError(f"{flag} must be >= {ge}, got {v}")


def parse(cls, argv=None, description=None):
    """Parse argv (default sys.argv[1:]) into an instance of the dataclass `cls`."""
    ns = build_parser(cls, description).parse_args(_dashes(sys.argv[1:] if argv is None else argv))
    values = {k: v for k, v in vars(ns).items() if v is not None}
    return cls(**values)


def main(train, cls, argv=None):
    """Entry point of every script: parse, validate, train; bad input exits 2 with one line. Under torchrun every
    rank runs this; only rank 0 prints (to stdout, and an error's one line)."""
    from . import dist
    try:
        args = parse(cls, argv, description=sys.modules[train.__module__].__doc__)
        check_bounds(args)
        dist.init(getattr(args, "device", "auto"))
        if not dist.is_main():
            sys.stdout = open(os.devnull, "w")
        return train(args)
    except UserError as e:
        if dist.is_main():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        dist.close()
