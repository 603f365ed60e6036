"""Every file or folder a README or a docs/ page names exists; every recipe folder has its README
and train.py; every test the bad-input catalogue names exists."""

import re

import pytest
from fakes import REPO

READMES = sorted(p for p in REPO.rglob("README.md")  # not in .venv, .pytest_cache or results
                 if not any(part.startswith(".") or part == "results"
                            for part in p.relative_to(REPO).parts))
DOCS = sorted((REPO / "docs").glob("*.md"))
ROOTS = ("recipes/", "speechtune/", "local/", "tools/", "hparams/", "tests/", ".ci/")
# a run writes these, not the repository
RUN_OUTPUTS = {"hyperparams.yaml", "CKPT.yaml", "lm_weights.yaml"}
PATHLIKE = re.compile(r"^[\w.\-/+]+$")


def named_paths(readme):
    text = readme.read_text(encoding="utf-8")
    names = set(re.findall(r"\]\(([^)#]+)\)", text))  # markdown links
    for code in re.findall(r"`([^`\s]+)`", text):  # `inline code` naming a repository path
        if code in RUN_OUTPUTS or "results/" in code:  # what a run writes, not the repository
            continue
        if PATHLIKE.match(code) and (code.startswith(ROOTS) or code.endswith((".py", ".yaml"))):
            names.add(code)
    return sorted(n for n in names if "://" not in n and "<" not in n)


@pytest.mark.parametrize("readme", READMES + DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_named_path_exists(readme):
    missing = []
    for name in named_paths(readme):
        candidates = [readme.parent / name, REPO / name]
        found = any(c.exists() for c in candidates)
        if not found and "/" not in name:  # a bare file name: somewhere in the repository
            found = any(p for p in REPO.rglob(name)  # not in a run's output or a hidden folder,
                        if not any(part.startswith(".") or part == "results"  # which CI lacks
                                   for part in p.relative_to(REPO).parts))
        if not found:
            missing.append(name)
    assert not missing, f"{readme} names paths that do not exist: {missing}"


def test_every_recipe_has_train_py_readme_and_hparams():
    recipes = [p.parent for p in REPO.glob("recipes/*/*/train.py")]
    assert recipes
    for recipe in recipes:
        assert (recipe / "README.md").exists(), recipe
        assert list((recipe / "hparams").glob("*.yaml")), recipe
        assert len((recipe / "train.py").read_text().splitlines()) <= 250


def test_library_modules_stay_small():
    for path in (REPO / "speechtune").rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, f"{path} grew past 400 lines: split it"


def test_ctc_recipes_whose_yaml_names_tune_lm_have_it():
    """The yamls' LM workflow runs `python tune_lm.py`: the recipe has one, it imports, and it
    prepares the corpus the way the recipe's train.py does."""
    import importlib.util

    for yaml in REPO.glob("recipes/*/CTC/hparams/*.yaml"):
        if "tune_lm.py" not in yaml.read_text(encoding="utf-8"):
            continue
        recipe = yaml.parent.parent
        tune = recipe / "tune_lm.py"
        assert tune.exists(), f"{yaml} names tune_lm.py but {recipe} has none"
        prepare = re.search(r"import (prepare_\w+)", (recipe / "train.py").read_text()).group(1)
        assert f"tune(sys.argv[1:], {prepare})" in tune.read_text(), tune
        spec = importlib.util.spec_from_file_location(f"tune_{recipe.parent.name}", tune)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))  # imports resolve


def test_every_test_the_bad_input_catalogue_names_exists():
    """docs/bad_inputs.md names, for each bad input, the test that checks it: each one exists."""
    catalogue = REPO / "docs" / "bad_inputs.md"
    assert catalogue.is_file(), "docs/bad_inputs.md, the bad-input catalogue, is missing"
    text = catalogue.read_text(encoding="utf-8")
    named = sorted(set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text)))
    assert named, "docs/bad_inputs.md names no test"
    missing = []
    for path, test in named:
        source = REPO / path
        defined = source.is_file() and re.search(
            rf"^def {test}\(", source.read_text(encoding="utf-8"), re.M)
        if not defined:
            missing.append(f"{path}::{test}")
    assert not missing, f"docs/bad_inputs.md names tests that do not exist: {missing}"
