"""Measure each stage's reading path (issue 22's table) in a source tree.

usage: python tests/benchmarks/reading_path.py ROOT [--list STAGE]   (ROOT: a checkout, e.g. . or a git worktree
       of an older commit, to compare before and after a change)

Rules (the same for every tree):
- The path of a stage = the script (all its physical lines) + every project definition (module-level function,
  class, or method of a class in nanorlhf/) reached from the script, transitively.
- Reached: a Name or Attribute in reached code that resolves to a project definition:
    * a name imported from a nanorlhf module (`from nanorlhf.x import f`, `from .x import f`), wherever the import
      stands in that module (function-local imports too);
    * `mod.f` where `mod` is an imported nanorlhf module (`from nanorlhf import model as M`, `from . import dist`);
    * a bare name defined at top level of the same module;
    * a module-level constant (e.g. a dict of parsers) reached this way is followed: the names in its value are
      reached (the constant itself is not counted as a definition);
    * `self.m` inside class C -> method C.m;
    * `x.m` on any other object -> method m of every *reached* project class that defines m (name-based: the
      receiver's type is not inferred);
    * a reached class reaches its dunder methods (__init__, __call__, __iter__, __enter__, __exit__, __str__, ...)
      and its project base classes.
  Nested functions and lambdas are part of the definition that contains them; their references are followed.
  The script's whole module (all its code, not the import lines) is the root.
- Counting: a definition counted "in full" contributes its span (decorators to last line, blank lines inside
  included); a class contributes its header, docstring and non-method body statements (fields); its methods are
  separate definitions. A "plumbing" definition contributes only its signature lines (decorators + def/class line(s))
  and its docstring lines.
- Plumbing = every definition in cli.py, dist.py, kernels.py, log.py, perf.py (the MFU / memory reporting),
  formats.py; in data.py the reading/format-parsing names (same names as formats.py, plus load_examples and the
  *Example classes); in model.py load/save/device/dtype (load_model, load_policy, load_reward_model, save_model,
  resolve, convert_gguf, smollm2_gguf, cache_dir, pick_device, pick_dtype, native_bf16, _quantization,
  one_4bit_path, set_pad_token); in lora.py save/merge (save_adapter, load_adapter, merge, merged_state_dict,
  _compute_dtype); in loop.py the out-folder policy, checkpoint files, RNG state, reporting (check_out,
  checkpoints, write_checkpoint, read_checkpoint, rng_state, set_rng_state, reporter, drop_metrics_after,
  Loop.state_dict/save_checkpoint/_write_checkpoint/_load, Loop.log/log_final/show_samples); every state_dict /
  load_state_dict method; rewards.load_reward_fn. Everything else (flags dataclasses included) is counted in full.
"""
import ast
import os
import sys

PKG = "nanorlhf"
PLUMBING_MODULES = {"cli", "dist", "kernels", "log", "perf", "formats"}
DATA_KEEP = {"render_prompt", "load_prompts", "TokenStats", "TokenStats.__str__", "_fit", "tokenize", "load_data",
             "collate", "SFTRow", "PairRow", "UnpairedRow", "Prompt"}  # data.py: the rest is reading/parsing
PLUMBING_NAMES = {
    "model": {"load_model", "load_policy", "load_reward_model", "save_model", "resolve", "convert_gguf",
              "smollm2_gguf", "cache_dir", "pick_device", "pick_dtype", "native_bf16", "_quantization",
              "one_4bit_path", "set_pad_token"},
    "lora": {"save_adapter", "load_adapter", "merge", "merged_state_dict", "_compute_dtype"},
    "loop": {"check_out", "checkpoints", "write_checkpoint", "read_checkpoint", "rng_state", "set_rng_state",
             "reporter", "drop_metrics_after", "Loop.state_dict", "Loop.save_checkpoint", "Loop._write_checkpoint",
             "Loop._load", "Loop.log", "Loop.log_final", "Loop.show_samples", "load_policy"},
    "rewards": {"load_reward_fn"},
}


def is_plumbing(mod, qual):
    if mod in PLUMBING_MODULES:
        return True
    if qual.split(".")[-1] in ("state_dict", "load_state_dict"):
        return True
    if mod == "data":
        return qual not in DATA_KEEP
    return qual in PLUMBING_NAMES.get(mod, set())


class Module:
    def __init__(self, name, path):
        self.name, self.path = name, path
        self.src = open(path).read()
        self.tree = ast.parse(self.src)
        self.defs = {}      # qual -> node (functions, classes, methods)
        self.consts = {}    # top-level assigned name -> value node
        self.imports = {}   # local name -> ("mod", modname) or ("def", modname, name)
        for node in self.tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.defs[node.name] = node
            elif isinstance(node, ast.ClassDef):
                self.defs[node.name] = node
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        self.defs[f"{node.name}.{sub.name}"] = sub
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Name) and node.value is not None:
                        self.consts[t.id] = node.value
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom):
                base = pkg_module(node, self.name)
                if base is None:
                    continue
                for a in node.names:
                    local = a.asname or a.name
                    if base == PKG:  # from nanorlhf import dist / from . import model as M
                        self.imports[local] = ("mod", a.name)
                    else:
                        self.imports[local] = ("def", base.split(".", 1)[1], a.name)


def pkg_module(node, current):
    """'nanorlhf' or 'nanorlhf.x' for an ImportFrom inside the project, else None."""
    if node.level:
        if node.level != 1:
            return None
        return PKG + ("." + node.module if node.module else "")
    if node.module == PKG or (node.module or "").startswith(PKG + "."):
        return node.module
    return None


def lines_of(node, mod, qual, plumbing):
    """Counted lines of one definition."""
    start = min([d.lineno for d in getattr(node, "decorator_list", [])] + [node.lineno])
    body = node.body
    doc = body[0] if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None),
                                                                            ast.Constant) \
        and isinstance(body[0].value.value, str) else None
    sig = body[0].lineno - start  # decorators + def/class lines up to the first body statement
    doc_lines = (doc.end_lineno - doc.lineno + 1) if doc else 0
    if plumbing:
        return sig + doc_lines
    if isinstance(node, ast.ClassDef):
        rest = sum(s.end_lineno - min([d.lineno for d in getattr(s, "decorator_list", [])] + [s.lineno]) + 1
                   for s in body[1 if doc else 0:] if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)))
        return sig + doc_lines + rest
    return node.end_lineno - start + 1


class Project:
    def __init__(self, root):
        self.root = root
        self.mods = {}
        for f in sorted(os.listdir(os.path.join(root, PKG))):
            if f.endswith(".py") and f != "__init__.py":
                self.mods[f[:-3]] = Module(f[:-3], os.path.join(root, PKG, f))

    def walk_refs(self, node):
        """Names and attributes referenced under node (import statements skipped)."""
        for n in ast.walk(node):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                continue
            yield n

    def measure(self, script):
        smod = Module("__script__", os.path.join(self.root, script))
        script_lines = len(smod.src.splitlines())
        reached = set()       # (mod, qual)
        attr_names = set()    # every x.attr name seen in reached code
        work = [(smod, smod.tree, None)]  # (module it lives in, node, enclosing class name)
        seen_nodes = set()

        def reach(mod, qual):
            if (mod, qual) in reached or qual not in self.mods[mod].defs:
                return
            reached.add((mod, qual))
            m = self.mods[mod]
            node = m.defs[qual]
            cls = qual.split(".")[0] if "." in qual else (qual if isinstance(node, ast.ClassDef) else None)
            if isinstance(node, ast.ClassDef):
                # body statements other than methods (fields, decorators, bases) are part of the class
                parts = [s for s in node.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
                parts += node.bases + node.decorator_list
                for p in parts:
                    if not is_plumbing(mod, qual):
                        work.append((m, p, cls))
                for sub in node.body:
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name.startswith("__") \
                            and sub.name.endswith("__"):
                        reach(mod, f"{qual}.{sub.name}")
                for sub in node.body:  # methods whose names are already used somewhere on the path
                    if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)) and sub.name in attr_names:
                        reach(mod, f"{qual}.{sub.name}")
            else:
                if not is_plumbing(mod, qual):  # a plumbing body is not read, so not followed
                    work.append((m, node, cls))
                if "." in qual:
                    reach(mod, qual.split(".")[0])

        def resolve_name(m, name):
            if m.name != "__script__" and name in m.defs and "." not in name:
                return [(m.name, name)]
            if name in m.imports:
                imp = m.imports[name]
                if imp[0] == "def":
                    return [(imp[1], imp[2])]
            return []

        while work:
            m, node, cls = work.pop()
            if id(node) in seen_nodes:
                continue
            seen_nodes.add(id(node))
            for n in self.walk_refs(node):
                if isinstance(n, ast.Name):
                    for mod, qual in resolve_name(m, n.id):
                        if mod in self.mods:
                            if qual in self.mods[mod].defs:
                                reach(mod, qual)
                            elif qual in self.mods[mod].consts:
                                work.append((self.mods[mod], self.mods[mod].consts[qual], None))
                    if m.name != "__script__" and n.id in m.consts and n.id not in m.defs:
                        work.append((m, m.consts[n.id], None))
                elif isinstance(n, ast.Attribute):
                    v = n.value
                    if isinstance(v, ast.Name) and v.id in m.imports and m.imports[v.id][0] == "mod":
                        target = m.imports[v.id][1]
                        if target in self.mods:
                            tm = self.mods[target]
                            if n.attr in tm.defs:
                                reach(target, n.attr)
                            elif n.attr in tm.consts:
                                work.append((tm, tm.consts[n.attr], None))
                        continue
                    if isinstance(v, ast.Name) and v.id == "self" and cls and m.name != "__script__":
                        if f"{cls}.{n.attr}" in m.defs:
                            reach(m.name, f"{cls}.{n.attr}")
                    if n.attr not in attr_names:
                        attr_names.add(n.attr)
                        for mod, qual in list(reached):
                            node2 = self.mods[mod].defs[qual]
                            if isinstance(node2, ast.ClassDef) and f"{qual}.{n.attr}" in self.mods[mod].defs:
                                reach(mod, f"{qual}.{n.attr}")
        rows = []
        for mod, qual in sorted(reached):
            node = self.mods[mod].defs[qual]
            p = is_plumbing(mod, qual)
            rows.append((mod, qual, p, lines_of(node, mod, qual, p)))
        path = script_lines + sum(r[3] for r in rows)
        return {"script": script, "script_lines": script_lines, "path": path, "defs": len(rows),
                "modules": len({r[0] for r in rows}), "share": script_lines / path, "rows": rows,
                "full_defs": sum(1 for r in rows if not r[2]), "full_lines": sum(r[3] for r in rows if not r[2]),
                "plumb_lines": sum(r[3] for r in rows if r[2])}


STAGES = ["sft", "rm", "dpo", "kto", "ppo", "grpo"]

if __name__ == "__main__":
    root = sys.argv[1]
    proj = Project(root)
    show = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--list" else None
    for st in STAGES:
        r = proj.measure(f"train_{st}.py")
        print(f"{st:5s} script {r['script_lines']:4d}  path {r['path']:5d}  defs {r['defs']:3d} in {r['modules']:2d} "
              f"modules  share {100 * r['share']:4.1f} %   (full: {r['full_defs']} defs {r['full_lines']} lines; "
              f"plumbing: {r['defs'] - r['full_defs']} defs {r['plumb_lines']} lines)")
        if show == st:
            for mod, qual, p, n in r["rows"]:
                print(f"    {mod:10s} {qual:40s} {'P' if p else ' '} {n}")
