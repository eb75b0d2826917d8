"""Type-check the code under the module names it is imported as.

pyproject.toml maps `tinyfleet.server` to server/ (and so on: [tool.setuptools] package-dir), and the
editable install resolves that with an import hook, which mypy does not run. So mypy runs in a tree of
links laid out as the installed package (build/typecheck/tinyfleet/server -> server/), and the files
it reports are named back as they are in the repository.

The tests are checked as pytest imports them: a folder without __init__.py is a top-level path, so
tests/server/harness.py is `server.harness` and tests/client/fake_fleet.py is `fake_fleet`. The tree
has no `server` of its own to shadow that (the repository root does). tests/client has a conftest of
its own, so it is checked in a second run.

Run: `python .ci/typecheck.py [PATH ...]` (default: every package and every test; PATHs, files or
folders of the repository, check those and what they import).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"
TESTS = ROOT / "tests"
#: Test folders pytest puts on sys.path itself (no __init__.py), each a run of its own.
APART = (TESTS / "client",)


def package_dirs() -> dict[str, str]:
    """Installed package name -> folder in the repository, from pyproject.toml."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return dict(config["tool"]["setuptools"]["package-dir"])


def lay_out_tree(dirs: dict[str, str]) -> dict[str, str]:
    """Links every mapped folder at its installed place; returns tree prefix -> repository prefix
    (tinyfleet/server/ -> server/). Links are replaced one by one, atomically, and the tree is never
    removed: another run may be checking inside it."""
    links: dict[Path, Path] = {}
    prefixes = {}
    for name, folder in sorted(dirs.items(), key=lambda item: item[0].count(".")):
        place = TREE / name.replace(".", "/")
        mapped_children = {other.rsplit(".", 1)[1] for other in dirs if other.startswith(name + ".")}
        if mapped_children:
            # A package whose children live elsewhere: a real folder holding links to its own files.
            for entry in (ROOT / folder).iterdir():
                if entry.name not in mapped_children and entry.name != "__pycache__":
                    links[place / entry.name] = entry
        else:
            links[place] = ROOT / folder
        prefixes[f"{place.relative_to(TREE)}/"] = f"{folder}/"
    for link, to in links.items():
        if link.is_symlink() and link.readlink() == to:
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        fresh = link.with_name(f".{link.name}.{os.getpid()}")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(to)
        os.replace(fresh, link)
    for folder, subfolders, files in os.walk(TREE):  # links of files since removed
        for name in subfolders + files:
            path = Path(folder) / name
            if path.is_symlink() and path not in links:
                path.unlink(missing_ok=True)
    return prefixes


def target(path: Path, prefixes: dict[str, str]) -> str:
    """What mypy is given for a repository path: its place in the tree, or (tests) its own path."""
    if path.is_relative_to(TESTS):
        return os.path.relpath(path, TREE)
    relative = path.relative_to(ROOT).as_posix() + ("/" if path.is_dir() else "")
    for tree_prefix, repo_prefix in sorted(prefixes.items(), key=lambda item: -len(item[1])):
        if relative.startswith(repo_prefix):
            return tree_prefix + relative.removeprefix(repo_prefix)
    raise SystemExit(f"{path} is in no package of [tool.setuptools] package-dir, nor in tests/")


def runs(paths: list[Path], prefixes: dict[str, str]) -> list[list[str]]:
    """mypy's targets, one list per run."""
    if not paths:
        tests = [p for p in sorted(TESTS.glob("*")) if p.suffix == ".py" or (p / "__init__.py").is_file()]
        groups = [["tinyfleet", *(target(p, prefixes) for p in tests)]]
        return groups + [[target(folder, prefixes)] for folder in APART]
    apart = [[target(p, prefixes) for p in paths if p.is_relative_to(folder)] for folder in APART]
    rest = [target(p, prefixes) for p in paths if not any(p.is_relative_to(folder) for folder in APART)]
    return [group for group in [rest, *apart] if group]


def main(arguments: list[str]) -> int:
    prefixes = lay_out_tree(package_dirs())
    paths = [Path(argument).resolve() for argument in arguments]
    back = {**prefixes, f"{os.path.relpath(ROOT, TREE)}/": ""}
    pattern = re.compile("^(" + "|".join(re.escape(p) for p in sorted(back, key=len, reverse=True)) + ")")
    code = 0
    for targets in runs(paths, prefixes):
        run = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), *targets],
            cwd=TREE, capture_output=True, text=True, check=False,
        )
        for line in (run.stdout + run.stderr).splitlines():
            print(pattern.sub(lambda match: back[match.group(1)], line))
        code = max(code, run.returncode)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
