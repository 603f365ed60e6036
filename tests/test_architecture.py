"""The architecture's rules, checked on the code: imports run one way with no cycles, nothing
outside a family switches on a family's name, SpeechBrain internals are used only as listed."""

import ast
import inspect
from pathlib import Path

import speechbrain
from fakes import REPO
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from speechtune import families, sb_compat

PACKAGE = REPO / "speechtune"
# the family modules: a family's own code may name it
FAMILY_MODULES = {"ctc", "ctc_decoding", "ctc_export", "lm_tuning", "whisper", "whisper_export",
                  "whisper_models", "encoder_cache", "families"}
# modules that must not import the training stack (preparation runs without it)
DATA_SIDE = {"data", "text", "corpus_checks", "prepare", "prepare.commonvoice", "prepare.coral",
             "prepare.coral_groups", "prepare.custom", "prepare.files", "prepare.librispeech",
             "prepare.synthetic"}
TRAINING_STACK = {"recipe", "brain", "family", "families", "ctc", "whisper", "lm_tuning"}


def module_name(path):
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")


def speechtune_imports(tree, top_level_only):
    """Names of the speechtune modules a module imports (``speechtune.`` dropped)."""
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "speechtune":
                found |= {a.name for a in node.names}
            elif node.module.startswith("speechtune."):
                found.add(node.module.removeprefix("speechtune."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("speechtune.") for a in node.names
                      if a.name.startswith("speechtune.")}
    return found


def import_graph():
    modules = {module_name(p): ast.parse(p.read_text(encoding="utf-8"))
               for p in PACKAGE.rglob("*.py")}
    return {name: speechtune_imports(tree, True) & set(modules)
            for name, tree in modules.items()}, modules


def test_the_package_import_graph_has_no_cycle():
    graph, _ = import_graph()
    done, path = set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name):] + [name])}"
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_no_function_level_imports_of_the_package():
    """An import inside a function hides a dependency (and was how cycles were dodged)."""
    _, modules = import_graph()
    for name, tree in modules.items():
        inner = speechtune_imports(tree, False) - speechtune_imports(tree, True)
        assert not inner, f"speechtune.{name} imports {sorted(inner)} inside a function"


def test_the_data_side_does_not_load_the_training_stack():
    graph, _ = import_graph()

    def reach(name, seen):
        for dep in graph[name]:
            if dep not in seen:
                seen.add(dep)
                reach(dep, seen)
        return seen

    for name in DATA_SIDE:
        assert not reach(name, set()) & TRAINING_STACK, f"speechtune.{name} loads the trainer"


FAMILY_NAMES = set(families.FAMILIES) | {f.__name__ for f in families.FAMILIES.values()}


def family_switches(tree):
    """Comparisons with, membership tests of, and dict keys that are a family's name."""
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                elts = side.elts if isinstance(side, ast.Tuple | ast.List | ast.Set) else [side]
                hits += [e.value for e in elts
                         if isinstance(e, ast.Constant) and e.value in FAMILY_NAMES]
                hits += [e.id for e in elts if isinstance(e, ast.Name) and e.id in FAMILY_NAMES]
        elif isinstance(node, ast.Dict):  # a table by family ({"ctc": ..., "whisper": ...})
            keys = [k.value for k in node.keys
                    if isinstance(k, ast.Constant) and k.value in FAMILY_NAMES]
            hits += keys if len(keys) > 1 else []
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                "isinstance", "issubclass"):
            hits += [a.id for a in node.args[1:] if isinstance(a, ast.Name)
                     and a.id in FAMILY_NAMES]
    return hits


def test_nothing_outside_a_family_switches_on_its_name():
    """Adding a family is one module and one line in speechtune/families.py: the runner, the
    export, the tools and the preparations ask the family, never test which one it is."""
    files = [p for p in PACKAGE.rglob("*.py") if module_name(p) not in FAMILY_MODULES]
    files += [*REPO.glob("tools/*.py"), *REPO.glob("local/*.py"),
              *REPO.glob("recipes/*/*/*.py")]
    for path in files:
        hits = family_switches(ast.parse(path.read_text(encoding="utf-8")))
        assert not hits, f"{path.relative_to(REPO)} switches on family names {hits}"


def test_the_switch_check_sees_a_switch():
    tree = ast.parse('if info["family"] == "ctc": pass\nx = {"ctc": 0, "whisper": 1}\n'
                     'isinstance(f, WhisperFamily)\npresets = {"whisper": 2}')
    assert family_switches(tree) == ["ctc", "ctc", "whisper", "WhisperFamily"]


def test_every_family_implements_the_interface():
    for name, family in families.FAMILIES.items():
        assert family.name == name
        assert not inspect.isabstract(family), f"{family.__name__} leaves abstract methods"
        base = (REPO / "hparams" / f"{name}.yaml").read_text(encoding="utf-8")
        assert f"family: {name} " in base, f"hparams/{name}.yaml does not declare its family"


def test_speechbrain_is_in_the_range_its_internals_were_checked_against():
    """speechtune overrides or reads the SpeechBrain internals sb_compat lists: an upgrade
    outside the checked range must re-check each (then widen SPEECHBRAIN_CHECKED)."""
    assert Version(speechbrain.__version__) in SpecifierSet(sb_compat.SPEECHBRAIN_CHECKED)
    for cls, names in sb_compat.PRIVATE_MEMBERS.items():
        source = inspect.getsource(cls)
        for name in names:
            assert hasattr(cls, name) or name in source, \
                f"{cls.__name__}.{name} is gone from this SpeechBrain"


def test_private_speechbrain_overrides_live_in_sb_compat_only():
    """A private member of sb.Brain overridden anywhere else would escape the version check."""
    private = {n for n in vars(speechbrain.Brain) if n.startswith("_") and not n.startswith("__")}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "sb_compat.py":
            continue
        defined = {n.name for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                   if isinstance(n, ast.FunctionDef)}
        assert not defined & private, f"{path.name} overrides {sorted(defined & private)}"


def test_a_recipe_yaml_sets_only_its_own_choices():
    """Corpus recipes stay short: the shared keys come from the family's base yaml."""
    for path in REPO.glob("recipes/*/*/hparams/*.yaml"):
        lines = [line for line in path.read_text(encoding="utf-8").splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        assert lines[0].startswith("defaults: "), f"{path}: the first key names the defaults"
        assert len(lines) <= 60, f"{path}: {len(lines)} non-comment lines"
        assert Path(path.parent / lines[0].split()[1]).is_file()
